"""End-to-end bench: publishers -> mosquitto -> ``vitalgate run`` -> TimescaleDB, on throwaway services.

Scenario (fixed, so figures compare across runs): pulse oximeters (one per 3 envelopes), each envelope carrying
5 ``numerics`` entries of ``spo2`` + ``pulse_rate`` one second apart (a device batching
5 s), i.e. **10 numeric readings per envelope**, no waveforms, realistic signals with
artifacts (so some readings are flagged and alerts open). JSON and MessagePack mixed
(alternating per device), MQTT 5, QoS 1, published flat out by separate publisher
processes with the raw-socket publisher (``bench.common.RawLink``: ~5 us of CPU per
message instead of paho's ~75-100 us, CPU the gateway needs on a 2-core machine).

Two modes, each against a fresh database and a new gateway session:

- ``live``: the gateway is running and subscribed; publishers go flat out while it ingests.
- ``backlog``: the gateway subscribes (persistent session), is stopped with SIGTERM, the
  whole load is published into the broker's queue, then the gateway is started again and
  drains it. This isolates the gateway from the publishers' CPU and also checks that its
  session survives a restart.

Committed rate = readings committed between the first and the last poll of
``SELECT count(*) FROM ingests`` (every 50 ms) that saw new rows, over that time. CPU is
read from /proc for the gateway process, the PostgreSQL backends of its connections, the
whole PostgreSQL cluster, mosquitto and the publishers, over the same window.

Then the **raw binary COPY** of the identical rows (read back from ``readings``) into a
fresh identical hypertable, one connection, 5,000 rows per COPY (median of 3), and the
ratio gateway / raw COPY (target >= 0.6). Last, the identical load to a bare subscriber that only
counts (``bench.subscriber``): the broker's limit, and the ratio gateway / bare subscriber.

Run ``python -m bench.e2e --help``; ``bench/README.md`` explains the output.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import cpu_snapshot, forget_mqtt_session, git_revision, machine_info, mosquitto_version, package_versions
from bench.fleet import Fleet, FleetConfig
from bench.rawcopy import raw_copy_rate, read_rows
from tests.harness import (
    PROFILES, REPO, GatewayProcess, Mosquitto, PostgresCluster, children, machine_busy_seconds, parent, rss_mib,
)

__all__ = ["E2EConfig", "run", "main", "print_table"]

READINGS_PER_ENVELOPE = 10
RESULTS_DIR = REPO / "bench" / "results"


@dataclass
class E2EConfig:
    readings: int = 300_000
    devices: int | None = None  # default: one device per 3 envelopes (15 s of signal each)
    processes: int = 2
    client: str = "raw"
    mqtt_version: str = "5"
    encoding: str = "mixed"
    modes: list[str] = field(default_factory=lambda: ["live", "backlog"])
    fsync: bool = True
    rows_per_copy: int = 5000
    raw_repeats: int = 3
    poll_s: float = 0.05
    timeout_s: float = 300.0
    gateway_env: dict[str, str] = field(default_factory=dict)  # extra VITALGATE_* settings
    profile_gateway: bool = False  # run the gateway under cProfile; top functions go into the results
    bare_subscriber: bool = True  # the broker's limit: the same load to a subscriber that only counts
    keep: bool = False

    @property
    def envelopes(self) -> int:
        return self.readings // READINGS_PER_ENVELOPE

    @property
    def n_devices(self) -> int:
        return self.devices if self.devices is not None else max(1, self.envelopes // 3)


class _Sampler:
    """Polls the ingest count and per-process CPU counters.

    Each sample: ``t`` (monotonic), ``ingests`` and ``cpu``: CPU seconds per process key
    (``gw:PID``, ``be:PID`` for the gateway's PostgreSQL backends, ``pg:PID`` for every
    cluster process, ``mq``). Processes come and go (a restarted gateway has new backends);
    ``_window`` sums per-process differences, so a process that exits keeps its CPU.
    """

    def __init__(self, conn: asyncpg.Connection, gw: GatewayProcess, my_pid: int, mq_pid: int | None,
                 poll_s: float) -> None:
        self.conn = conn
        self.gw = gw
        self.my_pid = my_pid
        self.mq_pid = mq_pid
        self.poll_s = poll_s
        self.backends: set[int] = set()
        self.pg_pids: set[int] = set(_cluster_pids(my_pid))
        self.samples: list[dict[str, Any]] = []

    async def _refresh_pids(self) -> None:
        rows = await self.conn.fetch(
            """SELECT pid FROM pg_stat_activity
               WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"""
        )
        self.backends |= {r[0] for r in rows}
        self.pg_pids |= set(_cluster_pids(self.my_pid))

    async def sample(self) -> dict[str, Any]:
        n = await self.conn.fetchval("SELECT count(*) FROM ingests")
        if not self.backends or len(self.samples) % 10 == 0:
            await self._refresh_pids()
        cpu = cpu_snapshot(self.gw.pid if self.gw.alive() else None, self.backends, self.pg_pids, self.mq_pid)
        cpu["machine"] = machine_busy_seconds()
        s = {"t": time.monotonic(), "ingests": float(n), "cpu": cpu}
        self.samples.append(s)
        return s

    async def run_until(self, target: int, deadline: float, label: str = "") -> dict[str, float]:
        """Poll until ``target`` ingests are committed; return the sample that saw it.

        Prints a progress line about once a second (committed envelopes, rate since the last line).
        """
        last: dict[str, Any] | None = None
        while True:
            s = await self.sample()
            if last is None or s["t"] - last["t"] >= 1.0 or s["ingests"] >= target:
                if last is not None and s["t"] > last["t"]:
                    rate = (s["ingests"] - last["ingests"]) / (s["t"] - last["t"])
                    print(f"  {label:>14} committed {int(s['ingests']):9,} of {target:,} envelopes, "
                          f"{rate:8,.0f} env/s = {rate * READINGS_PER_ENVELOPE:9,.0f} readings/s", file=sys.stderr,
                          flush=True)
                last = s
            if s["ingests"] >= target:
                return s
            if not self.gw.alive():
                raise RuntimeError(f"gateway exited with code {self.gw.proc.returncode}:\n{self.gw.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {int(s['ingests']):,} of {target:,} envelopes committed before the deadline:\n{self.gw.log_tail()}"
                )
            await asyncio.sleep(self.poll_s)


def _cluster_pids(backend_pid: int) -> list[int]:
    """The postmaster and its children (found from one backend's parent)."""
    pm = parent(backend_pid)
    return [] if pm is None else [pm, *children(pm)]


def _cpu_delta(samples: list[dict[str, Any]], i: int, j: int, prefix: str) -> float:
    """CPU seconds used between samples i and j by the processes whose key starts with ``prefix``."""
    keys = {k for s in samples[i : j + 1] for k in s["cpu"] if k.startswith(prefix)}
    total = 0.0
    for k in keys:
        start = samples[i]["cpu"].get(k, 0.0)  # a process born in the window counts from 0
        end = max(s["cpu"].get(k, 0.0) for s in samples[i : j + 1])  # one that died keeps its last value
        total += max(0.0, end - start)
    return total


def _window(samples: list[dict[str, Any]], total: int) -> dict[str, Any]:
    """Rates and CPU from the first sample that saw new rows to the first that saw them all.

    If everything landed between two polls, the window starts at the poll before.
    """
    base = samples[0]["ingests"]
    i = next((k for k, s in enumerate(samples) if s["ingests"] > base), None)
    j = next((k for k, s in enumerate(samples) if s["ingests"] >= total), len(samples) - 1)
    if i is None or i >= j:
        i = max(0, (j if i is None else i) - 1)
    first, last = samples[i], samples[j]
    dt = last["t"] - first["t"]
    committed = last["ingests"] - first["ingests"]
    return {
        "window_s": dt,
        "envelopes_in_window": committed,
        "envelopes_per_s": committed / dt if dt > 0 else float("nan"),
        "t_first": first["t"],
        "t_last": last["t"],
        "samples": j - i + 1,
        "gateway_cpu_s": _cpu_delta(samples, i, j, "gw:"),
        "pg_backends_cpu_s": _cpu_delta(samples, i, j, "be:"),
        "pg_cluster_cpu_s": _cpu_delta(samples, i, j, "pg:"),
        "mosquitto_cpu_s": _cpu_delta(samples, i, j, "mq"),
        "machine_busy_cores": _cpu_delta(samples, i, j, "machine") / dt if dt > 0 else float("nan"),
    }


async def _run_mode(mode: str, cfg: E2EConfig, pg: Any, mq: Any, work: Path) -> dict[str, Any]:
    db = f"bench_{mode}"
    dsn = pg.create_database(db)
    client_id = f"vitalgate-bench-{mode}-{uuid.uuid4().hex[:8]}"
    gw = GatewayProcess(
        work / f"gateway-{mode}.log", database_url=dsn, mqtt_url=mq.url, client_id=client_id, gateway_id="bench",
        profiles_dir=PROFILES, env={"VITALGATE_LOG_LEVEL": "INFO", **cfg.gateway_env},
        python_args=["-m", "cProfile", "-o", str(work / f"gateway-{mode}.prof")] if cfg.profile_gateway else (),
    )
    fcfg = _stress_fleet_config(cfg, mq.url, f"bench-{mode}")
    result: dict[str, Any] = {"mode": mode, "database": db, "gateway_client_id": client_id}
    gw.spawn()
    conn: asyncpg.Connection | None = None
    try:
        result["gateway_ready_s"] = gw.wait_ready(120)
        conn = await asyncpg.connect(dsn)
        sampler = _Sampler(conn, gw, await conn.fetchval("SELECT pg_backend_pid()"), mq.pid, cfg.poll_s)
        fleet = Fleet(fcfg)
        deadline = time.monotonic() + cfg.timeout_s
        if mode == "backlog":
            code = gw.terminate(60)
            result["gateway_restart_exit_code"] = code
            if code != 0:
                raise RuntimeError(f"gateway exited with code {code} on SIGTERM:\n{gw.log_tail()}")
            await asyncio.to_thread(fleet.start)
            t_pub = time.monotonic()
            if not await asyncio.to_thread(fleet.join, cfg.timeout_s):
                raise TimeoutError("publishers did not finish")
            await sampler.sample()
            gw.spawn()  # ready or not: the sampler waits for the backlog to be committed
            await sampler.run_until(cfg.envelopes, deadline, f"stress {mode}")
        else:
            await sampler.sample()
            polling = asyncio.create_task(sampler.run_until(cfg.envelopes, deadline, f"stress {mode}"))
            await asyncio.to_thread(fleet.start)
            t_pub = time.monotonic()
            if not await asyncio.to_thread(fleet.join, cfg.timeout_s):
                raise TimeoutError("publishers did not finish")
            await polling
        stats = fleet.stats()
        result["published"] = stats.as_dict()
        if stats.acked != stats.published or stats.ack_failures or stats.published != cfg.envelopes:
            raise RuntimeError(
                f"broker acknowledged {stats.acked:,} of {stats.published:,} envelopes ({cfg.envelopes:,} planned)"
            )
        win = _window(sampler.samples, stats.acked)
        t_first = sampler.samples[0]["t"]
        result["poll_samples"] = [{"t": x["t"] - t_first, "ingests": x["ingests"]} for x in sampler.samples[::5]]
        # Final counts, straight from the tables.
        counts = await conn.fetchrow(
            """SELECT (SELECT count(*) FROM ingests) AS ingests,
                      (SELECT coalesce(sum(n_readings), 0) FROM ingests) AS n_readings,
                      (SELECT coalesce(sum(n_flagged), 0) FROM ingests) AS n_flagged,
                      (SELECT count(*) FROM readings) AS readings,
                      (SELECT count(*) FROM rejected) AS rejected,
                      (SELECT count(*) FROM alerts) AS alerts"""
        )
        committed = dict(counts)
        result["committed"] = committed
        per_env = stats.acked_readings / stats.acked if stats.acked else 0
        win["readings_per_s"] = win["envelopes_per_s"] * per_env
        if mode == "live":
            win["end_to_end_s"] = win["t_last"] - t_pub
            win["end_to_end_readings_per_s"] = stats.acked_readings / win["end_to_end_s"]
        win["gateway_cores"] = win["gateway_cpu_s"] / win["window_s"] if win["window_s"] > 0 else float("nan")
        readings_in_window = win["envelopes_in_window"] * per_env
        win["gateway_cpu_us_per_reading"] = 1e6 * win["gateway_cpu_s"] / readings_in_window if readings_in_window else None
        win["pg_backends_cpu_us_per_reading"] = (
            1e6 * win["pg_backends_cpu_s"] / readings_in_window if readings_in_window else None
        )
        result["window"] = win
        result["zero_loss"] = (
            committed["ingests"] == stats.published and committed["readings"] == stats.published_readings
        )
        result["gateway_metrics"] = {
            k: gw.metric(k, default=None) for k in ("gateway_readings_written_total", "gateway_batches_written_total",
                                      "gateway_seq_gaps_total", "gateway_write_errors_total")
        }
        result["gateway_peak_rss_mib"] = rss_mib(gw.pid, "VmHWM")
        result["gateway_exit_code"] = gw.terminate(120)
        if result["gateway_exit_code"] != 0:
            raise RuntimeError(f"gateway exited with code {result['gateway_exit_code']}:\n{gw.log_tail()}")
        if cfg.profile_gateway:
            result["gateway_profile"] = _profile_top(work / f"gateway-{mode}.prof")
        return result
    except BaseException:
        result["gateway_log_tail"] = gw.log_tail(60) if gw.log_path.exists() else ""
        raise
    finally:
        gw.kill()
        if conn is not None:
            await conn.close()
        # The stopped gateway's persistent session would queue every later run's messages.
        try:
            forget_mqtt_session(mq.url, client_id)
        except OSError:
            pass


def _stress_fleet_config(cfg: E2EConfig, url: str, prefix: str) -> FleetConfig:
    return FleetConfig(
        url=url, profiles_dir=str(PROFILES), devices=cfg.n_devices, mix={"pulse_oximeter": 1.0},
        processes=cfg.processes, interval_s=5.0, flat_out=True, envelopes=cfg.envelopes, encoding=cfg.encoding,
        mqtt_version=cfg.mqtt_version, client=cfg.client, numerics_per_envelope=5, metrics=["spo2", "pulse_rate"],
        waveforms=False, artifacts=True, seed=7, client_id_prefix=prefix,
    )


async def _bare_subscriber_run(cfg: E2EConfig, mq: Any) -> dict[str, Any]:
    """The identical stress load, flat out, to the bare subscriber alone (bench.subscriber)."""
    from bench.subscriber import bare_run

    r = await bare_run(mq.url, _stress_fleet_config(cfg, mq.url, "bench-bare"), cfg.timeout_s)
    return {**r, "readings_per_s": r["envelopes_per_s"] * READINGS_PER_ENVELOPE}


def _profile_top(path: Path, n: int = 40) -> str:
    """The gateway's cProfile output (whole process life, both restarts in backlog mode), by own time."""
    import io
    import pstats

    if not path.exists():
        return "(no profile written)"
    out = io.StringIO()
    pstats.Stats(str(path), stream=out).sort_stats("tottime").print_stats(n)
    return out.getvalue()


async def _versions(dsn: str) -> dict[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        pg = await conn.fetchval("SHOW server_version")
        ts = await conn.fetchval("SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'")
        settings = {r[0]: r[1] for r in await conn.fetch(
            "SELECT name, setting FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes', "
            "'shared_buffers', 'max_wal_size', 'wal_level')")}
    finally:
        await conn.close()
    return {"postgresql": pg, "timescaledb": ts or "-", "postgresql_settings": settings}  # type: ignore[dict-item]


def make_services(fsync: bool = True) -> tuple[Any, Any, Path]:
    """A throwaway PostgreSQL+TimescaleDB and mosquitto (not started) in a new temporary directory."""
    work = Path(tempfile.mkdtemp(prefix="vitalgate-bench-"))
    # Commit timestamps give the ICU runs' commit latency (bench.beds); the cost is one SLRU entry per commit.
    pg = PostgresCluster(work / "pg", settings={"fsync": fsync, "full_page_writes": fsync,
                                                "track_commit_timestamp": True})
    # Saving the broker's queue every second would rewrite a whole backlog each time.
    mq = Mosquitto(work / "mqtt", autosave_interval=3600)
    return pg, mq, work


async def run(cfg: E2EConfig, services: tuple[Any, Any, Path] | None = None) -> dict[str, Any]:
    """Run the modes, the raw COPY and the bare subscriber, return the results (see module doc).

    With ``services`` (running, from ``make_services``) they are used and left running;
    otherwise they are started here and removed at the end.
    """
    started = datetime.now(timezone.utc)
    info = machine_info()
    own = services is None
    pg, mq, work = services if services is not None else make_services(cfg.fsync)
    results: dict[str, Any] = {
        "bench": "e2e",
        "started_at": started.isoformat(timespec="seconds"),
        "git": git_revision(),
        "machine": info,
        "config": {
            **{k: v for k, v in asdict(cfg).items() if k != "keep"},
            "envelopes": cfg.envelopes,
            "devices": cfg.n_devices,
            "readings_per_envelope": READINGS_PER_ENVELOPE,
            "scenario": "pulse_oximeter, 5 numerics entries x (spo2, pulse_rate) per envelope, no waveforms, "
                        "artifacts on, flat out",
        },
        "runs": [],
    }
    try:
        t0 = time.monotonic()
        if own:
            pg.start()
            mq.start()
        results["services_start_s"] = time.monotonic() - t0
        versions = await _versions(pg.dsn("postgres"))
        versions["mosquitto"] = mosquitto_version()
        versions["python_packages"] = package_versions()  # type: ignore[assignment]
        results["versions"] = versions
        raw_source: str | None = None
        for mode in cfg.modes:
            print(f"e2e: {mode} run, {cfg.readings:,} readings in {cfg.envelopes:,} envelopes ...", file=sys.stderr)
            try:
                r = await _run_mode(mode, cfg, pg, mq, work)
            except Exception as exc:  # noqa: BLE001 - reported in the results, and as a failure
                results["runs"].append({"mode": mode, "error": f"{type(exc).__name__}: {exc}"})
                print(f"e2e: {mode} run failed: {exc}", file=sys.stderr)
                continue
            results["runs"].append(r)
            raw_source = raw_source or r["database"]
        if raw_source is not None:
            print(f"e2e: raw binary COPY of the same rows ({cfg.raw_repeats} runs) ...", file=sys.stderr)
            conn = await asyncpg.connect(pg.dsn(raw_source))
            try:
                rows = await read_rows(conn)
                raw = await raw_copy_rate(conn, rows_per_copy=cfg.rows_per_copy, repeats=cfg.raw_repeats, rows=rows)
            finally:
                await conn.close()
            raw["source_database"] = raw_source
            results["raw_copy"] = raw
            for r in results["runs"]:
                if "window" in r:
                    r["ratio_to_raw_copy"] = r["window"]["readings_per_s"] / raw["rows_per_s"]
        if cfg.bare_subscriber:
            print(f"e2e: bare subscriber, the same {cfg.envelopes:,} envelopes ...", file=sys.stderr)
            try:
                bare = await _bare_subscriber_run(cfg, mq)
            except Exception as exc:  # noqa: BLE001 - reported in the results
                bare = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"e2e: bare subscriber failed: {exc}", file=sys.stderr)
            results["bare_subscriber"] = bare
            for r in results["runs"]:
                if "window" in r and bare.get("envelopes_per_s"):
                    r["ratio_to_bare_subscriber"] = r["window"]["envelopes_per_s"] / bare["envelopes_per_s"]
        results["duration_s"] = time.monotonic() - t0
        info["loadavg_at_end"] = open("/proc/loadavg").read().split()[:3]
    finally:
        if own:
            stop_services(pg, mq, work, cfg.keep)
    return results


def stop_services(pg: Any, mq: Any, work: Path, keep: bool = False) -> None:
    for svc in (mq, pg):
        try:
            svc.stop() if keep else svc.cleanup()
        except Exception as exc:  # noqa: BLE001
            print(f"bench: stopping {svc!r}: {exc}", file=sys.stderr)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"bench: kept {work}", file=sys.stderr)


def write_results(results: dict[str, Any], directory: Path = RESULTS_DIR) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = directory / f"{stamp}-e2e.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path


def _f(v: Any, fmt: str = ",.0f") -> str:
    if v is None:
        return "-"
    try:
        return format(v, fmt)
    except (TypeError, ValueError):
        return str(v)


def print_table(results: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout  # looked up now: the suite replaces sys.stdout to keep a log
    m = results["machine"]
    v = results.get("versions", {})
    print(f"\nvitalgate end-to-end bench ({results['started_at']}, git {results['git']})", file=out)
    print(f"machine: {m['nproc']} x {m['cpu_model']}, {m['memory_gib']} GiB, load {' '.join(m['loadavg_at_start'])} "
          f"-> {' '.join(m.get('loadavg_at_end', []))}", file=out)
    print(f"PostgreSQL {v.get('postgresql', '?')}, TimescaleDB {v.get('timescaledb', '?')}, mosquitto "
          f"{v.get('mosquitto', '?')}; fsync {'on' if results['config']['fsync'] else 'off'}", file=out)
    print(f"scenario: {results['config']['scenario']}; {results['config']['readings']:,} readings "
          f"= {results['config']['envelopes']:,} envelopes, {results['config']['devices']:,} devices, "
          f"{results['config']['processes']} publisher processes ({results['config']['client']}, MQTT "
          f"{results['config']['mqtt_version']}, {results['config']['encoding']})", file=out)
    raw = results.get("raw_copy")
    rows = [("", *[r["mode"] for r in results["runs"]])]

    def row(label: str, fn: Any) -> None:
        cells = []
        for r in results["runs"]:
            try:
                cells.append(fn(r) if "error" not in r else "FAILED")
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("-")
        rows.append((label, *cells))

    row("published envelopes (broker-acked)", lambda r: f"{r['published']['published']:,} ({r['published']['acked']:,})")
    row("published readings (broker-acked)",
        lambda r: f"{r['published']['published_readings']:,} ({r['published']['acked_readings']:,})")
    row("publish rate, envelopes/s", lambda r: _f(r["published"]["rate_envelopes_per_s"]))
    row("committed envelopes (ingests)", lambda r: f"{r['committed']['ingests']:,}")
    row("committed readings (rows)", lambda r: f"{r['committed']['readings']:,}")
    row("zero loss", lambda r: "yes" if r["zero_loss"] else "NO")
    row("commit window, s", lambda r: _f(r["window"]["window_s"], ".2f"))
    row("committed readings/s", lambda r: _f(r["window"]["readings_per_s"]))
    row("end-to-end readings/s (from publish start)", lambda r: _f(r["window"].get("end_to_end_readings_per_s")))
    row("gateway CPU s (cores)", lambda r: f"{r['window']['gateway_cpu_s']:.2f} ({r['window']['gateway_cores']:.2f})")
    row("gateway CPU us/reading", lambda r: _f(r["window"]["gateway_cpu_us_per_reading"], ".1f"))
    row("PG backends CPU s (us/reading)",
        lambda r: f"{r['window']['pg_backends_cpu_s']:.2f} ({r['window']['pg_backends_cpu_us_per_reading']:.1f})")
    row("PG cluster CPU s", lambda r: f"{r['window']['pg_cluster_cpu_s']:.2f}")
    row("mosquitto CPU s", lambda r: f"{r['window']['mosquitto_cpu_s']:.2f}")
    row("publishers CPU s", lambda r: f"{r['published']['publisher_cpu_s']:.2f}")
    row(f"machine busy, cores of {results['machine']['nproc']}", lambda r: f"{r['window']['machine_busy_cores']:.2f}")
    row("flagged readings / alerts", lambda r: f"{r['committed']['n_flagged']:,} / {r['committed']['alerts']:,}")
    row("gateway peak RSS, MiB", lambda r: _f(r["gateway_peak_rss_mib"]))
    row("gateway exit code", lambda r: str(r["gateway_exit_code"]))
    if raw:
        row("raw COPY rows/s (same rows)", lambda r: _f(raw["rows_per_s"]))
        row("ratio gateway / raw COPY (target >= 0.6)", lambda r: f"{r['ratio_to_raw_copy']:.2f}")
    bare = results.get("bare_subscriber")
    if bare and bare.get("envelopes_per_s"):
        row("bare subscriber msgs/s (same messages)", lambda r: _f(bare["envelopes_per_s"]))
        row("ratio gateway / bare subscriber", lambda r: f"{r['ratio_to_bare_subscriber']:.2f}")
    row("CPU/reading gateway <= PG backends",
        lambda r: "yes" if r["window"]["gateway_cpu_us_per_reading"] <= r["window"]["pg_backends_cpu_us_per_reading"]
        else "NO")
    widths = [max(len(str(x[i])) for x in rows) for i in range(len(rows[0]))]
    print("", file=out)
    for x in rows:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(x, widths))),
              file=out)
    if raw:
        print(f"\nraw COPY: {raw['rows']:,} rows, {raw['rows_per_copy']:,} rows per COPY, 1 connection, median of "
              f"{raw['repeats']} ({', '.join(_f(x) for x in raw['rows_per_s_runs'])} rows/s), backend CPU "
              f"{raw['backend_cpu_s']:.2f} s", file=out)
    for r in results["runs"]:
        if "error" in r:
            print(f"\n{r['mode']} FAILED: {r['error']}", file=out)
        if "gateway_profile" in r:
            print(f"\n{r['mode']}: gateway cProfile, by own time (whole process)\n{r['gateway_profile']}", file=out)


def ok(results: dict[str, Any]) -> bool:
    """Every run completed, lost nothing and the gateway exited 0."""
    return bool(results["runs"]) and all(
        "error" not in r and r.get("zero_loss") and r.get("gateway_exit_code") == 0 for r in results["runs"]
    )


def _args(argv: list[str] | None) -> E2EConfig:
    ap = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__.split("\n\n")[0])
    ap.add_argument("--readings", type=int, default=300_000, help="total readings (10 per envelope)")
    ap.add_argument("--devices", type=int, default=None,
                    help="simulated devices (default: envelopes / 3, i.e. 15 s of signal per device)")
    ap.add_argument("--processes", type=int, default=2, help="publisher processes")
    ap.add_argument("--client", choices=("raw", "paho"), default="raw")
    ap.add_argument("--mqtt", choices=("5", "3.1.1"), default="5")
    ap.add_argument("--encoding", choices=("json", "msgpack", "mixed"), default="mixed")
    ap.add_argument("--modes", default="live,backlog", help="comma-separated: live, backlog")
    ap.add_argument("--fsync", choices=("on", "off"), default="on", help="PostgreSQL fsync (default on)")
    ap.add_argument("--rows-per-copy", type=int, default=5000)
    ap.add_argument("--raw-repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds allowed for each ingest")
    ap.add_argument("--gateway-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra gateway setting, e.g. VITALGATE_BATCH_MAX_ROWS=20000 (repeatable)")
    ap.add_argument("--profile-gateway", action="store_true",
                    help="run the gateway under cProfile and put its top functions into the results")
    ap.add_argument("--keep", action="store_true", help="keep the services' directory (logs) afterwards")
    a = ap.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if not modes or any(m not in ("live", "backlog") for m in modes):
        ap.error("--modes takes live and/or backlog")
    env = dict(kv.split("=", 1) for kv in a.gateway_env)
    return E2EConfig(
        readings=a.readings, devices=a.devices, processes=a.processes, client=a.client, mqtt_version=a.mqtt,
        encoding=a.encoding, modes=modes, fsync=a.fsync == "on", rows_per_copy=a.rows_per_copy,
        raw_repeats=a.raw_repeats, timeout_s=a.timeout, gateway_env=env, keep=a.keep,
        profile_gateway=a.profile_gateway,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = _args(argv)
    results = asyncio.run(run(cfg))
    path = write_results(results)
    print_table(results)
    print(f"\nresults: {os.path.relpath(path, Path.cwd())}")
    return 0 if ok(results) else 1


if __name__ == "__main__":
    sys.exit(main())
