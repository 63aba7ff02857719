"""Cluster mode under faults: 3 NATS nodes, 3 gateway hosts (network namespaces), 500 devices.

Devices publish QoS 1 over MQTT 3.1.1 to random nodes (a minimal asyncio client: 500
paho clients would need 500 threads) and resend what was not acknowledged after a
reconnect. Under that load: one NATS node is killed (-9), then a whole gateway host, then
a gateway host is cut off the network for 20 s; then the killed host's gateway comes back
(a join). SpO2 episodes run across the faults (one across the first three, one across the
heal and the join), so check and rule state must survive every hand-over.

Checked:
- every acknowledged reading is stored, and every reading once;
- replay of the same per-device sequences, in the order the engine stored them (a reading
  lost by the engine before storage is resent by its device after later ones: that
  OUT_OF_ORDER is real, and replay sees it too), gives the same OUT_OF_ORDER count and
  the same threshold episodes, none opened twice;
- ``silent`` episodes: replay's clock is reading time and each device's sequence has no
  gap, so replay opens none. Live follows the wall clock: an episode live opens beyond
  replay's is accepted only when the device really got nothing through for ``after_s``
  (its next reading was received after the episode's ``at``); every one of replay's must
  be live's too. A gateway must never open one for devices whose readings kept arriving
  (elsewhere, or waiting in the engine while it was cut off or taking over);
- after each fault every partition is owned and committing again within 10 s (a reading
  published after the fault committed; printed per partition with the time for every
  device), and the joining gateway holds its rendezvous share within 10 s of joining.
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
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import orjson
import pytest

from gateway.cluster.engine import Layout
from gateway.cluster.membership import rendezvous
from gateway.model import Flag
from tests.harness import PROFILES, REPO, GatewayProcess, NatsCluster, NetHosts, PostgresCluster, wait_for

pytestmark = pytest.mark.integration

DEVICES = 500
PARTITIONS = 8
RECOVERY_S = 10.0
CUT_S = 20.0
LAST_SEQ = 58  # devices publish at least this long: the second SpO2 episode closes after the join
SILENT_AFTER_MS = 30_000  # probe_silent of pulse_oximeter


def _payload(dev: int, seq: int, t0: int) -> bytes:
    t = t0 + seq * 1000
    # SpO2 episodes on a fifth of the devices: one across the first faults, one across the heal and the join
    low = (dev % 10 == 0 and 20 <= seq < 40) or (dev % 10 == 5 and 36 <= seq < 56)
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
            rtask: asyncio.Task[None] | None = None
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
                rtask.add_done_callback(lambda t: t.cancelled() or t.exception())  # a lost connection is expected
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
                await asyncio.wait_for(self._drained(unacked, rtask), 60)
                return
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                self.errors += 1
                await asyncio.sleep(0.5)
            finally:
                if rtask is not None:
                    rtask.cancel()
                if writer is not None:
                    writer.close()

    @staticmethod
    async def _drained(unacked: dict[int, int], rtask: asyncio.Task[None]) -> None:
        while unacked:
            if rtask.done():
                raise ConnectionError("connection lost before the last PUBACKs")
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


class StreamOrder:
    """The order in which the engine stored each device's readings (an ordered consumer on
    ``$MQTT_msgs``, acknowledging nothing): replay's input is this per-device sequence, since
    a reading the engine lost before storing it comes again, resent by its device, after
    later ones (a real OUT_OF_ORDER that replay must see too)."""

    def __init__(self, servers: str) -> None:
        self.servers = servers
        self.first: dict[tuple[str, int], int] = {}  # (device, seq) -> first stream sequence
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()

    async def run(self) -> None:
        import nats as nats_client
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        nc = await nats_client.connect(self.servers.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.5)
        js = nc.jetstream()
        # the device stream keeps messages by interest: its consumers are R3; acknowledging none
        # (AckNone), this one holds nothing back
        await js.add_consumer("$MQTT_msgs", ConsumerConfig(
            durable_name="test-order", ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL,
            filter_subject=f"$MQTT.msgs.devices.*.telemetry.n{PARTITIONS}.*", num_replicas=3))
        sub = await js.pull_subscribe_bind("test-order", stream="$MQTT_msgs")
        self.ready.set()
        while not self.stop.is_set():
            try:
                msgs = await sub.fetch(1000, timeout=1)
            except Exception:  # noqa: BLE001 - pull expired, or no leader during the node kill: ask again
                await asyncio.sleep(0.1)
                continue
            for msg in msgs:
                env = orjson.loads(msg.data)
                key = (env["device_id"], env["seq"])
                sseq = msg.metadata.sequence.stream
                if sseq < self.first.get(key, sseq + 1):
                    self.first[key] = sseq
        await nc.close()


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


def _silent_gap_was_real(dsn: str, t0: int, device: str, at: int) -> bool:
    """A live ``silent`` episode replay cannot see: no reading of ``device`` newer than the one
    it counts from (``at - after_s``) was received before ``at``: the device really got
    nothing through for ``after_s`` of wall clock (replay's clock is reading time, and the
    device's own sequence has no gap, so replay has no such silence to find)."""
    latest_seq = (at - SILENT_AFTER_MS - t0) // 1000
    first = asyncio.run(_query(dsn, "SELECT (extract(epoch FROM min(received_at)) * 1000)::bigint FROM ingests "
                                    "WHERE device_id = $1 AND seq > $2", device, latest_seq))[0][0]
    return first is None or first >= at


def test_cluster_survives_node_host_and_partition_faults(pg_cluster: PostgresCluster, db_dsn: str, tmp_path: Path) -> None:
    tag = str(os.getpid() % 10000)
    net = NetHosts(tag)
    nats = None
    gws: dict[str, GatewayProcess] = {}
    layout = Layout("devices.*.telemetry", PARTITIONS, "vg")
    part_of = {f"cd-{d:04d}": layout.partition_of(f"cd-{d:04d}") for d in range(DEVICES)}
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
        order = StreamOrder(nats.servers)
        loop: asyncio.AbstractEventLoop | None = None

        def run_fleet() -> None:
            nonlocal loop
            net.enter(net.core)

            async def both() -> None:
                nonlocal loop
                loop = asyncio.get_running_loop()
                watcher = asyncio.create_task(order.run())
                await asyncio.wait_for(order.ready.wait(), 60)
                await fleet.run()
                await watcher

            asyncio.run(both())

        thread = threading.Thread(target=run_fleet, name="fleet", daemon=True)
        thread.start()
        recovered: dict[str, float] = {}  # fault -> s until every partition is owned and committing again
        marks: dict[str, int] = {}

        def first_new(t: int) -> dict[str, int]:
            """Per device, when its first reading published after ``t`` was committed."""
            rows = asyncio.run(_query(dsn, "SELECT device_id, (extract(epoch FROM min(received_at)) * 1000)::bigint "
                                           "FROM ingests WHERE seq >= $1 GROUP BY 1", -((t0 - t) // 1000)))
            return {r[0]: r[1] for r in rows}

        def flowing_again(name: str, t: int) -> None:
            wait_for(lambda: len(first_new(t)) == DEVICES, 60, 0.5, f"every device committed again after {name}")
            first = first_new(t)
            per_part: dict[int, int] = {}
            for dev, at in first.items():  # a partition is owned again once a reading published since is committed
                per_part[part_of[dev]] = min(per_part.get(part_of[dev], at), at)
            recovered[name] = (max(per_part.values()) - t) / 1000
            print(f"fault: {name}; every partition owned and committing again after {recovered[name]:.1f} s "
                  f"(per partition: " + ", ".join(f"p{p} {(at - t) / 1000:.1f}" for p, at in sorted(per_part.items()))
                  + f"); every device after {(max(first.values()) - t) / 1000:.1f} s", flush=True)

        def fault(name: str, act) -> None:  # type: ignore[no-untyped-def]
            marks[name] = t = int(time.time() * 1000)
            act()
            flowing_again(name, t)

        wait_for(lambda: len(_first_after(dsn, t0 + 4000)) == DEVICES, 60, 0.5, "every device ingested under steady load")
        fault("nats node kill -9", lambda: nats.kill(1))
        nats.start_node(1)
        fault("gateway host kill -9", lambda: gws["h2"].kill())
        marks["cut"] = int(time.time() * 1000)
        net.cut("h3")
        time.sleep(CUT_S)  # the fault itself: h3 is off the network this long
        net.heal("h3")
        flowing_again("gateway host cut off 20 s", marks["cut"])
        marks["join"] = int(time.time() * 1000)
        started = time.monotonic()
        gws["h2"].start(timeout=60)  # returns at "Joined the cluster.": a member from then on
        joined_at = time.monotonic()
        share = rendezvous(PARTITIONS, {"gw-h1", "gw-h2", "gw-h3"}, "gw-h2")

        def h2_holds_share() -> bool:
            rows = asyncio.run(_query(dsn, "SELECT consumer FROM partition_owners WHERE owner LIKE 'gw-h2/%'"))
            return {int(r[0].rsplit("-p", 1)[1]) for r in rows} == share

        wait_for(h2_holds_share, 30, 0.2, "the joining gateway holds its share")
        join_s = time.monotonic() - joined_at
        print(f"join: gw-h2 holds its share {sorted(share)} {join_s:.1f} s after joining "
              f"(the process took {joined_at - started:.1f} s to start)", flush=True)
        flowing_again("join", marks["join"])

        def every_device_past(seq: int) -> bool:
            return asyncio.run(_query(dsn, "SELECT count(DISTINCT device_id) FROM ingests WHERE seq >= $1", seq))[0][0] == DEVICES

        wait_for(lambda: every_device_past(LAST_SEQ), 90, 0.5, f"every device stored seq {LAST_SEQ}")
        fleet.stop.set()

        def stored() -> set:
            return {(r[0], r[1]) for r in asyncio.run(_query(dsn, "SELECT device_id, seq FROM ingests"))}

        def devices_done() -> bool:
            return not any(fleet.sent[d] > len(fleet.acked[d]) for d in range(DEVICES))

        wait_for(devices_done, 90, 0.5, "devices got their last PUBACKs")
        acked = {(f"cd-{d:04d}", s) for d in range(DEVICES) for s in fleet.acked[d]}
        wait_for(lambda: acked <= stored(), 90, 1.0, lambda: f"{len(acked - stored())} acknowledged readings not stored")
        wait_for(lambda: stored() <= order.first.keys(), 60, 0.5, "the stream order of every stored reading seen")
        assert loop is not None
        loop.call_soon_threadsafe(order.stop.set)
        thread.join(60)
        assert not thread.is_alive(), "devices or the stream watcher did not finish"
        for gw in gws.values():
            gw.stop()
        dup = asyncio.run(_query(dsn, "SELECT device_id, (extract(epoch FROM time) * 1000)::bigint, metric, count(*) "
                                      "FROM readings GROUP BY 1, 2, 3 HAVING count(*) > 1"))
        assert not dup, f"readings stored twice: {dup[:5]}"
        n_ingests = asyncio.run(_query(dsn, "SELECT count(*), count(DISTINCT (device_id, seq)) FROM ingests"))[0]
        assert n_ingests[0] == n_ingests[1]
        # replay of the same per-device sequences: what was stored, in the order the engine stored it
        rec = tmp_path / "recording.ndjson"
        rows = sorted(stored(), key=lambda k: order.first[k])
        with open(rec, "wb") as f:
            for dev, seq in rows:
                f.write(_payload(int(dev[3:]), seq, t0) + b"\n")
        out = subprocess.run([sys.executable, "-m", "gateway", "replay", "--profiles", str(PROFILES), str(rec)],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        objs = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
        replay_open = Counter((o["device_id"], o["rule"], o["at"]) for o in objs
                              if o.get("type") == "alert" and o.get("event") == "open")
        live_open = Counter((r[0], r[1], r[2]) for r in asyncio.run(_query(
            dsn, "SELECT device_id, rule, (extract(epoch FROM opened_at) * 1000)::bigint FROM alerts")))
        twice = {k: n for k, n in live_open.items() if n > 1}
        assert not twice, f"episodes opened twice: {list(twice.items())[:5]}"
        extra, missing = live_open - replay_open, replay_open - live_open
        report = "\n".join(f"{what} {dev} {rule} at t0+{(at - t0) / 1000:.1f} s; " + ", ".join(
            f"{k} {(at - v) / 1000:+.1f} s" for k, v in marks.items()) for what, c in (("extra", extra), ("missing", missing))
            for dev, rule, at in sorted(c, key=lambda k: k[2]))
        # threshold episodes follow reading time: exactly replay's
        assert not [k for k in extra + missing if k[1] != "probe_silent"], f"episodes differ from replay:\n{report}"
        # silent follows the clock: replay's, plus only those of devices that really got nothing through for after_s
        assert not missing, f"silent episodes replay opens, live does not:\n{report}"
        unexplained = [k for k in extra if not _silent_gap_was_real(dsn, t0, k[0], k[2])]
        assert not unexplained, f"silent episodes of devices whose readings kept arriving:\n{report}"
        assert replay_open, "the scenario opens alert episodes"
        summary = next(o for o in objs if o.get("type") == "summary")
        ooo = asyncio.run(_query(dsn, "SELECT count(*) FROM readings WHERE flags & $1 <> 0", int(Flag.OUT_OF_ORDER)))[0][0]
        assert ooo == summary.get("flags", {}).get("OUT_OF_ORDER", 0)
        for name, s in recovered.items():
            assert s <= RECOVERY_S, f"{name}: every partition committing each of its devices again only after {s:.1f} s"
        assert join_s <= RECOVERY_S, f"the joining gateway took {join_s:.1f} s"
        print(f"recovery: {recovered}; join {join_s:.1f} s; acked {len(acked)}; reconnects {fleet.errors}; "
              f"episodes {sum(live_open.values())} (silent ones replay cannot see: {sum(extra.values())})")
    finally:
        for gw in gws.values():
            gw.stop()
        if nats is not None:
            nats.cleanup()
        net.cleanup()
