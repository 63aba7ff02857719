"""`vitalgate devices` and `vitalgate keys` against a real database, with a running Registry.

Each change must reach a running registry through NOTIFY (the registry here refreshes
only on notifications: its periodic refresh is an hour away), leave one audit row, and
print a credential that the registry then accepts. Refused commands change nothing.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import stat
from pathlib import Path

import asyncpg
import orjson
import pytest

from gateway.registry import Registry
from tests.integration.support import cli_in_thread
from tests.harness import PROFILES, await_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]
ACTOR = f"cli:{getpass.getuser()}"


@pytest.fixture
def cli(db_dsn, monkeypatch, capsys):
    """Run `vitalgate ...` in a thread (it runs its own event loop); returns (status, stdout, stderr)."""
    for var in [v for v in os.environ if v.startswith("VITALGATE_")]:
        monkeypatch.delenv(var)  # the test run's own settings (VITALGATE_KEEP_SERVICES) are no gateway keys
    monkeypatch.setenv("VITALGATE_DATABASE_URL", db_dsn)
    monkeypatch.setenv("VITALGATE_PROFILES_DIR", str(PROFILES))

    return cli_in_thread(capsys)


async def _migrated(cli) -> None:  # noqa: ANN001
    rc, _, err = await cli("db", "migrate")
    assert rc == 0, err


async def audit_rows(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch("SELECT actor, action, target, outcome, correlation_id, detail FROM audit_log ORDER BY id")
    finally:
        await conn.close()


async def test_device_lifecycle_reaches_a_running_registry_and_is_audited(cli, db_dsn):
    await _migrated(cli)
    reg = Registry(refresh_s=3600)
    await reg.start(db_dsn)
    try:
        rc, out, err = await cli("devices", "add", "po-1", "--profile", "pulse_oximeter", "--note", "ward 3")
        assert rc == 0, err
        token = out.strip()
        assert token.startswith("vgd_") and len(out.splitlines()) == 1  # stdout holds the token alone
        assert "shown this once" in err
        await await_for(lambda: reg.device("po-1"), timeout=10, message="po-1 in the registry after NOTIFY")
        await asyncio.gather(*(reg.refresh() for _ in range(3)))  # beside the follower, on the same connection
        assert reg.authenticate_token(token).device_id == "po-1"
        assert reg.profile_of("po-1") == "pulse_oximeter"

        # refused or invalid: nothing changes, nothing is audited
        assert (await cli("devices", "add", "po-1", "--profile", "pulse_oximeter"))[::2] == (
            1, "vitalgate devices add: DEVICE_ID: device 'po-1' is already registered\n")
        rc, _, err = await cli("devices", "add", "po-2", "--profile", "toaster")
        assert rc == 2 and "--profile: unknown profile 'toaster' in" in err and "pulse_oximeter" in err
        rc, _, err = await cli("devices", "add", "po 2", "--profile", "pulse_oximeter")
        assert (rc, err) == (2, "vitalgate devices add: DEVICE_ID: 'po 2' must match [A-Za-z0-9._-]{1,64}\n")
        rc, _, err = await cli("devices", "revoke", "po-404")
        assert (rc, err) == (1, "vitalgate devices revoke: DEVICE_ID: device 'po-404' is not registered\n")
        rc, _, err = await cli("devices", "add", "po-3")
        assert rc == 2 and "--profile" in err  # argparse: required

        rc, out, _ = await cli("devices", "list", "--json")
        listed = orjson.loads(out)
        assert [(d["device_id"], d["profile"], d["status"], d["note"]) for d in listed] == [
            ("po-1", "pulse_oximeter", "active", "ward 3")]
        assert token.split("_")[1] == listed[0]["token_id"] and token not in out

        rc, out, err = await cli("devices", "rotate-token", "po-1")
        assert rc == 0, err
        new = out.strip()
        assert new.startswith("vgd_") and new != token
        await await_for(lambda: reg.authenticate_token(new), timeout=10, message="the new token accepted")
        assert reg.authenticate_token(token) is None  # the old one is refused

        rc, _, err = await cli("devices", "revoke", "po-1")
        assert rc == 0, err
        await await_for(lambda: reg.device("po-1").status == "revoked", timeout=10, message="po-1 revoked")
        assert reg.authenticate_token(new) is None
        assert (await cli("devices", "revoke", "po-1"))[0] == 1
        rc, _, err = await cli("devices", "rotate-token", "po-1")
        assert rc == 1 and "is revoked" in err

        rc, out, _ = await cli("devices", "show", "po-1")
        assert rc == 0 and "status:           revoked" in out and "device.rotate_token" in out
        rc, out, _ = await cli("devices", "list")
        assert out.splitlines()[0].split() == ["DEVICE_ID", "PROFILE", "STATUS", "TOKEN_ID", "CREATED_AT", "CERT_SUBJECT"]

        # the listener connection dies: the registry reconnects and reloads
        conn = await asyncpg.connect(db_dsn)
        try:
            assert await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'vitalgate:registry'"
                " AND datname = current_database()") == 1
        finally:
            await conn.close()
        rc, _, err = await cli("devices", "add", "po-2", "--profile", "pulse_oximeter", "--cert-subject", "CN=po-2")
        assert rc == 0, err
        await await_for(lambda: reg.device("po-2"), timeout=20, message="po-2 seen after the reconnect")
        assert reg.authenticate_cert("CN=po-2").device_id == "po-2"
        rc, _, err = await cli("devices", "add", "po-9", "--profile", "pulse_oximeter", "--cert-subject", "CN=po-2")
        assert (rc, err) == (1, "vitalgate devices add: --cert-subject: 'CN=po-2' is already the subject of device 'po-2'\n")
    finally:
        await reg.close()

    rows = await audit_rows(db_dsn)
    assert [(r["actor"], r["action"], r["target"], r["outcome"]) for r in rows] == [
        (ACTOR, "device.add", "po-1", "success"),
        (ACTOR, "device.rotate_token", "po-1", "success"),
        (ACTOR, "device.revoke", "po-1", "success"),
        (ACTOR, "device.add", "po-2", "success"),
    ]
    assert orjson.loads(rows[1]["detail"]) == {"old_token_id": token.split("_")[1], "token_id": new.split("_")[1]}


async def test_import_is_all_or_nothing_and_writes_tokens_once(cli, db_dsn, tmp_path: Path):
    await _migrated(cli)
    bad = tmp_path / "bad.csv"
    bad.write_text("device_id,profile\npo-a,pulse_oximeter\npo a,pulse_oximeter\npo-a,thermometer\npo-b,toaster\npo-c\n")
    rc, _, err = await cli("devices", "import", str(bad), "--no-tokens")
    assert rc == 2
    assert f"{bad}:3: device_id: 'po a' must match" in err
    assert f"{bad}:4: device_id: 'po-a' already on line 2" in err
    assert f"{bad}:5: profile: unknown profile 'toaster'" in err
    assert f"{bad}:6: expected 2 columns (device_id,profile), got 1" in err
    rc, _, err = await cli("devices", "import", str(bad))
    assert rc == 2 and "--tokens-out" in err  # one of the two is required

    fleet = tmp_path / "fleet.csv"
    fleet.write_text("# ward 3\ndevice_id,profile\npo-a,pulse_oximeter\n\nth-b,thermometer\npo-c,pulse_oximeter\n")
    out = tmp_path / "tokens.csv"
    rc, _, err = await cli("devices", "import", str(fleet), "--tokens-out", str(out))
    assert rc == 0, err
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    lines = out.read_text().splitlines()
    assert lines[0] == "device_id,token_id,token" and [ln.split(",")[0] for ln in lines[1:]] == ["po-a", "th-b", "po-c"]

    reg = Registry(refresh_s=3600)
    await reg.start(db_dsn)
    try:
        for ln in lines[1:]:
            dev, token_id, token = ln.split(",")
            assert reg.authenticate_token(token).device_id == dev
            assert reg.device(dev).token_id == token_id
        assert reg.profile_of("th-b") == "thermometer"
    finally:
        await reg.close()

    again = tmp_path / "again.csv"
    again.write_text("po-new,pulse_oximeter\npo-c,pulse_oximeter\n")
    rc, _, err = await cli("devices", "import", str(again), "--tokens-out", str(tmp_path / "t2.csv"))
    assert rc == 1 and f"{again}:2: device 'po-c' is already registered" in err
    assert not (tmp_path / "t2.csv").exists()
    rc, _, err = await cli("devices", "import", str(again), "--tokens-out", str(out))
    assert rc == 1  # the clash is found before the file is touched
    assert out.read_text().splitlines() == lines

    mqtt_only = tmp_path / "mqtt.csv"
    mqtt_only.write_text("po-m1,pulse_oximeter\npo-m2,pulse_oximeter\n")
    rc, _, err = await cli("devices", "import", str(mqtt_only), "--no-tokens")
    assert rc == 0, err
    rc, listing, _ = await cli("devices", "list", "--json")
    by_id = {d["device_id"]: d for d in orjson.loads(listing)}
    assert sorted(by_id) == ["po-a", "po-c", "po-m1", "po-m2", "th-b"]
    assert by_id["po-m1"]["token_id"] is None and by_id["po-a"]["token_id"] is not None

    rows = await audit_rows(db_dsn)
    assert [(r["action"], r["target"]) for r in rows] == [
        ("device.import", d) for d in ("po-a", "th-b", "po-c", "po-m1", "po-m2")]
    assert orjson.loads(rows[1]["detail"])["line"] == 5
    assert len({r["correlation_id"] for r in rows[:3]}) == 1  # one import, one correlation id


async def test_api_keys_add_list_revoke(cli, db_dsn):
    await _migrated(cli)
    reg = Registry(refresh_s=3600)
    await reg.start(db_dsn)
    try:
        rc, out, err = await cli("keys", "add", "dashboard", "--scope", "telemetry:read", "--scope", "admin")
        assert rc == 0, err
        key = out.strip()
        assert key.startswith("vgk_")
        got = await await_for(lambda: reg.authenticate_api_key(key), timeout=10, message="the key accepted")
        assert (got.name, got.scopes, got.status) == ("dashboard", frozenset({"telemetry:read", "admin"}), "active")
        assert reg.authenticate_api_key(key[:-1] + ("A" if key[-1] != "A" else "B")) is None

        rc, _, err = await cli("keys", "add", "x", "--scope", "telemetry:write")
        assert rc == 2 and "invalid choice: 'telemetry:write'" in err
        rc, out, _ = await cli("keys", "list", "--json")
        (listed,) = orjson.loads(out)
        assert listed["key_id"] == got.key_id and listed["scopes"] == ["admin", "telemetry:read"] and key not in out

        assert (await cli("keys", "revoke", "nothex"))[0] == 2
        assert (await cli("keys", "revoke", "0123456789abcdef"))[0] == 1
        rc, _, err = await cli("keys", "revoke", got.key_id)
        assert rc == 0, err
        await await_for(lambda: reg.authenticate_api_key(key) is None, timeout=10, message="the key refused")
        assert (await cli("keys", "revoke", got.key_id))[0] == 1
    finally:
        await reg.close()
    rows = await audit_rows(db_dsn)
    assert [(r["action"], r["target"]) for r in rows] == [("api_key.add", got.key_id), ("api_key.revoke", got.key_id)]
    assert orjson.loads(rows[0]["detail"]) == {"name": "dashboard", "scopes": ["admin", "telemetry:read"]}


async def test_registry_commands_need_the_migrated_schema(cli):
    rc, _, err = await cli("devices", "list")
    assert rc == 2 and 'relation "devices" does not exist' in err and "run `vitalgate db migrate` first" in err


async def test_changes_made_without_notify_are_found_by_the_periodic_check(cli, db_dsn):
    await _migrated(cli)
    reg = Registry(refresh_s=0.2)
    await reg.start(db_dsn)
    conn = await asyncpg.connect(db_dsn)
    try:
        await conn.execute("INSERT INTO devices (device_id, profile) VALUES ('po-sql', 'thermometer')")
        await await_for(lambda: reg.profile_of("po-sql") == "thermometer", timeout=10, message="po-sql found")
        await conn.execute("UPDATE devices SET status = 'revoked', revoked_at = now(), updated_at = now()"
                           " WHERE device_id = 'po-sql'")
        await await_for(lambda: reg.device("po-sql").status == "revoked", timeout=10, message="po-sql revoked")
    finally:
        await conn.close()
        await reg.close()
