"""bench.e2e's arithmetic and bench.rawcopy against a real (throwaway) TimescaleDB."""

from __future__ import annotations

import io

import asyncpg
import pytest

from bench import e2e
from bench.rawcopy import _synthesize, clone_hypertable, raw_copy_rate


def _s(t: float, n: float, **cpu: float) -> dict:
    return {"t": t, "ingests": n, "cpu": cpu}


def test_window_spans_first_to_last_commit_and_sums_cpu_per_process() -> None:
    samples = [
        _s(0.0, 0, **{"gw:1": 1.0, "be:5": 0.5, "machine": 10.0}),
        _s(1.0, 0, **{"gw:1": 1.1, "be:5": 0.5, "machine": 11.0}),
        _s(2.0, 100, **{"gw:1": 2.0, "be:5": 1.0, "be:6": 0.2, "machine": 13.0}),
        _s(3.0, 600, **{"gw:1": 3.0, "be:5": 1.5, "be:6": 0.4, "machine": 15.0}),  # be:5 exits after this
        _s(4.0, 1000, **{"gw:1": 4.0, "be:6": 0.9, "machine": 17.0}),
        _s(5.0, 1000, **{"gw:1": 4.1, "be:6": 0.9, "machine": 17.5}),
    ]
    w = e2e._window(samples, 1000)
    assert w["window_s"] == 2.0 and w["envelopes_in_window"] == 900 and w["envelopes_per_s"] == 450
    assert w["gateway_cpu_s"] == pytest.approx(2.0)
    assert w["pg_backends_cpu_s"] == pytest.approx(0.5 + 0.7)  # be:5 keeps its CPU, be:6 counted from 0.2
    assert w["machine_busy_cores"] == pytest.approx(2.0)


def test_window_when_everything_lands_between_two_polls() -> None:
    samples = [_s(0.0, 0, **{"gw:1": 0.0}), _s(0.5, 0, **{"gw:1": 0.1}), _s(1.0, 50, **{"gw:1": 0.4})]
    w = e2e._window(samples, 50)
    assert w["window_s"] == 0.5 and w["envelopes_per_s"] == 100


def test_print_table_and_ok() -> None:
    run = {
        "mode": "live", "database": "bench_live", "zero_loss": True, "gateway_exit_code": 0,
        "published": {"published": 10, "acked": 10, "published_readings": 100, "acked_readings": 100,
                      "rate_envelopes_per_s": 5.0, "publisher_cpu_s": 0.1},
        "committed": {"ingests": 10, "readings": 100, "n_flagged": 1, "alerts": 0},
        "window": {"window_s": 1.0, "readings_per_s": 100.0, "gateway_cpu_s": 0.5, "gateway_cores": 0.5,
                   "gateway_cpu_us_per_reading": 5000.0, "pg_backends_cpu_s": 0.1,
                   "pg_backends_cpu_us_per_reading": 1000.0, "pg_cluster_cpu_s": 0.2, "mosquitto_cpu_s": 0.0,
                   "machine_busy_cores": 1.0},
        "ratio_to_raw_copy": 0.5,
    }
    results = {
        "started_at": "now", "git": "abc", "config": {"fsync": True, "scenario": "s", "readings": 100, "envelopes": 10,
                                                      "devices": 1, "processes": 1, "client": "raw",
                                                      "mqtt_version": "5", "encoding": "json"},
        "machine": {"nproc": 2, "cpu_model": "x", "memory_gib": 1, "loadavg_at_start": ["0"]},
        "runs": [run, {"mode": "backlog", "error": "boom"}],
        "raw_copy": {"rows": 100, "rows_per_copy": 5000, "repeats": 1, "rows_per_s": 200.0, "rows_per_s_runs": [200.0],
                     "backend_cpu_s": 0.1},
    }
    out = io.StringIO()
    e2e.print_table(results, out)
    text = out.getvalue()
    assert "ratio gateway / raw COPY" in text and "0.50" in text and "backlog FAILED: boom" in text
    assert not e2e.ok(results)
    results["runs"] = [run]
    assert e2e.ok(results)


@pytest.mark.integration
@pytest.mark.asyncio
async def test_raw_copy_clones_the_hypertable_and_copies_every_row(db_dsn: str) -> None:
    conn = await asyncpg.connect(db_dsn)
    try:
        await _synthesize(conn, 12_000)
        ddl = await clone_hypertable(conn)
        assert len(ddl) == await conn.fetchval("SELECT count(*) FROM pg_indexes WHERE tablename = 'readings'")
        assert await conn.fetchval(
            "SELECT count(*) FROM timescaledb_information.hypertables WHERE hypertable_name = 'readings_rawcopy'"
        ) == 1
        result = await raw_copy_rate(conn, rows_per_copy=5000, repeats=2)
        assert result["rows"] == 12_000 and result["rows_per_s"] > 0 and len(result["rows_per_s_runs"]) == 2
        assert await conn.fetchval("SELECT to_regclass('readings_rawcopy')") is None  # dropped afterwards
    finally:
        await conn.close()
