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


def _v5_publish(topic: bytes, payload: bytes, qos: int, mid: int, props: Properties | None) -> bytes:
    from paho.mqtt.properties import VariableByteIntegers

    body = len(topic).to_bytes(2, "big") + topic + (mid.to_bytes(2, "big") if qos else b"")
    body += (props.pack() if props is not None else b"\x00") + payload
    return bytes([0x30 | qos << 1]) + VariableByteIntegers.encode(len(body)) + body


@pytest.mark.parametrize("chunk", [13, 300, 65536])
def test_fast_publish_path_delivers_what_paho_would_in_order(chunk: int):
    """Plain PUBLISH packets go to on_publish, the rest through paho's on_message, in stream
    order, whatever the packets' cut across reads."""
    import random
    import socket

    import paho.mqtt.client as paho_client

    from gateway.sources import paho_speed

    install()
    rnd = random.Random(chunk)
    expected, stream = [], bytearray()
    for i in range(300):
        qos, mid = rnd.choice((0, 1)), i % 65535 + 1
        topic = b"devices/d-%d/telemetry" % (i % 7)
        payload = rnd.randbytes(rnd.choice((0, 5, 200, 3000)))
        kind = rnd.choice(("plain", "content_type", "expiry"))
        props = None
        ct = None
        if kind != "plain":
            props = Properties(PacketTypes.PUBLISH)
            if kind == "content_type":
                props.ContentType = ct = rnd.choice(("application/json", "application/msgpack"))
            else:
                props.MessageExpiryInterval = 30  # not the fast path: paho parses it
        stream += _v5_publish(topic, payload, qos, mid, props)
        expected.append((topic.decode(), payload, qos, mid if qos else 0, ct, kind != "expiry"))
        if i % 50 == 0:
            stream += b"\xd0\x00"  # PINGRESP: paho's
    client = paho_client.Client(paho_client.CallbackAPIVersion.VERSION2, protocol=paho_client.MQTTv5)
    client.manual_ack_set(True)
    got: list[tuple] = []
    client.on_message = lambda _c, _u, m: got.append(
        (m.topic, m.payload, m.qos, m.mid if m.qos else 0, getattr(m.properties, "ContentType", None), False))
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    client._sock = ours  # noqa: SLF001
    paho_speed.buffer_reads(client, on_publish=lambda t, p, q, m, c: got.append((t, p, q, m if q else 0, c, True)))
    try:
        for k in range(0, len(stream), chunk):
            broker.sendall(stream[k:k + chunk])
            client.loop_read()
        for _ in range(1000):
            if len(got) == len(expected):
                break
            client.loop_read()
        assert [g[:5] for g in got] == [e[:5] for e in expected], "every message, in order, none twice"
        assert chunk < 1000 or any(g[5] for g in got), "the fast path was taken"
        assert all(not g[5] for g, e in zip(got, expected) if not e[5]), "packets with other properties went to paho"
    finally:
        client._sock = None  # noqa: SLF001
        ours.close()
        broker.close()


def test_parse_publish_leaves_what_it_does_not_handle():
    from gateway.sources.paho_speed import parse_publish

    pkt = _v5_publish(b"t/1", b"xy", 1, 9, None)
    assert parse_publish(bytearray(pkt + b"\xd0\x00"), True) == (len(pkt), "t/1", b"xy", 1, 9, None)
    for cut in range(len(pkt)):
        assert parse_publish(bytearray(pkt[:cut]), True) is None  # incomplete
    assert parse_publish(bytearray(b"\x34" + pkt[1:]), True) is None  # QoS 2
    assert parse_publish(bytearray(b"\xd0\x00"), True) is None  # not a PUBLISH
    assert parse_publish(bytearray(_v5_publish(b"\xff\xfe", b"x", 1, 1, None)), True) is None  # topic not UTF-8
    v311 = b"\x32\x07\x00\x03t/1\x00\x09" + b""
    assert parse_publish(bytearray(v311), False) == (len(v311), "t/1", b"", 1, 9, None)
