"""``vitalgate devices ...``: register, list, show, revoke devices, rotate their tokens, import a fleet.

Arguments, profile names and import files are checked before the database is reached;
the changes themselves are ``gateway.registry_store``'s (see ``registry_common``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from gateway.cli.common import Invalid, Refused, load_config, say
from gateway.cli.registry_common import add_action, check_text, iso, print_table, registry
from gateway.config import GatewayConfig
from gateway.errors import ProfileError
from gateway.model import DEVICE_ID_PATTERN
from gateway.profiles import load_profiles
from gateway.registry import new_token
from gateway.registry_import import ImportRow, parse_devices
from gateway.registry_store import DEVICE_COLUMNS

__all__ = ["add_parser"]

_DEVICE_RE = re.compile(DEVICE_ID_PATTERN)
_SHOWN_ERRORS = 20


def _check_device_id(device_id: str) -> str:
    if not _DEVICE_RE.fullmatch(device_id):
        raise Invalid(f"DEVICE_ID: {device_id!r} must match [A-Za-z0-9._-]{{1,64}}")
    return device_id


def _profiles(args: argparse.Namespace, cfg: GatewayConfig) -> tuple[str, set[str]]:
    """The profiles folder (``--profiles``, else ``profiles.dir``) and the names it defines."""
    directory = args.profiles or cfg.profiles.dir
    try:
        return directory, set(load_profiles(directory))
    except ProfileError as exc:
        raise Invalid(f"--profiles: {exc}") from None


def _listing(lines: Sequence[str]) -> str:
    more = f"\n  ... and {len(lines) - _SHOWN_ERRORS} more" if len(lines) > _SHOWN_ERRORS else ""
    return "\n  " + "\n  ".join(lines[:_SHOWN_ERRORS]) + more


def _device_json(row: asyncpg.Record) -> dict[str, object]:
    return {k: (iso(row[k]) if k.endswith("_at") else row[k]) for k in DEVICE_COLUMNS}


# ------------------------------------------------------------------------- add, list, show


def _add(args: argparse.Namespace) -> object:
    device_id = _check_device_id(args.device_id)
    cert = check_text(args.cert_subject, "--cert-subject")
    note = check_text(args.note, "--note")
    cfg = load_config(args)
    directory, known = _profiles(args, cfg)
    if args.profile not in known:
        raise Invalid(f"--profile: unknown profile {args.profile!r} in {directory} (known: {', '.join(sorted(known)) or 'none'})")

    async def change() -> None:
        tok = new_token()
        async with registry(cfg) as store:
            await store.add_device(device_id, args.profile, tok, cert, note)
        say(f"Registered device {device_id} (profile {args.profile}, token id {tok.id}).")
        say("Its token follows, shown this once: only its hash is stored.")
        print(tok.text)

    return change()


async def _list(args: argparse.Namespace) -> None:
    async with registry(load_config(args)) as store:
        rows = await store.devices(args.status)
    if args.json:
        sys.stdout.write(orjson.dumps([_device_json(r) for r in rows], option=orjson.OPT_APPEND_NEWLINE).decode())
        return
    table = [("DEVICE_ID", "PROFILE", "STATUS", "TOKEN_ID", "CREATED_AT", "CERT_SUBJECT")]
    table += [(r["device_id"], r["profile"], r["status"], r["token_id"] or "-",
               r["created_at"].strftime("%Y-%m-%dT%H:%M:%SZ"), r["cert_subject"] or "-") for r in rows]
    print_table(table)
    say(f"{len(rows)} devices.")


def _show(args: argparse.Namespace) -> object:
    device_id = _check_device_id(args.device_id)

    async def query() -> None:
        async with registry(load_config(args)) as store:
            row = await store.device(device_id)
            audit = await store.audit_of(device_id)
        if args.json:
            out = _device_json(row)
            out["audit"] = [{"at": iso(a["at"]), "actor": a["actor"], "action": a["action"], "outcome": a["outcome"]}
                            for a in audit]
            sys.stdout.write(orjson.dumps(out, option=orjson.OPT_APPEND_NEWLINE).decode())
            return
        for k, v in _device_json(row).items():
            print(f"{k + ':':<18}{'-' if v is None else v}")
        print("recent audit:" if audit else "recent audit:     -")
        for a in audit:
            print(f"  {a['at'].isoformat()}  {a['action']}  {a['outcome']}  {a['actor']}")

    return query()


# ------------------------------------------------------------------------- revoke, rotate-token


def _revoke(args: argparse.Namespace) -> object:
    device_id = _check_device_id(args.device_id)

    async def change() -> None:
        async with registry(load_config(args)) as store:
            await store.revoke_device(device_id)
        say(f"Revoked device {device_id}: gateways refuse its envelopes and its token from now on.")

    return change()


def _rotate(args: argparse.Namespace) -> object:
    device_id = _check_device_id(args.device_id)

    async def change() -> None:
        tok = new_token()
        async with registry(load_config(args)) as store:
            await store.rotate_token(device_id, tok)
        say(f"New token for device {device_id} (token id {tok.id}); the old one is refused from now on.")
        say("The token follows, shown this once: only its hash is stored.")
        print(tok.text)

    return change()


# ------------------------------------------------------------------------- import


def _read_import(path: str, directory: str, known: set[str]) -> list[ImportRow]:
    """The rows of the CSV at ``path``; every problem of the file in one ``Invalid``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise Invalid(f"FILE: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    rows, errors = parse_devices(text, known)
    if errors:
        lines = [f"{path}:{e}{f' in {directory}' if e.column == 'profile' else ''}" for e in errors]
        raise Invalid(f"FILE: {len({e.line for e in errors})} invalid rows, nothing imported:{_listing(lines)}")
    if not rows:
        raise Invalid(f"FILE: {path} holds no devices")
    return rows


@contextlib.contextmanager
def _tokens_file(path: str) -> Iterator[int]:
    """A new file at ``path`` (mode 0600, never an existing one), removed if the block fails."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        exists = " (it exists: tokens are never overwritten)" if exc.errno == errno.EEXIST else ""
        raise Invalid(f"--tokens-out: cannot create {path}: {exc.strerror}{exists}") from None
    try:
        yield fd
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def _import(args: argparse.Namespace) -> object:
    cfg = load_config(args)
    rows = _read_import(args.file, *_profiles(args, cfg))

    async def change() -> None:
        async with registry(cfg, {"device_id": "FILE"}) as store:
            existing = await store.registered([r.device_id for r in rows])
            if existing:  # found before the tokens file is created
                clash = [f"{args.file}:{r.line}: device {r.device_id!r} is already registered"
                         for r in rows if r.device_id in existing]
                raise Refused(f"FILE: {len(clash)} devices already registered, nothing imported:{_listing(clash)}")
            if not args.tokens_out:
                await store.import_devices(rows, None, os.path.basename(args.file))
                say(f"Imported {len(rows)} devices from {args.file}; no tokens.")
                return
            toks = [new_token() for _ in rows]
            with _tokens_file(args.tokens_out) as fd:

                def write_tokens() -> None:  # before the commit: a failed write imports nothing
                    lines = ["device_id,token_id,token"] + [f"{r.device_id},{t.id},{t.text}" for r, t in zip(rows, toks)]
                    os.write(fd, ("\n".join(lines) + "\n").encode())
                    os.fsync(fd)

                await store.import_devices(rows, toks, os.path.basename(args.file), before_commit=write_tokens)
        say(f"Imported {len(rows)} devices from {args.file}; tokens in {args.tokens_out} (mode 0600, shown nowhere else).")

    return change()


# ------------------------------------------------------------------------- parser


def add_parser(subparsers: Any) -> argparse.ArgumentParser:  # noqa: ANN401
    """Register ``devices`` (with its actions) on the top-level subparsers."""
    dev = subparsers.add_parser(
        "devices", help="manage the device registry",
        description="Register devices, list and show them, revoke them and rotate their tokens. Gateways "
        "refuse envelopes of devices that are not registered or are revoked (auth.require_registration). "
        "Every change is written to audit_log and reaches running gateways at once (NOTIFY).",
    )
    actions = dev.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = add_action(actions, "add", _add, "register a device and print its token once",
                     "Register DEVICE_ID with a profile and print a new bearer token (vgd_...) on stdout, once: only "
                     "its SHA-256 is stored. Devices publishing over MQTT authenticate to the broker and need no token.",
                     profiles=True)
    add.add_argument("device_id", metavar="DEVICE_ID", help="the device id of its envelopes and topic ([A-Za-z0-9._-]{1,64})")
    add.add_argument("--profile", required=True, metavar="NAME", help="profile of its envelopes that name none")
    add.add_argument("--cert-subject", metavar="S", help="TLS client certificate subject (CN or SAN URI) naming the device")
    add.add_argument("--note", metavar="N", help="free text kept with the device (location, owner)")

    lst = add_action(actions, "list", _list, "list registered devices", "List registered devices, one per line.")
    lst.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    lst.add_argument("--status", choices=("active", "revoked"), help="only devices of this status")

    show = add_action(actions, "show", _show, "show one device and its recent audit trail",
                      "Show everything stored about DEVICE_ID (never its token) and its 10 latest audit entries.")
    show.add_argument("device_id", metavar="DEVICE_ID")
    show.add_argument("--json", action="store_true", help="print JSON")

    rev = add_action(actions, "revoke", _revoke, "revoke a device",
                     "Revoke DEVICE_ID: its envelopes and its token are refused from now on, on every transport. "
                     "Its stored data stays.")
    rev.add_argument("device_id", metavar="DEVICE_ID")

    rot = add_action(actions, "rotate-token", _rotate, "give a device a new token; the old one stops working",
                     "Make a new token for DEVICE_ID and print it once; the previous token is refused from now on.")
    rot.add_argument("device_id", metavar="DEVICE_ID")

    imp = add_action(actions, "import", _import, "register many devices from a CSV file",
                     "Register every device of FILE (CSV: device_id,profile; an optional header line; lines starting "
                     "with # are skipped) in one transaction: if any row is invalid or already registered, nothing is "
                     "imported and every problem is listed with its line.", profiles=True)
    imp.add_argument("file", metavar="FILE", help="CSV file, one device per line: device_id,profile")
    out = imp.add_mutually_exclusive_group(required=True)
    out.add_argument("--tokens-out", metavar="OUT",
                     help="write device_id,token_id,token per device to OUT (created with mode 0600, never overwritten)")
    out.add_argument("--no-tokens", action="store_true", help="make no tokens (MQTT devices authenticated by the broker)")
    return dev
