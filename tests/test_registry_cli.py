"""`vitalgate devices` / `keys`: what is refused before any database is reached, and the help texts.

The database URL points at a port where nothing listens: every case here must be decided
without connecting (the database side is in tests/integration/test_registry_cli.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.cli import main
from tests.harness import PROFILES, free_port


@pytest.fixture(autouse=True)
def no_database(monkeypatch):
    for var in [v for v in os.environ if v.startswith("VITALGATE_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("VITALGATE_DATABASE_URL", f"postgresql://postgres:pw@127.0.0.1:{free_port()}/none")
    monkeypatch.setenv("VITALGATE_DATABASE_CONNECT_TIMEOUT_S", "2")
    monkeypatch.setenv("VITALGATE_PROFILES_DIR", str(PROFILES))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as exc:
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(("argv", "message"), [
    (("devices", "add", "po/1", "--profile", "pulse_oximeter"), "DEVICE_ID: 'po/1' must match [A-Za-z0-9._-]{1,64}"),
    (("devices", "add", "x" * 65, "--profile", "pulse_oximeter"), "must match [A-Za-z0-9._-]{1,64}"),
    (("devices", "add", "po-1", "--profile", "toaster"), "--profile: unknown profile 'toaster' in"),
    (("devices", "add", "po-1", "--profile", "pulse_oximeter", "--note", " "), "--note: must be 1 to 1024 characters"),
    (("devices", "add", "po-1", "--profile", "pulse_oximeter", "--profiles", "/nonexistent"), "--profiles: /nonexistent"),
    (("devices", "revoke", "po 1"), "DEVICE_ID: 'po 1' must match"),
    (("devices", "show", ""), "DEVICE_ID: '' must match"),
    (("keys", "revoke", "KEY"), "KEY_ID: 'KEY' is not a key id (16 hex digits, as `keys list` shows)"),
    (("keys", "add", " ", "--scope", "admin"), "NAME: must be 1 to 1024 characters"),
])
def test_invalid_arguments_exit_2_naming_the_argument_without_connecting(capsys, argv, message):
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    assert message in err and "cannot connect" not in err
    assert err.startswith(f"vitalgate {argv[0]} {argv[1]}: ")


def test_import_lists_every_bad_row_before_connecting(capsys, tmp_path: Path):
    f = tmp_path / "fleet.csv"
    f.write_text("device_id,profile\n" + "".join(f"bad id {i},pulse_oximeter\n" for i in range(25)))
    rc, _, err = run(capsys, "devices", "import", str(f), "--no-tokens")
    assert rc == 2 and "FILE: 25 invalid rows, nothing imported:" in err
    assert f"{f}:2: device_id: 'bad id 0' must match" in err and "... and 5 more" in err
    assert "cannot connect" not in err
    empty = tmp_path / "empty.csv"
    empty.write_text("device_id,profile\n# nothing yet\n\n")
    assert run(capsys, "devices", "import", str(empty), "--no-tokens")[2].endswith(f"FILE: {empty} holds no devices\n")
    assert "FILE: cannot read" in run(capsys, "devices", "import", str(tmp_path / "missing.csv"), "--no-tokens")[2]
    rc, _, err = run(capsys, "devices", "import", str(f), "--no-tokens", "--tokens-out", str(tmp_path / "t"))
    assert rc == 2 and "not allowed with argument" in err


def test_valid_arguments_reach_the_database_and_name_it_masked(capsys):
    rc, _, err = run(capsys, "devices", "add", "po-1", "--profile", "pulse_oximeter")
    assert rc == 2 and "vitalgate devices add: cannot connect to postgresql://postgres:***@127.0.0.1:" in err
    assert ":pw@" not in err


@pytest.mark.parametrize("argv", [
    ("db", "migrate"), ("devices", "list"), ("devices", "show", "po-1"), ("devices", "revoke", "po-1"),
    ("devices", "rotate-token", "po-1"), ("keys", "add", "dash", "--scope", "admin"), ("keys", "list"),
    ("keys", "revoke", "0123456789abcdef"),
])
def test_every_database_command_reports_an_unreachable_database_in_one_line(capsys, argv):
    rc, out, err = run(capsys, *argv)
    assert (rc, out) == (2, "")
    assert err.startswith(f"vitalgate {argv[0]} {argv[1]}: cannot connect to postgresql://postgres:***@127.0.0.1:")
    assert err.count("\n") == 1 and ":pw@" not in err


@pytest.mark.parametrize(("url", "reason"), [
    ("postgresql://postgres:pw@127.0.0.1:notaport/none", "invalid literal for int()"),
    ("mysql://postgres:pw@127.0.0.1/none", "invalid DSN"),
])
def test_a_malformed_database_url_is_a_one_line_error(capsys, monkeypatch, url, reason):
    monkeypatch.setenv("VITALGATE_DATABASE_URL", url)
    rc, out, err = run(capsys, "devices", "list")
    assert (rc, out) == (2, "")
    assert err.startswith("vitalgate devices list: cannot connect to ") and reason in err
    assert err.count("\n") == 1 and ":pw@" not in err


def test_help_documents_every_action_and_the_exit_status(capsys):
    rc, out, _ = run(capsys, "devices", "--help")
    assert rc == 0
    for action in ("add", "list", "show", "revoke", "rotate-token", "import"):
        assert action in out
    rc, out, _ = run(capsys, "devices", "add", "--help")
    assert rc == 0 and "--cert-subject S" in out and "--profiles DIR" in out and "exit status: 0 done; 1 refused" in out
    rc, out, _ = run(capsys, "keys", "add", "--help")
    assert rc == 0 and "{telemetry:read,admin}" in out
    rc, _, err = run(capsys, "keys", "add", "dash")
    assert rc == 2 and "the following arguments are required: --scope" in err
    rc, out, _ = run(capsys, "db", "migrate", "--help")
    assert rc == 0 and "exit status: 0 done" in out
