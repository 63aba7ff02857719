"""FastProperties parses property blocks exactly as paho's Properties does."""

from __future__ import annotations

import paho.mqtt._packet as paho_packet
import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.sources.paho_speed import FastProperties, install


def publish_props(content_type: str | None, user: list[tuple[str, str]], expiry: int | None) -> bytes:
    p = Properties(PacketTypes.PUBLISH)
    if content_type is not None:
        p.ContentType = content_type
    if user:
        p.UserProperty = user
    if expiry is not None:
        p.MessageExpiryInterval = expiry
    return p.pack()


text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x7FF), max_size=20)


@given(st.none() | text, st.lists(st.tuples(text, text), max_size=3), st.none() | st.integers(0, 2**32 - 1),
       st.binary(max_size=8))
def test_same_attributes_and_length_as_paho(content_type, user, expiry, trailing):
    block = publish_props(content_type, user, expiry) + trailing
    ours, n_ours = FastProperties(PacketTypes.PUBLISH).unpack(block)
    theirs, n_theirs = Properties(PacketTypes.PUBLISH).unpack(block)
    assert n_ours == n_theirs
    assert ours.json() == theirs.json()
    assert getattr(ours, "ContentType", None) == getattr(theirs, "ContentType", None)


def test_empty_block_and_reuse():
    p = FastProperties(PacketTypes.PUBLISH)
    p.unpack(publish_props("application/json", [], None))
    assert p.ContentType == "application/json"
    _, n = p.unpack(b"\x00rest")
    assert n == 1 and not hasattr(p, "ContentType")


def test_install_switches_packet_decoding():
    install()
    assert paho_packet.Properties is FastProperties


def _publish_packet(topic: bytes, payload: bytes) -> bytes:
    """An MQTT 3.1.1 PUBLISH, QoS 0 (remaining length < 128)."""
    body = len(topic).to_bytes(2, "big") + topic + payload
    return bytes([0x30, len(body)]) + body


@pytest.mark.asyncio
async def test_buffered_drain_yields_to_the_event_loop_between_turns():
    """Packets already in the read buffer are drained at most _PACKETS_PER_TURN per loop turn,
    so a broker that keeps the buffer full cannot starve the writer task."""
    import asyncio
    import socket

    import paho.mqtt.client as paho_client

    from gateway.sources import paho_speed

    client = paho_client.Client(paho_client.CallbackAPIVersion.VERSION2, protocol=paho_client.MQTTv311)
    received: list[bytes] = []
    client.on_message = lambda _c, _u, msg: received.append(msg.payload)
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    n = 2 * paho_speed._PACKETS_PER_TURN + 500  # noqa: SLF001
    broker.sendall(b"".join(_publish_packet(b"devices/d/telemetry", b"%05d" % i) for i in range(n)))
    client._sock = ours  # noqa: SLF001 - a connected socket, as paho holds it
    paho_speed.buffer_reads(client)
    seen_by_other_task: list[int] = []

    async def other() -> None:
        seen_by_other_task.append(len(received))

    try:
        task = asyncio.ensure_future(other())
        client.loop_read()
        assert len(received) == paho_speed._PACKETS_PER_TURN  # noqa: SLF001 - one turn's worth, then it yields
        await task
        for _ in range(100):
            if len(received) == n:
                break
            await asyncio.sleep(0)
        assert received == [b"%05d" % i for i in range(n)], "every packet, in order, none twice"
        assert seen_by_other_task and seen_by_other_task[0] < n, "another task ran before the drain finished"
    finally:
        client._sock = None  # noqa: SLF001
        ours.close()
        broker.close()
