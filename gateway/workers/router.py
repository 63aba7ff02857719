"""Device affinity between worker processes: the intake of one worker.

``Router`` has the intake surface the sources call (``submit``, ``validate``,
``accept``, ``quarantine``, ``backed_up``, ``audit``). A payload of a device this
worker owns goes to the local pipeline. Any other is forwarded, raw, to its owner and
held here until the owner reports its outcome after commit (``forward.Forwarder``); only
then are its ``ack`` and ``on_outcome`` called. The other workers' payloads for this
worker's devices arrive on its own socket (``owner.OwnerServer``). The frames are in
``frames.py``.

Backpressure: the owner stops reading frames while its pipeline is backed up; the
sender counts held payload bytes with its pipeline's (``held_fraction``), so its MQTT
source pauses reads when the two together reach the budget. The owner reads again
after a commit that leaves room: the router hands it a notification for every payload
it gives the pipeline (``_settles``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from gateway.errors import RejectError
from gateway.metrics import Metrics
from gateway.model import RawMessage
from gateway.pipeline import Pipeline
from gateway.workers import owner_of
from gateway.workers.forward import Forwarder
from gateway.workers.frames import socket_path
from gateway.workers.owner import OwnerServer

__all__ = ["Router"]

log = logging.getLogger(__name__)

_PEERS_WAIT_S = 30.0


def _then(ack: Callable[[], None], settled: Callable[[], None]) -> Callable[[], None]:
    def both() -> None:
        ack()
        settled()

    return both


class Router:
    """The intake of one worker: local pipeline for its own devices, forwarding for the others.

    Args:
        pipeline: This worker's pipeline.
        index: This worker's index, 0..count-1.
        count: Number of workers.
        runtime_dir: Directory of the workers' sockets (shared by all of them).
        max_held: Payloads held for one peer before ``backed_up`` (the MQTT window bounds them anyway).
    """

    def __init__(self, pipeline: Pipeline, *, index: int, count: int, runtime_dir: str | Path,
                 metrics: Metrics, max_held: int = 20_000) -> None:
        self.pipeline = pipeline
        self.index = index
        self.count = count
        self.runtime_dir = Path(runtime_dir)
        self.max_held = max_held
        self.stopping = False
        self.forwarder = Forwarder(index=index, count=count, runtime_dir=runtime_dir, metrics=metrics)
        self.owner = OwnerServer(pipeline, socket_path(runtime_dir, index))
        if hasattr(pipeline, "audit"):
            self.audit = pipeline.audit  # security decisions have no device state: written locally

    # ------------------------------------------------------------------ intake
    def owns(self, device_id: str | None) -> bool:
        return not device_id or owner_of(device_id, self.count) == self.index

    def _settles(self, raw: RawMessage) -> RawMessage:
        """Tell the owner side when ``raw`` is committed (a paused link may read again then)."""
        raw.ack = self.owner.settled if raw.ack is None else _then(raw.ack, self.owner.settled)
        return raw

    def submit(self, raw: RawMessage) -> None:
        device_id = raw.topic_device_id or raw.principal
        if self.owns(device_id):
            self.pipeline.submit(self._settles(raw))
        else:
            self.forwarder.put(owner_of(device_id, self.count), raw)  # type: ignore[arg-type]

    def validate(self, raw: RawMessage):  # noqa: ANN201 - the pipeline's Decoded
        return self.pipeline.validate(raw)  # decoding is stateless: any worker can answer 4xx

    def accept(self, raw: RawMessage, decoded) -> None:  # noqa: ANN001
        if self.stopping:
            raise RuntimeError("pipeline is stopping; no new payloads are taken")
        device_id = decoded.device_id
        if self.owns(device_id):
            self.pipeline.accept(self._settles(raw), decoded)
        else:
            self.forwarder.put(owner_of(device_id, self.count), raw)  # the owner decodes it again

    def quarantine(self, raw: RawMessage, exc: RejectError) -> None:
        self.pipeline.quarantine(self._settles(raw), exc)  # a reject touches no device state

    @property
    def backed_up(self) -> bool:
        return self.held_fraction() >= 1.0

    @property
    def in_flight(self) -> int:
        return self.pipeline.in_flight + self.forwarder.held

    @property
    def pending_bytes(self) -> int:
        return self.pipeline.pending_bytes + self.forwarder.held_bytes

    @property
    def held(self) -> int:
        """Payloads forwarded to other workers and not yet committed there."""
        return self.forwarder.held

    def held_fraction(self) -> float:
        """What this worker holds as a fraction of its budget: payload bytes (its pipeline's and
        those forwarded, not yet committed) and, per peer, held payloads against ``max_held``."""
        frac = self.pending_bytes / self.pipeline.settings.max_pending_bytes
        if self.pipeline.backed_up:
            frac = max(frac, 1.0)
        return max(frac, self.forwarder.most_held() / self.max_held)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Listen on this worker's socket and start the links to the other workers.

        Waits (bounded) for the other workers before the sources start: a worker taking a
        backlog alone would hold every payload of the others' devices and stall its acks.
        """
        await self.owner.start()
        missing = await self.forwarder.start(_PEERS_WAIT_S)
        if missing:
            log.warning("Starting before every worker is reachable; payloads of their devices are held until they are.",
                        extra={"worker": self.index, "unreachable": ",".join(map(str, missing))})
        log.info("Worker links up.", extra={"worker": self.index, "workers": self.count, "socket": str(self.owner.path)})

    def stop(self) -> None:
        """Stop taking payloads (forwarded ones refused from now on are left with the transport)."""
        self.stopping = True
        self.forwarder.stop()
        self.owner.stop()

    async def drain(self, timeout: float) -> bool:
        """Wait until every forwarded payload is answered (or refused); True if none is left."""
        return await self.forwarder.drain(timeout)

    async def close(self) -> None:
        """Stop listening and close every link (after the local pipeline has drained)."""
        await self.owner.close()
        await self.forwarder.close()
