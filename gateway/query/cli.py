"""``vitalgate associate`` and ``vitalgate dissociate``: which patient a device serves, from when.

Each change is one transaction with its ``audit_log`` row (actor ``cli:<unix user>``);
the association is printed as JSON on stdout, a sentence on stderr.

Exit status: 0 done; 1 refused (overlaps another association, nothing open, end before
start), nothing changed; 2 invalid arguments or configuration, or no database.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import re
import sys
import uuid
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from gateway.model import DEVICE_ID_PATTERN

from . import associations as store

__all__ = ["add_parsers", "parse_time"]

_EXIT = "exit status: 0 done; 1 refused (nothing changed); 2 invalid arguments or configuration, or no database."
_TIME_HELP = "RFC 3339 with an offset (2026-12-01T08:00:00+01:00) or epoch milliseconds; default now"


def parse_time(text: str) -> int:
    """An RFC 3339 timestamp with offset, or epoch milliseconds -> epoch ms."""
    if re.fullmatch(r"[0-9]{1,15}", text):
        return int(text)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RFC 3339 with an offset or epoch ms, got {text!r}") from None
    if dt.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no UTC offset")
    return int(dt.timestamp() * 1000)


def _device(text: str) -> str:
    if not re.match(DEVICE_ID_PATTERN, text):
        raise argparse.ArgumentTypeError(f"{text!r} must match [A-Za-z0-9._-]{{1,64}}")
    return text


def _ref(text: str) -> str:
    try:
        return store.check_patient_ref(text, "value")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("value: ")) from None


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):
        return f"cli:uid{os.getuid()}"


def _run(args: argparse.Namespace) -> int:
    from gateway.config import load

    prog = f"vitalgate {args.command}"
    cfg = load(args.config)
    at = args.at if args.at is not None else int(datetime.now().timestamp() * 1000)

    async def main() -> store.Association:
        conn = await asyncpg.connect(cfg.database.url, timeout=cfg.database.connect_timeout_s)
        try:
            if args.command == "associate":
                return await store.associate(conn, args.device, args.patient, args.location, at, actor=_actor(),
                                             correlation_id=uuid.uuid4().hex)
            return await store.dissociate(conn, args.device, at, actor=_actor(), correlation_id=uuid.uuid4().hex)
        finally:
            await conn.close()

    try:
        a = asyncio.run(main())
    except store.AssociationRefused as exc:
        print(f"{prog}: {exc.reason}", file=sys.stderr)
        return 1
    except asyncpg.UndefinedTableError as exc:
        print(f"{prog}: {exc}: run `vitalgate db migrate` first", file=sys.stderr)
        return 2
    except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
            asyncpg.exceptions.TargetServerAttributeNotMatched) as exc:
        print(f"{prog}: database: {exc or type(exc).__name__}", file=sys.stderr)
        return 2
    sys.stdout.write(orjson.dumps(a.to_dict()).decode() + "\n")
    verb = "Associated" if args.command == "associate" else "Dissociated"
    print(f"{verb} {a.device_id} with patient {a.patient_ref}" + (f" at {a.location}" if a.location else "")
          + f" (association {a.id}).", file=sys.stderr)
    return 0


def add_parsers(subparsers: Any) -> None:
    """Register ``associate`` and ``dissociate`` on the CLI's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", metavar="FILE",
                        help="TOML configuration file, for database.url (default: $VITALGATE_CONFIG, else defaults)")
    common.add_argument("--at", metavar="TIME", type=parse_time, help=_TIME_HELP)
    a = subparsers.add_parser(
        "associate", parents=[common], help="associate a device with a patient (and a bed) from a time",
        description="Associate DEVICE with the patient REF (an ADT identifier) from --at on. A device has one "
        "association at a time: refused while another one is open or overlaps (end it with dissociate). "
        "Reads by patient cover each device within its association. Audited.", epilog=_EXIT)
    a.add_argument("device", metavar="DEVICE", type=_device)
    a.add_argument("--patient", metavar="REF", required=True, type=_ref, help="the patient's ADT identifier")
    a.add_argument("--location", metavar="BED", type=_ref, help="unit/bed, e.g. ICU-1/bed-04")
    a.set_defaults(func=_run)
    d = subparsers.add_parser(
        "dissociate", parents=[common], help="end a device's open association",
        description="End DEVICE's open association at --at (default now). Refused when none is open or --at "
        "is not after its start. Audited.", epilog=_EXIT)
    d.add_argument("device", metavar="DEVICE", type=_device)
    d.set_defaults(func=_run)
