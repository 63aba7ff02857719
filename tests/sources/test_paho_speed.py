"""FastProperties parses property blocks exactly as paho's Properties does."""

from __future__ import annotations

import paho.mqtt._packet as paho_packet
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
