"""ICU beds: the standard workload at a fixed count, the bed sweep, and 2x overload.

**The ICU bed** (``icu_fleet_config``): one ``patient_monitor`` per bed, one envelope per
second carrying one ``numerics`` entry with all 10 numeric metrics of the profile (heart
rate, respiration rate, SpO2, pulse rate, perfusion index, NIBP systolic/diastolic/mean,
temperature, EtCO2: every metric in every envelope, whatever its profile interval) and
three waveform blocks covering that second: ECG lead II at 250 Hz, pleth at 125 Hz,
respiration at 62.5 Hz (62 and 63 samples alternating): 13 rows and 437.5 samples per
envelope. Paced: each bed sends when its second of signal ends, at its own offset within
the second, with wall-clock reading times; the publishers record how late they sent
(``max_send_lag_ms``, ``late_sends``) and the harness prints their send rate beside the
target.

**Commit latency** of an envelope = the commit time of the transaction that stored it
minus the time of its newest reading (the numerics entry, stamped at the end of the
second the envelope covers: the earliest moment the device could have sent it). The
commit time is PostgreSQL's own (``track_commit_timestamp = on`` in the bench's cluster,
``pg_xact_commit_timestamp(xmin)`` of the envelope's ``ingests`` row): exact to the
microsecond, no polling, nothing changed in the gateway. Every envelope of a run is
measured except those whose readings fall in the first ``warmup_s`` seconds. The same
query gives receipt-to-commit (``ingests.received_at``), the gateway's own share.

A run passes when nothing is lost (envelopes, readings and waveform samples committed =
published, counted in the database) and the p99 commit latency is under ``p99_limit_s``.
The **sweep** starts from the fixed-count run, grows the bed count by 1.5x until a step
fails, then bisects to within 10 % (``next_beds``); each step is ``step_s`` seconds.

**Overload** runs ``overload_factor`` x the sweep's largest passing count for
``overload_s`` seconds against a fresh gateway (``max_memory_mib`` set explicitly), then
waits for the broker's backlog to drain: peak resident memory (sampled ``VmRSS`` and the
kernel's ``VmHWM``), drain time (from the last publish to the last commit), zero loss.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np

from bench.common import cpu_snapshot, forget_mqtt_session
from bench.fleet import Fleet, FleetConfig
from tests.harness import PROFILES, GatewayProcess, cpu_seconds, machine_busy_seconds, rss_mib

__all__ = [
    "BedsConfig", "icu_fleet_config", "percentiles", "next_beds", "LoadRun", "run_beds", "latency_summary",
]

PROFILE = "patient_monitor"
ICU_NUMERICS = 10
ICU_WAVES = {"ecg_ii": 250.0, "pleth": 125.0, "resp": 62.5}


@dataclass
class BedsConfig:
    fixed_beds: int = 3000
    fixed_s: float = 30.0
    step_s: float = 20.0
    warmup_s: float = 3.0
    sweep_steps: int = 5  # after the fixed-count run
    sweep_grow: float = 1.5
    sweep_resolution: float = 0.1
    p99_limit_s: float = 1.0
    overload_factor: float = 2.0
    overload_s: float = 60.0
    max_memory_mib: int = 512
    processes: int = 2
    poll_s: float = 0.5
    drain_timeout_s: float = 240.0
    broker_limit_envelopes: int = 30_000  # ICU envelopes published flat out to the bare subscriber
    raw_copy_envelopes: int = 20_000  # ICU envelopes whose rows are COPYed raw
    gateway_env: dict[str, str] = field(default_factory=dict)
    sweep: bool = True
    overload: bool = True
    profile_gateway: bool = False  # the fixed-count/sweep gateway under cProfile; top 40 into the results
    pregenerate: bool = True  # fixed count and sweep: payloads generated before the start (overload: live)
    waveform_format: str = "numbers"  # samples as numbers (PROTOCOL 1) or compact binary (1.1): f32le, i16le


# Pregenerating payloads: CPU seconds per envelope per publisher process (measured ~70 us; margin for a busy machine).
PREGEN_S_PER_ENVELOPE = 150e-6


def icu_fleet_config(url: str, beds: int, *, seconds: float | None = None, processes: int = 2, seed: int = 11,
                     prefix: str = "icu", flat_out: bool = False, envelopes: int | None = None,
                     pregenerate: bool = False, waveform_format: str = "numbers") -> FleetConfig:
    """The ICU bed workload (module doc) for ``beds`` beds.

    With ``pregenerate`` (paced, ``seconds`` given) every payload is generated before the
    start, which is set far enough ahead for that (``start_ms``): while the run goes, the
    publishers only send.
    """
    start_ms = None
    if pregenerate:
        assert seconds is not None
        lead = 2.0 + beds * seconds / max(1, processes) * PREGEN_S_PER_ENVELOPE
        start_ms = int((time.time() + lead) * 1000)
    return FleetConfig(
        url=url, profiles_dir=str(PROFILES), devices=beds, mix={PROFILE: 1.0}, processes=processes,
        interval_s=1.0, flat_out=flat_out, seconds=seconds, envelopes=envelopes, encoding="mixed", mqtt_version="5",
        client="raw", numerics_per_envelope=1, metrics=None, waveforms=True, artifacts=True, respect_intervals=False,
        seed=seed, client_id_prefix=prefix, pregenerate=pregenerate, start_ms=start_ms,
        waveform_format=waveform_format,
    )


def check_icu_profile() -> None:
    """The shipped profile still has the ICU bed's 10 numerics and 3 waveforms."""
    from gateway.profiles import load_profiles

    prof = load_profiles(str(PROFILES))[PROFILE]
    numeric = [m for m, s in prof.metrics.items() if s.kind == "numeric"]
    waves = {m: float(s.hz) for m, s in prof.metrics.items() if s.kind == "waveform"}  # type: ignore[arg-type]
    if len(numeric) != ICU_NUMERICS or waves != ICU_WAVES:
        raise RuntimeError(f"{PROFILE} profile no longer matches the ICU bed: numerics {numeric}, waveforms {waves}")


# --------------------------------------------------------------------------------------
# Pure helpers (tested in tests/bench/test_beds.py)


def percentiles(values: np.ndarray | list[float], ps: tuple[float, ...] = (50, 95, 99)) -> dict[str, float | None]:
    """``{"p50": .., "p95": .., "p99": .., "max": .., "n": ..}`` (linear interpolation); Nones when empty."""
    a = np.asarray(values, dtype=np.float64)
    out: dict[str, float | None] = {"n": float(a.size)}
    for p in ps:
        out[f"p{p:g}"] = float(np.percentile(a, p)) if a.size else None
    out["max"] = float(a.max()) if a.size else None
    return out


def cdf_points(values: np.ndarray, n: int = 200) -> list[tuple[float, float]]:
    """(value, fraction <= value) at ``n`` quantiles plus the max, for plotting."""
    a = np.sort(np.asarray(values, dtype=np.float64))
    if not a.size:
        return []
    qs = np.linspace(0, 1, n)
    idx = np.minimum((qs * (a.size - 1)).round().astype(int), a.size - 1)
    return [(float(a[i]), float((i + 1) / a.size)) for i in idx]


def latency_summary(commit_ms: np.ndarray, reading_ms: np.ndarray, received_ms: np.ndarray,
                    warmup_until_ms: float) -> dict[str, Any]:
    """Commit latency (s) from the newest reading and from receipt, envelopes after the warm-up only."""
    keep = reading_ms >= warmup_until_ms
    lat = (commit_ms[keep] - reading_ms[keep]) / 1000.0
    gw = (commit_ms[keep] - received_ms[keep]) / 1000.0
    return {"reading_to_commit_s": percentiles(lat), "receipt_to_commit_s": percentiles(gw),
            "measured_envelopes": int(keep.sum()), "warmup_envelopes": int((~keep).sum()),
            "cdf_reading_to_commit_s": cdf_points(lat)}


def _round_beds(x: float) -> int:
    return max(100, int(round(x / 100.0)) * 100)


def next_beds(history: list[tuple[int, bool]], *, grow: float = 1.5, resolution: float = 0.1,
              max_beds: int = 100_000) -> int | None:
    """The next bed count to try, or None when the sweep is done.

    ``history`` is (beds, passed) of the steps so far (the first one is the start). Grow by
    ``grow`` while every step passes; halve while every step fails; otherwise bisect between
    the largest pass and the smallest fail above it until they are within ``resolution``.
    """
    if not history:
        raise ValueError("the sweep needs a first step")
    passes = [b for b, ok in history if ok]
    tried = {b for b, _ in history}
    if not passes:
        nxt = _round_beds(min(b for b, _ in history) / 2)
        return None if nxt in tried or nxt < 100 else nxt
    lo = max(passes)
    fails_above = [b for b, ok in history if not ok and b > lo]
    if not fails_above:
        nxt = min(max_beds, _round_beds(lo * grow))
        return None if nxt in tried else nxt
    hi = min(fails_above)
    if hi - lo <= max(100, resolution * lo):
        return None
    nxt = _round_beds((lo + hi) / 2)
    return None if nxt in tried or not lo < nxt < hi else nxt


# --------------------------------------------------------------------------------------
# One paced load against a running gateway


def _cluster_pids(backend_pid: int) -> list[int]:
    from bench.e2e import _cluster_pids as f

    return f(backend_pid)


class LoadRun:
    """Publish one paced (or flat-out) load to a running gateway, sample, wait for the drain, measure."""

    def __init__(self, label: str, gw: GatewayProcess, conn: asyncpg.Connection, mq: Any, fcfg: FleetConfig,
                 cfg: BedsConfig, out: Any = sys.stderr) -> None:
        self.label, self.gw, self.conn, self.mq, self.fcfg, self.cfg, self.out = label, gw, conn, mq, fcfg, cfg, out
        self.samples: list[dict[str, Any]] = []
        self.backends: set[int] = set()
        self.pg_pids: set[int] = set()

    async def _sample(self, id0: int, fleet: Fleet, t0: float) -> dict[str, Any]:
        n = await self.conn.fetchval("SELECT count(*) FROM ingests WHERE id > $1", id0)
        if not self.backends or len(self.samples) % 10 == 0:
            rows = await self.conn.fetch(
                """SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()
                   AND backend_type = 'client backend'""")
            self.backends |= {r[0] for r in rows}
            self.pg_pids |= set(_cluster_pids(await self.conn.fetchval("SELECT pg_backend_pid()")))
        cpu = cpu_snapshot(self.gw.pid if self.gw.alive() else None, self.backends, self.pg_pids, self.mq.pid)
        cpu["machine"] = machine_busy_seconds()
        st = fleet.stats()
        s = {"t": time.time() - t0, "ingests": float(n), "acked": st.acked, "published": st.published,
             "rss_mib": rss_mib(self.gw.pid) if self.gw.alive() else None, "cpu": cpu,
             "publisher_cpu_s": st.publisher_cpu_s}
        self.samples.append(s)
        return s

    def _progress(self, s: dict[str, Any], prev: dict[str, Any] | None, target: float, per_env: tuple[float, float]
                  ) -> None:
        dt = s["t"] - prev["t"] if prev else 0.0
        sent = (s["acked"] - prev["acked"]) / dt if prev and dt > 0 else 0.0
        com = (s["ingests"] - prev["ingests"]) / dt if prev and dt > 0 else 0.0
        gw_key = f"gw:{self.gw.pid}"
        cores = ((s["cpu"].get(gw_key, 0) - prev["cpu"].get(gw_key, 0)) / dt) if prev and dt > 0 else 0.0
        rss = s["rss_mib"]
        print(f"  {self.label:>18} t={s['t']:5.0f}s sent {sent:7,.0f}/s (target {target:,.0f}) committed {com:7,.0f} env/s"
              f" {com * per_env[0]:8,.0f} readings/s {com * per_env[1] / 1e6:5.2f} M samples/s in flight "
              f"{s['acked'] - s['ingests']:7,.0f} gw {cores:4.2f} cores RSS {rss or 0:4.0f} MiB",
              file=self.out, flush=True)

    async def run(self) -> dict[str, Any]:
        cfg, fcfg = self.cfg, self.fcfg
        id0 = int(await self.conn.fetchval("SELECT coalesce(max(id), 0) FROM ingests"))
        fleet = Fleet(fcfg)
        # Times are seconds from the publishers' planned start (pregenerated) or from now.
        t0 = fcfg.start_ms / 1000 if fcfg.start_ms else time.time()
        await asyncio.to_thread(fleet.start)
        # The publishers' epoch start: window 0 begins here.
        t_start = fcfg.start_ms / 1000 if fcfg.start_ms else fleet._t0.value
        target = fcfg.devices / fcfg.interval_s if not fcfg.flat_out else float("nan")
        per_env = (ICU_NUMERICS, 437.5)
        result: dict[str, Any] = {"label": self.label, "beds": fcfg.devices, "target_envelopes_per_s": target,
                                  "seconds": fcfg.seconds, "first_ingest_id": id0 + 1}
        prev: dict[str, Any] | None = None
        last_print = 0.0
        t_pub_end: float | None = None
        deadline_pub = time.monotonic() + max(0.0, t_start - time.time()) + (fcfg.seconds or 0) + 60
        try:
            while True:
                s = await self._sample(id0, fleet, t0)
                if s["t"] - last_print >= 0.99:
                    self._progress(s, prev, target, per_env)
                    prev, last_print = s, s["t"]
                if not self.gw.alive():
                    raise RuntimeError(f"gateway exited with code {self.gw.proc.returncode}:\n{self.gw.log_tail()}")
                fleet.check()
                if t_pub_end is None and fleet.done():
                    fleet.join(1)
                    t_pub_end = time.time()
                    st = fleet.stats()
                    result["backlog_at_publish_end"] = st.acked - int(s["ingests"])
                    deadline = time.monotonic() + cfg.drain_timeout_s
                if t_pub_end is None and time.monotonic() > deadline_pub:
                    fleet.stop()
                if t_pub_end is not None:
                    st = fleet.stats()
                    if s["ingests"] >= st.acked:
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{self.label}: {int(s['ingests']):,} of {st.acked:,} envelopes committed "
                                           f"{cfg.drain_timeout_s:.0f} s after publishing ended")
                await asyncio.sleep(cfg.poll_s)
        finally:
            fleet.kill()
        t_commit_end = time.time()
        st = fleet.stats()
        s = self.samples[-1]
        self._progress(s, prev, target, per_env)
        result["published"] = st.as_dict()
        result["send_rate_envelopes_per_s"] = st.published / max(1e-9, fcfg.seconds or st.elapsed_s)
        result["send_rate_ratio_to_target"] = (result["send_rate_envelopes_per_s"] / target
                                               if target == target else None)
        result["drain_s"] = t_commit_end - t_pub_end if t_pub_end else None
        result["publish_s"] = st.elapsed_s
        counts = await self.conn.fetchrow(
            """SELECT (SELECT count(*) FROM ingests WHERE id > $1) AS ingests,
                      (SELECT count(*) FROM readings WHERE time >= $2 AND ingest_id > $1) AS readings,
                      (SELECT count(*) FROM waveform_blocks WHERE time >= $2 AND ingest_id > $1) AS blocks,
                      (SELECT coalesce(sum(cardinality(samples)), 0) FROM waveform_blocks
                        WHERE time >= $2 AND ingest_id > $1) AS samples,
                      (SELECT coalesce(sum(n_flagged), 0) FROM ingests WHERE id > $1) AS n_flagged,
                      (SELECT count(*) FROM rejected WHERE received_at >= $3) AS rejected""",
            id0, datetime.fromtimestamp(t_start - 60, timezone.utc), datetime.fromtimestamp(t0 - 1, timezone.utc))
        committed = {k: int(v) for k, v in dict(counts).items()}
        result["committed"] = committed
        result["zero_loss"] = (
            st.acked == st.published and st.ack_failures == 0 and st.no_subscribers == 0
            and committed["ingests"] == st.published and committed["readings"] == st.published_readings
            and committed["samples"] == st.published_samples and committed["rejected"] == 0
        )
        lat = await self.conn.fetch(
            """SELECT (extract(epoch FROM pg_xact_commit_timestamp(i.xmin)) * 1000)::float8,
                      (extract(epoch FROM i.received_at) * 1000)::float8,
                      (extract(epoch FROM r.t) * 1000)::float8
               FROM ingests i JOIN (SELECT ingest_id, max(time) AS t FROM readings
                                    WHERE time >= $2 AND ingest_id > $1 GROUP BY ingest_id) r ON r.ingest_id = i.id
               WHERE i.id > $1""",
            id0, datetime.fromtimestamp(t_start - 60, timezone.utc))
        arr = np.array([tuple(r) for r in lat], dtype=np.float64).reshape(-1, 3)
        if arr.size and np.isnan(arr[:, 0]).any():
            raise RuntimeError("no commit timestamps: the cluster needs track_commit_timestamp = on")
        result["latency"] = latency_summary(arr[:, 0], arr[:, 2], arr[:, 1], (t_start + cfg.warmup_s) * 1000)
        result["commit_timeline"] = _commit_timeline(arr[:, 0], t0 * 1000)
        # Rates over the steady part: from the warm-up's end to the end of publishing.
        result["window"] = _steady_window(self.samples, cfg.warmup_s + (t_start - t0),
                                          (t_pub_end or t_commit_end) - t0, st)
        result["samples"] = [{k: v for k, v in x.items() if k != "cpu"} for x in self.samples]
        result["peak_rss_sampled_mib"] = max((x["rss_mib"] or 0) for x in self.samples)
        return result


def _commit_timeline(commit_ms: np.ndarray, t0_ms: float, bin_s: float = 1.0) -> list[tuple[float, int]]:
    """Envelopes committed per ``bin_s`` second, by PostgreSQL commit time, seconds since the run's start."""
    if not commit_ms.size:
        return []
    rel = (commit_ms - t0_ms) / 1000.0
    bins = np.floor(rel / bin_s).astype(int)
    lo = bins.min()
    counts = np.bincount(bins - lo)
    return [(float((lo + i) * bin_s), int(c)) for i, c in enumerate(counts)]


def _steady_window(samples: list[dict[str, Any]], t_from: float, t_to: float, st: Any) -> dict[str, Any]:
    from bench.e2e import _cpu_delta

    idx = [k for k, s in enumerate(samples) if t_from <= s["t"] <= t_to]
    if len(idx) < 2:
        idx = [0, len(samples) - 1]
    i, j = idx[0], idx[-1]
    dt = samples[j]["t"] - samples[i]["t"]
    env = samples[j]["ingests"] - samples[i]["ingests"]
    per_read = st.published_readings / st.published if st.published else 0.0
    per_samp = st.published_samples / st.published if st.published else 0.0
    gw = _cpu_delta(samples, i, j, "gw:")
    be = _cpu_delta(samples, i, j, "be:")
    out = {
        "window_s": dt, "envelopes_per_s": env / dt if dt > 0 else None,
        "readings_per_s": env * per_read / dt if dt > 0 else None,
        "samples_per_s": env * per_samp / dt if dt > 0 else None,
        "gateway_cpu_s": gw, "pg_backends_cpu_s": be,
        "pg_cluster_cpu_s": _cpu_delta(samples, i, j, "pg:"), "mosquitto_cpu_s": _cpu_delta(samples, i, j, "mq"),
        "publishers_cpu_s": samples[j]["publisher_cpu_s"] - samples[i]["publisher_cpu_s"],
        "machine_busy_cores": _cpu_delta(samples, i, j, "machine") / dt if dt > 0 else None,
    }
    if env > 0:
        out["gateway_cpu_us_per_envelope"] = 1e6 * gw / env
        out["pg_backends_cpu_us_per_envelope"] = 1e6 * be / env
        out["gateway_cores"] = gw / dt
    return out


# --------------------------------------------------------------------------------------
# The ICU part of the suite


def _gateway(work: Path, name: str, dsn: str, mq: Any, cfg: BedsConfig, extra: dict[str, str] | None = None
             ) -> GatewayProcess:
    env = {"VITALGATE_LOG_LEVEL": "INFO", **cfg.gateway_env, **(extra or {})}
    prof = ["-m", "cProfile", "-o", str(work / f"gateway-{name}.prof")] if cfg.profile_gateway and name == "icu" else []
    return GatewayProcess(
        work / f"gateway-{name}.log", database_url=dsn, mqtt_url=mq.url,
        client_id=f"vitalgate-bench-{name}-{uuid.uuid4().hex[:8]}", gateway_id="bench",
        profiles_dir=PROFILES, env=env, python_args=prof,
    )


def passed(r: dict[str, Any], cfg: BedsConfig) -> bool:
    p99 = r["latency"]["reading_to_commit_s"]["p99"]
    return bool(r["zero_loss"]) and p99 is not None and p99 < cfg.p99_limit_s


async def _with_gateway(gw: GatewayProcess, dsn: str, fn: Any) -> Any:
    conn = None
    try:
        gw.start(120)
        conn = await asyncpg.connect(dsn)
        result = await fn(conn)
        code = gw.terminate(120)
        if code != 0:
            raise RuntimeError(f"gateway exited with code {code}:\n{gw.log_tail()}")
        return result
    finally:
        gw.kill()
        if conn is not None:
            await conn.close()
        try:
            forget_mqtt_session(gw.env["VITALGATE_MQTT_URL"], gw.env["VITALGATE_MQTT_CLIENT_ID"])
        except OSError:
            pass


async def _broker_limit(mq: Any, cfg: BedsConfig) -> dict[str, Any]:
    """ICU envelopes flat out to the bare subscriber alone (no gateway subscribed)."""
    from bench.subscriber import bare_run

    fcfg = icu_fleet_config(mq.url, max(100, cfg.broker_limit_envelopes // 10), processes=cfg.processes,
                            flat_out=True, envelopes=cfg.broker_limit_envelopes, prefix="icu-bare", seed=23)
    r = await bare_run(mq.url, fcfg, 300)
    return {**r, "beds_equivalent": r["envelopes_per_s"]}


async def _db_limit(dsn: str, id0: int, n: int, per_copy: int = 500) -> dict[str, Any]:
    """The database's limit for ICU envelopes: raw binary COPY of the identical rows, one connection.

    The rows of ``n`` envelopes (ingest ids after ``id0``) are exported once as PostgreSQL's
    own binary COPY stream, ``per_copy`` envelopes per stream (the gateway's batches at 3,000
    beds are about that size), then COPYed into fresh clones of ``readings`` and
    ``waveform_blocks``, each COPY its own transaction: the database's cost alone, with no
    client-side encoding.
    """
    import io

    from bench.rawcopy import clone_hypertable, columns_of

    conn = await asyncpg.connect(dsn)
    try:
        out: dict[str, Any] = {"envelopes": n, "envelopes_per_copy": per_copy}
        streams: dict[str, tuple[list[str], list[bytes], int]] = {}
        for table in ("readings", "waveform_blocks"):
            cols = await columns_of(conn, table)
            await conn.execute(f"CREATE TEMP TABLE src_{table} AS SELECT {', '.join(cols)} FROM {table} "
                               f"WHERE ingest_id > {int(id0)} AND ingest_id <= {int(id0 + n)}")
            await conn.execute(f"CREATE INDEX ON src_{table} (ingest_id)")
            rows = int(await conn.fetchval(f"SELECT count(*) FROM src_{table}"))
            chunks = []
            for a in range(id0, id0 + n, per_copy):
                buf = io.BytesIO()
                await conn.copy_from_query(
                    f"SELECT {', '.join(cols)} FROM src_{table} WHERE ingest_id > {a} AND ingest_id <= "
                    f"{min(a + per_copy, id0 + n)} ORDER BY ingest_id, time", output=buf, format="binary")
                chunks.append(buf.getvalue())
            streams[table] = (cols, chunks, rows)
        await conn.execute("CHECKPOINT")
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        total_s = 0.0
        for table, (cols, chunks, rows) in streams.items():
            dst = f"{table}_rawcopy"
            await clone_hypertable(conn, table, dst)
            cpu0 = cpu_seconds(backend)
            t0 = time.perf_counter()
            for c in chunks:
                await conn.copy_to_table(dst, source=io.BytesIO(c), columns=cols, format="binary")
            seconds = time.perf_counter() - t0
            n_in = int(await conn.fetchval(f"SELECT count(*) FROM {dst}"))
            if n_in != rows:
                raise RuntimeError(f"raw COPY stored {n_in} rows of {rows} in {dst}")
            out[table] = {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds if seconds > 0 else None,
                          "backend_cpu_s": cpu_seconds(backend) - cpu0, "bytes": sum(len(c) for c in chunks)}
            await conn.execute(f"DROP TABLE {dst}")
            total_s += seconds
        out["seconds"] = total_s
        out["envelopes_per_s"] = n / total_s if total_s > 0 else None
        out["beds_equivalent"] = out["envelopes_per_s"]
        return out
    finally:
        await conn.close()


async def run_beds(cfg: BedsConfig, pg: Any, mq: Any, work: Path, out: Any = sys.stderr) -> dict[str, Any]:
    """Fixed count, sweep, limits, overload; returns the ``icu`` part of the results."""
    check_icu_profile()
    res: dict[str, Any] = {"config": {k: v for k, v in cfg.__dict__.items()}, "steps": []}
    env = {"VITALGATE_MAX_MEMORY_MIB": str(cfg.max_memory_mib)}
    res["gateway_env"] = {**cfg.gateway_env, **env}
    dsn = pg.create_database("bench_icu")
    gw = _gateway(work, "icu", dsn, mq, cfg, env)

    async def sweep(conn: asyncpg.Connection) -> None:
        beds: int | None = cfg.fixed_beds
        seconds = cfg.fixed_s
        history: list[tuple[int, bool]] = []
        while beds is not None:
            label = f"icu {beds} beds"
            print(f"icu: {beds:,} beds for {seconds:.0f} s ...", file=out, flush=True)
            fcfg = icu_fleet_config(mq.url, beds, seconds=seconds, processes=cfg.processes,
                                    prefix=f"icu{len(history)}", seed=11 + len(history), pregenerate=cfg.pregenerate,
                                    waveform_format=cfg.waveform_format)
            try:
                r = await LoadRun(label, gw, conn, mq, fcfg, cfg, out).run()
            except (RuntimeError, TimeoutError) as exc:
                r = {"label": label, "beds": beds, "error": f"{type(exc).__name__}: {exc}", "zero_loss": False}
                print(f"icu: {label} failed: {exc}", file=out)
                res["steps"].append(r)
                if not gw.alive():
                    raise
                history.append((beds, False))
            else:
                r["passed"] = passed(r, cfg)
                lat = r["latency"]["reading_to_commit_s"]
                print(f"icu: {beds:,} beds: p50 {lat['p50']:.3f} s, p99 {lat['p99']:.3f} s, max {lat['max']:.3f} s, "
                      f"zero loss {'yes' if r['zero_loss'] else 'NO'} -> {'pass' if r['passed'] else 'FAIL'}",
                      file=out, flush=True)
                res["steps"].append(r)
                history.append((beds, r["passed"]))
            if not cfg.sweep or len(history) > cfg.sweep_steps:
                break
            beds = next_beds(history, grow=cfg.sweep_grow, resolution=cfg.sweep_resolution)
            seconds = cfg.step_s
        good = [b for b, ok in history if ok]
        res["sweep_max_beds"] = max(good) if good else None
        first = res["steps"][0]
        if "error" not in first and first.get("committed"):
            print(f"icu: raw COPY of {cfg.raw_copy_envelopes:,} envelopes' rows ...", file=out, flush=True)
            res["db_limit"] = await _db_limit(dsn, first["first_ingest_id"] - 1,
                                              min(cfg.raw_copy_envelopes, first["committed"]["ingests"]))

    await _with_gateway(gw, dsn, sweep)
    res["fixed"] = res["steps"][0]
    if cfg.profile_gateway:
        from bench.e2e import _profile_top

        res["gateway_profile"] = _profile_top(work / "gateway-icu.prof")
        print(f"\nICU gateway cProfile, by own time (whole process)\n{res['gateway_profile']}", file=out)
    print(f"icu: bare subscriber, {cfg.broker_limit_envelopes:,} ICU envelopes flat out ...", file=out, flush=True)
    res["broker_limit"] = await _broker_limit(mq, cfg)
    if cfg.overload and res.get("sweep_max_beds"):
        beds = _round_beds(cfg.overload_factor * res["sweep_max_beds"])
        print(f"icu: overload, {beds:,} beds ({cfg.overload_factor:g} x {res['sweep_max_beds']:,}) for "
              f"{cfg.overload_s:.0f} s, max_memory_mib {cfg.max_memory_mib} ...", file=out, flush=True)
        dsn2 = pg.create_database("bench_overload")
        gw2 = _gateway(work, "overload", dsn2, mq, cfg, env)

        async def overload(conn: asyncpg.Connection) -> dict[str, Any]:
            fcfg = icu_fleet_config(mq.url, beds, seconds=cfg.overload_s, processes=cfg.processes, prefix="icu-ovl",
                                    seed=31, waveform_format=cfg.waveform_format)
            r = await LoadRun(f"overload {beds} beds", gw2, conn, mq, fcfg, cfg, out).run()
            r["peak_rss_hwm_mib"] = rss_mib(gw2.pid, "VmHWM")
            return r

        try:
            r = await _with_gateway(gw2, dsn2, overload)
            r["max_memory_mib"] = cfg.max_memory_mib
            peak = max(r["peak_rss_sampled_mib"], r.get("peak_rss_hwm_mib") or 0)
            r["peak_rss_mib"] = peak
            r["rss_under_bound"] = peak < cfg.max_memory_mib
            r["passed"] = bool(r["zero_loss"] and r["rss_under_bound"])
            print(f"icu: overload: peak RSS {peak:.0f} MiB (bound {cfg.max_memory_mib}), drain "
                  f"{r['drain_s']:.1f} s, zero loss {'yes' if r['zero_loss'] else 'NO'}", file=out, flush=True)
        except (RuntimeError, TimeoutError) as exc:
            r = {"label": "overload", "beds": beds, "error": f"{type(exc).__name__}: {exc}", "passed": False}
            print(f"icu: overload failed: {exc}", file=out)
        res["overload"] = r
    return res


def ok(res: dict[str, Any]) -> bool:
    """Every ICU run lost nothing (a sweep step may fail its latency limit: that is how the sweep ends)."""
    runs = list(res.get("steps", [])) + ([res["overload"]] if "overload" in res else [])
    return bool(runs) and all(r.get("zero_loss") for r in runs)


if __name__ == "__main__":  # pragma: no cover - use python -m bench.run
    print("run python -m bench.run (the suite) or python -m bench.run --only icu", file=sys.stderr)
    sys.exit(2)
