"""bench.beds, bench.subscriber and bench.run: the pure parts (no services)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest

from bench import beds, run
from bench.fleet import FleetConfig, _Worker
from bench.subscriber import parse_publishes


def test_percentiles_and_empty() -> None:
    p = beds.percentiles(np.arange(1, 101, dtype=float))
    assert p["p50"] == pytest.approx(50.5) and p["p99"] == pytest.approx(99.01) and p["max"] == 100 and p["n"] == 100
    e = beds.percentiles([])
    assert e["p99"] is None and e["max"] is None and e["n"] == 0


def test_latency_summary_excludes_warmup_and_measures_from_newest_reading() -> None:
    reading = np.array([1000.0, 2000.0, 3000.0, 4000.0])
    commit = reading + np.array([5000.0, 100.0, 200.0, 300.0])  # the first is in the warm-up
    received = reading + 50.0
    s = beds.latency_summary(commit, reading, received, warmup_until_ms=1500.0)
    assert s["measured_envelopes"] == 3 and s["warmup_envelopes"] == 1
    assert s["reading_to_commit_s"]["max"] == pytest.approx(0.3)
    assert s["receipt_to_commit_s"]["max"] == pytest.approx(0.25)
    assert s["cdf_reading_to_commit_s"][-1] == (pytest.approx(0.3), 1.0)


def test_next_beds_grows_then_bisects_then_stops() -> None:
    assert beds.next_beds([(3000, True)]) == 4500
    assert beds.next_beds([(3000, True), (4500, True)]) == 6800
    assert beds.next_beds([(3000, True), (4500, False)]) == 3800
    assert beds.next_beds([(3000, True), (4500, False), (3800, True)]) == 4200
    assert beds.next_beds([(3000, True), (4500, False), (3800, True), (4200, False)]) == 4000
    assert beds.next_beds([(3000, True), (4500, False), (3800, True), (4200, False), (4000, True)]) is None  # 10 %
    assert beds.next_beds([(3000, False)]) == 1500
    assert beds.next_beds([(3000, False), (1500, True)]) == 2200
    assert beds.next_beds([(100, False)]) is None


def test_commit_timeline_bins_by_second() -> None:
    t0 = 1_000_000.0
    tl = beds._commit_timeline(np.array([t0 + 100, t0 + 900, t0 + 1500, t0 + 3100]), t0)
    assert tl == [(0.0, 2), (1.0, 1), (2.0, 0), (3.0, 1)]


def test_icu_envelope_has_10_numerics_and_the_three_waveforms() -> None:
    beds.check_icu_profile()
    cfg = beds.icu_fleet_config("mqtt://127.0.0.1:1", 4)
    w = _Worker(0, cfg, {"patient_monitor": [1, 2, 3, 4]}, {f"pm-{i:06d}": i - 1 for i in range(1, 5)}, [0] * 64)
    samples = []
    for k in range(4):
        msgs = w.window_messages(1_800_000_000_000)
        assert len(msgs) == 4
        for _, topic, payload, enc, n_read, n_samp, bad in msgs:
            assert n_read == 10 and not bad
            samples.append(n_samp)
        if k == 0:
            import msgspec

            _, _, payload, enc, *_ = msgs[0]
            env = msgspec.json.decode(payload) if enc == "json" else msgspec.msgpack.decode(payload)
            assert len(env["numerics"]) == 1 and len(env["numerics"][0]["values"]) == 10
            assert {(b["metric"], b["hz"]) for b in env["waveforms"]} == {("ecg_ii", 250), ("pleth", 125),
                                                                          ("resp", 62.5)}
            # The newest reading is the end of the second the envelope covers.
            assert env["numerics"][0]["t"] == env["sent_at"]
    assert set(samples) == {437, 438}  # 250 + 125 + 62 or 63


def _publish(topic: str, pid: int, payload: bytes, qos: int = 1) -> bytes:
    t = struct.pack("!H", len(topic)) + topic.encode()
    body = t + (struct.pack("!H", pid) if qos else b"") + b"\x00" + payload  # empty MQTT 5 properties
    out = io.BytesIO()
    out.write(bytes([0x30 | (qos << 1)]))
    n = len(body)
    while True:
        b = n & 0x7F
        n >>= 7
        out.write(bytes([b | 0x80 if n else b]))
        if not n:
            break
    return out.getvalue() + body


def test_parse_publishes_counts_whole_packets_and_keeps_the_rest() -> None:
    big = b"x" * 300  # two-byte remaining length
    buf = _publish("devices/a/telemetry", 7, b"abc") + b"\x90\x03\x00\x01\x01" + _publish("devices/b/telemetry", 9, big)
    n, nbytes, pids, used = parse_publishes(buf)
    assert (n, pids, used) == (2, [7, 9], len(buf)) and nbytes == 4 + 301
    part = buf[:-10]
    n, _, pids, used = parse_publishes(part)
    assert n == 1 and pids == [7] and part[used:used + 1] == b"\x32"  # the SUBACK skipped, the cut PUBLISH kept
    n, _, pids, _ = parse_publishes(_publish("t", 0, b"q", qos=0))
    assert n == 1 and pids == []


def test_targets_report_each_figure() -> None:
    results = {
        "stress": {"runs": [{"mode": "live", "zero_loss": True, "ratio_to_raw_copy": 0.81,
                             "window": {"gateway_cpu_us_per_reading": 1.9, "pg_backends_cpu_us_per_reading": 4.0}},
                            {"mode": "backlog", "zero_loss": True, "ratio_to_raw_copy": 0.79,
                             "window": {"gateway_cpu_us_per_reading": 2.1, "pg_backends_cpu_us_per_reading": 4.0}}]},
        "icu": {"config": {"overload_s": 60.0}, "sweep_max_beds": 8500,
                "steps": [{"label": "icu 3000 beds", "beds": 3000, "zero_loss": True,
                           "latency": {"reading_to_commit_s": {"p99": 0.5}},
                           "window": {"gateway_cpu_us_per_envelope": 65.0, "pg_backends_cpu_us_per_envelope": 90.0}},
                          {"label": "icu 8500 beds", "beds": 8500, "zero_loss": True,
                           "latency": {"reading_to_commit_s": {"p99": 0.8}},
                           "window": {"gateway_cpu_us_per_envelope": 75.0, "pg_backends_cpu_us_per_envelope": 90.0}}],
                "overload": {"zero_loss": False, "passed": False, "peak_rss_mib": 300.0, "max_memory_mib": 512,
                             "drain_s": 12.0}},
    }
    met = {x["target"]: x["met"] for x in run.targets(results)}
    assert met["stress live: rate >= 0.8 x raw single-connection COPY"]
    assert not met["stress backlog: rate >= 0.8 x raw single-connection COPY"]
    assert met["stress live: gateway CPU per reading <= 0.5 x the PostgreSQL backends'"]
    assert not met["stress backlog: gateway CPU per reading <= 0.5 x the PostgreSQL backends'"]
    assert met["icu 3000 beds: gateway CPU per ICU envelope <= 70 us and <= the PostgreSQL backends'"]
    assert not met["icu 8500 beds: gateway CPU per ICU envelope <= 70 us and <= the PostgreSQL backends'"]
    assert any(x["met"] and "8500" in x["figure"].replace(",", "") for x in run.targets(results))
    zero = [x for x in run.targets(results) if x["target"].startswith("zero loss")][0]
    assert not zero["met"] and "overload" in zero["figure"]


def test_fleet_config_respect_intervals_default() -> None:
    assert FleetConfig().respect_intervals is True
    assert beds.icu_fleet_config("mqtt://x:1", 1).respect_intervals is False


def test_pregenerate_needs_a_paced_run_with_a_start_and_a_duration() -> None:
    with pytest.raises(ValueError):
        FleetConfig(pregenerate=True, seconds=10.0)
    with pytest.raises(ValueError):
        FleetConfig(pregenerate=True, start_ms=1, seconds=10.0, flat_out=True)
    cfg = beds.icu_fleet_config("mqtt://x:1", 3000, seconds=20.0, pregenerate=True)
    import time

    assert cfg.start_ms is not None and cfg.start_ms / 1000 > time.time() + 2.0
