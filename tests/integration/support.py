"""What the MQTT integration tests publish and what they read back.

``Publisher`` (paho, QoS 1, waits for the broker's PUBACKs) and ``publish_paced``;
deterministic pulse-oximeter envelopes in both encodings; the readings a set of
envelopes must leave in the database, and the ones it did. The gateway and the
services come from ``tests.harness``.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence

import asyncpg
import msgspec
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.harness import wait_for

__all__ = ["Publisher", "encode", "expected_readings", "fetch_readings", "publish_paced", "pulse_ox_envelopes",
           "sha256", "topic"]


class Publisher:
    """A paho client publishing at QoS 1 and waiting for the broker's PUBACKs."""

    def __init__(self, port: int, *, protocol: int = mqtt.MQTTv311, client_id: str = "", username: str | None = None,
                 password: str | None = None, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, reconnect_delay_s: float | None = None) -> None:
        """``username``/``password``: broker credentials; ``tls_ca``: connect with TLS trusting this CA
        (``tls_cert``/``tls_key``: a client certificate). ``connack`` and ``puback_reasons`` (mid ->
        reason code, MQTT 5 tells refusals apart) record what the broker answered.
        ``reconnect_delay_s``: paho's first reconnect delay (default 1 s), which ``close()`` may
        wait out when the broker dropped the connection."""
        self.protocol = protocol
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        self.client.max_inflight_messages_set(500)
        self.client.max_queued_messages_set(0)
        self.connack: object = None
        self.puback_reasons: dict[int, object] = {}
        self.client.on_connect = lambda _c, _u, _f, rc, _p: setattr(self, "connack", rc)
        self.client.on_publish = lambda _c, _u, mid, rc, _p: self.puback_reasons.__setitem__(mid, rc)
        if reconnect_delay_s is not None:
            self.client.reconnect_delay_set(reconnect_delay_s, max(reconnect_delay_s, 1))  # type: ignore[arg-type]
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls_ca is not None:
            self.client.tls_set(ca_certs=tls_ca, certfile=tls_cert, keyfile=tls_key)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.infos: list[mqtt.MQTTMessageInfo] = []

    def wait_connected(self, timeout: float = 10.0) -> object:
        """Wait for the CONNACK; return its reason code (``.is_failure`` tells a refusal)."""
        return wait_for(lambda: self.connack, timeout=timeout, message="CONNACK from the broker")

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, content_type: str | None = None) -> None:
        props = None
        if content_type and self.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = content_type
        info = self.client.publish(topic, payload, qos=qos, properties=props)
        self.infos.append(info)

    def wait_acked(self, timeout: float = 120.0) -> None:
        wait_for(lambda: all(i.is_published() for i in self.infos), timeout=timeout, interval=0.05,
                 message=lambda: f"broker acked {sum(i.is_published() for i in self.infos)} of {len(self.infos)}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def publish_paced(port: int, messages: Sequence[tuple[str, bytes]], per_second: float, stop: threading.Event | None = None) -> threading.Thread:
    """Publish ``messages`` from a thread at about ``per_second``; waits for every PUBACK.

    The sleep paces the input (a device fleet's rate), it waits for no condition.
    """

    def run() -> None:
        pub = Publisher(port)
        start = time.monotonic()
        for i, (topic, payload) in enumerate(messages):
            due = start + i / per_second
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            pub.publish(topic, payload)
        pub.wait_acked()
        pub.close()

    t = threading.Thread(target=run, name="publisher", daemon=True)
    t.start()
    return t


async def fetch_readings(dsn: str) -> Counter[tuple[str, str, int, float]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT device_id, metric, (extract(epoch FROM time) * 1000)::bigint AS t, value FROM readings"
        )
    finally:
        await conn.close()
    return Counter((r["device_id"], r["metric"], r["t"], r["value"]) for r in rows)


def expected_readings(envelopes: Iterable[dict]) -> Counter[tuple[str, str, int, float]]:
    out: Counter[tuple[str, str, int, float]] = Counter()
    for env in envelopes:
        for n in env.get("numerics", []):
            for m, v in n["values"].items():
                out[(env["device_id"], m, n["t"], float(v))] += 1
    return out


def sha256(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()


def pulse_ox_envelopes(n_devices: int, per_device: int, *, t0: int | None = None, prefix: str = "po") -> list[dict]:
    """Deterministic pulse-oximeter envelopes, device-interleaved; every 10th carries a pleth block."""
    t0 = t0 if t0 is not None else (int(time.time()) - 3600) * 1000
    out = []
    for s in range(per_device):
        for d in range(n_devices):
            t = t0 + s * 1000
            env: dict = {
                "v": 1,
                "device_id": f"{prefix}-{d:05d}",
                "seq": s,
                "profile": "pulse_oximeter",
                "firmware": "2.4.1",
                "sent_at": t + 50,
                "numerics": [{"t": t, "values": {"spo2": 90 + (s + d) % 10, "pulse_rate": 60 + (7 * s + d) % 40}}],
            }
            if (s + d) % 10 == 0:
                env["waveforms"] = [
                    {"metric": "pleth", "t0": t, "hz": 125.0, "samples": [round(0.5 + 0.01 * k, 3) for k in range(25)]}
                ]
            out.append(env)
    return out


def encode(env: dict, i: int) -> bytes:
    """JSON for even i, MessagePack for odd i."""
    return orjson.dumps(env) if i % 2 == 0 else msgspec.msgpack.encode(env)


def topic(env: dict) -> str:
    return f"devices/{env['device_id']}/telemetry"


def cli_in_thread(capsys):  # noqa: ANN001, ANN201 - pytest's capture fixture; an async callable
    """``await run(*argv)`` runs ``vitalgate ARGV`` in this process (off the test's event loop)
    and returns ``(exit status, stdout, stderr)``; argparse's exits count as statuses."""
    from gateway.cli import main

    async def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            rc = await asyncio.to_thread(main, list(argv))
        except SystemExit as exc:  # argparse
            rc = int(exc.code or 0)
        out, err = capsys.readouterr()
        return rc, out, err

    return run
