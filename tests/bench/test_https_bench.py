"""bench.https's load: every body is a valid JSON array of the device's own envelopes, 10 readings each."""

from __future__ import annotations

import orjson

from bench.https import READINGS_PER_ENVELOPE, _bodies
from gateway.decode import decode
from gateway.profiles import load_profiles
from tests.harness import PROFILES

P = load_profiles(PROFILES)


def test_bodies_are_batches_of_valid_envelopes_of_their_token_s_device():
    devices = ["hb-0", "hb-1", "hb-2"]
    tokens = {d: f"vgd_{i:016x}_secret" for i, d in enumerate(devices)}
    bodies = _bodies(devices, tokens, per_device=7, batch=3, t0=1_764_000_000_000)
    assert len(bodies) == 3 * 3  # 7 envelopes per device in batches of 3, 3, 1
    seen: dict[str, list[int]] = {}
    for token, body in bodies:
        envs = orjson.loads(body)
        assert 1 <= len(envs) <= 3
        for env in envs:
            assert tokens[env["device_id"]] == token
            d = decode(orjson.dumps(env), content_type="application/json", profiles=P)
            assert d.n_numeric == READINGS_PER_ENVELOPE
            seen.setdefault(env["device_id"], []).append(env["seq"])
    assert seen == {d: list(range(7)) for d in devices}
