"""``vitalgate devices ...`` and ``vitalgate keys ...``: the device registry and API keys.

Each change is one transaction that also writes its ``audit_log`` row (actor
``cli:<unix user>``) and sends ``NOTIFY vitalgate_registry``, delivered at commit, so
running gateways reload the registry at once. Tokens and keys are printed once, on
stdout alone (messages go to stderr), and only their SHA-256 is stored.

Exit status: 0 done; 1 refused by the registry's state (already registered, not
registered, already revoked), nothing changed; 2 invalid arguments, configuration or
input file, or the database cannot be used.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import getpass
import os
import re
import sys
import uuid
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from gateway.config import GatewayConfig, load
from gateway.errors import ProfileError
from gateway.model import DEVICE_ID_PATTERN
from gateway.profiles import load_profiles
from gateway.registry import NOTIFY_CHANNEL, SCOPES, new_api_key, new_token

__all__ = ["add_registry_parsers"]

_DEVICE_RE = re.compile(DEVICE_ID_PATTERN)
_KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_MAX_TEXT = 1024

_AUDIT = """
INSERT INTO audit_log (actor, action, target, outcome, correlation_id, detail)
SELECT $1, $2, t, 'success', $3, d::jsonb FROM unnest($4::text[], $5::text[]) AS u(t, d)
"""


class _Exit(Exception):
    """Stop the command with this message (stderr) and exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _refused(message: str) -> _Exit:
    return _Exit(message, 1)


def _invalid(message: str) -> _Exit:
    return _Exit(message, 2)


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = f"uid{os.getuid()}"
    return f"cli:{user}"


def _mask(url: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _check_device_id(device_id: str, what: str = "DEVICE_ID") -> str:
    if not _DEVICE_RE.match(device_id):
        raise _invalid(f"{what}: {device_id!r} must match [A-Za-z0-9._-]{{1,64}}")
    return device_id


def _check_text(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    if not value.strip() or len(value) > _MAX_TEXT or "\x00" in value:
        raise _invalid(f"{what}: must be 1 to {_MAX_TEXT} characters, not blank, without NUL")
    return value


def _profile_names(args: argparse.Namespace, cfg: GatewayConfig) -> tuple[str, set[str]]:
    directory = args.profiles or cfg.profiles.dir
    try:
        return directory, set(load_profiles(directory))
    except ProfileError as exc:
        raise _invalid(f"--profiles: {exc}") from None


def _check_profile(name: str, directory: str, known: set[str], what: str = "--profile") -> str:
    if name not in known:
        raise _invalid(f"{what}: unknown profile {name!r} in {directory} (known: {', '.join(sorted(known)) or 'none'})")
    return name


class _Db:
    """One connection for one command, and the audit/notify steps every change shares."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.actor = _actor()
        self.correlation_id = uuid.uuid4().hex

    async def audit(self, action: str, targets: Sequence[str], details: Sequence[dict[str, object]]) -> None:
        await self.conn.execute(_AUDIT, self.actor, action, self.correlation_id, list(targets),
                                [orjson.dumps(d).decode() for d in details])

    async def notify(self, payload: str) -> None:
        await self.conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, payload[:7000])


def _run(
    args: argparse.Namespace,
    body: Callable[[_Db, GatewayConfig], Coroutine[Any, Any, None]],
    prepare: Callable[[GatewayConfig], None] | None = None,
) -> int:
    """Load the configuration, run ``prepare`` (checks needing no database), connect, run ``body``."""
    cfg = load(args.config)
    prog = f"vitalgate {args.command} {args.action}"
    if prepare is not None:
        try:
            prepare(cfg)
        except _Exit as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return exc.status

    async def main() -> None:
        where = _mask(cfg.database.url)
        try:
            conn = await asyncpg.connect(cfg.database.url, timeout=cfg.database.connect_timeout_s)
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise _invalid(f"cannot connect to {where}: {exc or type(exc).__name__}") from None
        try:
            await body(_Db(conn), cfg)
        except asyncpg.UndefinedTableError as exc:
            raise _invalid(f"{exc} in {where}: run `vitalgate db migrate` first") from None
        except asyncpg.PostgresError as exc:
            raise _invalid(f"the database refused the change: {exc} (SQLSTATE {exc.sqlstate})") from None
        finally:
            await conn.close()

    try:
        asyncio.run(main())
    except _Exit as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.status
    return 0


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def _iso(value: object) -> str | None:
    return value.isoformat() if value is not None else None  # type: ignore[attr-defined]


# ------------------------------------------------------------------------- devices



def _print_table(table: list[tuple[str, ...]]) -> None:
    """Rows (the first the header) in columns as wide as their widest value."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())

def _cmd_devices_add(args: argparse.Namespace) -> int:
    device_id = _check_device_id(args.device_id)
    cert = _check_text(args.cert_subject, "--cert-subject")
    note = _check_text(args.note, "--note")

    checked: dict[str, str] = {}

    def prepare(cfg: GatewayConfig) -> None:
        directory, known = _profile_names(args, cfg)
        checked["profile"] = _check_profile(args.profile, directory, known)

    async def body(db: _Db, cfg: GatewayConfig) -> None:  # noqa: ARG001
        profile = checked["profile"]
        tok = new_token()
        async with db.conn.transaction():
            try:
                async with db.conn.transaction():  # a savepoint: the error below still lets us look up the clash
                    await db.conn.execute(
                        "INSERT INTO devices (device_id, profile, token_id, token_sha256, token_created_at, cert_subject, note)"
                        " VALUES ($1, $2, $3, $4, now(), $5, $6)",
                        device_id, profile, tok.id, tok.sha256, cert, note,
                    )
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == "devices_cert_subject_key":
                    other = await db.conn.fetchval("SELECT device_id FROM devices WHERE cert_subject = $1", cert)
                    raise _refused(f"--cert-subject: {cert!r} is already the subject of device {other!r}") from None
                raise _refused(f"DEVICE_ID: device {device_id!r} is already registered") from None
            await db.audit("device.add", [device_id], [{"profile": profile, "token_id": tok.id, "cert_subject": cert}])
            await db.notify(f"device:{device_id}")
        _say(f"Registered device {device_id} (profile {profile}, token id {tok.id}).")
        _say("Its token follows, shown this once: only its hash is stored.")
        print(tok.text)

    return _run(args, body, prepare)


_DEVICE_COLUMNS = ("device_id", "profile", "status", "created_at", "updated_at", "revoked_at", "token_id",
                   "token_created_at", "cert_subject", "note")


def _device_json(row: asyncpg.Record) -> dict[str, object]:
    return {k: (_iso(row[k]) if k.endswith("_at") else row[k]) for k in _DEVICE_COLUMNS}


def _cmd_devices_list(args: argparse.Namespace) -> int:
    async def body(db: _Db, cfg: GatewayConfig) -> None:  # noqa: ARG001
        rows = await db.conn.fetch(
            f"SELECT {', '.join(_DEVICE_COLUMNS)} FROM devices WHERE $1::text IS NULL OR status = $1 ORDER BY device_id",
            args.status,
        )
        if args.json:
            sys.stdout.write(orjson.dumps([_device_json(r) for r in rows], option=orjson.OPT_APPEND_NEWLINE).decode())
            return
        table = [("DEVICE_ID", "PROFILE", "STATUS", "TOKEN_ID", "CREATED_AT", "CERT_SUBJECT")]
        table += [(r["device_id"], r["profile"], r["status"], r["token_id"] or "-",
                   r["created_at"].strftime("%Y-%m-%dT%H:%M:%SZ"), r["cert_subject"] or "-") for r in rows]
        _print_table(table)
        _say(f"{len(rows)} devices.")

    return _run(args, body)


def _cmd_devices_show(args: argparse.Namespace) -> int:
    device_id = _check_device_id(args.device_id)

    async def body(db: _Db, cfg: GatewayConfig) -> None:  # noqa: ARG001
        row = await db.conn.fetchrow(f"SELECT {', '.join(_DEVICE_COLUMNS)} FROM devices WHERE device_id = $1", device_id)
        if row is None:
            raise _refused(f"DEVICE_ID: device {device_id!r} is not registered")
        audit = await db.conn.fetch(
            "SELECT at, actor, action, outcome FROM audit_log WHERE target = $1 ORDER BY at DESC, id DESC LIMIT 10",
            device_id,
        )
        if args.json:
            out = _device_json(row)
            out["audit"] = [{"at": _iso(a["at"]), "actor": a["actor"], "action": a["action"], "outcome": a["outcome"]}
                            for a in audit]
            sys.stdout.write(orjson.dumps(out, option=orjson.OPT_APPEND_NEWLINE).decode())
            return
        for k, v in _device_json(row).items():
            print(f"{k + ':':<18}{'-' if v is None else v}")
        print("recent audit:" if audit else "recent audit:     -")
        for a in audit:
            print(f"  {a['at'].isoformat()}  {a['action']}  {a['outcome']}  {a['actor']}")

    return _run(args, body)


def _cmd_devices_revoke(args: argparse.Namespace) -> int:
    device_id = _check_device_id(args.device_id)

    async def body(db: _Db, cfg: GatewayConfig) -> None:  # noqa: ARG001
        async with db.conn.transaction():
            status = await db.conn.fetchval("SELECT status FROM devices WHERE device_id = $1 FOR UPDATE", device_id)
            if status is None:
                raise _refused(f"DEVICE_ID: device {device_id!r} is not registered")
            if status == "revoked":
                raise _refused(f"DEVICE_ID: device {device_id!r} is already revoked")
            await db.conn.execute(
                "UPDATE devices SET status = 'revoked', revoked_at = now(), updated_at = now() WHERE device_id = $1",
                device_id,
            )
            await db.audit("device.revoke", [device_id], [{}])
            await db.notify(f"device:{device_id}")
        _say(f"Revoked device {device_id}: gateways refuse its envelopes and its token from now on.")

    return _run(args, body)


def _cmd_devices_rotate(args: argparse.Namespace) -> int:
    device_id = _check_device_id(args.device_id)

    async def body(db: _Db, cfg: GatewayConfig) -> None:  # noqa: ARG001
        tok = new_token()
        async with db.conn.transaction():
            row = await db.conn.fetchrow(
                "SELECT status, token_id FROM devices WHERE device_id = $1 FOR UPDATE", device_id)
            if row is None:
                raise _refused(f"DEVICE_ID: device {device_id!r} is not registered")
            if row["status"] == "revoked":
                raise _refused(f"DEVICE_ID: device {device_id!r} is revoked; a revoked device gets no new token")
            await db.conn.execute(
                "UPDATE devices SET token_id = $2, token_sha256 = $3, token_created_at = now(), updated_at = now()"
                " WHERE device_id = $1",
                device_id, tok.id, tok.sha256,
            )
            await db.audit("device.rotate_token", [device_id], [{"old_token_id": row["token_id"], "token_id": tok.id}])
            await db.notify(f"device:{device_id}")
        _say(f"New token for device {device_id} (token id {tok.id}); the old one is refused from now on.")
        _say("The token follows, shown this once: only its hash is stored.")
        print(tok.text)

    return _run(args, body)


def _read_import(path: str, directory: str, known: set[str]) -> list[tuple[int, str, str]]:
    """``(line, device_id, profile)`` per row of the CSV; every problem of the file in one error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _invalid(f"FILE: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    rows: list[tuple[int, str, str]] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for n, rec in enumerate(csv.reader(text.splitlines()), start=1):
        if not rec or not "".join(rec).strip() or rec[0].lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in rec]
        if not rows and not errors and [f.lower() for f in fields] == ["device_id", "profile"]:
            continue  # header
        if len(fields) != 2:
            errors.append(f"{path}:{n}: expected 2 columns (device_id,profile), got {len(fields)}")
            continue
        dev, prof = fields
        if not _DEVICE_RE.match(dev):
            errors.append(f"{path}:{n}: device_id: {dev!r} must match [A-Za-z0-9._-]{{1,64}}")
        elif dev in seen:
            errors.append(f"{path}:{n}: device_id: {dev!r} already on line {seen[dev]}")
        else:
            seen[dev] = n
        if prof not in known:
            errors.append(f"{path}:{n}: profile: unknown profile {prof!r} in {directory}")
        rows.append((n, dev, prof))
    if errors:
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise _invalid(f"FILE: {len(errors)} invalid rows, nothing imported:\n  " + "\n  ".join(errors[:20]) + more)
    if not rows:
        raise _invalid(f"FILE: {path} holds no devices")
    return rows


def _cmd_devices_import(args: argparse.Namespace) -> int:
    rows: list[tuple[int, str, str]] = []

    def prepare(cfg: GatewayConfig) -> None:
        directory, known = _profile_names(args, cfg)
        rows.extend(_read_import(args.file, directory, known))

    async def body(db: _Db, cfg: GatewayConfig) -> None:  # noqa: ARG001
        ids = [r[1] for r in rows]
        existing = {r[0] for r in await db.conn.fetch("SELECT device_id FROM devices WHERE device_id = ANY($1::text[])", ids)}
        if existing:
            clash = [f"{args.file}:{n}: device {d!r} is already registered" for n, d, _ in rows if d in existing]
            raise _refused(f"FILE: {len(clash)} devices already registered, nothing imported:\n  " + "\n  ".join(clash[:20]))
        toks = [new_token() for _ in rows] if args.tokens_out else []
        out_fd = None
        if args.tokens_out:
            try:
                out_fd = os.open(args.tokens_out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as exc:
                raise _invalid(f"--tokens-out: cannot create {args.tokens_out}: {exc.strerror}"
                               f"{' (it exists: tokens are never overwritten)' if exc.errno == 17 else ''}") from None
        try:
            async with db.conn.transaction():
                await db.conn.execute(
                    "INSERT INTO devices (device_id, profile, token_id, token_sha256, token_created_at)"
                    " SELECT d, p, t, h, CASE WHEN t IS NULL THEN NULL ELSE now() END"
                    " FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[]) AS u(d, p, t, h)",
                    ids, [r[2] for r in rows],
                    [t.id for t in toks] if toks else [None] * len(rows),
                    [t.sha256 for t in toks] if toks else [None] * len(rows),
                )
                name = os.path.basename(args.file)
                await db.audit("device.import", ids, [
                    {"file": name, "line": n, "profile": p, "token_id": toks[i].id if toks else None}
                    for i, (n, _, p) in enumerate(rows)
                ])
                await db.notify(f"import:{len(rows)}")
                if out_fd is not None:  # written before the commit: a failed write imports nothing
                    lines = ["device_id,token_id,token"] + [f"{d},{t.id},{t.text}" for d, t in zip(ids, toks)]
                    os.write(out_fd, ("\n".join(lines) + "\n").encode())
                    os.fsync(out_fd)
        except BaseException:
            if out_fd is not None:
                os.close(out_fd)
                out_fd = None
                os.unlink(args.tokens_out)
            raise
        finally:
            if out_fd is not None:
                os.close(out_fd)
        where = f"; tokens in {args.tokens_out} (mode 0600, shown nowhere else)" if args.tokens_out else "; no tokens"
        _say(f"Imported {len(rows)} devices from {args.file}{where}.")

    return _run(args, body, prepare)


# ------------------------------------------------------------------------- keys


def _cmd_keys_add(args: argparse.Namespace) -> int:
    name = _check_text(args.name, "NAME")
    scopes = sorted(set(args.scope))

    async def body(db: _Db, cfg: GatewayConfig) -> None:  # noqa: ARG001
        key = new_api_key()
        async with db.conn.transaction():
            await db.conn.execute(
                "INSERT INTO api_keys (key_id, name, scopes, key_sha256) VALUES ($1, $2, $3, $4)",
                key.id, name, scopes, key.sha256,
            )
            await db.audit("api_key.add", [key.id], [{"name": name, "scopes": scopes}])
            await db.notify(f"key:{key.id}")
        _say(f"Added API key {key.id} ({name}; scopes {', '.join(scopes)}).")
        _say("The key follows, shown this once: only its hash is stored.")
        print(key.text)

    return _run(args, body)


def _cmd_keys_list(args: argparse.Namespace) -> int:
    async def body(db: _Db, cfg: GatewayConfig) -> None:  # noqa: ARG001
        rows = await db.conn.fetch("SELECT key_id, name, scopes, status, created_at, revoked_at FROM api_keys ORDER BY created_at, key_id")
        if args.json:
            out = [{"key_id": r["key_id"], "name": r["name"], "scopes": list(r["scopes"]), "status": r["status"],
                    "created_at": _iso(r["created_at"]), "revoked_at": _iso(r["revoked_at"])} for r in rows]
            sys.stdout.write(orjson.dumps(out, option=orjson.OPT_APPEND_NEWLINE).decode())
            return
        table = [("KEY_ID", "STATUS", "SCOPES", "CREATED_AT", "NAME")]
        table += [(r["key_id"], r["status"], ",".join(r["scopes"]), r["created_at"].strftime("%Y-%m-%dT%H:%M:%SZ"), r["name"])
                  for r in rows]
        _print_table(table)
        _say(f"{len(rows)} API keys.")

    return _run(args, body)


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    if not _KEY_ID_RE.match(args.key_id):
        print(f"vitalgate keys revoke: KEY_ID: {args.key_id!r} is not a key id (16 hex digits, as `keys list` shows)",
              file=sys.stderr)
        return 2
    key_id = args.key_id

    async def body(db: _Db, cfg: GatewayConfig) -> None:  # noqa: ARG001
        async with db.conn.transaction():
            status = await db.conn.fetchval("SELECT status FROM api_keys WHERE key_id = $1 FOR UPDATE", key_id)
            if status is None:
                raise _refused(f"KEY_ID: no API key {key_id!r}")
            if status == "revoked":
                raise _refused(f"KEY_ID: API key {key_id!r} is already revoked")
            await db.conn.execute("UPDATE api_keys SET status = 'revoked', revoked_at = now() WHERE key_id = $1", key_id)
            await db.audit("api_key.revoke", [key_id], [{}])
            await db.notify(f"key:{key_id}")
        _say(f"Revoked API key {key_id}.")

    return _run(args, body)


# ------------------------------------------------------------------------- parser


def _guarded(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Argument errors found before connecting (``_Exit``) print like the others."""

    def call(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except _Exit as exc:
            print(f"vitalgate {args.command} {args.action}: {exc}", file=sys.stderr)
            return exc.status

    return call


_EXIT = "exit status: 0 done; 1 refused (nothing changed); 2 invalid arguments, input or configuration, or no database."


def add_registry_parsers(subparsers: Any) -> None:
    """Register ``devices`` and ``keys`` (with their actions) on the CLI's subparsers."""

    def action(parent: Any, name: str, func: Callable[[argparse.Namespace], int], help_: str, description: str,
               profiles: bool = False) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_, description=description, epilog=_EXIT)
        p.add_argument("--config", "-c", metavar="FILE",
                       help="TOML configuration file, for database.url (default: $VITALGATE_CONFIG, else built-in defaults)")
        if profiles:
            p.add_argument("--profiles", metavar="DIR",
                           help="device profiles folder the profile names are checked against (default: profiles.dir)")
        p.set_defaults(func=_guarded(func))
        return p

    dev = subparsers.add_parser(
        "devices", help="manage the device registry",
        description="Register devices, list and show them, revoke them and rotate their tokens. Gateways "
        "refuse envelopes of devices that are not registered or are revoked (auth.require_registration). "
        "Every change is written to audit_log and reaches running gateways at once (NOTIFY).",
    )
    dsub = dev.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = action(dsub, "add", _cmd_devices_add, "register a device and print its token once",
                 "Register DEVICE_ID with a profile and print a new bearer token (vgd_...) on stdout, once: only "
                 "its SHA-256 is stored. Devices publishing over MQTT authenticate to the broker and need no token.",
                 profiles=True)
    add.add_argument("device_id", metavar="DEVICE_ID", help="the device id of its envelopes and topic ([A-Za-z0-9._-]{1,64})")
    add.add_argument("--profile", required=True, metavar="NAME", help="profile of its envelopes that name none")
    add.add_argument("--cert-subject", metavar="S", help="TLS client certificate subject (CN or SAN URI) naming the device")
    add.add_argument("--note", metavar="N", help="free text kept with the device (location, owner)")

    lst = action(dsub, "list", _cmd_devices_list, "list registered devices", "List registered devices, one per line.")
    lst.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    lst.add_argument("--status", choices=("active", "revoked"), help="only devices of this status")

    show = action(dsub, "show", _cmd_devices_show, "show one device and its recent audit trail",
                  "Show everything stored about DEVICE_ID (never its token) and its 10 latest audit entries.")
    show.add_argument("device_id", metavar="DEVICE_ID")
    show.add_argument("--json", action="store_true", help="print JSON")

    rev = action(dsub, "revoke", _cmd_devices_revoke, "revoke a device",
                 "Revoke DEVICE_ID: its envelopes and its token are refused from now on, on every transport. "
                 "Its stored data stays.")
    rev.add_argument("device_id", metavar="DEVICE_ID")

    rot = action(dsub, "rotate-token", _cmd_devices_rotate, "give a device a new token; the old one stops working",
                 "Make a new token for DEVICE_ID and print it once; the previous token is refused from now on.")
    rot.add_argument("device_id", metavar="DEVICE_ID")

    imp = action(dsub, "import", _cmd_devices_import, "register many devices from a CSV file",
                 "Register every device of FILE (CSV: device_id,profile; an optional header line; lines starting "
                 "with # are skipped) in one transaction: if any row is invalid or already registered, nothing is "
                 "imported and every problem is listed with its line.", profiles=True)
    imp.add_argument("file", metavar="FILE", help="CSV file, one device per line: device_id,profile")
    out = imp.add_mutually_exclusive_group(required=True)
    out.add_argument("--tokens-out", metavar="OUT",
                     help="write device_id,token_id,token per device to OUT (created with mode 0600, never overwritten)")
    out.add_argument("--no-tokens", action="store_true", help="make no tokens (MQTT devices authenticated by the broker)")

    keys = subparsers.add_parser(
        "keys", help="manage API keys of readers and operators",
        description="API keys (vgk_...) for readers and operators, with scopes: telemetry:read, admin "
        "(telemetry:write belongs to devices and their tokens). Every change is written to audit_log.",
    )
    ksub = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    kadd = action(ksub, "add", _cmd_keys_add, "make an API key and print it once",
                  "Make an API key named NAME with the given scopes and print it on stdout, once: only its SHA-256 is stored.")
    kadd.add_argument("name", metavar="NAME", help="who or what holds the key (for the audit trail and `keys list`)")
    kadd.add_argument("--scope", action="append", required=True, choices=SCOPES,
                      help="a scope of the key; repeat for several")
    klist = action(ksub, "list", _cmd_keys_list, "list API keys (never the keys themselves)", "List API keys.")
    klist.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    krev = action(ksub, "revoke", _cmd_keys_revoke, "revoke an API key", "Revoke KEY_ID: the key is refused from now on.")
    krev.add_argument("key_id", metavar="KEY_ID", help="16 hex digits, as `keys list` shows")
