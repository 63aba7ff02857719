"""The broker's limit: a bare MQTT 5 subscriber, QoS 1, that only counts what it receives.

It subscribes like the gateway (``devices/+/telemetry``, QoS 1, receive maximum 20,000)
and acknowledges every PUBLISH at once, batching the PUBACKs of one ``recv()`` into one
``send()``: no decoding, no database. Whatever rate it reaches with the same load is what
the broker (and the publishers) can deliver on this machine at that moment; the gateway's
rate divided by it says how much of the broker's capacity the gateway turns into commits.

``BareSubscriber(url).start()`` runs it in its own process; ``stats()`` reads its counters
(messages, payload bytes, first and last message time, CPU seconds).

Standalone::

    python -m bench.subscriber --url mqtt://127.0.0.1:1883 --seconds 30
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from bench.common import _str, _varint, parse_mqtt_url

__all__ = ["BareSubscriber", "SubscriberStats", "parse_publishes", "bare_run", "main"]

# Shared counters: messages, payload bytes, first message (epoch us), last message (epoch us), CPU ms, state.
N_MSG, N_BYTES, T_FIRST_US, T_LAST_US, CPU_MS, STATE = range(6)
INIT, READY, DONE, FAILED = 0, 1, 2, -1


def parse_publishes(buf: bytearray | bytes, start: int = 0) -> tuple[int, int, list[int], int]:
    """Parse whole packets in ``buf`` from ``start``.

    Returns (number of PUBLISH packets, their payload bytes, packet ids of those at QoS 1
    or 2, offset of the first incomplete packet). Other packets are skipped. The payload
    size includes MQTT 5 properties: a subscriber cannot count less without parsing them.
    """
    n = nbytes = 0
    pids: list[int] = []
    i, end = start, len(buf)
    while i + 2 <= end:
        h = buf[i]
        length, mult, j = 0, 1, i + 1
        while True:
            if j >= end:
                return n, nbytes, pids, i
            b = buf[j]
            length += (b & 0x7F) * mult
            mult <<= 7
            j += 1
            if not b & 0x80:
                break
        if j + length > end:
            break
        if h & 0xF0 == 0x30:
            tlen = (buf[j] << 8) | buf[j + 1]
            k = j + 2 + tlen
            if h & 0x06:
                pids.append((buf[k] << 8) | buf[k + 1])
                k += 2
            n += 1
            nbytes += j + length - k
        i = j + length
    return n, nbytes, pids, i


def _connect(host: str, port: int, client_id: str, topic: str, receive_maximum: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=10.0)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    props = b"\x21" + struct.pack("!H", receive_maximum)  # receive maximum; session expiry 0 (default)
    vh = _str("MQTT") + bytes([5, 0x02]) + struct.pack("!H", 60) + _varint(len(props)) + props
    body = vh + _str(client_id)
    sock.sendall(b"\x10" + _varint(len(body)) + body)
    buf = bytearray()
    while len(buf) < 4 or len(buf) < 2 + buf[1]:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("broker closed the connection before CONNACK")
        buf += data
    if buf[0] != 0x20 or buf[3] != 0:
        raise ConnectionError(f"CONNACK refused: {bytes(buf[:4]).hex()}")
    sub = struct.pack("!H", 1) + b"\x00" + _str(topic) + b"\x01"  # packet id 1, no properties, QoS 1
    sock.sendall(b"\x82" + _varint(len(sub)) + sub)
    buf = bytearray()
    while len(buf) < 2 or len(buf) < 2 + buf[1]:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("broker closed the connection before SUBACK")
        buf += data
    if buf[0] != 0x90 or buf[-1] >= 0x80:
        raise ConnectionError(f"SUBACK refused: {bytes(buf).hex()}")
    return sock


def _main(url: str, topic: str, client_id: str, receive_maximum: int, counters: Any, stop: Any) -> None:
    try:
        host, port = parse_mqtt_url(url)
        sock = _connect(host, port, client_id, topic, receive_maximum)
        sock.settimeout(0.05)
        counters[STATE] = READY
        buf = bytearray()
        n = nbytes = 0
        first = last = 0
        last_flush = time.monotonic()
        ping_at = time.monotonic() + 30
        while not stop.is_set():
            try:
                data = sock.recv(1 << 20)
            except socket.timeout:
                data = None
            if data == b"":
                raise ConnectionError("broker closed the connection")
            if data:
                buf += data
                k, b, pids, used = parse_publishes(buf)
                del buf[:used]
                if k:
                    now = int(time.time() * 1e6)
                    first = first or now
                    last = now
                    n += k
                    nbytes += b
                if pids:
                    sock.sendall(b"".join(b"\x40\x02" + struct.pack("!H", p) for p in pids))
            mono = time.monotonic()
            if mono - last_flush > 0.05:
                counters[N_MSG], counters[N_BYTES], counters[T_FIRST_US], counters[T_LAST_US] = n, nbytes, first, last
                counters[CPU_MS] = int(time.process_time() * 1000)
                last_flush = mono
            if mono > ping_at:
                sock.sendall(b"\xc0\x00")
                ping_at = mono + 30
        counters[N_MSG], counters[N_BYTES], counters[T_FIRST_US], counters[T_LAST_US] = n, nbytes, first, last
        counters[CPU_MS] = int(time.process_time() * 1000)
        try:
            sock.sendall(b"\xe0\x00")
        finally:
            sock.close()
        counters[STATE] = DONE
    except BaseException as exc:  # noqa: BLE001 - the parent sees FAILED
        counters[STATE] = FAILED
        print(f"bare subscriber: {type(exc).__name__}: {exc}", file=sys.stderr)


@dataclass
class SubscriberStats:
    messages: int
    payload_bytes: int
    first_s: float  # epoch seconds of the first and last message (0 if none)
    last_s: float
    cpu_s: float

    @property
    def rate(self) -> float:
        """Messages per second from the first to the last message."""
        dt = self.last_s - self.first_s
        return (self.messages - 1) / dt if self.messages > 1 and dt > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "messages_per_s": round(self.rate, 1),
                "mib_per_s": round(self.rate * self.payload_bytes / max(1, self.messages) / 2**20, 2)}


class BareSubscriber:
    """The bare subscriber in its own process."""

    def __init__(self, url: str, topic: str = "devices/+/telemetry", receive_maximum: int = 20_000) -> None:
        self.url, self.topic, self.receive_maximum = url, topic, receive_maximum
        ctx = mp.get_context("spawn")
        self._counters = ctx.Array("q", 6, lock=False)
        self._stop = ctx.Event()
        self._proc = ctx.Process(
            target=_main, name="bare-subscriber", daemon=True,
            args=(url, topic, f"bench-bare-{os.getpid()}-{time.monotonic_ns() % 10**9}", receive_maximum,
                  self._counters, self._stop),
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def start(self, timeout: float = 30.0) -> None:
        self._proc.start()
        deadline = time.monotonic() + timeout
        while self._counters[STATE] == INIT:
            if not self._proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("bare subscriber did not subscribe")
            time.sleep(0.02)
        if self._counters[STATE] == FAILED:
            raise RuntimeError("bare subscriber failed to connect")

    def stats(self) -> SubscriberStats:
        c = self._counters
        return SubscriberStats(c[N_MSG], c[N_BYTES], c[T_FIRST_US] / 1e6, c[T_LAST_US] / 1e6, c[CPU_MS] / 1000)

    def failed(self) -> bool:
        return self._counters[STATE] == FAILED

    def wait_for(self, n: int, timeout: float) -> bool:
        """Wait until ``n`` messages have arrived; False on timeout or failure."""
        deadline = time.monotonic() + timeout
        while self._counters[N_MSG] < n:
            if self.failed() or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> SubscriberStats:
        self._stop.set()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        return self.stats()


async def bare_run(url: str, fleet_cfg: Any, publish_timeout_s: float) -> dict[str, Any]:
    """The broker's limit: ``fleet_cfg``'s load, flat out, to a bare subscriber alone (no gateway).

    Returns what was published and received, whether every message arrived, and the
    subscriber's rate (messages/s).
    """
    import asyncio

    from bench.fleet import Fleet

    sub = BareSubscriber(url)
    sub.start()
    fleet = Fleet(fleet_cfg)
    try:
        await asyncio.to_thread(fleet.start)
        if not await asyncio.to_thread(fleet.join, publish_timeout_s):
            raise TimeoutError("publishers did not finish")
        st = fleet.stats()
        complete = await asyncio.to_thread(sub.wait_for, st.published, 60)
    finally:
        fleet.kill()
        s = sub.stop()
    return {"published": st.as_dict(), "received": s.as_dict(), "complete": complete and s.messages == st.published,
            "envelopes_per_s": s.rate}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.subscriber", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="mqtt://127.0.0.1:1883")
    ap.add_argument("--topic", default="devices/+/telemetry")
    ap.add_argument("--seconds", type=float, default=30.0)
    a = ap.parse_args(argv)
    sub = BareSubscriber(a.url, a.topic)
    sub.start()
    t_end = time.monotonic() + a.seconds
    while time.monotonic() < t_end:
        time.sleep(1.0)
        s = sub.stats()
        print(f"messages={s.messages:,} rate={s.rate:,.0f}/s cpu={s.cpu_s:.1f}s", file=sys.stderr)
    print(sub.stop().as_dict())
    return 0


if __name__ == "__main__":
    sys.exit(main())
