"""Cluster bench: committed readings/s with 1, 2 and 3 gateway processes on a 3-node NATS
JetStream cluster, against the single-host Mosquitto path and the engine's own limit, in one run.

Every path gets the same load, as a backlog (so that the publishers' CPU is not in the
window): pulse oximeters, envelopes of 5 ``numerics`` entries of ``spo2`` + ``pulse_rate``
(10 readings), MQTT 3.1.1 QoS 1 flat out from ``bench.fleet`` (raw-socket publishers),
published while no gateway runs, then drained:

- ``mosquitto``: one gateway with a persistent session on a throwaway Mosquitto (the
  single-host path, ``bench.e2e``'s backlog mode);
- ``cluster-N``: ``vitalgate cluster init`` on a fresh database, the load published to the
  NATS nodes' MQTT listeners (stored in ``$MQTT_msgs``, replicas 3), then N gateway
  processes (cluster mode) started together;
- ``engine``: the load published again, then drained by a bare consumer in this process
  (pinned pulls on the same partition consumers, an ack per message, nothing else): what
  the engine and the client library deliver without the gateway.

Committed rate = envelopes committed between the first and the last poll of
``SELECT count(*) FROM ingests`` (every 0.1 s) that saw new rows, times 10. CPU seconds
over the same window from /proc: the gateway processes, the nats-server nodes (or
mosquitto), the whole PostgreSQL cluster, and the machine. On a 2-core machine shared by
all of them the point is the shape (no loss, what a second gateway buys, the cost per
reading against Mosquitto), not absolute rates.

    python -m bench.cluster [--readings 200000] [--gateways 1,2,3] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from bench import e2e
from bench.fleet import Fleet, FleetConfig
from tests.harness import (
    PROFILES, GatewayProcess, NatsCluster, children, cpu_seconds, machine_busy_seconds, parent, vitalgate,
)

__all__ = ["main", "run"]

PARTITIONS = 8
READINGS_PER_ENVELOPE = e2e.READINGS_PER_ENVELOPE


def _fleet(readings: int, url: str, prefix: str) -> FleetConfig:
    cfg = e2e.E2EConfig(readings=readings, mqtt_version="3.1.1", client="raw")
    return e2e._stress_fleet_config(cfg, url, prefix)  # noqa: SLF001 - the very same scenario as bench.e2e


def _publish(fcfg: FleetConfig, timeout_s: float = 300.0) -> int:
    fleet = Fleet(fcfg)
    fleet.start()
    if not fleet.join(timeout_s):
        raise TimeoutError("publishers did not finish")
    stats = fleet.stats()
    if stats.acked != stats.published or stats.published != fcfg.envelopes:
        raise RuntimeError(f"engine acknowledged {stats.acked:,} of {stats.published:,} envelopes")
    return stats.acked


class _Window:
    """Polls a count and the CPU of process groups; ``result`` is over the first..last new rows."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups  # pids looked up at every sample: PostgreSQL backends come with the gateways
        self.samples: list[tuple[float, float, dict[str, float]]] = []

    def sample(self, count: float) -> None:
        cpu = {g: sum(cpu_seconds(p) for p in pids()) for g, pids in self.groups.items()}
        cpu["machine"] = machine_busy_seconds()
        self.samples.append((time.monotonic(), count, cpu))

    def result(self, total: int) -> dict[str, Any]:
        base = self.samples[0][1]
        i = next((k for k, s in enumerate(self.samples) if s[1] > base), 0)
        i = max(0, i - 1)
        j = next((k for k, s in enumerate(self.samples) if s[1] >= total), len(self.samples) - 1)
        (t1, n1, c1), (t2, n2, c2) = self.samples[i], self.samples[j]
        dt = t2 - t1
        readings = (n2 - n1) * READINGS_PER_ENVELOPE
        out: dict[str, Any] = {"window_s": round(dt, 2), "readings_per_s": readings / dt if dt > 0 else 0.0}
        for g in c1:
            used = c2[g] - c1[g]
            out[f"{g}_cores"] = used / dt if dt > 0 else 0.0
            if g != "machine":
                out[f"{g}_us_per_reading"] = 1e6 * used / readings if readings else None
        return out


async def _poll(dsn: str, window: _Window, total: int, deadline_s: float, alive: Any) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        end = time.monotonic() + deadline_s
        while True:
            n = await conn.fetchval("SELECT count(*) FROM ingests") if await conn.fetchval(
                "SELECT to_regclass('ingests') IS NOT NULL") else 0
            window.sample(float(n))
            if n >= total:
                return
            if time.monotonic() > end or not alive():
                raise RuntimeError(f"only {n:,} of {total:,} envelopes committed")
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def _postmaster(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        pm = parent(await conn.fetchval("SELECT pg_backend_pid()"))
    finally:
        await conn.close()
    if pm is None:
        raise RuntimeError("PostgreSQL's postmaster not found")
    return pm


async def _cluster_run(n_gw: int, readings: int, pg: Any, nats: NatsCluster, work: Path) -> dict[str, Any]:
    dsn = pg.create_database(f"bench_cluster_{n_gw}")
    env = {"VITALGATE_MQTT_ENABLED": "false", "VITALGATE_NATS_ENABLED": "true", "VITALGATE_NATS_SERVERS": nats.servers,
           "VITALGATE_NATS_PARTITIONS": str(PARTITIONS), "VITALGATE_LOG_LEVEL": "INFO"}
    host, port = nats.mqtt_address(0)
    vitalgate(dsn, "db", "migrate", env=env)  # before the gateways: they would race to create the schema
    vitalgate(dsn, "cluster", "init", "--mqtt", f"{host}:{port}", env=env)
    fcfg = _fleet(readings, f"mqtt://{host}:{port}", f"bench-c{n_gw}")
    total = await asyncio.to_thread(_publish, fcfg)
    gws = [GatewayProcess(work / f"cluster{n_gw}-gw{i}.log", database_url=dsn, gateway_id=f"bench-{i}", env=env,
                          profiles_dir=PROFILES, ready_line="Joined the cluster.") for i in range(n_gw)]
    nats_pids = [p for p in (nats.pid(i) for i in range(nats.nodes)) if p is not None]
    try:
        for gw in gws:
            gw.spawn()
        pm = await _postmaster(dsn)
        window = _Window({"gateway": lambda: [gw.pid for gw in gws], "nats": lambda: nats_pids,
                          "postgres": lambda: [pm, *children(pm)]})
        try:
            await _poll(dsn, window, total, 300, lambda: all(gw.alive() for gw in gws))
        except RuntimeError as exc:
            tails = "\n".join(f"--- {gw.log_path.name}\n{gw.log_tail(30)}" for gw in gws)
            raise RuntimeError(f"cluster-{n_gw}: {exc}\n{tails}") from None
        res = window.result(total)
        conn = await asyncpg.connect(dsn)
        try:
            stored = await conn.fetchval("SELECT count(*) FROM readings")
        finally:
            await conn.close()
        res["zero_loss"] = stored == total * READINGS_PER_ENVELOPE
        return res
    finally:
        for gw in gws:
            gw.stop()


async def _engine_run(readings: int, nats: NatsCluster) -> dict[str, Any]:
    """The load drained by pinned pulls and acks alone (what the engine delivers)."""
    import nats as nats_client

    from gateway.cluster.engine import GROUP, STREAM

    host, port = nats.mqtt_address(0)
    total = await asyncio.to_thread(_publish, _fleet(readings, f"mqtt://{host}:{port}", "bench-engine"))
    nc = await nats_client.connect(nats.servers.split(","))
    got = 0
    done = asyncio.Event()

    async def partition(p: int) -> None:
        nonlocal got
        inbox = nc.new_inbox()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        sub = await nc.subscribe(inbox, cb=queue.put)
        pin = None
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.vg-n{PARTITIONS}-p{p}"
        while not done.is_set():
            body = {"batch": 1000, "expires": 1_000_000_000, "group": GROUP, **({"id": pin} if pin else {})}
            await nc.publish(subject, orjson.dumps(body), reply=inbox)
            n = 0
            while n < 1000:
                try:
                    msg = await asyncio.wait_for(queue.get(), 3)
                except asyncio.TimeoutError:
                    break
                headers = msg.headers or {}
                if headers.get("Status") and not msg.data:
                    if headers["Status"] == "423":
                        pin = None
                    break
                pin = headers.get("Nats-Pin-Id", pin)
                await nc.publish(msg.reply, b"+ACK")
                n += 1
                got += 1
                if got >= total:
                    done.set()
        await sub.unsubscribe()

    nats_pids = [p for p in (nats.pid(i) for i in range(nats.nodes)) if p is not None]
    window = _Window({"consumer": lambda: [os.getpid()], "nats": lambda: nats_pids})
    tasks = [asyncio.create_task(partition(p)) for p in range(PARTITIONS)]
    end = time.monotonic() + 300
    while got < total and time.monotonic() < end:
        window.sample(float(got))
        await asyncio.sleep(0.1)
    window.sample(float(got))
    done.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    await nc.close()
    res = window.result(total)
    res["zero_loss"] = got >= total
    return res


async def run(readings: int, gateways: list[int]) -> dict[str, Any]:
    pg, mq, work = e2e.make_services(fsync=True)
    nats = NatsCluster(work / "nats", partitions=PARTITIONS)
    results: dict[str, Any] = {"readings": readings, "envelopes": readings // READINGS_PER_ENVELOPE}
    try:
        pg.start()
        mq.start()
        nats.start()
        cfg = e2e.E2EConfig(readings=readings, mqtt_version="3.1.1", modes=["backlog"], bare_subscriber=False)
        single = await e2e._run_mode("backlog", cfg, pg, mq, work)  # noqa: SLF001 - the single-host path as bench.e2e runs it
        w = single["window"]
        results["mosquitto"] = {
            "window_s": round(w["window_s"], 2), "readings_per_s": w["readings_per_s"],
            "gateway_cores": w["gateway_cores"], "gateway_us_per_reading": w["gateway_cpu_us_per_reading"],
            "broker_us_per_reading": 1e6 * w["mosquitto_cpu_s"] / (w["envelopes_in_window"] * READINGS_PER_ENVELOPE),
            "postgres_us_per_reading": 1e6 * w["pg_cluster_cpu_s"] / (w["envelopes_in_window"] * READINGS_PER_ENVELOPE),
            "machine_cores": w["machine_busy_cores"], "zero_loss": single["zero_loss"]}
        _say("mosquitto", results["mosquitto"])
        for n in gateways:
            results[f"cluster-{n}"] = await _cluster_run(n, readings, pg, nats, work)
            _say(f"cluster-{n}", results[f"cluster-{n}"])
        results["engine"] = await _engine_run(readings, nats)
        _say("engine", results["engine"])
        return results
    finally:
        nats.cleanup()
        e2e.stop_services(pg, mq, work)
        shutil.rmtree(work, ignore_errors=True)


def _say(name: str, r: dict[str, Any]) -> None:
    print(f"{name:>10}: " + ", ".join(f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()),
          file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n\n")[0])
    ap.add_argument("--readings", type=int, default=200_000, help="readings per path (10 per envelope)")
    ap.add_argument("--gateways", default="1,2,3", help="gateway process counts on the cluster")
    ap.add_argument("--json", type=Path, help="write the results here")
    a = ap.parse_args(argv)
    results = asyncio.run(run(a.readings, [int(x) for x in a.gateways.split(",")]))
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    ok = all(r.get("zero_loss") for k, r in results.items() if isinstance(r, dict))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
