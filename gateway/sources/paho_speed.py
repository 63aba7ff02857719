"""Two narrow speed-ups of paho's receive path, which dominates the gateway's CPU time.

1. MQTT 5 property blocks: paho builds a fresh ``Properties`` object per packet, whose
   constructor rebuilds three lookup tables and whose ``clear()`` scans all 27 property
   names. ``FastProperties`` shares the tables (they never change) and returns at once
   for the common empty block. Parsing of non-empty blocks is paho's own code.
2. Socket reads: paho reads a packet's fixed header one byte per ``recv`` call.
   ``buffer_reads`` gives one client a read buffer filled 64 KiB at a time, and drains
   the packets already buffered on each readiness event (the socket will not signal
   readiness again for bytes we already hold), at most ``_PACKETS_PER_TURN`` of them
   per event-loop turn: on loopback the broker can keep the buffer full (PUBACKs of
   queued alert publications answer each next one at once), and a drain that never
   returns starves the writer of the loop.

3. PUBLISH packets: with ``on_publish`` given, a complete QoS 0/1 PUBLISH at the head of
   the read buffer whose property block is empty or a lone content type is parsed here
   (``parse_publish``) and handed over as (topic, payload, qos, packet id, content type),
   without paho's ``MQTTMessage``, property objects, topic matcher and locks. Anything
   else (other packets, QoS 2, other properties, a packet cut by the buffer's end, a
   packet paho has begun) is left to paho, which reads it from the same buffer.

All keep paho's behaviour and error handling; ``tests/sources/test_paho_speed.py``
checks them against paho's own parsing. They rely on paho internals (``_packet``,
``_sock_recv``, ``loop_read``), hence the exact ``paho-mqtt`` pin in pyproject.toml.

Measured gain (paho-mqtt 2.2.0, MQTT 5 QoS 1 PUBLISH packets, the same bytes fed through
a socket pair, only the client's reads timed, median of 7 alternating rounds):
``python -m bench.paho_receive --rounds 7 --packets 20000`` (600-byte payloads) saved
28% and, in a second run, 44% of paho's read time per packet; ``--payload-bytes 3600``
(an ICU envelope) saved 38%. The machine was shared (load 5-6 on 2 cores), so the
absolute times varied threefold between runs (44-110 us with, 61-195 us without); the
ratio is what the figure means.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import paho.mqtt._packet as paho_packet
import paho.mqtt.client as paho_client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

__all__ = ["FastProperties", "install", "buffer_reads", "parse_publish", "OnPublish"]

_PROTO = Properties(PacketTypes.PUBLISH)
_READ_SIZE = 65536
_PACKETS_PER_TURN = 1000
_PUBLISH = 0x30  # packet type (high nibble)
_CONTENT_TYPE = 0x03  # MQTT 5 property identifier
log = logging.getLogger("gateway.sources.mqtt")


class FastProperties(Properties):
    """``Properties`` with shared lookup tables and a fast path for empty property blocks."""

    types = _PROTO.types
    names = _PROTO.names
    properties = _PROTO.properties

    def __init__(self, packetType: int) -> None:  # noqa: N803 - paho's name
        object.__setattr__(self, "packetType", packetType)

    def clear(self) -> None:
        for key in [k for k in self.__dict__ if k != "packetType"]:
            object.__delattr__(self, key)

    def unpack(self, buffer: bytes | bytearray) -> tuple[Properties, int]:
        if buffer[:1] == b"\x00":
            self.clear()
            return self, 1
        return super().unpack(buffer)


def parse_publish(buf: bytearray, v5: bool) -> tuple[int, str, bytes, int, int, str | None] | None:
    """The PUBLISH (QoS 0 or 1) at the head of ``buf`` when it is complete and plain:
    ``(packet length, topic, payload, qos, packet id, content type)``. ``None`` for anything
    else (another packet, an incomplete one, QoS 2, properties other than a content type,
    a topic that is not UTF-8): paho's own parser takes those."""
    n = len(buf)
    if n < 2 or buf[0] & 0xF0 != _PUBLISH:
        return None
    qos = (buf[0] >> 1) & 3
    if qos > 1:
        return None
    # remaining length: 1 to 4 bytes, 7 bits each
    length = 0
    mult = 1
    pos = 1
    while True:
        if pos >= n or pos > 4:
            return None
        byte = buf[pos]
        length += (byte & 0x7F) * mult
        pos += 1
        if not byte & 0x80:
            break
        mult <<= 7
    end = pos + length
    if end > n or length < 2:
        return None
    tlen = (buf[pos] << 8) | buf[pos + 1]
    pos += 2
    if pos + tlen > end:
        return None
    try:
        topic = buf[pos:pos + tlen].decode()
    except UnicodeDecodeError:
        return None
    pos += tlen
    mid = 0
    if qos:
        if pos + 2 > end:
            return None
        mid = (buf[pos] << 8) | buf[pos + 1]
        pos += 2
    content_type = None
    if v5:
        if pos >= end:
            return None
        plen = buf[pos]
        if plen & 0x80:
            return None  # a property block of 128 bytes or more: paho's parser
        pos += 1
        if plen:
            # only a lone content type is handled here
            if buf[pos] != _CONTENT_TYPE or plen < 3:
                return None
            clen = (buf[pos + 1] << 8) | buf[pos + 2]
            if 3 + clen != plen or pos + plen > end:
                return None
            try:
                content_type = buf[pos + 3:pos + plen].decode()
            except UnicodeDecodeError:
                return None
            pos += plen
    return end, topic, bytes(buf[pos:end]), qos, mid, content_type


OnPublish = Callable[[str, bytes, int, int, "str | None"], None]  # topic, payload, qos, packet id, content type
_installed = False


def install() -> None:
    """Make paho's packet decoding use ``FastProperties`` (idempotent)."""
    global _installed
    if not _installed:
        paho_packet.Properties = FastProperties  # type: ignore[attr-defined]
        paho_client.Properties = FastProperties  # type: ignore[attr-defined]
        _installed = True


def buffer_reads(client: paho_client.Client, keep_reading: Callable[[], bool] | None = None,
                 on_publish: OnPublish | None = None) -> None:
    """Give ``client`` a read buffer; call before connecting. Each connection needs a new client.

    ``keep_reading``: asked before each further packet of one readiness event; False stops
    there (reads paused), leaving the rest in the buffer for the next ``loop_read()``.
    Without it, a packet completed by a fresh ``recv`` refills the buffer and the drain
    goes on as long as the socket has data.

    ``on_publish``: called for the plain PUBLISH packets parsed here (see the module
    docstring) instead of paho's ``on_message``; the client's protocol decides whether a
    property block is expected.
    """
    buf = bytearray()
    original_loop_read = client.loop_read

    def sock_recv(bufsize: int) -> bytes:
        if not buf:
            sock = client._sock  # noqa: SLF001
            if sock is None:
                raise ConnectionError("self._sock is None")
            data = sock.recv(max(bufsize, _READ_SIZE))  # BlockingIOError/SSL errors propagate as in paho
            if not data:
                return b""
            buf.extend(data)
        out = bytes(buf[:bufsize])
        del buf[:bufsize]
        return out

    def recv_translating_ssl(bufsize: int) -> bytes:
        import ssl

        try:
            return sock_recv(bufsize)
        except ssl.SSLWantReadError as err:
            raise BlockingIOError() from err
        except ssl.SSLWantWriteError as err:
            client._call_socket_register_write()  # noqa: SLF001
            raise BlockingIOError() from err

    later: list[asyncio.Handle] = []  # the scheduled continuation, if any

    def go_on() -> None:
        later.clear()
        if buf and client._sock is not None and (keep_reading is None or keep_reading()):  # noqa: SLF001
            try:
                loop_read()
            except Exception as exc:  # noqa: BLE001 - as a reader callback would; paho reports socket errors itself
                log.warning("MQTT read failed.", extra={"error": repr(exc)})

    v5 = client._protocol == paho_client.MQTTv5  # noqa: SLF001
    success = paho_client.MQTTErrorCode.MQTT_ERR_SUCCESS

    def one(max_packets: int) -> paho_client.MQTTErrorCode:
        if on_publish is not None and client._in_packet["command"] == 0:  # noqa: SLF001
            if not buf and client._sock is not None:  # noqa: SLF001
                # fill here, or a paced load (a few packets per readiness event) would reach
                # paho first every time; errors and end of stream: paho's read meets them again
                try:
                    buf.extend(client._sock.recv(_READ_SIZE))  # noqa: SLF001
                except OSError:
                    pass
            hit = parse_publish(buf, v5) if buf else None
            if hit is not None:
                end, topic, payload, qos, mid, content_type = hit
                del buf[:end]
                client._last_bytes_received = paho_client.time_func()  # noqa: SLF001 - paho's keepalive clock
                on_publish(topic, payload, qos, mid, content_type)
                return success
        return original_loop_read(max_packets)

    def loop_read(max_packets: int = 1) -> paho_client.MQTTErrorCode:
        rc = one(max_packets)
        packets = 1
        while rc == paho_client.MQTTErrorCode.MQTT_ERR_SUCCESS and buf and client._sock is not None:  # noqa: SLF001
            if keep_reading is not None and not keep_reading():
                break
            if packets >= _PACKETS_PER_TURN:
                if not later:  # the rest of the buffer on the next turn, after other tasks ran
                    later.append(asyncio.get_running_loop().call_soon(go_on))
                break
            rc = one(max_packets)
            packets += 1
        return rc

    client._sock_recv = recv_translating_ssl  # type: ignore[method-assign] # noqa: SLF001
    client.loop_read = loop_read  # type: ignore[method-assign]
