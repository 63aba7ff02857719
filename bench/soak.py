"""Soak: hours of ordinary load in minutes of figures; does anything grow that should stay flat?

One gateway (MQTT and HTTPS) on a throwaway PostgreSQL+TimescaleDB and mosquitto, for
``--minutes`` (default 30) under:
- the ICU bed workload of ``bench.beds`` (one patient monitor per bed, one envelope per
  second, 10 numerics and three waveforms; artifacts, desaturations and abnormal heart
  rates, so alert episodes open and close all along) at ``--beds``: by default half the
  largest bed count the latest ``make bench`` suite in ``bench/results/`` passed (its
  ``sweep_max_beds``), 1,500 when there is none;
- HTTPS traffic beside it: ``--https-devices`` registered pulse oximeters, each posting one
  request of 5 envelopes (10 readings each) per second over TLS with keep-alive.

Every ``--sample-s`` seconds (10) it records the gateway's resident memory (``VmRSS``), its
open file descriptors (``/proc/PID/fd``), its database connections (``pg_stat_activity``
client backends of the database, the sampler's own excluded) and the p50/p99 commit
latency of the MQTT envelopes committed in that window: PostgreSQL's commit timestamp of
the envelope's ``ingests`` row minus its receipt (``received_at``), what the gateway's
``gateway_commit_latency_seconds`` measures; while intake is paused, the time an envelope
waits at the broker is not in it (the committed rate, printed beside it, shows that).

**Verdict per series**, over the samples after the warm-up (``--warmup-s``, default 10 % of
the run and at least 60 s): *flat* when the median of the last fifth differs from the
median of the first fifth by at most ``--tolerance`` (10 %) of the first, and the trend
line (Theil-Sen: the median of the slopes between every two samples) moves by at most that
much of the mean over the whole span. Medians ignore a single noisy sample; the trend
catches a slow leak that the fifths alone might straddle. At the end: nothing lost (every MQTT envelope the broker
acknowledged is committed with all its readings and samples; every HTTPS envelope answered
202 is in ``ingests``), the gateway exits 0 on SIGTERM.

    python -m bench.soak                       # 30 minutes
    python -m bench.soak --minutes 5 --beds 1700

Results: one line per sample, a table, ``bench/results/<stamp>-soak.json`` and
``<stamp>-soak.png`` (matplotlib, the ``bench`` extra). Exit code 0 when nothing was lost
and every series was flat.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np

from bench import e2e
from bench.beds import icu_fleet_config
from bench.common import forget_mqtt_session, git_revision, machine_info
from bench.fleet import Fleet
from tests.harness import PROFILES, GatewayProcess, free_port, rss_mib, vitalgate, wait_for

__all__ = ["SoakConfig", "default_beds", "flatness", "run", "main"]

RESULTS_DIR = e2e.RESULTS_DIR
SERIES = {"rss_mib": "resident memory, MiB", "open_fds": "open file descriptors",
          "db_connections": "database connections", "p99_commit_s": "p99 commit latency (receipt to commit), s"}
FALLBACK_BEDS = 1500


@dataclass
class SoakConfig:
    minutes: float = 30.0
    beds: int = FALLBACK_BEDS
    beds_source: str = "default"
    sample_s: float = 10.0
    warmup_s: float | None = None  # None: 10 % of the run, at least 60 s
    tolerance: float = 0.10
    https_devices: int = 20
    https_envelopes_per_request: int = 5
    processes: int = 2  # publisher processes
    drain_timeout_s: float = 300.0
    keep: bool = False

    @property
    def warmup(self) -> float:
        return self.warmup_s if self.warmup_s is not None else max(60.0, 0.1 * self.minutes * 60)


def default_beds(results_dir: Path = RESULTS_DIR) -> tuple[int, str]:
    """Half the largest passing bed count of the newest suite result, and which file said so."""
    for path in sorted(results_dir.glob("*-suite.json"), reverse=True):
        try:
            best = json.loads(path.read_text()).get("icu", {}).get("sweep_max_beds")
        except (OSError, ValueError):
            continue
        if best:
            return max(100, int(best) // 2), f"half of sweep_max_beds {best} in {path.name}"
    return FALLBACK_BEDS, "no suite result: the default"


def flatness(t: list[float], v: list[float | None], warmup_s: float, tolerance: float) -> dict[str, Any]:
    """The verdict on one series (module doc): flat, and the figures it was decided on."""
    pts = [(a, b) for a, b in zip(t, v) if a > warmup_s and b is not None]
    if len(pts) < 5:
        return {"flat": None, "why": f"{len(pts)} samples after the warm-up; 5 needed", "samples": len(pts)}
    ts = np.array([a for a, _ in pts])
    vs = np.array([b for _, b in pts], dtype=np.float64)
    k = max(2, len(vs) // 5)
    first, last, mean = float(np.median(vs[:k])), float(np.median(vs[-k:])), float(vs.mean())
    # Theil-Sen: the median slope between every two samples; one outlier cannot tilt it
    i, j = np.triu_indices(len(ts), 1)
    dt = ts[j] - ts[i]
    slope = float(np.median((vs[j] - vs[i])[dt > 0] / dt[dt > 0])) if (dt > 0).any() else 0.0
    trend = slope * float(np.ptp(ts))

    def rel(x: float, base: float) -> float:
        return 0.0 if x == 0 else (float("inf") if base == 0 else abs(x) / abs(base))

    change, moved = rel(last - first, first), rel(trend, mean)
    return {"flat": bool(change <= tolerance and moved <= tolerance), "samples": len(vs), "first": first,
            "last": last, "change": change, "trend_over_span": trend, "trend_ratio": moved, "mean": mean,
            "min": float(vs.min()), "max": float(vs.max())}


# ------------------------------------------------------------------ HTTPS beside the fleet


class HttpsLoad:
    """Each device posts ``per_request`` envelopes once a second; every answer must be 202 (429/503 retried)."""

    def __init__(self, url: str, cafile: Path, tokens: dict[str, str], per_request: int) -> None:
        self.url, self.cafile, self.tokens, self.per_request = url, cafile, tokens, per_request
        self.status: dict[int, int] = {}
        self.envelopes_202 = 0
        self.errors: list[str] = []
        self.latencies: list[float] = []

    async def run(self, stop: asyncio.Event) -> None:
        import aiohttp
        import orjson

        ctx = ssl.create_default_context(cafile=str(self.cafile))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=len(self.tokens))) as s:
            await asyncio.gather(*(self._device(s, dev, tok, stop, orjson.dumps, k)
                                   for k, (dev, tok) in enumerate(self.tokens.items())))

    async def _device(self, s: Any, dev: str, token: str, stop: asyncio.Event, dumps: Any, k: int) -> None:
        seq = 0
        await asyncio.sleep(k / max(1, len(self.tokens)))  # spread the devices over the second
        while not stop.is_set():
            t0 = time.time()
            ms = int(t0 * 1000) - 5000
            body = dumps([{"v": 1, "device_id": dev, "seq": seq + i, "profile": "pulse_oximeter",
                           "numerics": [{"t": ms + i * 1000 + j * 200, "values": {"spo2": 95 + (seq + j) % 4,
                                                                                  "pulse_rate": 70 + j}}
                                        for j in range(5)]} for i in range(self.per_request)])
            seq += self.per_request
            while True:
                try:
                    async with s.post(f"{self.url}/v1/telemetry", data=body, headers={
                            "Authorization": f"Bearer {token}", "Content-Type": "application/json"}) as r:
                        answer = await r.read()
                        self.status[r.status] = self.status.get(r.status, 0) + 1
                        retry = float(r.headers.get("Retry-After", "1"))
                except (OSError, asyncio.TimeoutError) as exc:  # a dropped connection is a failure, then a retry
                    self.status[0] = self.status.get(0, 0) + 1
                    self.errors.append(f"{dev}: {type(exc).__name__}: {exc}"[:200])
                    await asyncio.sleep(1)
                    continue
                if r.status == 202:
                    self.envelopes_202 += len(json.loads(answer)["results"])
                    self.latencies.append(time.time() - t0)
                    break
                if r.status in (429, 503):
                    await asyncio.sleep(retry)
                    continue
                self.errors.append(f"{dev}: {r.status} {answer[:200]!r}")
                break
            await asyncio.sleep(max(0.0, 1.0 - (time.time() - t0)))


# ------------------------------------------------------------------ sampling


# Receipt to commit, as gateway_commit_latency_seconds measures it (and VitalgateWriterBackedUp
# pages on), exact per envelope: the ingests rows alone, so sampling costs the database little.
# A join to readings for the newest reading time (bench.beds' measure) read ~1 M rows per
# sample at 1,700 beds and slowed the gateway it measured.
_LATENCY_SQL = """
WITH w AS (SELECT pg_xact_commit_timestamp(xmin) AS c, received_at FROM ingests WHERE id > $1 AND source = 'mqtt'),
     l AS (SELECT extract(epoch FROM c - received_at)::float8 AS s FROM w WHERE c >= $2 AND c < $3)
SELECT count(*) AS n, percentile_cont(0.5) WITHIN GROUP (ORDER BY s) AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY s) AS p99, max(s) AS max FROM l"""


class Sampler:
    """One sample of every series per call, on a connection of its own."""

    def __init__(self, conn: asyncpg.Connection, gw: GatewayProcess) -> None:
        self.conn, self.gw = conn, gw
        self.watermarks: list[int] = [0, 0]  # max ingest id two samples ago and one sample ago
        self.since: datetime | None = None

    async def sample(self, t: float, https: HttpsLoad) -> dict[str, Any]:
        now = await self.conn.fetchval("SELECT clock_timestamp()")
        top = int(await self.conn.fetchval("SELECT coalesce(max(id), 0) FROM ingests"))
        lat: Any = {"n": 0, "p50": None, "p99": None, "max": None}
        if self.since is not None:
            # ids are taken in order but committed by two transactions at once: commit time, not id,
            # decides the window; ids older than two samples are committed long since
            lat = dict(await self.conn.fetchrow(_LATENCY_SQL, self.watermarks[0], self.since, now))
        conns = await self.conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()")
        pid = self.gw.pid
        try:
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            fds = None
        self.watermarks = [self.watermarks[1], top]
        self.since = now
        return {"t": t, "rss_mib": rss_mib(pid), "open_fds": fds, "db_connections": int(conns),
                "p50_commit_s": lat["p50"], "p99_commit_s": lat["p99"], "max_commit_s": lat["max"],
                "committed_in_window": int(lat["n"]), "max_ingest_id": top,
                "https_202": https.status.get(202, 0), "https_other": sum(n for s, n in https.status.items() if s != 202)}


# ------------------------------------------------------------------ the run


async def _register(dsn: str, work: Path, n: int) -> dict[str, str]:
    vitalgate(dsn, "db", "migrate")
    devices = [f"sk-{i:04d}" for i in range(n)]
    (work / "devices.csv").write_text("".join(f"{d},pulse_oximeter\n" for d in devices))
    vitalgate(dsn, "devices", "import", str(work / "devices.csv"), "--tokens-out", str(work / "tokens.csv"))
    return {line.split(",")[0]: line.split(",")[2] for line in (work / "tokens.csv").read_text().splitlines()[1:]}


async def run(cfg: SoakConfig, out: Any = sys.stdout) -> dict[str, Any]:
    import trustme

    pg, mq, work = e2e.make_services()
    results: dict[str, Any] = {"bench": "soak", "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "git": git_revision(), "machine": machine_info(),
                               "config": {**asdict(cfg), "warmup_s": cfg.warmup}, "samples": []}
    gw: GatewayProcess | None = None
    fleet: Fleet | None = None
    try:
        pg.start()
        mq.start()
        dsn = pg.create_database("bench_soak")
        tokens = await _register(dsn, work, cfg.https_devices) if cfg.https_devices else {}
        ca = trustme.CA()
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(work / "server.pem"))
        ca.cert_pem.write_to_path(str(work / "ca.pem"))
        port = free_port()
        gw = GatewayProcess(
            work / "gateway.log", database_url=dsn, mqtt_url=mq.url, client_id=f"vitalgate-soak-{uuid.uuid4().hex[:8]}",
            gateway_id="soak", profiles_dir=PROFILES,
            env={"VITALGATE_HTTP_ENABLED": "true", "VITALGATE_HTTP_PORT": str(port),
                 "VITALGATE_HTTP_TLS_CERT": str(work / "server.pem"), "VITALGATE_HTTP_TLS_KEY": str(work / "server.pem"),
                 "VITALGATE_LOG_LEVEL": "INFO"})
        gw.start(120)
        wait_for(lambda: "HTTPS listening." in gw.log_since_start(), 60, message="HTTPS listener")  # type: ignore[union-attr]
        conn = await asyncpg.connect(dsn)
        sampler = Sampler(conn, gw)
        seconds = cfg.minutes * 60
        fcfg = icu_fleet_config(mq.url, cfg.beds, seconds=seconds, processes=cfg.processes, prefix="soak", seed=41)
        fleet = Fleet(fcfg)
        https = HttpsLoad(f"https://127.0.0.1:{port}", work / "ca.pem", tokens, cfg.https_envelopes_per_request)
        stop = asyncio.Event()
        print(f"soak: {cfg.beds:,} ICU beds ({cfg.beds_source}) + {len(tokens)} HTTPS devices x "
              f"{cfg.https_envelopes_per_request} envelopes/s for {cfg.minutes:g} min; sample every {cfg.sample_s:g} s, "
              f"warm-up {cfg.warmup:.0f} s", file=out, flush=True)
        await asyncio.to_thread(fleet.start)
        t0 = time.monotonic()
        https_task = asyncio.create_task(https.run(stop)) if tokens else None
        t_start = time.time()
        await sampler.sample(0.0, https)  # opens the first latency window
        k = 1
        while (now := time.monotonic() - t0) < seconds:
            await asyncio.sleep(max(0.0, k * cfg.sample_s - now))
            if not gw.alive():
                raise RuntimeError(f"gateway exited with code {gw.proc.returncode}:\n{gw.log_tail()}")  # type: ignore[union-attr]
            fleet.check()
            s = await sampler.sample(time.monotonic() - t0, https)
            results["samples"].append(s)
            st = fleet.stats()
            p99 = s["p99_commit_s"]
            print(f"  t={s['t']:6.0f}s RSS {s['rss_mib']:6.1f} MiB fds {s['open_fds']:4d} db conns "
                  f"{s['db_connections']:2d} p99 {p99 if p99 is not None else float('nan'):6.3f} s "
                  f"committed {s['committed_in_window'] / cfg.sample_s:,.0f} env/s, mqtt acked {st.acked:,} https 202 {s['https_202']:,} "
                  f"other {s['https_other']}", file=out, flush=True)
            k += 1
        stop.set()
        if https_task is not None:
            await https_task
        results["drain"] = await _drain(conn, fleet, cfg, out)
        results["loss"] = await _loss(conn, fleet, https, t_start)
        results["alerts_opened"] = int(await conn.fetchval(
            "SELECT count(*) FROM alerts WHERE opened_at >= $1", datetime.fromtimestamp(t_start - 60, timezone.utc)))
        results["https"] = {"status": https.status, "envelopes_202": https.envelopes_202, "errors": https.errors[:10],
                            "p99_request_s": float(np.percentile(https.latencies, 99)) if https.latencies else None}
        results["publishers"] = fleet.stats().as_dict()
        await conn.close()
        code = gw.terminate(120)
        results["gateway_exit_code"] = code
        results["verdicts"] = {k: flatness([x["t"] for x in results["samples"]], [x[k] for x in results["samples"]],
                                           cfg.warmup, cfg.tolerance) for k in SERIES}
        return results
    finally:
        if fleet is not None:
            fleet.kill()
        if gw is not None:
            gw.kill()
            try:
                forget_mqtt_session(mq.url, gw.env["VITALGATE_MQTT_CLIENT_ID"])
            except OSError:
                pass
        e2e.stop_services(pg, mq, work, cfg.keep)


async def _drain(conn: asyncpg.Connection, fleet: Fleet, cfg: SoakConfig, out: Any) -> dict[str, Any]:
    """Wait for the publishers to finish and every acknowledged MQTT envelope to be committed."""
    t0 = time.monotonic()
    while not fleet.done():
        fleet.check()
        if time.monotonic() - t0 > 60:
            fleet.stop()
        await asyncio.sleep(0.2)
    fleet.join(5)
    acked = fleet.stats().acked
    t1 = time.monotonic()
    while (n := await conn.fetchval("SELECT count(*) FROM ingests WHERE source = 'mqtt'")) < acked:
        if time.monotonic() - t1 > cfg.drain_timeout_s:
            # reported, not raised: the series measured so far are the figures of an overloaded run
            print(f"soak: {n:,} of {acked:,} MQTT envelopes committed {cfg.drain_timeout_s:.0f} s after publishing "
                  "ended; not drained", file=out, flush=True)
            return {"drain_s": None, "backlog_at_timeout": acked - n}
        await asyncio.sleep(0.5)
    print(f"soak: drained {time.monotonic() - t1:.1f} s after publishing ended", file=out, flush=True)
    return {"drain_s": time.monotonic() - t1}


async def _loss(conn: asyncpg.Connection, fleet: Fleet, https: HttpsLoad, t_start: float) -> dict[str, Any]:
    st = fleet.stats()
    since = datetime.fromtimestamp(t_start - 120, timezone.utc)
    row = await conn.fetchrow(
        """SELECT (SELECT count(*) FROM ingests WHERE source = 'mqtt') AS mqtt_ingests,
                  (SELECT count(*) FROM ingests WHERE source = 'https') AS https_ingests,
                  (SELECT count(*) FROM readings WHERE time >= $1 AND device_id LIKE 'pm-%') AS readings,
                  (SELECT coalesce(sum(cardinality(samples)), 0) FROM waveform_blocks
                    WHERE time >= $1 AND device_id LIKE 'pm-%') AS samples,
                  (SELECT count(*) FROM rejected) AS rejected""", since)
    c = {k: int(v) for k, v in dict(row).items()}
    ok = (st.acked == st.published and st.ack_failures == 0 and st.no_subscribers == 0
          and c["mqtt_ingests"] == st.published and c["readings"] == st.published_readings
          and c["samples"] == st.published_samples and c["rejected"] == 0
          and c["https_ingests"] == https.envelopes_202 and not https.errors)
    return {"committed": c, "published": st.published, "published_readings": st.published_readings,
            "published_samples": st.published_samples, "https_envelopes_202": https.envelopes_202, "zero_loss": ok}


# ------------------------------------------------------------------ report


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = results["samples"]
    warm = results["config"]["warmup_s"]
    fig, axes = plt.subplots(len(SERIES), 1, figsize=(9, 2.3 * len(SERIES)), sharex=True)
    for ax, (key, label) in zip(axes, SERIES.items()):
        pts = [(s["t"] / 60, s[key]) for s in samples if s[key] is not None]
        ax.plot([a for a, _ in pts], [b for _, b in pts], marker=".", lw=1)
        ax.axvspan(0, warm / 60, color="0.9", label="warm-up")
        v = results["verdicts"][key]
        verdict = "flat" if v.get("flat") else ("not flat" if v.get("flat") is False else v.get("why", "?"))
        extra = f" (first {v['first']:.3g}, last {v['last']:.3g}, change {100 * v['change']:.1f} %)" if "first" in v else ""
        ax.set_title(f"{label}: {verdict}{extra}", fontsize=9)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("minutes")
    c = results["config"]
    fig.suptitle(f"soak: {c['beds']:,} ICU beds + {c['https_devices']} HTTPS devices, {c['minutes']:g} min", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_report(results: dict[str, Any], out: Any = sys.stdout) -> bool:
    print("\nseries (after the warm-up)      first     last   change  trend/mean   verdict", file=out)
    for key, label in SERIES.items():
        v = results["verdicts"][key]
        if "first" not in v:
            print(f"  {label:<28} {v['why']}", file=out)
            continue
        print(f"  {label:<28} {v['first']:7.3g}  {v['last']:7.3g}  {100 * v['change']:5.1f} %  {100 * v['trend_ratio']:7.1f} %"
              f"   {'flat' if v['flat'] else 'NOT FLAT'}", file=out)
    loss = results["loss"]
    c = loss["committed"]
    print(f"\nMQTT: {loss['published']:,} envelopes published, {c['mqtt_ingests']:,} committed "
          f"({c['readings']:,} readings, {c['samples']:,} samples); HTTPS: {loss['https_envelopes_202']:,} envelopes "
          f"answered 202, {c['https_ingests']:,} stored; answers {results['https']['status']}; alert episodes opened "
          f"{results['alerts_opened']:,}; zero loss {'yes' if loss['zero_loss'] else 'NO'}; gateway exit code "
          f"{results['gateway_exit_code']}", file=out)
    flat = all(v.get("flat") for v in results["verdicts"].values())
    return bool(loss["zero_loss"] and results["gateway_exit_code"] == 0 and flat)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="load duration (default 30)")
    ap.add_argument("--beds", type=int, default=None,
                    help="ICU beds (default: half the latest suite's sweep_max_beds, else 1,500)")
    ap.add_argument("--https-devices", type=int, default=20, help="HTTPS devices, one request per second each (0: none)")
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--warmup-s", type=float, default=None, help="default: 10%% of the run, at least 60 s")
    ap.add_argument("--tolerance", type=float, default=0.10, help="flat within this fraction (default 0.10)")
    ap.add_argument("--no-write", action="store_true", help="do not write results or the plot")
    ap.add_argument("--keep", action="store_true", help="keep the services' directory (gateway log) afterwards")
    ap.add_argument("--redraw", metavar="RESULTS_JSON", help="recompute the verdicts and the plot of a results file")
    a = ap.parse_args(argv)
    if a.redraw:
        path = Path(a.redraw)
        results = json.loads(path.read_text())
        c = results["config"]
        results["verdicts"] = {k: flatness([x["t"] for x in results["samples"]], [x[k] for x in results["samples"]],
                                           c["warmup_s"], c["tolerance"]) for k in SERIES}
        path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        good = print_report(results)
        print(f"plot: {os.path.relpath(plot(results, path.with_suffix('.png')))}")
        return 0 if good else 1
    # SIGTERM (and SIGINT, which a shell ignores in background jobs) end the run with its cleanup:
    # the gateway, publishers, PostgreSQL and mosquitto are stopped and the directory removed
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    beds, source = (a.beds, "--beds") if a.beds else default_beds()
    cfg = SoakConfig(minutes=a.minutes, beds=beds, beds_source=source, sample_s=a.sample_s, warmup_s=a.warmup_s,
                     tolerance=a.tolerance, https_devices=a.https_devices, keep=a.keep)
    results = asyncio.run(run(cfg))
    good = print_report(results)
    if not a.no_write:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{stamp}-soak.json"
        path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        png = plot(results, RESULTS_DIR / f"{stamp}-soak.png")
        print(f"results: {os.path.relpath(path)}; plot: {os.path.relpath(png)}")
    print(f"soak: {'ok' if good else 'FAILED'}")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
