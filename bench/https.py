"""HTTPS ingest bench: client processes -> ``POST /v1/telemetry`` over TLS -> ``vitalgate run`` -> TimescaleDB.

Scenario: ``--devices`` registered pulse oximeters (each with its own token), envelopes
of 5 ``numerics`` entries of ``spo2`` + ``pulse_rate`` (**10 numeric readings**, as in the
MQTT bench), ``--batch`` envelopes per request (JSON array), sent by ``--clients``
separate client processes with ``--connections`` keep-alive TLS connections each, flat
out. Bodies are encoded before the clock starts. A 429 or 503 is retried after its
Retry-After (and counted); anything else but 202 is a failure.

Every 202 comes after the commit, so the rate is envelopes (readings) answered 202 over
the time from the first request to the last answer, checked against the database:
afterwards ``ingests`` and ``readings`` must hold exactly what was sent (zero loss, no
duplicates). Then the raw binary COPY of the identical rows into a fresh identical
hypertable (``bench.rawcopy``, one connection, median of 3) and the ratio gateway / raw
COPY, the MQTT bench's yardstick.

    python -m bench.https                          # 100,000 envelopes, 1,000,000 readings
    python -m bench.https --envelopes 30000 --clients 2 --connections 32 --batch 50

Results: a table on stdout and ``bench/results/<stamp>-https.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import git_revision, machine_info, package_versions
from bench.rawcopy import raw_copy_rate, read_rows
from tests.harness import (
    PROFILES, REPO, GatewayProcess, PostgresCluster, cpu_seconds, free_port, tree_cpu_seconds, vitalgate,
)

__all__ = ["HttpsBenchConfig", "run", "main"]

READINGS_PER_ENVELOPE = 10
RESULTS_DIR = REPO / "bench" / "results"


@dataclass
class HttpsBenchConfig:
    envelopes: int = 100_000
    devices: int = 100
    batch: int = 50  # envelopes per request
    clients: int = 2  # client processes
    connections: int = 64  # keep-alive connections per client process
    fsync: bool = True
    raw_repeats: int = 3
    rows_per_copy: int = 5000
    timeout_s: float = 600.0
    keep: bool = False


# ------------------------------------------------------------------ client process


def _bodies(devices: list[str], tokens: dict[str, str], per_device: int, batch: int, t0: int) -> list[tuple[str, bytes]]:
    """(token, JSON body) per request: each device's envelopes in order, ``batch`` per request."""
    import orjson

    out = []
    for dev in devices:
        envs = []
        for seq in range(per_device):
            t = t0 + seq * 5000
            envs.append({
                "v": 1, "device_id": dev, "seq": seq, "profile": "pulse_oximeter", "firmware": "2.4.1",
                "sent_at": t + 4050,
                "numerics": [{"t": t + k * 1000, "values": {"spo2": 94 + (seq + k) % 5, "pulse_rate": 60 + (3 * seq + k) % 30}}
                             for k in range(5)],
            })
        for i in range(0, len(envs), batch):
            out.append((tokens[dev], orjson.dumps(envs[i:i + batch])))
    return out


def _client(url: str, cafile: str, work: list[tuple[str, bytes]], connections: int, ready: Any, go: Any,
            results: Any) -> None:
    """One client process: ``connections`` keep-alive sessions draining a shared queue of requests."""
    import aiohttp

    async def main() -> dict[str, Any]:
        ctx = ssl.create_default_context(cafile=cafile)
        queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        for item in work:
            queue.put_nowait(item)
        latencies: list[float] = []
        stats = {"requests": 0, "envelopes": 0, "retried_429": 0, "retried_503": 0, "failures": 0}
        errors: list[str] = []
        connector = aiohttp.TCPConnector(ssl=ctx, limit=connections, keepalive_timeout=60)
        async with aiohttp.ClientSession(connector=connector) as session:
            # open the connections (TLS handshakes) before the clock starts
            await asyncio.gather(*(session.get(f"{url}/openapi.json") for _ in range(connections)))

            async def worker() -> None:
                while True:
                    try:
                        token, body = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    while True:
                        t = time.perf_counter()
                        async with session.post(f"{url}/v1/telemetry", data=body, headers={
                                "Authorization": f"Bearer {token}", "Content-Type": "application/json"}) as r:
                            answer = await r.read()
                            status = r.status
                            retry = float(r.headers.get("Retry-After", "1"))
                        if status == 202:
                            latencies.append(time.perf_counter() - t)
                            stats["requests"] += 1
                            stats["envelopes"] += len(json.loads(answer)["results"])
                            break
                        if status in (429, 503):
                            stats[f"retried_{status}"] += 1
                            await asyncio.sleep(retry)
                            continue
                        stats["failures"] += 1
                        if len(errors) < 5:
                            errors.append(f"{status}: {answer[:200]!r}")
                        break

            ready.set()
            await asyncio.get_running_loop().run_in_executor(None, go.wait)
            start = time.time()
            await asyncio.gather(*(worker() for _ in range(connections)))
            end = time.time()
        return {**stats, "start": start, "end": end, "latencies": latencies, "errors": errors,
                "cpu_s": time.process_time()}

    try:
        results.put(asyncio.run(main()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put({"error": f"{type(exc).__name__}: {exc}"})
        ready.set()


# ------------------------------------------------------------------ the run


def _postgres_cpu_s(pg: PostgresCluster) -> float:
    """CPU seconds of the whole PostgreSQL cluster (postmaster and every backend)."""
    return tree_cpu_seconds(int((pg.data_dir / "postmaster.pid").read_text().splitlines()[0]))


async def run(cfg: HttpsBenchConfig) -> dict[str, Any]:
    import trustme

    work = Path(tempfile.mkdtemp(prefix="vitalgate-bench-https-"))
    pg = PostgresCluster(work / "pg", settings={"fsync": cfg.fsync, "full_page_writes": cfg.fsync})
    per_device = max(1, cfg.envelopes // cfg.devices)
    envelopes = per_device * cfg.devices
    results: dict[str, Any] = {
        "bench": "https",
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": git_revision(),
        "machine": machine_info(),
        "config": {**{k: v for k, v in asdict(cfg).items() if k != "keep"}, "envelopes": envelopes,
                   "readings_per_envelope": READINGS_PER_ENVELOPE,
                   "scenario": "pulse_oximeter, 5 numerics entries x (spo2, pulse_rate) per envelope, JSON arrays, "
                               "TLS 1.3, keep-alive, flat out"},
        "versions": package_versions(),
    }
    gw: GatewayProcess | None = None
    try:
        pg.start()
        dsn = pg.create_database("bench_https")
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        cert.private_key_and_cert_chain_pem.write_to_path(str(work / "server.pem"))
        ca.cert_pem.write_to_path(str(work / "ca.pem"))
        vitalgate(dsn, "db", "migrate")
        devices = [f"hb-{i:05d}" for i in range(cfg.devices)]
        (work / "devices.csv").write_text("".join(f"{d},pulse_oximeter\n" for d in devices))
        vitalgate(dsn, "devices", "import", str(work / "devices.csv"), "--tokens-out", str(work / "tokens.csv"))
        tokens = {}
        for line in (work / "tokens.csv").read_text().splitlines()[1:]:
            dev, _, token = line.split(",")
            tokens[dev] = token
        port = free_port()
        gw = GatewayProcess(
            work / "gateway.log", database_url=dsn, mqtt_url="mqtt://127.0.0.1:1", client_id="unused",
            gateway_id="bench-https", profiles_dir=PROFILES, ready_line="HTTPS listening.",
            env={
                "VITALGATE_MQTT_ENABLED": "false",
                "VITALGATE_AUTH_REQUIRE_REGISTRATION": "true",
                "VITALGATE_HTTP_ENABLED": "true",
                "VITALGATE_HTTP_PORT": str(port),
                "VITALGATE_HTTP_TLS_CERT": str(work / "server.pem"),
                "VITALGATE_HTTP_TLS_KEY": str(work / "server.pem"),
                "VITALGATE_HTTP_RATE_LIMIT_PER_S": "10000",
                "VITALGATE_HTTP_RATE_LIMIT_BURST": "10000",
                "VITALGATE_HTTP_MAX_ENVELOPES_PER_REQUEST": str(max(cfg.batch, 1)),
            },
        )
        gw.start()
        url = f"https://127.0.0.1:{port}"

        t_gen = int(time.time() * 1000) - 3_600_000
        requests = _bodies(devices, tokens, per_device, cfg.batch, t_gen)
        ctx = mp.get_context("spawn")
        ready = [ctx.Event() for _ in range(cfg.clients)]
        go = ctx.Event()
        out = ctx.Queue()
        share = [requests[i::cfg.clients] for i in range(cfg.clients)]
        procs = [ctx.Process(target=_client, args=(url, str(work / "ca.pem"), share[i], cfg.connections, ready[i], go, out),
                             name=f"https-client-{i}") for i in range(cfg.clients)]
        for p in procs:
            p.start()
        for e in ready:
            if not e.wait(120):
                raise TimeoutError("client processes did not get ready")
        cpu_gw0, cpu_pg0 = cpu_seconds(gw.pid), _postgres_cpu_s(pg)
        go.set()
        client_results = [out.get(timeout=cfg.timeout_s) for _ in procs]
        cpu_gw, cpu_pg = cpu_seconds(gw.pid) - cpu_gw0, _postgres_cpu_s(pg) - cpu_pg0
        for p in procs:
            p.join(30)
        errors = [c["error"] for c in client_results if "error" in c]
        if errors:
            raise RuntimeError(f"client failed: {errors[0]}")

        start = min(c["start"] for c in client_results)
        end = max(c["end"] for c in client_results)
        seconds = end - start
        answered = sum(c["envelopes"] for c in client_results)
        lat = sorted(x for c in client_results for x in c["latencies"])
        conn = await asyncpg.connect(dsn)
        try:
            n_ingests = await conn.fetchval("SELECT count(*) FROM ingests")
            n_readings = await conn.fetchval("SELECT count(*) FROM readings")
            n_dup_keys = await conn.fetchval(
                "SELECT count(*) FROM (SELECT 1 FROM ingests GROUP BY device_id, payload_sha256 HAVING count(*) > 1) d")
            rows = await read_rows(conn)
            print(f"https: raw binary COPY of the same {len(rows[1]):,} rows ({cfg.raw_repeats} runs) ...", file=sys.stderr)
            raw = await raw_copy_rate(conn, rows_per_copy=cfg.rows_per_copy, repeats=cfg.raw_repeats, rows=rows)
        finally:
            await conn.close()
        sent_readings = envelopes * READINGS_PER_ENVELOPE
        results["run"] = {
            "seconds": seconds,
            "requests": sum(c["requests"] for c in client_results),
            "envelopes_answered_202": answered,
            "envelopes_per_s": answered / seconds,
            "readings_per_s": n_readings / seconds,
            "latency_s": {"p50": statistics.median(lat), "p99": lat[int(0.99 * (len(lat) - 1))], "max": lat[-1]},
            "retried_429": sum(c["retried_429"] for c in client_results),
            "retried_503": sum(c["retried_503"] for c in client_results),
            "failures": sum(c["failures"] for c in client_results),
            "failure_samples": [e for c in client_results for e in c["errors"]][:5],
            "database": {"ingests": n_ingests, "readings": n_readings, "duplicate_keys": n_dup_keys},
            "zero_loss": n_ingests == envelopes == answered and n_readings == sent_readings and n_dup_keys == 0,
            "cpu_s": {"gateway": cpu_gw, "postgresql": cpu_pg, "clients": sum(c["cpu_s"] for c in client_results)},
            "gateway_cpu_us_per_reading": cpu_gw / n_readings * 1e6 if n_readings else None,
            "postgresql_cpu_us_per_reading": cpu_pg / n_readings * 1e6 if n_readings else None,
        }
        results["raw_copy"] = raw
        results["ratio_to_raw_copy"] = results["run"]["readings_per_s"] / raw["rows_per_s"]
        code = gw.terminate()
        results["gateway_exit_code"] = code
        gw = None
    finally:
        if gw is not None:
            gw.kill()
        try:
            pg.cleanup() if not cfg.keep else pg.stop()
        except Exception as exc:  # noqa: BLE001
            print(f"https: stopping PostgreSQL: {exc}", file=sys.stderr)
        if not cfg.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"https: kept {work}", file=sys.stderr)
    return results


def print_table(results: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout  # looked up now: the suite replaces sys.stdout to keep a log
    r, raw = results["run"], results["raw_copy"]
    c = results["config"]
    rows = [
        ("envelopes (10 readings each), batch per request", f"{r['envelopes_answered_202']:,} in {r['requests']:,} "
                                                           f"requests of {c['batch']}"),
        ("clients x keep-alive connections", f"{c['clients']} processes x {c['connections']}"),
        ("committed envelopes/s", f"{r['envelopes_per_s']:,.0f}"),
        ("committed readings/s", f"{r['readings_per_s']:,.0f}"),
        ("raw binary COPY of the same rows, 1 connection", f"{raw['rows_per_s']:,.0f} rows/s"),
        ("ratio gateway / raw COPY", f"{results['ratio_to_raw_copy']:.2f}"),
        ("request latency p50 / p99 (202 = committed)", f"{r['latency_s']['p50'] * 1000:,.0f} ms / "
                                                        f"{r['latency_s']['p99'] * 1000:,.0f} ms"),
        ("gateway CPU per committed reading", f"{r['gateway_cpu_us_per_reading']:.1f} us"),
        ("PostgreSQL CPU per reading", f"{r['postgresql_cpu_us_per_reading']:.1f} us"),
        ("retries after 429 / 503; other failures", f"{r['retried_429']} / {r['retried_503']}; {r['failures']}"),
        ("sent = committed, no duplicates", "yes" if r["zero_loss"] else f"NO: {r['database']}"),
    ]
    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a:<{width}}  {b}", file=out)


def ok(results: dict[str, Any]) -> bool:
    r = results.get("run", {})
    return bool(r.get("zero_loss")) and r.get("failures") == 0 and results.get("gateway_exit_code") == 0


def _args(argv: list[str] | None) -> HttpsBenchConfig:
    d = HttpsBenchConfig()
    p = argparse.ArgumentParser(prog="python -m bench.https", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envelopes", type=int, default=d.envelopes, help="envelopes to send (10 readings each)")
    p.add_argument("--devices", type=int, default=d.devices, help="registered devices, one token each")
    p.add_argument("--batch", type=int, default=d.batch, help="envelopes per request")
    p.add_argument("--clients", type=int, default=d.clients, help="client processes")
    p.add_argument("--connections", type=int, default=d.connections, help="keep-alive connections per client")
    p.add_argument("--no-fsync", dest="fsync", action="store_false", help="PostgreSQL with fsync off")
    p.add_argument("--raw-repeats", type=int, default=d.raw_repeats, help="raw COPY runs (median)")
    p.add_argument("--timeout", dest="timeout_s", type=float, default=d.timeout_s, help="seconds the load may take")
    p.add_argument("--keep", action="store_true", help="keep the database directory and logs")
    a = p.parse_args(argv)
    return HttpsBenchConfig(envelopes=a.envelopes, devices=a.devices, batch=a.batch, clients=a.clients,
                            connections=a.connections, fsync=a.fsync, raw_repeats=a.raw_repeats,
                            timeout_s=a.timeout_s, keep=a.keep)


def main(argv: list[str] | None = None) -> int:
    cfg = _args(argv)
    results = asyncio.run(run(cfg))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-https.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print_table(results)
    print(f"results: {path.relative_to(REPO)}", file=sys.stderr)
    return 0 if ok(results) else 1


if __name__ == "__main__":
    sys.exit(main())
