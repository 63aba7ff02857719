"""How much ``gateway.sources.paho_speed`` saves on paho's receive path.

The same MQTT 5 PUBLISH packets (QoS 1, manual acks, as the gateway subscribes) are fed
through a socket pair to a paho client: with paho as shipped, with
``paho_speed.install()`` and ``buffer_reads()`` (``paho_speed``), and with the PUBLISH
fast path as well (``fast``: ``buffer_reads(on_publish=...)``); only the reads are timed. Each
mode runs in its own process (``install()`` patches paho module-wide), alternating, and
the median of the rounds is reported.

    .venv/bin/python -m bench.paho_receive [--packets 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import socket
import statistics
import subprocess
import sys
import time

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

_CHUNK = 96 * 1024  # below the socket pair's buffer: the sender never blocks the single thread


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(mid: int, topic: bytes, payload: bytes, content_type: str | None) -> bytes:
    """An MQTT 5 PUBLISH, QoS 1: with an empty property block, or a content type."""
    props = b"\x00"
    if content_type is not None:
        p = Properties(PacketTypes.PUBLISH)
        p.ContentType = content_type
        props = p.pack()
    body = len(topic).to_bytes(2, "big") + topic + mid.to_bytes(2, "big") + props + payload
    return b"\x32" + _varint(len(body)) + body


def workload(n: int, payload_bytes: int) -> list[bytes]:
    """Chunks of packets: 300 devices, every tenth packet with a content type (HTTPS-like senders)."""
    payload = b"{" + b"x" * (payload_bytes - 2) + b"}"
    chunks, cur = [], bytearray()
    for i in range(n):
        pkt = publish(i % 65535 + 1, b"devices/pm-%03d/telemetry" % (i % 300), payload,
                      "application/json" if i % 10 == 0 else None)
        if len(cur) + len(pkt) > _CHUNK:
            chunks.append(bytes(cur))
            cur.clear()
        cur += pkt
    chunks.append(bytes(cur))
    return chunks


def run_once(mode: str, n: int, payload_bytes: int) -> float:
    """Seconds of client reads for ``n`` packets in ``mode`` ("paho" or "paho_speed")."""
    if mode in ("paho_speed", "fast"):
        from gateway.sources import paho_speed

        paho_speed.install()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.manual_ack_set(True)
    received = 0

    def on_message(_c: object, _u: object, _m: object) -> None:
        nonlocal received
        received += 1

    client.on_message = on_message
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    client._sock = ours  # noqa: SLF001 - a connected socket, as paho holds it
    if mode == "paho_speed":
        paho_speed.buffer_reads(client)
    elif mode == "fast":
        paho_speed.buffer_reads(client, on_publish=lambda *_: on_message(None, None, None))
    chunks = workload(n, payload_bytes)
    gc.collect()
    gc.freeze()  # as the gateway does after start-up: imports do not weigh on the timed collections
    spent = 0.0
    for chunk in chunks:
        broker.sendall(chunk)
        target = received + chunk.count(b"/telemetry")
        t0 = time.perf_counter()
        while received < target:
            client.loop_read()
        spent += time.perf_counter() - t0
    assert received == n, (received, n)
    client._sock = None  # noqa: SLF001
    ours.close()
    broker.close()
    return spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=20000)
    ap.add_argument("--payload-bytes", type=int, default=600, help="600: a small numerics envelope")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--one", choices=["paho", "paho_speed", "fast"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(run_once(a.one, a.packets, a.payload_bytes))
        return
    times: dict[str, list[float]] = {"paho": [], "paho_speed": [], "fast": []}
    for _ in range(a.rounds):
        for mode in times:
            out = subprocess.run([sys.executable, "-m", "bench.paho_receive", "--one", mode, "--packets",
                                  str(a.packets), "--payload-bytes", str(a.payload_bytes)],
                                 check=True, capture_output=True, text=True).stdout
            times[mode].append(float(out))
    us = {m: statistics.median(t) / a.packets * 1e6 for m, t in times.items()}
    print(json.dumps({"packets": a.packets, "payload_bytes": a.payload_bytes, "rounds": a.rounds,
                      "us_per_packet": {m: round(v, 2) for m, v in us.items()},
                      "saved": {m: f"{1 - us[m] / us['paho']:.0%}" for m in ("paho_speed", "fast")}}))


if __name__ == "__main__":
    main()
