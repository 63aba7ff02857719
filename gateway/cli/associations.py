"""``vitalgate associate`` and ``vitalgate dissociate``: which patient a device serves, from when.

Each change is one transaction with its ``audit_log`` row (actor ``cli:<unix user>``);
the association is printed as JSON on stdout, a sentence on stderr.

Exit status: 0 done; 1 refused (overlaps another association, nothing open, end before
start), nothing changed; 2 invalid arguments or configuration, or no database.
"""

from __future__ import annotations

import argparse
import re
import sys
import uuid
from datetime import datetime
from typing import Any

import orjson

from gateway.cli.common import Refused, add_config_option, connect, load_config, say
from gateway.cli.registry_common import _actor
from gateway.model import DEVICE_ID_PATTERN
from gateway.query import associations as store

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


def _run(args: argparse.Namespace) -> object:
    cfg = load_config(args)
    at = args.at if args.at is not None else int(datetime.now().timestamp() * 1000)

    async def change() -> None:
        async with connect(cfg) as conn:
            try:
                if args.command == "associate":
                    a = await store.associate(conn, args.device, args.patient, args.location, at, actor=_actor(),
                                              correlation_id=uuid.uuid4().hex)
                else:
                    a = await store.dissociate(conn, args.device, at, actor=_actor(), correlation_id=uuid.uuid4().hex)
            except store.AssociationRefused as exc:
                raise Refused(exc.reason) from None
        sys.stdout.write(orjson.dumps(a.to_dict()).decode() + "\n")
        verb = "Associated" if args.command == "associate" else "Dissociated"
        say(f"{verb} {a.device_id} with patient {a.patient_ref}" + (f" at {a.location}" if a.location else "")
            + f" (association {a.id}).")

    return change()


def add_parsers(subparsers: Any) -> None:
    """Register ``associate`` and ``dissociate`` on the CLI's subparsers."""
    common = add_config_option(argparse.ArgumentParser(add_help=False))
    common.add_argument("--at", metavar="TIME", type=parse_time, help=_TIME_HELP)
    a = subparsers.add_parser(
        "associate", parents=[common], help="associate a device with a patient (and a bed) from a time",
        description="Associate DEVICE with the patient REF (an ADT identifier) from --at on. A device has one "
        "association at a time: refused while another one is open or overlaps (end it with dissociate). "
        "Reads by patient cover each device within its association. Audited.", epilog=_EXIT)
    a.add_argument("device", metavar="DEVICE", type=_device)
    a.add_argument("--patient", metavar="REF", required=True, type=_ref, help="the patient's ADT identifier")
    a.add_argument("--location", metavar="BED", type=_ref, help="unit/bed, e.g. ICU-1/bed-04")
    a.set_defaults(func=_run, prog=a.prog)
    d = subparsers.add_parser(
        "dissociate", parents=[common], help="end a device's open association",
        description="End DEVICE's open association at --at (default now). Refused when none is open or --at "
        "is not after its start. Audited.", epilog=_EXIT)
    d.add_argument("device", metavar="DEVICE", type=_device)
    d.set_defaults(func=_run, prog=d.prog)
