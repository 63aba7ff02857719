"""Run ``vitalgate run`` as a real subprocess for integration tests, and publish to it."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import asyncpg
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.util import free_port, wait_for

REPO = Path(__file__).resolve().parent.parent
PROFILES = REPO / "device_profiles"


class GatewayProcess:
    """A ``python -m gateway run`` subprocess with its log in a file."""

    def __init__(self, workdir: Path, *, db_dsn: str, mqtt_url: str, client_id: str, env: dict[str, str] | None = None,
                 args: Sequence[str] = (), subscriptions: int = 1):
        """``args``: more ``vitalgate run`` arguments (``--workers 2``); ``start()`` waits for
        ``subscriptions`` "Subscribed." lines (one per worker)."""
        self.args = list(args)
        self.subscriptions = subscriptions
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "gateway.log"
        self.metrics_port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("VITALGATE_")},
            "VITALGATE_DATABASE_URL": db_dsn,
            "VITALGATE_MQTT_URL": mqtt_url,
            "VITALGATE_MQTT_CLIENT_ID": client_id,
            "VITALGATE_PROFILES_DIR": str(PROFILES),
            "VITALGATE_GATEWAY_ID": "test-gw",
            "VITALGATE_METRICS_PORT": str(self.metrics_port),
            # most tests publish from devices nobody registered; identity tests turn this on
            "VITALGATE_AUTH_REQUIRE_REGISTRATION": "false",
            # the assertions on the log read its key=value form; tests/integration/test_log_lines.py reads JSON
            "VITALGATE_LOG_FORMAT": "text",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 60.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        mark = self.log_path.stat().st_size
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", *self.args], cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.starts += 1

        def subscribed() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited with {self.proc.returncode}:\n{self.log_tail()}")
            with open(self.log_path, "rb") as f:
                f.seek(mark)
                return f.read().count(b"Subscribed.") >= self.subscriptions

        wait_for(subscribed, timeout=timeout, interval=0.05, message=lambda: f"gateway never subscribed:\n{self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def metric(self, name: str) -> float:
        import urllib.request

        for attempt in range(3):
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
                break
            except ConnectionError:
                if attempt == 2:
                    raise
        total = 0.0
        found = False
        for line in body.splitlines():
            if line.startswith(name) and (len(line) > len(name) and line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        if not found:
            raise KeyError(name)
        return total

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def stop(self) -> None:
        if self.alive():
            try:
                self.terminate(30)
            except subprocess.TimeoutExpired:
                self.kill()


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
    """Publish ``messages`` from a thread at about ``per_second``; waits for every PUBACK."""
    import time

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
