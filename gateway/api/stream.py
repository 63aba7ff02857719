"""``GET /v1/stream``: committed numerics, waveform blocks and alert events as Server-Sent Events.

A client watches a device, a patient (the devices associated with them now) or a
location prefix. Every worker process has its own hub (``gateway.query.hub``); a client
gets one feed per worker: the local hub's directly, the others' through
``gateway.query.peers``. Its position is a vector of one component per worker,
``seq`` (commit ``seq`` fully delivered) or ``seq~k`` (its first k events delivered),
joined by ``.``: that is each event's ``id``, so ``Last-Event-ID`` resumes every worker's
feed exactly where it stopped, as long as the commits are still in that worker's window;
otherwise the client gets an ``event: gap`` and should re-read the missed interval with
the query API.

Events wait in a per-client buffer of at most ``MAX_BUFFER`` bytes. A client that does
not read fast enough fills it and is disconnected: delivering never waits for a client,
so no client can slow ingestion. A comment line ``: heartbeat`` goes out every 15 s.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Callable

import orjson
from aiohttp import web

from gateway.query.hub import Event
from gateway.sources.http.api import CORRELATION_HEADER, ApiError, ErrorBody, operation
from gateway.sources.http.context import CORRELATION

from . import audit_read, db, read_side
from .params import Query, params

__all__ = ["stream", "Client", "parse_position", "MAX_BUFFER", "HEARTBEAT_S"]

log = logging.getLogger(__name__)

MAX_BUFFER = 4 << 20  # bytes of events a client may leave unread before it is disconnected
HEARTBEAT_S = 15.0
_COMPONENT = re.compile(r"^(?:-|([0-9]{1,19})(?:~([0-9]{1,9}))?)$")

Position = tuple[int, int] | None


def parse_position(text: str | None, origins: int) -> list[Position] | None:
    """The per-worker positions of a ``Last-Event-ID``; ``None`` when absent or not one of ours."""
    if not text:
        return None
    parts = text.strip().split(".")
    if len(parts) != origins:
        return None
    out: list[Position] = []
    for p in parts:
        m = _COMPONENT.match(p)
        if m is None:
            return None
        out.append(None if p == "-" else (int(m.group(1)), int(m.group(2) or 0)))
    return out


class Client:
    """One SSE connection's buffer and position (see the module docstring)."""

    def __init__(self, origins: int, *, max_bytes: int = MAX_BUFFER, abort: Callable[[], None] = lambda: None) -> None:
        self.position: list[Position] = [None] * origins
        self.queue: deque[bytes] = deque()
        self.size = 0
        self.max_bytes = max_bytes
        self.wake = asyncio.Event()
        self.closed = False
        self._abort = abort

    def event_id(self) -> str:
        return ".".join("-" if p is None else (str(p[0]) if p[1] == 0 else f"{p[0]}~{p[1]}") for p in self.position)

    def _push(self, name: str, data: bytes) -> None:
        frame = b"id: " + self.event_id().encode() + b"\nevent: " + name.encode() + b"\ndata: " + data + b"\n\n"
        self.queue.append(frame)
        self.size += len(frame)

    def deliverer(self, origin: int) -> Callable[[int, list[Event] | None], bool]:
        """``deliver(seq, events)`` for worker ``origin``'s feed; never blocks."""

        def deliver(seq: int, events: list[Event] | None) -> bool:
            if self.closed:
                return False
            if events is None:
                self.position[origin] = (seq, 0)
                self._push("gap", orjson.dumps({"worker": origin, "reason": "events older than the replay window"}))
            else:
                pos = self.position[origin]
                base = pos[1] if pos is not None and pos[0] == seq else 0
                last = len(events) - 1
                for j, (name, data) in enumerate(events):
                    self.position[origin] = (seq, 0) if j == last else (seq, base + j + 1)
                    self._push(name, data)
            if self.size > self.max_bytes:
                log.warning("Stream client disconnected: it left too many events unread.",
                            extra={"buffered_bytes": self.size, "limit": self.max_bytes})
                self.close()
                return False
            self.wake.set()
            return True

        return deliver

    def start_at(self, origin: int, seq: int) -> None:
        """A fresh feed: from the worker's current commit on."""
        if self.position[origin] is None:
            self.position[origin] = (seq, 0)

    def take(self) -> bytes:
        data = b"".join(self.queue)
        self.queue.clear()
        self.size = 0
        self.wake.clear()
        return data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.wake.set()
            self._abort()


@operation(
    "GET", "/v1/stream", operation_id="streamEvents",
    summary="Live committed readings, waveform blocks and alert events (Server-Sent Events)",
    description="Give exactly one of device, patient (devices associated with the patient now) or location "
                "(prefix of the current location). Events `reading`, `waveform`, `alert` (and `gap`, `open`) carry "
                "an `id` to resume from with the `Last-Event-ID` header within the replay window (60 s, less under "
                "heavy load); `: heartbeat` every 15 s. A client that leaves 4 MiB unread is disconnected.",
    auth="api_key", scope="telemetry:read", produces="text/event-stream",
    query_params=params("device", "patient", "location"),
    responses={200: ("An event stream.", None),
               400: ("A query parameter is invalid; `reason` names it.", ErrorBody),
               401: ("No credentials, or unknown/revoked ones.", ErrorBody),
               403: ("A device credential, or an API key without scope `telemetry:read` (audited).", ErrorBody),
               429: ("The key's rate limit is exhausted; see Retry-After.", ErrorBody),
               503: ("The live stream is not available on this instance, or the database is unavailable.",
                     ErrorBody)},
)
async def stream(request: web.Request) -> web.StreamResponse:
    read = read_side(request)
    subject = Query(request).subject(location=True)
    hub = read.hub
    if hub is None:
        raise ApiError(503, "gateway: the live stream is not available on this instance")
    origins, local = read.origins, read.origin
    resume = parse_position(request.headers.get("Last-Event-ID"), origins)
    now = int(time.time() * 1000)
    await audit_read(request, "read.stream", subject, now, 2**53, [subject[1]] if subject[0] == "device" else [],
                     resumed=resume is not None)
    await db(hub.refresh())
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no", CORRELATION_HEADER: request[CORRELATION]})
    await response.prepare(request)
    transport = request.transport
    client = Client(origins, abort=lambda: transport.abort() if transport is not None else None)
    if resume is not None:
        client.position = list(resume)
    elif request.headers.get("Last-Event-ID"):
        client.deliverer(local)(hub.seq, None)  # an id of another deployment: say what cannot be resumed
    feed, seq = hub.add_feed(subject, client.deliverer(local), resume[local] if resume else None)
    client.start_at(local, seq)
    remote = [read.peers.subscribe(i, subject, client, resume[i] if resume else None)
              for i in range(origins) if i != local] if read.peers is not None else []
    try:
        if remote:  # the other workers' positions, so that the first id resumes them too
            await asyncio.wait([asyncio.ensure_future(r.ready.wait()) for r in remote], timeout=5.0)
        if not client.queue:
            client._push("open", orjson.dumps({"workers": origins, "worker": local}))  # noqa: SLF001 - the first id
        while not client.closed:
            if not client.queue:
                try:
                    await asyncio.wait_for(client.wake.wait(), HEARTBEAT_S)
                except asyncio.TimeoutError:
                    await response.write(b": heartbeat\n\n")
                    continue
            data = client.take()
            if data:
                await response.write(data)
    except (ConnectionError, asyncio.TimeoutError, RuntimeError):
        pass  # the client went away, or was disconnected for not reading
    finally:
        client.close()
        hub.remove_feed(feed)
        for r in remote:
            r.cancel()
    return response
