"""Shared pieces of the bench: QoS 1 MQTT publishers, CPU snapshots, machine and version info.

The gateway process, the throwaway services and the /proc samplers are ``tests.harness``,
shared with the tests.

MQTT publishers, two with one interface, for the fleet simulator:

- ``PahoLink``: paho-mqtt (MQTT 5 or 3.1.1), driven from the calling thread (no network
  thread). It buffers socket writes and reads, so a burst of publishes costs one
  ``send()`` and a stream of PUBACKs one ``recv()``: on this project's machines a system
  call costs tens of microseconds, and plain paho spends more time in them than in
  Python (3,000-9,000 msgs/s per process instead of 10,000-14,000).
- ``RawLink``: a minimal MQTT 5 / 3.1.1 client written for load generation (CONNECT,
  PUBLISH QoS 1, PUBACK, PINGREQ, DISCONNECT, nothing else). paho spends ~75-100 us of
  CPU per message on packing and acknowledging; this one ~5 us, so a flat-out load
  generator takes far less CPU away from the gateway under test on a 2-core machine.

Both call ``on_ack(token, reason_code)`` once per PUBACK, from ``pump()`` only, in the
thread that calls ``pump()``. Reason code 16 is MQTT 5's "no matching subscribers": the
broker accepted the message but nobody was subscribed, so nobody will ever get it.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import time
from typing import Any, Callable, Protocol
from urllib.parse import urlsplit

from tests.harness import REPO, cpu_seconds

__all__ = [
    "Link", "PahoLink", "RawLink", "open_link", "parse_mqtt_url", "NO_MATCHING_SUBSCRIBERS",
    "machine_info", "package_versions", "mosquitto_version", "git_revision", "forget_mqtt_session", "cpu_snapshot",
]

NO_MATCHING_SUBSCRIBERS = 16
AckCallback = Callable[[Any, int], None]


def parse_mqtt_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp", ""):
        raise ValueError(f"unsupported MQTT URL scheme {parts.scheme!r} (use mqtt://host:port)")
    return parts.hostname or "127.0.0.1", parts.port or 1883


class Link(Protocol):
    """A connected QoS 1 publisher."""

    def publish(self, topic: str, payload: bytes, content_type: str | None, token: Any) -> None: ...
    def pump(self, timeout: float = 0.0) -> None:
        """Send what is buffered, read PUBACKs (calling ``on_ack``), keep the connection alive."""
    @property
    def outstanding(self) -> int:
        """Messages published and not yet acknowledged."""
    def close(self) -> None: ...


def open_link(kind: str, url: str, client_id: str, version: str, on_ack: AckCallback) -> Link:
    """Connect a ``paho`` or ``raw`` publisher; ``version`` is ``"5"`` or ``"3.1.1"``."""
    if version not in ("5", "3.1.1"):
        raise ValueError(f"MQTT version must be 5 or 3.1.1, not {version!r}")
    host, port = parse_mqtt_url(url)
    if kind == "paho":
        return PahoLink(host, port, client_id, version, on_ack)
    if kind == "raw":
        return RawLink(host, port, client_id, version, on_ack)
    raise ValueError(f"unknown MQTT client {kind!r} (paho or raw)")


# --------------------------------------------------------------------------------------
# paho-mqtt, with buffered socket I/O


def _paho_client_class() -> type:
    import paho.mqtt.client as mqtt

    class _BufferedClient(mqtt.Client):  # type: ignore[misc]
        """paho's Client with writes collected until ``flush()`` and reads served from a buffer.

        Overrides two private methods of paho-mqtt 2.x (``_sock_send``, ``_sock_recv``);
        the protocol itself stays paho's.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._vg_wbuf = bytearray()
            self._vg_rbuf = b""
            self._vg_rpos = 0

        def _sock_send(self, buf: bytes | bytearray) -> int:
            self._vg_wbuf += buf
            return len(buf)

        def _sock_recv(self, bufsize: int) -> bytes:
            if self._vg_rpos >= len(self._vg_rbuf):
                data = super()._sock_recv(1 << 18)
                if not data:
                    return data
                self._vg_rbuf, self._vg_rpos = data, 0
            out = self._vg_rbuf[self._vg_rpos : self._vg_rpos + bufsize]
            self._vg_rpos += len(out)
            return out

        def vg_has_buffered_input(self) -> bool:
            return self._vg_rpos < len(self._vg_rbuf)

        def vg_flush(self, block: bool) -> None:
            sock = self.socket()
            if sock is None or not self._vg_wbuf:
                return
            view = memoryview(self._vg_wbuf)
            sent = 0
            try:
                while sent < len(view):
                    try:
                        sent += sock.send(view[sent:])
                    except BlockingIOError:
                        if not block:
                            break
                        select.select([], [sock], [], 1.0)
            finally:
                view.release()
                del self._vg_wbuf[:sent]

    return _BufferedClient


class PahoLink:
    """paho-mqtt publisher driven by ``pump()`` (no background thread)."""

    def __init__(self, host: str, port: int, client_id: str, version: str, on_ack: AckCallback) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self._v5 = version == "5"
        self._on_ack = on_ack
        self._pending: dict[int, Any] = {}
        self._props: dict[str | None, Any] = {None: None}
        if self._v5:
            for ct in ("application/json", "application/msgpack"):
                p = Properties(PacketTypes.PUBLISH)
                p.ContentType = ct
                self._props[ct] = p
        cls = _paho_client_class()
        self._c = c = cls(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
            **({} if self._v5 else {"clean_session": True}),
        )
        c.max_inflight_messages_set(0)  # we bound outstanding messages ourselves
        c.max_queued_messages_set(0)
        c.on_publish = self._on_publish
        self._connack: int | None = None
        c.on_connect = self._on_connect
        c.connect(host, port, keepalive=60)
        c._reset_sockets(sockpair_only=True)  # single-threaded: no wake-up byte per publish
        deadline = time.monotonic() + 10.0
        while self._connack is None:
            if time.monotonic() > deadline:
                raise ConnectionError(f"no CONNACK from {host}:{port} within 10 s")
            self.pump(0.05)
        if self._connack != 0:
            raise ConnectionError(f"broker refused the connection: reason code {self._connack}")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._connack = int(getattr(reason_code, "value", reason_code))

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        token = self._pending.pop(mid)
        self._on_ack(token, int(getattr(reason_code, "value", reason_code)))

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def publish(self, topic: str, payload: bytes, content_type: str | None, token: Any) -> None:
        if len(self._pending) >= 60_000:
            raise RuntimeError("more than 60,000 unacknowledged messages: packet ids would wrap")
        info = self._c.publish(topic, payload, qos=1, properties=self._props.get(content_type) if self._v5 else None)
        if info.rc != 0:
            raise ConnectionError(f"paho publish failed: rc={info.rc}")
        self._pending[info.mid] = token
        if len(self._c._vg_wbuf) > 65536:
            self._c.vg_flush(block=False)

    def pump(self, timeout: float = 0.0) -> None:
        c = self._c
        c.vg_flush(block=True)
        sock = c.socket()
        if sock is None:
            raise ConnectionError("MQTT connection lost")
        if c.vg_has_buffered_input() or select.select([sock], [], [], timeout)[0]:
            rc = c.loop_read()
            if rc != 0:
                raise ConnectionError(f"MQTT connection lost (rc={rc})")
            while c.vg_has_buffered_input():
                c.loop_read()
        c.loop_misc()
        c.vg_flush(block=True)

    def close(self) -> None:
        try:
            self._c.disconnect()
            self._c.vg_flush(block=True)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        sock = self._c.socket()
        if sock is not None:
            sock.close()


# --------------------------------------------------------------------------------------
# A minimal publisher on a raw socket


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


class RawLink:
    """Minimal QoS 1 publisher: CONNECT (clean), PUBLISH, PUBACK, PINGREQ, DISCONNECT."""

    KEEPALIVE_S = 60

    def __init__(self, host: str, port: int, client_id: str, version: str, on_ack: AckCallback) -> None:
        self._v5 = version == "5"
        self._on_ack = on_ack
        self._pending: dict[int, Any] = {}
        self._pid = 0
        self._topics: dict[str, bytes] = {}
        self._props = {None: b"\x00"}
        for ct in ("application/json", "application/msgpack"):
            p = b"\x03" + _str(ct)
            self._props[ct] = _varint(len(p)) + p
        self._w = bytearray()
        self._r = bytearray()
        self._sock = sock = socket.create_connection((host, port), timeout=10.0)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        vh = _str("MQTT") + bytes([5 if self._v5 else 4, 0x02]) + struct.pack("!H", self.KEEPALIVE_S)
        if self._v5:
            vh += b"\x00"  # no properties
        body = vh + _str(client_id)
        sock.sendall(b"\x10" + _varint(len(body)) + body)
        ptype, pkt = self._read_packet_blocking()
        if ptype != 0x20 or len(pkt) < 2:
            raise ConnectionError(f"expected CONNACK, got packet type {ptype:#x}")
        if pkt[1] != 0:
            raise ConnectionError(f"broker refused the connection: reason code {pkt[1]}")
        sock.setblocking(False)
        self._last_io = time.monotonic()

    def _read_packet_blocking(self) -> tuple[int, bytes]:
        while True:
            got = self._parse_one()
            if got is not None:
                return got
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionError("broker closed the connection")
            self._r += data

    def _parse_one(self) -> tuple[int, bytes] | None:
        r = self._r
        if len(r) < 2:
            return None
        length, mult, i = 0, 1, 1
        while True:
            if i >= len(r):
                return None
            b = r[i]
            length += (b & 0x7F) * mult
            mult <<= 7
            i += 1
            if not b & 0x80:
                break
        if len(r) < i + length:
            return None
        ptype = r[0] & 0xF0
        pkt = bytes(r[i : i + length])
        del r[: i + length]
        return ptype, pkt

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def publish(self, topic: str, payload: bytes, content_type: str | None, token: Any) -> None:
        t = self._topics.get(topic)
        if t is None:
            t = self._topics[topic] = _str(topic)
        pid = self._pid % 65535 + 1
        self._pid = pid
        if pid in self._pending:
            raise RuntimeError("packet id still in use: too many unacknowledged messages")
        props = self._props[content_type] if self._v5 else b""
        rl = len(t) + 2 + len(props) + len(payload)
        self._w += b"\x32" + _varint(rl) + t + struct.pack("!H", pid) + props
        self._w += payload
        self._pending[pid] = token
        if len(self._w) > 65536:
            self._flush(block=False)

    def _flush(self, block: bool) -> None:
        if not self._w:
            return
        view = memoryview(self._w)
        sent = 0
        try:
            while sent < len(view):
                try:
                    sent += self._sock.send(view[sent:])
                except BlockingIOError:
                    if not block:
                        break
                    # Read while waiting, so that a broker blocked on its own writes makes progress.
                    readable, _, _ = select.select([self._sock], [self._sock], [], 1.0)
                    if readable:
                        self._read_available()
        finally:
            view.release()
            del self._w[:sent]
        self._last_io = time.monotonic()

    def _read_available(self) -> None:
        while True:
            try:
                data = self._sock.recv(1 << 18)
            except BlockingIOError:
                break
            if not data:
                raise ConnectionError("broker closed the connection")
            self._r += data
            if len(data) < (1 << 18):
                break
        while True:
            got = self._parse_one()
            if got is None:
                return
            ptype, pkt = got
            if ptype == 0x40:  # PUBACK
                pid = (pkt[0] << 8) | pkt[1]
                rc = pkt[2] if len(pkt) > 2 else 0
                token = self._pending.pop(pid, None)
                if token is None:
                    raise ConnectionError(f"PUBACK for unknown packet id {pid}")
                self._on_ack(token, rc)
            elif ptype == 0xD0:  # PINGRESP
                pass
            elif ptype == 0xE0:  # DISCONNECT from the server (MQTT 5)
                rc = pkt[0] if pkt else 0
                raise ConnectionError(f"broker disconnected us: reason code {rc}")
            else:
                raise ConnectionError(f"unexpected packet type {ptype:#x} from the broker")

    def pump(self, timeout: float = 0.0) -> None:
        self._flush(block=True)
        readable, _, _ = select.select([self._sock], [], [], timeout)
        if readable:
            self._read_available()
        if time.monotonic() - self._last_io > self.KEEPALIVE_S / 2:
            self._w += b"\xc0\x00"
            self._flush(block=True)

    def close(self) -> None:
        try:
            self._sock.setblocking(True)
            self._flush(block=True)
            self._sock.sendall(b"\xe0\x00")
        except OSError:
            pass
        self._sock.close()


# --------------------------------------------------------------------------------------
# CPU, machine and versions (used by the demo and the benches)


def cpu_snapshot(gw_pid: int | None, backends: set[int], pg_pids: set[int], mq_pid: int | None) -> dict[str, float]:
    """CPU seconds so far of the gateway (``gw:``), its PostgreSQL backends (``be:``), the whole
    cluster (``pg:``) and the broker (``mq``), keyed so that samples can be subtracted."""
    cpu: dict[str, float] = {}
    if gw_pid is not None:
        cpu[f"gw:{gw_pid}"] = cpu_seconds(gw_pid)
    for p in backends:
        cpu[f"be:{p}"] = cpu_seconds(p)
    for p in pg_pids:
        cpu[f"pg:{p}"] = cpu_seconds(p)
    if mq_pid:
        cpu["mq"] = cpu_seconds(mq_pid)
    return cpu


def machine_info() -> dict[str, Any]:
    import platform

    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    try:
        load = open("/proc/loadavg").read().split()[:3]
    except OSError:
        load = []
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": load,
    }


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("vitalgate", "asyncpg", "aiomqtt", "paho-mqtt", "msgspec", "orjson", "numpy", "uvloop", "prometheus-client"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "-"
    return out


def mosquitto_version(binary: str = "mosquitto") -> str:
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "-"
    first = out.splitlines()[0] if out else ""
    return first.replace("mosquitto version ", "").strip() or "-"


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except OSError:
        return "-"


def forget_mqtt_session(url: str, client_id: str) -> None:
    """Remove a persistent MQTT session from the broker (connect clean with expiry 0, disconnect).

    A gateway's persistent session otherwise stays on the broker after the gateway is
    gone, and the broker keeps queueing every telemetry message for it.
    """
    host, port = parse_mqtt_url(url)
    sock = socket.create_connection((host, port), timeout=5)
    try:
        vh = _str("MQTT") + bytes([5, 0x02]) + struct.pack("!H", 10) + b"\x05\x11\x00\x00\x00\x00"
        body = vh + _str(client_id)
        sock.sendall(b"\x10" + _varint(len(body)) + body)
        sock.recv(64)
        sock.sendall(b"\xe0\x00")
    finally:
        sock.close()

