"""Flow control of the MQTT source: PUBACKs in arrival order, and socket reads paused at the memory bound.

``OrderedAcks`` sequences one connection's acknowledgements: with ``--workers`` a
payload forwarded to the worker owning its device commits independently of local
batches, but MQTT 3.1.1 section 4.6 wants PUBACKs in the order the PUBLISH packets
arrived.

``ReadGate`` takes paho's socket off the event loop while the intake holds its budget
of payload bytes (``backed_up``) or the process's resident memory is above 90% of
``max_memory_bytes``, so that the kernel and then the broker hold the backlog, and puts
it back once the held bytes are under 75% of the budget and resident memory under 80%.
While paused the client still sends PINGREQs and PUBACKs; it cannot read PINGRESPs
queued behind unread PUBLISH packets, so its own keepalive timeout is suspended until
reads resume (the broker's side of keepalive is met by the PINGREQs).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable

import aiomqtt
import paho.mqtt.client as paho

from gateway.metrics import Metrics

__all__ = ["OrderedAcks", "ReadGate", "resident_bytes"]

log = logging.getLogger("gateway.sources.mqtt")

_PAGE = os.sysconf("SC_PAGE_SIZE")
_SAMPLE_S = 0.1  # how often resident memory and the held bytes are looked at while connected
_PAUSE_AT, _RESUME_HELD, _RESUME_RSS = 0.9, 0.75, 0.8  # watermarks (fractions of the bounds)
_LOG_EVERY_S = 10.0  # pause/resume log lines at most this often


def resident_bytes() -> int:
    """This process's resident set size, from ``/proc/self/statm`` (a few microseconds)."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


def _noop_send(_mid: int, _qos: int) -> None:
    pass


class OrderedAcks:
    """PUBACKs of one connection in arrival order, whatever order the commits complete in.

    ``track(mid, qos)`` is called as each message arrives and returns its ``ack``
    callable; calling it marks the message done and sends every acknowledgement from
    the oldest pending message up to the first one still waiting. ``close()`` (the
    connection is gone) turns every outstanding ``ack`` into a no-op: the broker
    redelivers those messages on the next connection.
    """

    __slots__ = ("_send", "_pending")

    def __init__(self, send: Callable[[int, int], object]) -> None:
        self._send = send
        self._pending: deque[list] = deque()  # [mid, qos, done], arrival order

    def __len__(self) -> int:
        return len(self._pending)

    def track(self, mid: int, qos: int) -> Callable[[], None]:
        slot = [mid, qos, False]
        pending = self._pending
        pending.append(slot)

        def ack() -> None:
            slot[2] = True
            if pending and pending[0] is slot:
                self._flush()

        return ack

    def _flush(self) -> None:
        pending, send = self._pending, self._send
        while pending and pending[0][2]:
            mid, qos, _ = pending.popleft()
            send(mid, qos)

    def close(self) -> None:
        self._send = _noop_send
        self._pending.clear()


class ReadGate:
    """Pauses and resumes one MQTT client's socket reads (see the module docstring).

    Args:
        metrics: For ``gateway_intake_paused``.
        backed_up: True while the intake holds its budget of payload bytes.
        held_fraction: Held payload bytes as a fraction of that budget.
        max_memory_bytes: Resident memory bound of the process (0: not watched).
    """

    def __init__(self, metrics: Metrics, backed_up: Callable[[], bool], held_fraction: Callable[[], float],
                 max_memory_bytes: int) -> None:
        self._metrics = metrics
        self._backed_up = backed_up
        self._held_fraction = held_fraction
        self._max_memory = max_memory_bytes
        self._client: aiomqtt.Client | None = None  # the client of the current connection
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: object | None = None  # paho's socket while connected
        self._reader_off = False  # the reader is taken off the loop (reads paused)
        self._paused: str | None = None  # why intake is paused: "held" | "memory" | None
        self._paused_at = 0.0
        self._pauses = 0  # pauses since the last pause log line
        self._last_log = -_LOG_EVERY_S
        self._rss = 0
        self._memory_stuck = False  # resident memory stayed high with nothing held: no memory pauses

    def paused_for(self) -> tuple[float, str | None]:
        """Seconds reads have been paused (0 while reading) and why ("held" or "memory")."""
        return (time.monotonic() - self._paused_at, self._paused) if self._paused else (0.0, None)

    def reading(self) -> bool:
        """False while reads are paused (``paho_speed.buffer_reads`` stops its drain then)."""
        return not self._reader_off

    def after_take(self) -> None:
        """Called after each payload taken: pause at once when the budget is reached."""
        if self._paused is None and self._backed_up():
            self.pause("held")

    def hook(self, client: aiomqtt.Client, inner: paho.Client) -> None:
        """Know paho's socket (to take its reader off the loop) and keep keepalive alive while paused.

        aiomqtt 2.5.1 registers ``loop.add_reader(sock, callback)`` in its ``on_socket_open``
        and removes it in ``on_socket_close``; its ``_misc_loop`` calls ``loop_misc()`` once a
        second, which sends PINGREQs and closes the connection when no byte arrived within
        the keepalive. Both hooks are wrapped here, nothing else is changed.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._client = client
        opened, closed = inner.on_socket_open, inner.on_socket_close

        def on_open(c: paho.Client, userdata: object, sock: object) -> None:
            opened(c, userdata, sock)  # schedules aiomqtt's add_reader; ours runs after it
            loop.call_soon_threadsafe(self._socket_opened, client, sock)

        def on_close(c: paho.Client, userdata: object, sock: object) -> None:
            self._sock = None
            closed(c, userdata, sock)

        inner.on_socket_open = on_open
        inner.on_socket_close = on_close
        misc = inner.loop_misc

        def loop_misc() -> paho.MQTTErrorCode:
            if self._reader_off:
                # Unread bytes are ours to read later, not a silent broker: restart paho's
                # no-bytes-received clock so that it keeps sending PINGREQs and does not close.
                with inner._msgtime_mutex:  # noqa: SLF001
                    inner._last_bytes_received = paho.time_func()  # noqa: SLF001
                inner._ping_t = 0  # noqa: SLF001
            return misc()

        inner.loop_misc = loop_misc  # type: ignore[method-assign]

    def _socket_opened(self, client: aiomqtt.Client, sock: object) -> None:
        if client is not self._client or sock.fileno() < 0:  # type: ignore[attr-defined]
            return  # a connection that is already gone again
        self._sock = sock
        self._reader_off = False
        if self._paused:
            self._reads_off()

    def _reads_off(self) -> None:
        sock = self._sock
        if sock is not None and not self._reader_off and self._loop is not None and sock.fileno() >= 0:  # type: ignore[attr-defined]
            self._loop.remove_reader(sock.fileno())  # type: ignore[attr-defined]
            self._reader_off = True

    def _reads_on(self) -> None:
        sock, client = self._sock, self._client
        if sock is None or client is None or not self._reader_off or self._loop is None:
            return
        if sock.fileno() < 0:  # type: ignore[attr-defined]
            self._reader_off = False
            return
        inner = client._client  # noqa: SLF001
        with inner._msgtime_mutex:  # noqa: SLF001
            inner._last_bytes_received = paho.time_func()  # noqa: SLF001
        inner._ping_t = 0  # noqa: SLF001
        self._reader_off = False

        def read_ready() -> None:  # the same as aiomqtt's reader callback
            try:
                while True:
                    inner.loop_read()
                    if hasattr(inner._sock, "pending") and inner._sock.pending() > 0:  # type: ignore[union-attr] # noqa: SLF001
                        continue
                    break
            except Exception as exc:  # noqa: BLE001 - a broken connection: aiomqtt reconnects
                if not client._disconnected.done():  # noqa: SLF001
                    client._disconnected.set_exception(exc)  # noqa: SLF001

        self._loop.add_reader(sock.fileno(), read_ready)  # type: ignore[attr-defined]
        self._loop.call_soon(read_ready)  # packets already in the read buffer: the socket will not signal them

    def pause(self, why: str) -> None:
        self._paused = why
        self._paused_at = time.monotonic()
        self._pauses += 1
        self._metrics.intake_paused.set(1)
        self._reads_off()
        now = self._paused_at
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            log.warning(
                "Intake paused; the broker holds the backlog.",
                extra={"reason": "pending payloads at budget" if why == "held" else "resident memory near the bound",
                       "held_fraction": round(self._held_fraction(), 2), "rss_mib": self._rss >> 20,
                       "max_memory_mib": self._max_memory >> 20, "pauses": self._pauses},
            )
            self._pauses = 0

    def _resume(self) -> None:
        paused_s = time.monotonic() - self._paused_at
        self._paused = None
        self._metrics.intake_paused.set(0)
        self._reads_on()
        if paused_s >= 1.0 or time.monotonic() - self._last_log >= _LOG_EVERY_S:
            self._last_log = time.monotonic()
            log.info("Intake resumed.", extra={"paused_s": round(paused_s, 1), "rss_mib": self._rss >> 20})

    def _govern(self) -> None:
        """Pause or resume reads from the held bytes and resident memory (every ``_SAMPLE_S``)."""
        held = self._held_fraction()
        rss = self._rss = resident_bytes() if self._max_memory else 0
        high = self._max_memory and rss >= _PAUSE_AT * self._max_memory
        if self._memory_stuck and rss < _RESUME_RSS * self._max_memory:
            self._memory_stuck = False
        if self._paused is None:
            if self._backed_up():
                self.pause("held")
            elif high and held > 0 and not self._memory_stuck:
                self.pause("memory")
            return
        if self._backed_up() or held >= _RESUME_HELD:
            return
        if self._max_memory and not self._memory_stuck and rss >= _RESUME_RSS * self._max_memory and held > 0:
            return  # payloads are still being written: what they hold is what pausing frees
        if self._paused == "memory" and held == 0 and rss >= _RESUME_RSS * self._max_memory:
            # Memory the process keeps with nothing held (allocator, caches) is not what a
            # pause frees: stop pausing for memory until it is under the low watermark again;
            # the payload budget still bounds what is held.
            self._memory_stuck = True
            log.warning("Resident memory stays near the bound with no payload held; reading on, bounded by "
                        "the payload budget.", extra={"rss_mib": rss >> 20, "max_memory_mib": self._max_memory >> 20})
        self._resume()

    async def govern(self) -> None:
        """Run ``_govern`` every ``_SAMPLE_S`` while connected (a task per connection)."""
        while True:
            await asyncio.sleep(_SAMPLE_S)
            self._govern()
