"""``vitalgate keys ...``: API keys of readers and operators (add, list, revoke).

The changes themselves are ``gateway.registry_store``'s (see ``registry_common``).
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import orjson

from gateway.cli.common import Invalid, load_config, say
from gateway.cli.registry_common import add_action, check_text, iso, print_table, registry
from gateway.registry import SCOPES, new_api_key

__all__ = ["add_parser"]

_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")


def _add(args: argparse.Namespace) -> object:
    name = check_text(args.name, "NAME")
    scopes = sorted(set(args.scope))

    async def change() -> None:
        key = new_api_key()
        async with registry(load_config(args)) as store:
            await store.add_key(key, name, scopes)
        say(f"Added API key {key.id} ({name}; scopes {', '.join(scopes)}).")
        say("The key follows, shown this once: only its hash is stored.")
        print(key.text)

    return change()


async def _list(args: argparse.Namespace) -> None:
    async with registry(load_config(args)) as store:
        rows = await store.keys()
    if args.json:
        out = [{"key_id": r["key_id"], "name": r["name"], "scopes": list(r["scopes"]), "status": r["status"],
                "created_at": iso(r["created_at"]), "revoked_at": iso(r["revoked_at"])} for r in rows]
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_APPEND_NEWLINE).decode())
        return
    table = [("KEY_ID", "STATUS", "SCOPES", "CREATED_AT", "NAME")]
    table += [(r["key_id"], r["status"], ",".join(r["scopes"]), r["created_at"].strftime("%Y-%m-%dT%H:%M:%SZ"), r["name"])
              for r in rows]
    print_table(table)
    say(f"{len(rows)} API keys.")


def _revoke(args: argparse.Namespace) -> object:
    key_id = args.key_id
    if not _KEY_ID_RE.fullmatch(key_id):
        raise Invalid(f"KEY_ID: {key_id!r} is not a key id (16 hex digits, as `keys list` shows)")

    async def change() -> None:
        async with registry(load_config(args)) as store:
            await store.revoke_key(key_id)
        say(f"Revoked API key {key_id}.")

    return change()


def add_parser(subparsers: Any) -> argparse.ArgumentParser:  # noqa: ANN401
    """Register ``keys`` (with its actions) on the top-level subparsers."""
    keys = subparsers.add_parser(
        "keys", help="manage API keys of readers and operators",
        description="API keys (vgk_...) for readers and operators, with scopes: telemetry:read, admin "
        "(telemetry:write belongs to devices and their tokens). Every change is written to audit_log.",
    )
    actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = add_action(actions, "add", _add, "make an API key and print it once",
                     "Make an API key named NAME with the given scopes and print it on stdout, once: only its SHA-256 "
                     "is stored.")
    add.add_argument("name", metavar="NAME", help="who or what holds the key (for the audit trail and `keys list`)")
    add.add_argument("--scope", action="append", required=True, choices=SCOPES, help="a scope of the key; repeat for several")
    lst = add_action(actions, "list", _list, "list API keys (never the keys themselves)", "List API keys.")
    lst.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    rev = add_action(actions, "revoke", _revoke, "revoke an API key", "Revoke KEY_ID: the key is refused from now on.")
    rev.add_argument("key_id", metavar="KEY_ID", help="16 hex digits, as `keys list` shows")
    return keys
