"""Registry credentials: token and key format, hashing, and who authenticates (no database)."""

from __future__ import annotations

import re

import pytest

from gateway.registry import (
    ApiKey,
    Device,
    StaticRegistry,
    hash_secret,
    new_api_key,
    new_token,
    split_secret,
)


def test_tokens_are_random_prefixed_and_only_their_hash_is_kept():
    tokens = [new_token() for _ in range(200)]
    for t in tokens:
        assert re.fullmatch(r"vgd_[0-9a-f]{16}_[A-Za-z0-9_-]{43,}", t.text)
        assert t.text == f"vgd_{t.id}_{t.secret}"
        assert t.sha256 == hash_secret(t.secret) and len(t.sha256) == 32
        assert t.secret not in t.sha256.hex()
    assert len({t.secret for t in tokens}) == len({t.id for t in tokens}) == 200
    key = new_api_key()
    assert key.text.startswith(f"vgk_{key.id}_") and split_secret(key.text, "vgk") == (key.id, key.secret)


@pytest.mark.parametrize("text", [
    "", "vgd", "vgd_", "vgd__x", "vgk_0123456789abcdef_" + "a" * 43, "vgd_0123456789ABCDEF_" + "a" * 43,
    "vgd_0123456789abcde_" + "a" * 43, "vgd_0123456789abcdef_" + "a" * 42, "Bearer vgd_0123456789abcdef_" + "a" * 43,
])
def test_malformed_tokens_are_not_split(text):
    assert split_secret(text, "vgd") is None


def test_a_secret_may_contain_underscores():
    assert split_secret("vgd_0123456789abcdef_" + "_a" * 22, "vgd") == ("0123456789abcdef", "_a" * 22)


def test_token_authentication_accepts_only_the_active_devices_exact_token():
    reg = StaticRegistry()
    token = reg.add_device("po-1", "pulse_oximeter")
    other = reg.add_device("po-2", "pulse_oximeter")
    assert token and other
    dev = reg.authenticate_token(token)
    assert dev == Device("po-1", "pulse_oximeter", "active", token.split("_")[1], None)
    assert reg.authenticate_token(other).device_id == "po-2"
    token_id, secret = split_secret(token, "vgd")
    flipped = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    assert reg.authenticate_token(f"vgd_{token_id}_{flipped}") is None  # wrong secret
    assert reg.authenticate_token(f"vgd_{other.split('_')[1]}_{secret}") is None  # secret of another token
    assert reg.authenticate_token(f"vgd_0123456789abcdef_{secret}") is None  # unknown token id
    assert reg.authenticate_token(token.replace("vgd_", "vgk_", 1)) is None
    reg.revoke_device("po-1")
    assert reg.authenticate_token(token) is None
    assert reg.device("po-1").status == "revoked"  # still known, any status
    assert reg.authenticate_token(other).device_id == "po-2"


def test_rotating_a_token_refuses_the_old_one():
    reg = StaticRegistry()
    old = reg.add_device("po-1", "pulse_oximeter")
    new = reg.add_device("po-1", "pulse_oximeter")  # what `devices rotate-token` stores: a new id and hash
    assert reg.authenticate_token(old) is None
    assert reg.authenticate_token(new).device_id == "po-1"
    assert reg.size == 1


def test_devices_without_token_or_with_a_certificate():
    reg = StaticRegistry([Device("po-1", "pulse_oximeter", "active"), Device("cgm-1", "cgm", "revoked", cert_subject="CN=cgm-1")])
    reg.add_device("th-1", "thermometer", cert_subject="URI:urn:dev:th-1", token=False)
    assert reg.profile_of("po-1") == "pulse_oximeter" and reg.profile_of("nope") is None
    assert reg.device("nope") is None
    assert reg.authenticate_cert("URI:urn:dev:th-1").device_id == "th-1"
    assert reg.authenticate_cert("CN=cgm-1") is None  # revoked
    assert reg.authenticate_cert("CN=other") is None


def test_api_keys_carry_scopes_and_can_be_revoked():
    reg = StaticRegistry(api_keys=[ApiKey("0123456789abcdef", "listed", frozenset({"admin"}), "active")])
    key = reg.add_api_key("dash", ["telemetry:read"])
    got = reg.authenticate_api_key(key)
    assert got is not None and got.scopes == frozenset({"telemetry:read"}) and got.name == "dash"
    assert reg.authenticate_api_key("vgk_0123456789abcdef_" + "a" * 43) is None  # a key made without its secret
    assert reg.authenticate_api_key(key.replace("vgk_", "vgd_", 1)) is None
    revoked = reg.add_api_key("old", ["admin"], status="revoked")
    assert reg.authenticate_api_key(revoked) is None


@pytest.mark.asyncio
async def test_static_registry_has_the_registry_lifecycle():
    reg = StaticRegistry([Device("po-1", "pulse_oximeter", "active")])
    await reg.start("postgresql://unused")
    await reg.refresh()
    await reg.close()
    assert reg.device("po-1") is not None
