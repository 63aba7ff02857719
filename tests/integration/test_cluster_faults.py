"""Cluster mode under faults: 3 NATS nodes, 3 gateway hosts (network namespaces), 500 devices.

Devices publish QoS 1 over MQTT 3.1.1 to random nodes (a minimal asyncio client: 500
paho clients would need 500 threads) and resend what was not acknowledged after a
reconnect. Under that load: one NATS node is killed (-9), then a whole gateway host, then
a gateway host is cut off the network for 20 s; finally the killed host's gateway comes
back (a join). Then: every acknowledged reading is stored exactly once, OUT_OF_ORDER flags
and alert episodes equal what replay of the same per-device sequences gives, every device
is ingested again within 10 s of each fault, and the joining gateway holds its
rendezvous share of partitions within 10 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import orjson
import pytest

from gateway.cluster.membership import rendezvous
from gateway.model import Flag
from tests.harness import PROFILES, REPO, GatewayProcess, NatsCluster, NetHosts, PostgresCluster, wait_for

pytestmark = pytest.mark.integration

DEVICES = 500
PARTITIONS = 8
RECOVERY_S = 10.0


def _payload(dev: int, seq: int, t0: int) -> bytes:
    t = t0 + seq * 1000
    low = dev % 10 == 0 and 20 <= seq < 40  # an SpO2 episode on a tenth of the devices
    env = {"v": 1, "device_id": f"cd-{dev:04d}", "seq": seq, "profile": "pulse_oximeter", "sent_at": t + 20,
           "numerics": [{"t": t, "values": {"spo2": 85 if low else 97, "pulse_rate": 60 + seq % 30}}]}
    return orjson.dumps(env)


class Fleet:
    """Devices publishing one reading a second each until ``stop``; ``acked[dev]`` = seqs PUBACKed."""

    def __init__(self, addresses: list[tuple[str, int]], t0: int) -> None:
        self.addresses = addresses
        self.t0 = t0
        self.stop = threading.Event()
        self.acked: list[set[int]] = [set() for _ in range(DEVICES)]
        self.sent = [0] * DEVICES
        self.errors = 0

    async def device(self, d: int) -> None:
        rng = random.Random(d)
        await asyncio.sleep(rng.random())
        unacked: dict[int, int] = {}  # packet id -> seq
        pid = 0
        while True:
            host, port = rng.choice(self.addresses)
            writer = None
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 3)
                cid = f"cd-{d:04d}".encode()
                var = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid
                writer.write(bytes([0x10, len(var)]) + var)
                ack = await asyncio.wait_for(reader.readexactly(4), 5)
                if ack[3] != 0:
                    raise ConnectionError(f"CONNACK {ack[3]}")

                async def pubacks() -> None:
                    while True:
                        head = await reader.readexactly(4)
                        if head[0] >> 4 == 4:
                            seq = unacked.pop(int.from_bytes(head[2:4], "big"), None)
                            if seq is not None:
                                self.acked[d].add(seq)

                rtask = asyncio.create_task(pubacks())
                for p, seq in sorted(unacked.items(), key=lambda kv: kv[1]):  # resend, in order
                    writer.write(self._publish(d, seq, p, dup=True))
                while not self.stop.is_set():
                    if rtask.done():
                        raise ConnectionError("connection lost")
                    if self.t0 + self.sent[d] * 1000 <= time.time() * 1000:
                        pid = pid % 65535 + 1
                        seq = self.sent[d]
                        unacked[pid] = seq
                        self.sent[d] += 1
                        writer.write(self._publish(d, seq, pid))
                    await asyncio.sleep(0.1)
                await asyncio.wait_for(self._drained(unacked), 60)
                rtask.cancel()
                return
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                self.errors += 1
                await asyncio.sleep(0.5)
            finally:
                if writer is not None:
                    writer.close()

    @staticmethod
    async def _drained(unacked: dict[int, int]) -> None:
        while unacked:
            await asyncio.sleep(0.1)

    def _publish(self, d: int, seq: int, pid: int, dup: bool = False) -> bytes:
        topic = f"devices/cd-{d:04d}/telemetry".encode()
        body = len(topic).to_bytes(2, "big") + topic + pid.to_bytes(2, "big") + _payload(d, seq, self.t0)
        n, rem = len(body), bytearray()
        while True:
            b, n = n % 128, n // 128
            rem.append(b | (0x80 if n else 0))
            if not n:
                break
        return bytes([0x32 | (0x08 if dup else 0)]) + bytes(rem) + body

    async def run(self) -> None:
        await asyncio.gather(*(self.device(d) for d in range(DEVICES)))


def _socket_dsn(pg: PostgresCluster, tcp_dsn: str) -> str:
    """The same database over the unix socket: reachable from every network namespace."""
    return f"postgresql://postgres@/{urlsplit(tcp_dsn).path.lstrip('/')}?host={pg.socket_dir}&port={pg.port}"


async def _query(dsn: str, sql: str, *args: object) -> list:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def _first_after(dsn: str, t_ms: int) -> dict[str, int]:
    rows = asyncio.run(_query(dsn, "SELECT device_id, (extract(epoch FROM min(received_at)) * 1000)::bigint "
                                   "FROM ingests WHERE received_at > to_timestamp($1 / 1000.0) GROUP BY 1", t_ms))
    return {r[0]: r[1] for r in rows}


def test_cluster_survives_node_host_and_partition_faults(pg_cluster: PostgresCluster, db_dsn: str, tmp_path: Path) -> None:
    tag = str(os.getpid() % 10000)
    net = NetHosts(tag)
    nats = None
    gws: dict[str, GatewayProcess] = {}
    try:
        core = ["10.231.0.1", "10.231.0.2", "10.231.0.3"]
        net.create(core)
        nats = NatsCluster(tmp_path / "nats", partitions=PARTITIONS, hosts=core, netns=[net.core] * 3)
        nats.start()
        dsn = _socket_dsn(pg_cluster, db_dsn)
        env = {"VITALGATE_MQTT_ENABLED": "false", "VITALGATE_NATS_ENABLED": "true", "VITALGATE_NATS_SERVERS": nats.servers,
               "VITALGATE_NATS_PARTITIONS": str(PARTITIONS)}
        init = subprocess.run(["ip", "netns", "exec", net.core, sys.executable, "-m", "gateway", "cluster", "init",
                               "--mqtt", f"{core[0]}:{nats.mqtt_ports[0]}"], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, **env, "VITALGATE_DATABASE_URL": dsn}, timeout=180)
        assert init.returncode == 0, init.stderr
        for i, name in enumerate(("h1", "h2", "h3")):
            ns = net.add_host(name, f"10.231.0.{11 + i}")
            gws[name] = GatewayProcess(tmp_path / name / "gateway.log", database_url=dsn, gateway_id=f"gw-{name}",
                                       profiles_dir=PROFILES, metrics_port=0, env=env, ready_line="Joined the cluster.",
                                       command_prefix=["ip", "netns", "exec", ns])
            gws[name].start(timeout=60)
        t0 = int(time.time()) * 1000 + 2000
        fleet = Fleet([(core[i], nats.mqtt_ports[i]) for i in range(3)], t0)

        def run_fleet() -> None:
            net.enter(net.core)
            asyncio.run(fleet.run())

        thread = threading.Thread(target=run_fleet, name="fleet", daemon=True)
        thread.start()
        recovered: dict[str, float] = {}

        def fault(name: str, act) -> None:  # type: ignore[no-untyped-def]
            t = int(time.time() * 1000)
            act()
            wait_for(lambda: len(_first_after(dsn, t)) == DEVICES, 60, 0.5, f"every device ingested again after {name}")
            recovered[name] = (max(_first_after(dsn, t).values()) - t) / 1000

        wait_for(lambda: len(_first_after(dsn, t0)) == DEVICES, 60, 0.5, "every device ingested")
        time.sleep(5)  # steady load before the first fault
        fault("nats node kill -9", lambda: nats.kill(1))
        nats.start_node(1)
        fault("gateway host kill -9", lambda: gws["h2"].kill())
        fault("gateway host cut off 20 s", lambda: net.cut("h3"))
        time.sleep(20)
        net.heal("h3")
        joined_at = time.monotonic()
        gws["h2"].start(timeout=60)
        share = rendezvous(PARTITIONS, {"gw-h1", "gw-h2", "gw-h3"}, "gw-h2")

        def h2_holds_share() -> bool:
            rows = asyncio.run(_query(dsn, "SELECT consumer FROM partition_owners WHERE owner LIKE 'gw-h2/%'"))
            return {int(r[0].rsplit("-p", 1)[1]) for r in rows} == share

        wait_for(h2_holds_share, 30, 0.2, "the joining gateway holds its share")
        join_s = time.monotonic() - joined_at
        time.sleep(3)
        fleet.stop.set()
        thread.join(90)
        assert not thread.is_alive(), "devices did not get their last PUBACKs"
        acked = {(f"cd-{d:04d}", s) for d in range(DEVICES) for s in fleet.acked[d]}

        def stored() -> set:
            return {(r[0], r[1]) for r in asyncio.run(_query(dsn, "SELECT device_id, seq FROM ingests"))}

        wait_for(lambda: acked <= stored(), 90, 1.0, lambda: f"{len(acked - stored())} acknowledged readings not stored")
        for gw in gws.values():
            gw.stop()
        dup = asyncio.run(_query(dsn, "SELECT device_id, (extract(epoch FROM time) * 1000)::bigint, metric, count(*) "
                                      "FROM readings GROUP BY 1, 2, 3 HAVING count(*) > 1"))
        assert not dup, f"readings stored twice: {dup[:5]}"
        n_ingests = asyncio.run(_query(dsn, "SELECT count(*), count(DISTINCT (device_id, seq)) FROM ingests"))[0]
        assert n_ingests[0] == n_ingests[1]
        # replay of the same per-device sequences (what was stored, in seq order)
        rec = tmp_path / "recording.ndjson"
        rows = asyncio.run(_query(dsn, "SELECT device_id, seq FROM ingests ORDER BY seq, device_id"))
        with open(rec, "wb") as f:
            for dev, seq in rows:
                f.write(_payload(int(dev[3:]), seq, t0) + b"\n")
        out = subprocess.run([sys.executable, "-m", "gateway", "replay", "--profiles", str(PROFILES), str(rec)],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        objs = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
        replay_open = sorted((o["device_id"], o["rule"], o["at"]) for o in objs
                             if o.get("type") == "alert" and o.get("event") == "open")
        live_open = sorted((r[0], r[1], r[2]) for r in asyncio.run(_query(
            dsn, "SELECT device_id, rule, (extract(epoch FROM opened_at) * 1000)::bigint FROM alerts")))
        assert live_open == replay_open
        assert replay_open, "the scenario opens alert episodes"
        summary = next(o for o in objs if o.get("type") == "summary")
        ooo = asyncio.run(_query(dsn, "SELECT count(*) FROM readings WHERE flags & $1 <> 0", int(Flag.OUT_OF_ORDER)))[0][0]
        assert ooo == summary.get("flags", {}).get("OUT_OF_ORDER", 0)
        for name, s in recovered.items():
            assert s <= RECOVERY_S, f"{name}: devices ingested again after {s:.1f} s"
        assert join_s <= RECOVERY_S, f"the joining gateway took {join_s:.1f} s"
        print(f"recovery: {recovered}; join {join_s:.1f} s; acked {len(acked)}; reconnects {fleet.errors}")
    finally:
        for gw in gws.values():
            gw.stop()
        if nats is not None:
            nats.cleanup()
        net.cleanup()
