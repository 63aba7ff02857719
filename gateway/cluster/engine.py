"""The JetStream side of cluster mode: names, subjects, API requests, the version floor.

nats-py has no helpers for consumer priority groups, so consumers are created, pulled and
unpinned with plain requests to the JetStream API (``$JS.API.*``). Servers before 2.11
accept ``priority_groups`` and drop them silently, which would let every gateway pull
every partition: the version is checked at connect and the config the server returns is
read back (``check_consumer``).
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import orjson

from gateway.config import NatsConfig
from gateway.errors import GatewayError

__all__ = ["STREAM", "GROUP", "VERSION_FLOOR", "EngineError", "Unavailable", "Layout", "connect", "api",
           "consumer_config", "check_consumer", "ensure_mqtt_stream"]

STREAM = "$MQTT_msgs"  # the server's own MQTT stream: what a device's PUBACK stands for
GROUP = "gw"  # the priority group every gateway pulls in
VERSION_FLOOR = (2, 11, 0)  # priority groups with pinned_client, UNPIN
_NS = 1_000_000_000


class EngineError(GatewayError):
    """The JetStream API refused a request (the description says why)."""


class Unavailable(EngineError):
    """No answer or 503: no leader (elections take 6-7 s after a node dies), or no quorum. Back off."""


@dataclass(frozen=True, slots=True)
class Layout:
    """Where partition ``p`` of the device stream lives, for ``partitions`` partitions.

    MQTT topic ``devices/d1/telemetry`` is NATS subject ``devices.d1.telemetry``; the
    servers' mapping stores it as ``$MQTT.msgs.devices.d1.telemetry.n8.3``. The partition
    count is part of the subject (``n8``), so a new count gets new subjects and new
    consumers beside the old ones (README, "Changing the partition count").
    """

    subject: str
    partitions: int
    prefix: str
    ingest_subject: str = "vgingest.*"

    @classmethod
    def of(cls, cfg: NatsConfig) -> Layout:
        return cls(cfg.subject, cfg.partitions, cfg.consumer_prefix, cfg.ingest_subject)

    @property
    def generation(self) -> str:
        return f"n{self.partitions}"

    def durable(self, p: int) -> str:
        return f"{self.prefix}-{self.generation}-p{p}"

    def filter(self, p: int) -> str:
        return f"$MQTT.msgs.{self.subject}.{self.generation}.{p}"

    @property
    def device_token(self) -> int:
        """Index of the device id among the tokens of a stored subject."""
        return 2 + self.subject.split(".").index("*")

    def parse(self, subject: str) -> tuple[str, int] | None:
        """``(device_id, partition)`` of a stored subject; None when it is not one of ours."""
        tokens = subject.split(".")
        try:
            return tokens[self.device_token].replace("//", "."), int(tokens[-1])
        except (IndexError, ValueError):
            return None

    def mappings(self) -> dict[str, str]:
        """The account mappings every server must carry (``vitalgate cluster init`` prints them)."""
        n = self.partitions
        wild = self.subject.replace("*", "{{wildcard(1)}}")
        tail = f".{self.generation}.{{{{partition({n},1)}}}}"
        return {self.subject: wild + tail, self.ingest_subject: f"$MQTT.msgs.{wild}{tail}"}

    def partition_of(self, device_id: str) -> int:
        """The partition the servers' ``partition(n, wildcard)`` mapping gives a device: FNV-1a
        (32 bit) of the subject token, modulo the count (checked against the servers by the
        cluster tests)."""
        h = 0x811C9DC5
        for b in device_id.replace(".", "//").encode():
            h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
        return h % self.partitions

    def ingest(self, device_id: str) -> str:
        """Where an envelope posted over HTTPS is published: mapped into the device's partition."""
        return self.ingest_subject.replace("*", device_id.replace(".", "//"))


async def connect(cfg: NatsConfig, *, name: str, **callbacks: Any) -> nats.NATS:
    """Connect to any node of ``cfg.servers``; refuse a server below ``VERSION_FLOOR``."""
    import ssl

    tls = ssl.create_default_context(cafile=cfg.tls_ca) if cfg.tls_ca else None
    nc = await nats.connect(
        cfg.server_list, name=name, user=cfg.user, password=cfg.password, tls=tls,
        max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=3, ping_interval=5,
        max_outstanding_pings=2, allow_reconnect=True, **callbacks,
    )
    v = nc.connected_server_version
    if (v.major, v.minor, v.patch) < VERSION_FLOOR:
        await nc.close()
        floor = ".".join(map(str, VERSION_FLOOR))
        raise EngineError(f"nats.servers: nats-server {v.major}.{v.minor}.{v.patch} is older than {floor}: it would "
                          "ignore consumer priority groups; upgrade the servers")
    return nc


async def api(nc: nats.NATS, subject: str, body: dict[str, Any] | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """One JetStream API request; ``Unavailable`` on no answer or 503, ``EngineError`` on refusal."""
    try:
        msg = await nc.request(subject, orjson.dumps(body) if body is not None else b"", timeout=timeout)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionClosedError,
            asyncio.TimeoutError) as exc:
        raise Unavailable(f"{subject}: no answer ({type(exc).__name__})") from None
    if msg.headers and msg.headers.get("Status") == "503":
        raise Unavailable(f"{subject}: 503 no responders")
    data = orjson.loads(msg.data) if msg.data else {}
    err = data.get("error")
    if err:
        text = f"{subject}: {err.get('description', err)} (code {err.get('code')}, err_code {err.get('err_code')})"
        raise Unavailable(text) if err.get("code") == 503 else EngineError(text)
    return data


def consumer_config(layout: Layout, p: int, cfg: NatsConfig) -> dict[str, Any]:
    """The durable pull consumer of partition ``p``: explicit acks, one pinned puller at a time."""
    return {
        "durable_name": layout.durable(p),
        "filter_subject": layout.filter(p),
        "deliver_policy": "all",
        "ack_policy": "explicit",
        "ack_wait": int(cfg.ack_wait_s * _NS),
        "max_ack_pending": cfg.max_ack_pending,
        "max_deliver": -1,  # never give up on a reading: a message is redelivered until stored
        "num_replicas": cfg.replicas,
        "priority_groups": [GROUP],
        "priority_policy": "pinned_client",
        "priority_timeout": int(cfg.priority_timeout_s * _NS),
    }


def check_consumer(returned: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Raise ``EngineError`` when the server dropped or changed a field we depend on."""
    got = returned.get("config", {})
    for key in ("priority_groups", "priority_policy", "priority_timeout", "ack_policy", "ack_wait", "filter_subject"):
        if got.get(key) != wanted[key]:
            raise EngineError(f"consumer {wanted['durable_name']}: the server returned {key}={got.get(key)!r}, "
                              f"not {wanted[key]!r} (a server older than the floor ignores priority groups)")


async def ensure_mqtt_stream(nc: nats.NATS, mqtt: tuple[str, int] | None, timeout: float = 30.0) -> dict[str, Any]:
    """The info of ``$MQTT_msgs``. The server creates it when the first MQTT client connects:
    without it, one MQTT 3.1.1 CONNECT to ``mqtt`` (clean session, no subscription) creates it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    poked = False
    while True:
        try:
            return await api(nc, f"$JS.API.STREAM.INFO.{STREAM}")
        except Unavailable:
            pass
        except EngineError as exc:
            if "not found" not in str(exc):
                raise
            if mqtt is None:
                raise EngineError(f"{STREAM} does not exist yet: give the MQTT listener (--mqtt HOST:PORT) or "
                                  "connect one MQTT client first") from None
            if not poked:
                await loop.run_in_executor(None, _mqtt_connect, mqtt)
                poked = True
        if loop.time() > deadline:
            raise Unavailable(f"{STREAM}: JetStream did not answer within {timeout:g}s")
        await asyncio.sleep(0.5)


def _mqtt_connect(address: tuple[str, int]) -> None:
    """CONNECT (MQTT 3.1.1, clean session, client id vitalgate-init), wait for CONNACK, DISCONNECT."""
    cid = b"vitalgate-init"
    var = b"\x00\x04MQTT\x04\x02\x00\x1e" + len(cid).to_bytes(2, "big") + cid
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(bytes([0x10, len(var)]) + var)
        s.recv(4)
        s.sendall(b"\xe0\x00")
