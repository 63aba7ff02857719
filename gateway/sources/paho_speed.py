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

Both keep paho's behaviour and error handling; ``tests/sources/test_paho_speed.py``
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

__all__ = ["FastProperties", "install", "buffer_reads"]

_PROTO = Properties(PacketTypes.PUBLISH)
_READ_SIZE = 65536
_PACKETS_PER_TURN = 1000
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


_installed = False


def install() -> None:
    """Make paho's packet decoding use ``FastProperties`` (idempotent)."""
    global _installed
    if not _installed:
        paho_packet.Properties = FastProperties  # type: ignore[attr-defined]
        paho_client.Properties = FastProperties  # type: ignore[attr-defined]
        _installed = True


def buffer_reads(client: paho_client.Client, keep_reading: Callable[[], bool] | None = None) -> None:
    """Give ``client`` a read buffer; call before connecting. Each connection needs a new client.

    ``keep_reading``: asked before each further packet of one readiness event; False stops
    there (reads paused), leaving the rest in the buffer for the next ``loop_read()``.
    Without it, a packet completed by a fresh ``recv`` refills the buffer and the drain
    goes on as long as the socket has data.
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

    def loop_read(max_packets: int = 1) -> paho_client.MQTTErrorCode:
        rc = original_loop_read(max_packets)
        packets = 1
        while rc == paho_client.MQTTErrorCode.MQTT_ERR_SUCCESS and buf and client._sock is not None:  # noqa: SLF001
            if keep_reading is not None and not keep_reading():
                break
            if packets >= _PACKETS_PER_TURN:
                if not later:  # the rest of the buffer on the next turn, after other tasks ran
                    later.append(asyncio.get_running_loop().call_soon(go_on))
                break
            rc = original_loop_read(max_packets)
            packets += 1
        return rc

    client._sock_recv = recv_translating_ssl  # type: ignore[method-assign] # noqa: SLF001
    client.loop_read = loop_read  # type: ignore[method-assign]
