"""Retention and legal holds on real TimescaleDB chunks, through the `vitalgate` command line.

Readings are written 30 days in the past across three 1-hour chunks (plus a recent one),
with a horizon of 7 days: the dry run must list exactly the three old chunks and change
nothing; the run must drop exactly them, after moving the rows of a held device and of a
held patient (through ``associations``) to the held tables, where ``readings_all`` still
reads them. Every drop, move, hold and release leaves its audit row; a run that finds
another under way does nothing.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import re
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest

from gateway.cli import main
from gateway.retention import LOCK_KEY
from gateway.sinks.schema import migrate
from tests.integration.support import cli_in_thread
from tests.harness import await_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]
ACTOR = f"cli:{getpass.getuser()}"
HOUR = timedelta(hours=1)
MIN = timedelta(minutes=1)
# the associations table as the device-patient migration specifies it, for databases that lack it
_ASSOCIATIONS = """
CREATE TABLE IF NOT EXISTS associations (
    device_id text NOT NULL, patient_ref text NOT NULL, location text,
    started_at timestamptz NOT NULL, ended_at timestamptz)
"""
DEVICES = ("po-a", "po-b", "po-c", "po-d")


@pytest.fixture
def cli(db_dsn, monkeypatch, capsys):
    """Run `vitalgate ...` in a thread (it runs its own event loop); returns (status, stdout, stderr)."""
    for var in [v for v in os.environ if v.startswith("VITALGATE_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("VITALGATE_DATABASE_URL", db_dsn)
    for table in ("READINGS", "WAVEFORM_BLOCKS", "INGESTS", "REJECTED"):
        monkeypatch.setenv(f"VITALGATE_RETENTION_{table}_DAYS", "7")

    return cli_in_thread(capsys)


async def _seed(dsn: str) -> datetime:
    """Old data in three 1-hour chunks from T0 (30 days ago), recent data a day ago; returns T0.

    Each device has one ingest and one reading every 10 minutes over the three old hours;
    po-a and po-c have a waveform block at T0+40m; rejected rows of po-a and po-c at T0+45m.
    """
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        await conn.execute(_ASSOCIATIONS)
        now = await conn.fetchval("SELECT now()")
        t0 = (now - timedelta(days=30)).replace(minute=0, second=0, microsecond=0)
        recent = now - timedelta(days=1)
        times = [t0 + 10 * i * MIN for i in range(18)] + [recent]
        for device in DEVICES:
            for t in times:
                ingest = await conn.fetchval(
                    "INSERT INTO ingests (received_at, device_id, source, gateway_id, topic_or_path, payload_sha256,"
                    " payload_bytes, encoding, profile, profile_version, n_readings, n_flagged)"
                    " VALUES ($1::timestamptz, $2, 'mqtt', 'gw', 't', sha256(convert_to($2 || $1::timestamptz::text, 'UTF8')),"
                    " 10, 'json', 'p', '1', 1, 0)"
                    " RETURNING id", t, device)
                await conn.execute("INSERT INTO readings VALUES ($1, $2, 'spo2', 97, 0, $3)", t, device, ingest)
                if device in ("po-a", "po-c") and t == t0 + 40 * MIN:
                    await conn.execute("INSERT INTO waveform_blocks VALUES ($1, $2, 'pleth', 125, '{1,2}', 0, $3)",
                                       t, device, ingest)
        for device, t in (("po-a", t0 + 45 * MIN), ("po-c", t0 + 45 * MIN), (None, t0), ("po-c", recent)):
            await conn.execute(
                "INSERT INTO rejected (received_at, source, gateway_id, topic_or_path, device_id, reason, payload_sha256,"
                " payload_bytes, payload) VALUES ($1, 'mqtt', 'gw', 't', $2, 'bad',"
                " sha256(convert_to(coalesce($2, '') || $1::timestamptz::text, 'UTF8')), 1, '\\x00')", t, device)
        # po-b is P1's from T0+2h30m on; po-d was P1's only before the window; po-c is P2's
        await conn.executemany("INSERT INTO associations (device_id, patient_ref, location, started_at, ended_at) VALUES ($1, $2, 'icu-1', $3, $4)", [
            ("po-b", "P1", t0 + 150 * MIN, None), ("po-d", "P1", t0 - HOUR, t0 + 2 * HOUR), ("po-c", "P2", t0, None)])
        return t0
    finally:
        await conn.close()


async def _fetch(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def _chunks(dsn: str, table: str = "readings") -> list[tuple[str, datetime]]:
    rows = await _fetch(dsn, "SELECT chunk_schema || '.' || chunk_name, range_start FROM timescaledb_information.chunks"
                             " WHERE hypertable_name = $1 ORDER BY range_start", table)
    return [(r[0], r[1]) for r in rows]


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


async def test_dry_run_and_run_drop_exactly_the_old_chunks_and_keep_held_rows(db_dsn, cli):
    t0 = await _seed(db_dsn)
    rc, out, err = await cli("hold", "add", "--device", "po-a", "--from", _iso(t0 + 30 * MIN), "--to", _iso(t0 + 90 * MIN),
                             "--reason", "case 17")
    assert rc == 0, err
    hold_a = int(out)
    rc, out, err = await cli("hold", "add", "--patient", "P1", "--from", _iso(t0 + 2 * HOUR), "--to", _iso(t0 + 3 * HOUR),
                             "--reason", "case 18")
    assert rc == 0, err
    hold_p = int(out)
    before = await _chunks(db_dsn)
    old = [name for name, start in before if start < t0 + 3 * HOUR]
    assert len(old) == 3 and len(before) == 4
    old_wave = [name for name, start in await _chunks(db_dsn, "waveform_blocks") if start < t0 + HOUR]
    assert len(old_wave) == 1

    rc, out, err = await cli("retention", "run", "--dry-run")
    assert rc == 0, err
    assert "Dry run: nothing changed." in err
    assert sorted(re.findall(r"would drop chunk (\S+)", out)) == sorted(old + old_wave)
    assert re.findall(r"would move (\d+) rows to readings_held \(hold (\d+)\)", out) == [
        ("3", str(hold_a)), ("3", str(hold_a)), ("3", str(hold_p))]
    assert f"would move 1 rows to waveform_blocks_held (hold {hold_a})" in out
    assert "ingests: horizon" in out and "would delete 63 rows" in out  # 4 x 18 old, 9 kept for the holds
    assert "rejected: horizon" in out and "would delete 2 rows" in out
    assert "audit_log: kept forever" in out
    assert await _chunks(db_dsn) == before
    assert (await _fetch(db_dsn, "SELECT count(*) FROM readings_held"))[0][0] == 0
    assert not await _fetch(db_dsn, "SELECT 1 FROM audit_log WHERE action LIKE 'retention.%'")

    rc, out, err = await cli("retention", "run")
    assert rc == 0, err
    assert sorted(re.findall(r"^  drop chunk (\S+)", out, re.M)) == sorted(old + old_wave)
    assert [name for name, _ in await _chunks(db_dsn)] == [name for name, _ in before if name not in old]
    assert await _chunks(db_dsn, "waveform_blocks") == []

    # the held rows survive, readable through the views, and nothing else of the old hours does
    held = await _fetch(db_dsn, "SELECT device_id, time, hold_id FROM readings_held ORDER BY device_id, time")
    assert [(r[0], r[1] - t0, r[2]) for r in held] == (
        [("po-a", m * MIN, hold_a) for m in (30, 40, 50, 60, 70, 80)] + [("po-b", m * MIN, hold_p) for m in (150, 160, 170)])
    view = await _fetch(db_dsn, "SELECT device_id, time FROM readings_all WHERE time < $1 ORDER BY 1, 2", t0 + 3 * HOUR)
    assert [(r[0], r[1]) for r in view] == [(r[0], r[1]) for r in held]
    assert (await _fetch(db_dsn, "SELECT count(*) FROM readings_all WHERE time > $1", t0 + 3 * HOUR))[0][0] == 4
    wave = await _fetch(db_dsn, "SELECT device_id, h.hold_id, a.samples FROM waveform_blocks_all a"
                                " JOIN waveform_blocks_held h USING (time, device_id, metric, ingest_id)")
    assert [(r[0], r[1], r[2]) for r in wave] == [("po-a", hold_a, [1.0, 2.0])]
    # provenance of held rows is kept; every other old ingest and rejected row is gone
    assert (await _fetch(db_dsn, "SELECT count(*) FROM readings_held r LEFT JOIN ingests i ON i.id = r.ingest_id"
                                 " WHERE i.id IS NULL"))[0][0] == 0
    assert (await _fetch(db_dsn, "SELECT count(*) FROM ingests WHERE received_at < $1", t0 + 3 * HOUR))[0][0] == 9
    rejected = await _fetch(db_dsn, "SELECT device_id FROM rejected WHERE received_at < $1", t0 + 3 * HOUR)
    assert [r[0] for r in rejected] == ["po-a"]

    audit = await _fetch(db_dsn, "SELECT actor, action, target, detail FROM audit_log ORDER BY id")
    actions = [(r["action"], r["target"]) for r in audit]
    assert actions[:2] == [("hold.add", f"hold:{hold_a}"), ("hold.add", f"hold:{hold_p}")]
    assert sorted(t for a, t in actions if a == "retention.drop_chunk") == sorted(old + old_wave)
    assert sorted(t for a, t in actions if a == "retention.move") == sorted([f"hold:{hold_a}"] * 3 + [f"hold:{hold_p}"])
    assert {t for a, t in actions if a == "retention.delete"} == {"ingests", "rejected"}
    assert {r["actor"] for r in audit} == {ACTOR}

    # a second run finds nothing left to do
    rc, out, err = await cli("retention", "run")
    assert rc == 0, err
    assert "readings: horizon" in out and "0 chunks past it" in out and "drop chunk" not in out

    # release: rows no other hold covers are deleted by the next run; a covering hold adopts its rows
    rc, out, err = await cli("hold", "add", "--device", "po-a", "--from", _iso(t0 + 60 * MIN), "--to", _iso(t0 + 70 * MIN),
                             "--reason", "case 19")
    assert rc == 0, err
    hold_c = int(out)
    rc, _, err = await cli("hold", "release", str(hold_a), "--reason", "case 17 closed")
    assert rc == 0, err
    assert "Released hold" in err
    rc, _, err = await cli("hold", "release", str(hold_a), "--reason", "again")
    assert rc == 1 and f"hold {hold_a} was released at" in err
    rc, out, err = await cli("retention", "run")
    assert rc == 0, err
    assert f"readings_held: 1 rows of released holds pass to hold {hold_c}" in out
    assert f"readings_held: delete 5 rows of released hold {hold_a}" in out
    assert f"waveform_blocks_held: delete 1 rows of released hold {hold_a}" in out
    held = await _fetch(db_dsn, "SELECT device_id, time, hold_id FROM readings_held ORDER BY device_id, time")
    assert [(r[0], r[1] - t0, r[2]) for r in held] == (
        [("po-a", 60 * MIN, hold_c)] + [("po-b", m * MIN, hold_p) for m in (150, 160, 170)])
    audit = await _fetch(db_dsn, "SELECT action, target, detail FROM audit_log WHERE id > $1 ORDER BY id",
                         max(r["id"] for r in await _fetch(db_dsn, "SELECT id FROM audit_log WHERE action = 'hold.add'")))
    assert [(r["action"], r["target"]) for r in audit] == [
        ("hold.release", f"hold:{hold_a}"), ("retention.adopt_held", f"hold:{hold_c}"),
        ("retention.purge_held", f"hold:{hold_a}"), ("retention.purge_held", f"hold:{hold_a}"),
        ("retention.delete", "ingests"), ("retention.delete", "rejected")]  # what hold_a alone kept goes too
    assert (await _fetch(db_dsn, "SELECT count(*) FROM ingests WHERE received_at < $1", t0 + 3 * HOUR))[0][0] == 4
    assert not await _fetch(db_dsn, "SELECT 1 FROM rejected WHERE received_at < $1", t0 + 3 * HOUR)

    rc, out, err = await cli("hold", "list", "--all")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "SUBJECT", "FROM", "TO", "HELD_ROWS", "REASON"]
    assert lines[1].split()[:2] == [str(hold_a), "released"] and lines[2].split()[:4] == [str(hold_p), "active", "patient", "P1"]


async def test_a_second_concurrent_run_does_nothing(db_dsn, cli):
    t0 = await _seed(db_dsn)
    before = await _chunks(db_dsn)
    # the first run takes the retention lock, then waits for the holds this connection locks
    blocker = await asyncpg.connect(db_dsn)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE legal_holds IN EXCLUSIVE MODE")
        first = asyncio.ensure_future(cli("retention", "run"))
        await await_for(lambda: blocker.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory'"
            " AND l.objid = $1 AND l.granted AND a.wait_event_type = 'Lock'", LOCK_KEY), message="first run waiting")
        # the second run, meanwhile: it prints only its refusal (stderr, captured with the first run's output)
        assert await asyncio.to_thread(main, ["retention", "run"]) == 1
        assert await _chunks(db_dsn) == before  # the second run dropped nothing
        await tx.rollback()
        rc, out, err = await first
        assert rc == 0, err
        assert "vitalgate retention run: another retention run is under way" in err
        assert len(re.findall(r"^  drop chunk", out, re.M)) == 4
    finally:
        await blocker.close()
    assert len(await _chunks(db_dsn)) == 1
    assert all(start > t0 + 3 * HOUR for _, start in await _chunks(db_dsn))


async def test_a_patient_hold_without_associations_stops_the_run(db_dsn, cli):
    await _seed(db_dsn)
    rc, _, err = await cli("hold", "add", "--patient", "P1", "--from", "2020-01-01", "--reason", "case 20")
    assert rc == 0, err
    before = await _chunks(db_dsn)
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute("DROP TABLE associations CASCADE")
    finally:
        await conn.close()
    for argv in (["retention", "run", "--dry-run"], ["retention", "run"]):
        rc, out, err = await cli(*argv)
        assert rc == 2
        assert "name patients, but the table associations" in err and "nothing was dropped" in err
    assert await _chunks(db_dsn) == before


async def test_audit_log_is_pruned_only_beyond_its_floor(db_dsn, cli, monkeypatch):
    conn = await asyncpg.connect(db_dsn)
    try:
        await migrate(conn)
        await conn.execute("INSERT INTO audit_log (at, actor, action, outcome) VALUES"
                           " (now() - interval '3 days', 't', 'old', 'success'),"
                           " (now() - interval '1 day', 't', 'young', 'success')")
        with pytest.raises(asyncpg.InvalidParameterValueError, match="not older than the floor"):
            await conn.fetchval("SELECT audit_log_prune(now() - interval '1 day', 2, 100, 't')")
    finally:
        await conn.close()
    for key in ("READINGS", "WAVEFORM_BLOCKS", "INGESTS", "REJECTED"):
        monkeypatch.setenv(f"VITALGATE_RETENTION_{key}_DAYS", "1")
    monkeypatch.setenv("VITALGATE_RETENTION_AUDIT_LOG_DAYS", "2")
    monkeypatch.setenv("VITALGATE_RETENTION_AUDIT_FLOOR_DAYS", "2")
    rc, out, err = await cli("retention", "run", "--dry-run")
    assert rc == 0, err
    assert "audit_log: horizon" in out and "would delete 1 rows" in out
    rc, out, err = await cli("retention", "run")
    assert rc == 0, err
    rows = await _fetch(db_dsn, "SELECT action, detail FROM audit_log ORDER BY id")
    assert [r["action"] for r in rows] == ["young", "retention.audit_prune"]
    # the append-only trigger is back in force
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await _fetch(db_dsn, "DELETE FROM audit_log")


async def test_hold_arguments_are_checked(cli):
    for argv, message in (
        (["--device", "bad id", "--from", "2026-01-01"], "--device: 'bad id' is not a device id"),
        (["--device", "po-1", "--from", "2026-01-01T00:00:00"], "--from: '2026-01-01T00:00:00' has no UTC offset"),
        (["--device", "po-1", "--from", "yesterday"], "--from: 'yesterday' is not a time"),
        (["--device", "po-1", "--from", "2026-01-02", "--to", "2026-01-01"], "--to: 2026-01-01 is not after --from"),
    ):
        rc, _, err = await cli("hold", "add", *argv, "--reason", "r")
        assert rc == 2 and message in err, err
    rc, _, err = await cli("hold", "release", "x1", "--reason", "r")
    assert rc == 2 and "HOLD_ID: 'x1' is not a hold id" in err


async def test_the_gateway_runs_retention_on_its_schedule(db_dsn, gateway_factory):
    t0 = await _seed(db_dsn)
    env = {f"VITALGATE_RETENTION_{k}_DAYS": "7" for k in ("READINGS", "WAVEFORM_BLOCKS", "INGESTS", "REJECTED")}
    gw = gateway_factory(db_dsn, env={**env, "VITALGATE_RETENTION_ENABLED": "true"})
    await asyncio.to_thread(gw.start)

    async def old_chunks_gone() -> bool:
        return all(start > t0 + 3 * HOUR for _, start in await _chunks(db_dsn))

    await await_for(old_chunks_gone, timeout=30, message=lambda: f"old chunks still there:\n{gw.log_tail()}")
    assert await asyncio.to_thread(gw.terminate) == 0
    drops = await _fetch(db_dsn, "SELECT actor FROM audit_log WHERE action = 'retention.drop_chunk'")
    assert [r[0] for r in drops] == ["gateway:test-gw"] * 4
    assert "Retention done." in gw.log_text()
