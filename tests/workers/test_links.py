"""The links between workers, on real unix sockets: refusals are resent, a bad frame drops the
link without dropping what it holds, and an owner whose pipeline is backed up stops reading."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.metrics import Metrics
from gateway.model import Outcome, RawMessage
from gateway.workers.forward import Forwarder
from gateway.workers.frames import Done, forward_frame, frame, read_frame, socket_path
from gateway.workers.owner import OwnerServer

pytestmark = pytest.mark.asyncio


async def until(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Wait for ``cond`` with a deadline (each event-loop turn lets the links make progress)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class FakePipeline:
    """Takes payloads; commits them when told; refuses the next ``refuse`` of them (stopping)."""

    def __init__(self) -> None:
        self.taken: list[RawMessage] = []
        self.backed_up = False
        self.refuse = 0
        self.refused = 0

    def submit(self, raw: RawMessage) -> None:
        if self.refuse:
            self.refuse -= 1
            self.refused += 1
            raise RuntimeError("pipeline is stopping")
        self.taken.append(raw)

    def commit(self, raw: RawMessage, outcome: Outcome = Outcome("stored", 41)) -> None:
        if raw.ack is not None:
            raw.ack()
        if raw.on_outcome is not None:
            raw.on_outcome(outcome)


@pytest.fixture
def runtime():
    with tempfile.TemporaryDirectory(prefix="vg-links-") as d:  # short: unix socket paths are limited
        yield Path(d)


def payload(i: int, acks: list[int] | None = None) -> RawMessage:
    ack = (lambda: acks.append(i)) if acks is not None else None
    return RawMessage(f'{{"n":{i}}}'.encode(), "mqtt", f"dev-{i}", f"devices/dev-{i}/telemetry", 1_000 + i,
                      topic_device_id=f"dev-{i}", ack=ack, remote_addr="10.0.0.9")


async def test_a_refused_frame_is_resent_and_held_until_done(runtime):
    pipeline = FakePipeline()
    owner = OwnerServer(pipeline, socket_path(runtime, 1))
    await owner.start()
    fwd = Forwarder(index=0, count=2, runtime_dir=runtime, metrics=Metrics())
    assert await fwd.start(5.0) == []
    pipeline.refuse = 1
    acks: list[int] = []
    outcomes: list[Outcome] = []
    raw = payload(1, acks)
    raw.on_outcome = outcomes.append
    fwd.put(1, raw)
    await until(lambda: pipeline.taken, "the resent frame")
    assert pipeline.refused == 1, "refused once, then sent again"
    taken = pipeline.taken[0]
    assert (taken.payload, taken.remote_addr, taken.ack) == (raw.payload, "10.0.0.9", None)
    assert fwd.held == 1 and acks == [], "held until the owner's Done"
    assert not await fwd.drain(0.01)
    pipeline.commit(taken, Outcome("stored", 41))
    assert await fwd.drain(5.0)
    assert acks == [1] and outcomes == [Outcome("stored", 41, None)]
    assert fwd.held == 0 and fwd.held_bytes == 0
    await fwd.close()
    await owner.close()


async def test_a_refusal_while_stopping_leaves_the_payload_with_the_transport(runtime):
    pipeline = FakePipeline()
    owner = OwnerServer(pipeline, socket_path(runtime, 1))
    await owner.start()
    fwd = Forwarder(index=0, count=2, runtime_dir=runtime, metrics=Metrics())
    await fwd.start(5.0)
    fwd.stop()
    with pytest.raises(RuntimeError):
        fwd.put(1, payload(9))
    fwd.stopping = False  # one payload in flight when the stop comes
    acks: list[int] = []
    pipeline.refuse = 1
    fwd.put(1, payload(2, acks))
    fwd.stop()
    assert await fwd.drain(5.0), "released by the refusal"
    assert acks == [] and pipeline.taken == []
    await fwd.close()
    await owner.close()


async def test_a_bad_answer_drops_the_link_and_the_payload_stays_held_and_is_resent(runtime):
    received: list[tuple[int, bytes]] = []
    connections = 0

    async def owner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        msg = await read_frame(reader)
        received.append((msg.id, msg.payload))
        if connections == 1:
            writer.write(b"\x00\x00\x00\x03abc")  # not MessagePack of a Done
        else:
            writer.write(frame(Done(msg.id, "stored", 7)))
        await writer.drain()
        await reader.read()  # until the sender closes
        writer.close()

    server = await asyncio.start_unix_server(owner, path=str(socket_path(runtime, 1)))
    fwd = Forwarder(index=0, count=2, runtime_dir=runtime, metrics=Metrics())
    await fwd.start(5.0)
    acks: list[int] = []
    fwd.put(1, payload(3, acks))
    assert await fwd.drain(10.0)
    assert connections == 2, "the link was dropped and opened again"
    assert received[0] == received[1], "the same held payload, sent again on the new link"
    assert acks == [3]
    await fwd.close()
    server.close()


async def test_a_bad_frame_closes_the_owners_link_and_a_new_link_works(runtime):
    pipeline = FakePipeline()
    owner = OwnerServer(pipeline, socket_path(runtime, 1))
    await owner.start()
    reader, writer = await asyncio.open_unix_connection(str(socket_path(runtime, 1)))
    writer.write(frame(Done(1, "stored")))  # an answer where a Forward belongs
    assert await asyncio.wait_for(reader.read(), 5.0) == b"", "the owner closed the link"
    writer.close()
    reader, writer = await asyncio.open_unix_connection(str(socket_path(runtime, 1)))
    writer.write(forward_frame(5, payload(5)))
    await until(lambda: pipeline.taken, "the frame on the new link")
    pipeline.commit(pipeline.taken[0])
    assert await asyncio.wait_for(read_frame(reader), 5.0) == Done(5, "stored", 41, None)
    writer.close()
    await owner.close()


async def test_the_owner_stops_reading_while_backed_up_and_reads_again_after_a_commit(runtime):
    pipeline = FakePipeline()
    owner = OwnerServer(pipeline, socket_path(runtime, 1))
    await owner.start()
    reader, writer = await asyncio.open_unix_connection(str(socket_path(runtime, 1)))
    pipeline.backed_up = True
    writer.write(forward_frame(1, payload(1)))
    await until(lambda: len(pipeline.taken) == 1, "the first frame")
    (link,) = owner.links
    assert link in owner.paused and not link.transport.is_reading(), "paused while the pipeline is backed up"
    writer.write(forward_frame(2, payload(2)))
    await writer.drain()
    pipeline.commit(pipeline.taken[0])  # still backed up: stays paused
    assert await asyncio.wait_for(read_frame(reader), 5.0) == Done(1, "stored", 41), "answered though paused"
    assert link in owner.paused and not link.transport.is_reading()
    assert len(pipeline.taken) == 1
    pipeline.backed_up = False
    pipeline.taken.append(payload(99))  # a local payload committed: room again
    pipeline.commit(RawMessage(b"", "mqtt", None, "", 0, ack=owner.settled))
    await until(lambda: len(pipeline.taken) == 3, "the second frame, read after the commit")
    assert pipeline.taken[2].payload == payload(2).payload and not owner.paused

    pipeline.backed_up = True
    writer.write(forward_frame(3, payload(3)))
    await until(lambda: len(pipeline.taken) == 4, "the third frame")
    assert owner.paused
    writer.write(forward_frame(4, payload(4)))
    pipeline.refuse = 1  # the pipeline stops: what arrives now is refused, so reads must resume
    owner.stop()
    assert not owner.paused
    answer = await asyncio.wait_for(read_frame(reader), 5.0)
    assert answer == Done(4, "refused")
    writer.close()
    await owner.close()
