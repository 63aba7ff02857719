"""Owner side: take ``Forward`` frames of this worker's devices into its pipeline, answer ``Done`` after commit.

Frames are taken in the I/O callback itself, not in a task, so that a forwarded payload
is submitted as early as a payload read from the broker at the same time: each device's
order is the order the two workers received them in. The answer goes back on the link
the frame came on, once the pipeline reports the payload's outcome (after commit); a
frame arriving while the pipeline stops taking payloads is answered ``refused`` (the
sender keeps it). A bad frame closes its link; the sender reconnects and resends.

Backpressure: a link stops reading while the pipeline is backed up (the sender holds the
payloads meanwhile, and pauses its own reads). It reads again when ``settled()`` reports
a commit that left the pipeline below its budget, or when the server stops (refusals
must flow); the router calls ``settled()`` for every payload it hands the pipeline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import msgspec

from gateway.model import Outcome, RawMessage
from gateway.workers.frames import HEADER, MAX_FRAME, Done, Forward, decoder, frame, raw_of

__all__ = ["OwnerServer"]

log = logging.getLogger("gateway.workers.router")


class _Pipeline(Protocol):
    def submit(self, raw: RawMessage) -> None: ...

    @property
    def backed_up(self) -> bool: ...


class _OwnerLink(asyncio.Protocol):
    """One peer's link, owner side."""

    def __init__(self, server: OwnerServer) -> None:
        self.server = server
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.links.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.links.discard(self)
        self.server.paused.discard(self)
        self.transport = None  # the sender resends what it still holds

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def resume(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def _answer(self, fid: int) -> Callable[[Outcome], None]:
        settled = self.server.settled

        def on_outcome(o: Outcome) -> None:
            t = self.transport
            if t is not None and not t.is_closing():
                t.write(frame(Done(fid, o.status, o.ingest_id, o.reason)))
            settled()

        return on_outcome

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        server = self.server
        pipeline = server.pipeline
        pos = 0
        try:
            while len(buf) - pos >= 4:
                (n,) = HEADER.unpack_from(buf, pos)
                if n > MAX_FRAME:
                    raise ValueError(f"frame of {n} bytes")
                if len(buf) - pos - 4 < n:
                    break
                msg = decoder.decode(memoryview(buf)[pos + 4: pos + 4 + n])
                pos += 4 + n
                if not isinstance(msg, Forward):
                    raise ValueError("unexpected frame from a worker")
                try:
                    pipeline.submit(raw_of(msg, on_outcome=self._answer(msg.id)))
                except RuntimeError:  # stopping: the sender keeps it
                    self.transport.write(frame(Done(msg.id, "refused")))  # type: ignore[union-attr]
        except (ValueError, msgspec.DecodeError) as exc:
            log.error("Bad frame from a worker; closing the link.", extra={"error": str(exc)})
            self.close()
            return
        finally:
            del buf[:pos]
        if pipeline.backed_up and not server.stopping and self.transport is not None and self not in server.paused:
            server.paused.add(self)
            self.transport.pause_reading()


class OwnerServer:
    """Listens on this worker's socket and takes the other workers' forwarded payloads.

    Args:
        pipeline: This worker's pipeline (``submit``, ``backed_up``).
        path: The socket to listen on.
    """

    def __init__(self, pipeline: _Pipeline, path: Path) -> None:
        self.pipeline = pipeline
        self.path = path
        self.stopping = False
        self.links: set[_OwnerLink] = set()
        self.paused: set[_OwnerLink] = set()  # links not reading until the pipeline has room
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)  # left by a previous run of this worker (killed)
        self._server = await asyncio.get_running_loop().create_unix_server(lambda: _OwnerLink(self), path=str(self.path))

    def settled(self) -> None:
        """A payload in the pipeline was committed: paused links read again if it has room now."""
        if self.paused and not self.pipeline.backed_up:
            self._resume_all()

    def _resume_all(self) -> None:
        paused, self.paused = self.paused, set()
        for link in paused:
            link.resume()

    def stop(self) -> None:
        """Refuse new frames from now on; paused links read again so that the refusals go out."""
        self.stopping = True
        self._resume_all()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            link.close()
        self.path.unlink(missing_ok=True)
