"""Offline replay (PROTOCOL section 4): golden examples, chunking, rejects, CLI wiring."""

from __future__ import annotations

import io
import os
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.cli.replay import run
from gateway.profiles import load_profiles
from gateway.replay import Replay

ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = ROOT / "device_profiles"
EXAMPLES = PROFILES_DIR / "examples"
RECORDINGS = sorted(p for p in EXAMPLES.glob("*.ndjson") if not p.name.endswith(".expected.ndjson"))
T0 = 1_764_187_200_000


def _replay(path: Path | str, default_profile: str | None = None) -> tuple[int, list[dict]]:
    out = io.StringIO()
    code = run(str(path), str(PROFILES_DIR), default_profile, out)
    return code, [orjson.loads(line) for line in out.getvalue().splitlines()]


def _records(lines: list[bytes], chunk: int, default_profile: str | None = None) -> list[dict]:
    replay = Replay(load_profiles(PROFILES_DIR), default_profile)
    return [*replay.feed(lines, chunk=chunk), replay.summary()]


def test_every_example_has_its_expected_output() -> None:
    assert {p.stem for p in RECORDINGS} == {"desaturation", "probe_off", "frozen_sensor", "silent_device"}
    for rec in RECORDINGS:
        assert rec.with_suffix(".expected.ndjson").exists(), rec


@pytest.mark.parametrize("recording", RECORDINGS, ids=lambda p: p.stem)
def test_example_replays_to_its_expected_output(recording: Path) -> None:
    out = io.StringIO()
    assert run(str(recording), str(PROFILES_DIR), None, out) == 0
    expected = recording.with_suffix(".expected.ndjson")
    if os.environ.get("VITALGATE_REGENERATE") == "1":  # after a deliberate change; review the diff
        expected.write_text(out.getvalue())
    assert out.getvalue() == expected.read_text()


def test_desaturation_opens_after_the_delay_and_closes_past_the_clear_level() -> None:
    _, records = _replay(EXAMPLES / "desaturation.ndjson")
    alerts = [(r["event"], r["rule"], r["at"] - T0, r["value"]) for r in records if r["type"] == "alert"]
    # SpO2 < 90 from t=17 s: opens 10 s later; 90-91.5 % while recovering keeps it open (hysteresis).
    assert alerts == [
        ("open", "spo2_low", 27_000, 87.0),
        ("open", "pulse_rate_high", 31_000, 125.0),
        ("close", "pulse_rate_high", 38_000, 114.0),
        ("close", "spo2_low", 47_000, 92.0),
    ]
    assert records[-1]["alerts_open"] == 0


def test_probe_off_artifacts_raise_no_alert() -> None:
    _, records = _replay(EXAMPLES / "probe_off.ndjson")
    assert [r for r in records if r["type"] == "alert"] == []
    flags = records[-1]["flags"]
    assert flags["OUT_OF_RANGE"] == 8 + 8 + 2  # SpO2 127 %, PR 511 /min, two saturated pleth blocks
    assert flags["SPIKE"] > 0


def test_frozen_sensor_is_flagged_flatline_and_the_lost_envelope_gap() -> None:
    _, records = _replay(EXAMPLES / "frozen_sensor.ndjson")
    flags = records[-1]["flags"]
    assert flags["FLATLINE"] == 2 * 30  # from 120 s after the value froze, both metrics
    assert flags["GAP"] == 2


def test_silent_device_opens_at_its_deadline_and_closes_on_its_next_reading() -> None:
    _, records = _replay(EXAMPLES / "silent_device.ndjson")
    alerts = [(r["event"], r["device_id"], r["at"] - T0, r["metric"], r["value"]) for r in records if r["type"] == "alert"]
    assert alerts == [("open", "po-000002", 49_000, None, None), ("close", "po-000002", 90_000, None, None)]


def test_output_keys_follow_the_protocol_order() -> None:
    _, records = _replay(EXAMPLES / "desaturation.ndjson")
    assert list(records[0]) == ["type", "event", "device_id", "rule", "priority", "metric", "at", "value"]
    assert list(records[-1]) == ["type", "envelopes", "readings", "waveform_samples", "rejected", "flags", "alerts_open"]
    assert list(records[-1]["flags"]) == [
        "OUT_OF_RANGE", "SPIKE", "FLATLINE", "GAP", "CLOCK_FUTURE", "CLOCK_STALE", "OUT_OF_ORDER", "NOT_FINITE",
    ]


def _all_lines() -> list[bytes]:
    """All examples interleaved line by line: several devices, silences, artifacts."""
    files = [p.read_bytes().splitlines(keepends=True) for p in RECORDINGS]
    out = []
    for i in range(max(map(len, files))):
        out += [f[i] for f in files if i < len(f)]
    return out


@settings(max_examples=25, deadline=None)
@given(chunk=st.integers(1, 40))
def test_chunking_does_not_change_the_output(chunk: int) -> None:
    lines = _all_lines()
    assert _records(lines, chunk) == _records(lines, 1)


def test_rejected_lines_are_reported_in_place_and_counted() -> None:
    good = (EXAMPLES / "desaturation.ndjson").read_bytes().splitlines(keepends=True)
    lines = [good[0], b'{"v": 1, "device_id": "po-1", "numerics": [{"t": 1, "values": {"spo2": "x"}}]}\n', b"\n", b"not json\n", *good[1:]]
    records = _records(lines, 512)
    rejected = [r for r in records if r["type"] == "rejected"]
    assert [r["line"] for r in rejected] == [2, 4]
    assert rejected[0]["reason"].startswith("numerics[0].values.spo2")
    assert records[-1]["rejected"] == 2 and records[-1]["envelopes"] == len(good)
    alerts_alone = [r for r in _records(good, 512) if r["type"] == "alert"]
    assert [r for r in records if r["type"] == "alert"] == alerts_alone


def test_envelope_without_profile_needs_default_profile() -> None:
    line = b'{"v": 1, "device_id": "po-9", "numerics": [{"t": 1764187200000, "values": {"spo2": 97}}]}\n'
    no_default = _records([line], 512)
    assert no_default[0] == {"type": "rejected", "line": 1, "reason": "profile: required, the device has no registered profile"}
    with_default = _records([line], 512, default_profile="pulse_oximeter")
    assert with_default[-1]["envelopes"] == 1 and with_default[-1]["rejected"] == 0


def test_received_at_drives_the_clock_checks() -> None:
    t = T0
    late = orjson.dumps({"v": 1, "device_id": "po-9", "profile": "pulse_oximeter",
                         "numerics": [{"t": t, "values": {"spo2": 97}}], "received_at": t + 2 * 86_400_000})
    early = orjson.dumps({"v": 1, "device_id": "po-8", "profile": "pulse_oximeter",
                          "numerics": [{"t": t, "values": {"spo2": 97}}], "received_at": t - 120_000})
    flags = _records([late, early], 512)[-1]["flags"]
    assert flags["CLOCK_STALE"] == 1 and flags["CLOCK_FUTURE"] == 1
    bad = orjson.dumps({"v": 1, "device_id": "po-9", "profile": "pulse_oximeter",
                        "numerics": [{"t": t, "values": {"spo2": 97}}], "received_at": "soon"})
    assert _records([bad], 512)[0]["reason"] == "received_at: expected integer epoch milliseconds"


def test_run_reports_bad_profiles_and_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.toml").write_text('[profile]\nname = "bad"\nversion = "1"\n')
    assert run(str(EXAMPLES / "desaturation.ndjson"), str(tmp_path), None, io.StringIO()) == 2
    assert "bad.toml" in capsys.readouterr().err
    assert run(str(tmp_path / "missing.ndjson"), str(PROFILES_DIR), None, io.StringIO()) == 2
    assert "missing.ndjson" in capsys.readouterr().err


def test_cli_replay_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    assert main(["replay", "--profiles", str(PROFILES_DIR), str(EXAMPLES / "silent_device.ndjson")]) == 0
    out = capsys.readouterr().out
    assert out == (EXAMPLES / "silent_device.expected.ndjson").read_text()


def test_a_repeated_envelope_is_evaluated_once_as_live_stores_it_once() -> None:
    """Redeliveries (identical lines, next to each other and far apart) add no alert, no flag
    and no count: the output equals that of the recording without them, whatever the chunking."""
    lines = [line.rstrip(b"\n") for line in _all_lines()]
    repeated = [*lines[:5], lines[3], *lines[5:40], lines[2], lines[2], *lines[40:], lines[10], lines[-1]]
    once = _records(lines, 512)
    for chunk in (1, 7, 512):
        assert _records(repeated, chunk) == once
    # the same line with and without its line ending is the same payload
    assert _records([*lines[:3], lines[1] + b"\r\n"], 512) == _records(lines[:3], 512)


def test_envelopes_that_differ_in_a_byte_are_both_evaluated() -> None:
    line = orjson.dumps({"v": 1, "device_id": "po-9", "profile": "pulse_oximeter", "seq": 1,
                         "numerics": [{"t": T0, "values": {"spo2": 97}}]})
    assert _records([line, line.replace(b'"seq":1', b'"seq":2')], 512)[-1]["envelopes"] == 2
    assert _records([line, line], 512)[-1]["envelopes"] == 1
