"""Retention's pure parts: the plan (which chunks are past their horizon), its configuration, its report."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from gateway.cli.holds import parse_time
from gateway.cli.common import Invalid
from gateway.cli.retention import format_report
from gateway.config import RetentionConfig, load
from gateway.errors import ConfigError
from gateway.retention import Chunk, Report, plan

NOW = datetime(2026, 12, 6, 12, 30, tzinfo=timezone.utc)
H = timedelta(hours=1)


def chunk(table: str, start: datetime, n: int = 0) -> Chunk:
    return Chunk(table, "_timescaledb_internal", f"_hyper_{table[0]}_{n}_chunk", start, start + H)


def test_a_chunk_is_dropped_only_once_its_whole_range_is_past_the_horizon():
    cfg = RetentionConfig(readings_days=1, waveform_blocks_days=0.5)
    horizon = NOW - timedelta(days=1)  # 2026-12-05 12:30
    ends_before = chunk("readings", horizon - 2 * H, 1)
    ends_at = chunk("readings", horizon.replace(minute=0) - H + timedelta(minutes=30), 2)  # ends exactly at the horizon
    straddles = chunk("readings", horizon.replace(minute=0), 3)  # 12:00-13:00 holds the horizon
    younger = chunk("readings", NOW - H, 4)
    wave_old = chunk("waveform_blocks", NOW - 13 * H, 5)
    wave_young = chunk("waveform_blocks", NOW - 12 * H, 6)
    p = plan(NOW, cfg, [younger, wave_young, straddles, ends_at, wave_old, ends_before])
    assert ends_at.end == horizon
    assert p.chunks == (ends_before, ends_at, wave_old)  # by table, oldest first
    assert p.horizons["readings"] == horizon and p.horizons["waveform_blocks"] == NOW - 12 * H
    assert p.horizons["ingests"] == NOW - timedelta(days=90)
    assert p.audit_cutoff is None


def test_zero_days_keeps_a_table_forever():
    cfg = RetentionConfig(readings_days=0, waveform_blocks_days=0, ingests_days=0, rejected_days=0)
    p = plan(NOW, cfg, [chunk("readings", NOW - 1000 * 24 * H), chunk("waveform_blocks", NOW - 1000 * 24 * H)])
    assert p.chunks == ()
    assert set(p.horizons.values()) == {None}


def test_the_audit_log_is_cut_at_its_horizon_never_within_its_floor():
    assert plan(NOW, RetentionConfig(), []).audit_cutoff is None  # kept forever by default
    cfg = RetentionConfig(audit_log_days=3000, audit_floor_days=2190)
    assert plan(NOW, cfg, []).audit_cutoff == NOW - timedelta(days=3000)


@pytest.mark.parametrize(("environ", "message"), [
    ({"VITALGATE_RETENTION_AUDIT_LOG_DAYS": "100"}, "audit_log_days (100) is below audit_floor_days (2190)"),
    ({"VITALGATE_RETENTION_AUDIT_LOG_DAYS": "30", "VITALGATE_RETENTION_AUDIT_FLOOR_DAYS": "30"},
     "audit_log_days (30) must not be shorter than readings_days: the audit log is kept longest"),
    ({"VITALGATE_RETENTION_AUDIT_LOG_DAYS": "3000", "VITALGATE_RETENTION_REJECTED_DAYS": "0"},
     "audit_log_days (3000) must not be shorter than rejected_days"),
    ({"VITALGATE_RETENTION_INGESTS_DAYS": "10"}, "ingests_days (10) must not be shorter than readings_days"),
    ({"VITALGATE_RETENTION_READINGS_DAYS": "0"}, "ingests_days (90) must not be shorter than readings_days"),
    ({"VITALGATE_RETENTION_AUDIT_FLOOR_DAYS": "0.5"}, "retention.audit_floor_days): Expected `float` >= 1"),
    ({"VITALGATE_RETENTION_READINGS_DAYS": "-1"}, "retention.readings_days): Expected `float` >= 0"),
])
def test_horizons_that_would_lose_provenance_or_audit_are_refused(environ, message):
    with pytest.raises(ConfigError) as info:
        load(None, environ=environ)
    assert message in str(info.value)


def test_defaults_keep_everything_until_enabled():
    cfg = load(None, environ={}).retention
    assert not cfg.enabled and cfg.audit_log_days == 0 and cfg.ingests_days >= cfg.readings_days


def test_the_report_names_each_chunk_its_range_and_the_rows_moved_per_hold():
    cfg = RetentionConfig(readings_days=1, waveform_blocks_days=0, ingests_days=0)
    old = chunk("readings", datetime(2026, 12, 1, 10, tzinfo=timezone.utc), 7)
    report = Report(plan=plan(NOW, cfg, [old]), dry_run=True, moved={old.qualified: {4: 12, 2: 3}},
                    deleted={"rejected": 0}, held_purged={"readings_held": {1: 5}})
    assert format_report(report) == [
        "readings: horizon 2026-12-05T12:30:00+00:00, 1 chunks past it",
        "  would drop chunk _timescaledb_internal._hyper_r_7_chunk [2026-12-01T10:00:00+00:00, 2026-12-01T11:00:00+00:00)",
        "    would move 3 rows to readings_held (hold 2)",
        "    would move 12 rows to readings_held (hold 4)",
        "  readings_held: would delete 5 rows of released hold 1",
        "waveform_blocks: kept forever",
        "ingests: kept forever",
        "rejected: horizon 2026-11-06T12:30:00+00:00, would delete 0 rows (held rows kept)",
        "audit_log: kept forever",
    ]


def test_hold_times_carry_their_offset():
    assert parse_time("2026-11-01", "--from") == datetime(2026, 11, 1, tzinfo=timezone.utc)
    assert parse_time("2026-11-01T08:00:00Z", "--from") == datetime(2026, 11, 1, 8, tzinfo=timezone.utc)
    assert parse_time("2026-11-01T09:00:00+01:00", "--to") == datetime(2026, 11, 1, 8, tzinfo=timezone.utc)
    with pytest.raises(Invalid, match="--to: '2026-11-01T08:00' has no UTC offset"):
        parse_time("2026-11-01T08:00", "--to")
