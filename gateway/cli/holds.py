"""``vitalgate hold add|release|list``: legal holds that keep a subject's rows through retention.

The changes are ``gateway.holds_store``'s, each audited; ``gateway.retention`` honours them.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any

import orjson

from gateway.cli.common import Invalid, Refused, connect, load_config, say
from gateway.cli.registry_common import _actor as cli_actor
from gateway.cli.registry_common import add_action, check_text, iso, print_table
from gateway.config import GatewayConfig
from gateway.holds_store import HOLD_COLUMNS, HoldRefused, HoldsStore

__all__ = ["add_parser", "parse_time"]

_DEVICE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_MAX_REF = 256
_HOLD_ID_RE = re.compile(r"[1-9][0-9]{0,17}")


def parse_time(value: str, what: str) -> datetime:
    """An RFC 3339 time with its offset (``2026-11-01T08:00:00Z``), or a date (midnight UTC)."""
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            return datetime.fromisoformat(value).replace(tzinfo=timezone.utc)
        t = datetime.fromisoformat(value)
    except ValueError:
        raise Invalid(f"{what}: {value!r} is not a time (RFC 3339, e.g. 2026-11-01T08:00:00Z, or a date)") from None
    if t.tzinfo is None:
        raise Invalid(f"{what}: {value!r} has no UTC offset (add Z or +hh:mm)")
    return t


@asynccontextmanager
async def _holds(cfg: GatewayConfig) -> AsyncIterator[HoldsStore]:
    async with connect(cfg) as conn:
        try:
            yield HoldsStore(conn, cli_actor())
        except HoldRefused as exc:
            raise Refused(f"HOLD_ID: {exc}") from None


def _subject(r: Any) -> str:  # noqa: ANN401 - an asyncpg record
    return f"device {r['device_id']}" if r["device_id"] is not None else f"patient {r['patient_ref']}"


def _add(args: argparse.Namespace) -> object:
    device, patient = args.device, args.patient
    if device is not None and not _DEVICE_ID_RE.fullmatch(device):
        raise Invalid(f"--device: {device!r} is not a device id (1 to 64 of A-Z a-z 0-9 . _ -)")
    if patient is not None and (not patient.strip() or len(patient) > _MAX_REF or "\x00" in patient):
        raise Invalid(f"--patient: must be 1 to {_MAX_REF} characters, not blank, without NUL")
    start = parse_time(args.from_time, "--from")
    end = parse_time(args.to_time, "--to") if args.to_time is not None else None
    if end is not None and end <= start:
        raise Invalid(f"--to: {args.to_time} is not after --from {args.from_time}")
    reason = check_text(args.reason, "--reason")

    async def change() -> None:
        async with _holds(load_config(args)) as store:
            hold_id = await store.add(device_id=device, patient_ref=patient, from_time=start, to_time=end, reason=reason)
        subject = f"device {device}" if device is not None else f"patient {patient}"
        say(f"Placed hold {hold_id} on {subject} from {start.isoformat()} to {end.isoformat() if end else 'release'}.")
        print(hold_id)

    return change()


def _release(args: argparse.Namespace) -> object:
    if not _HOLD_ID_RE.fullmatch(args.hold_id):
        raise Invalid(f"HOLD_ID: {args.hold_id!r} is not a hold id (a number, as `hold list` shows)")
    hold_id = int(args.hold_id)
    reason = check_text(args.reason, "--reason")

    async def change() -> None:
        async with _holds(load_config(args)) as store:
            row = await store.release(hold_id, reason)
        say(f"Released hold {hold_id}. Its {row['readings']} held readings and {row['waveform_blocks']} held waveform "
            "blocks return to retention (kept while another hold covers them).")

    return change()


async def _list(args: argparse.Namespace) -> None:
    async with _holds(load_config(args)) as store:
        rows = await store.holds(include_released=args.all)
    if args.json:
        out = [{**{c: iso(r[c]) if isinstance(r[c], datetime) else r[c] for c in HOLD_COLUMNS},
                "held_readings": r["held_readings"], "held_waveform_blocks": r["held_waveform_blocks"]} for r in rows]
        sys.stdout.write(orjson.dumps(out, option=orjson.OPT_APPEND_NEWLINE).decode())
        return
    table = [("ID", "STATUS", "SUBJECT", "FROM", "TO", "HELD_ROWS", "REASON")]
    table += [(str(r["id"]), "released" if r["released_at"] else "active", _subject(r), iso(r["from_time"]) or "",
               iso(r["to_time"]) or "open", str(r["held_readings"] + r["held_waveform_blocks"]), r["reason"])
              for r in rows]
    print_table(table)
    say(f"{len(rows)} holds.")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:  # noqa: ANN401
    """Register ``hold`` (with its actions) on the top-level subparsers."""
    hold = subparsers.add_parser(
        "hold", help="legal holds: keep a device's or patient's rows through retention",
        description="Legal holds. Rows of a held device, or of the devices associated with a held patient while "
        "they were, with from <= time < to, survive retention: before a chunk is dropped they move to "
        "readings_held / waveform_blocks_held, which the views readings_all / waveform_blocks_all read. "
        "Every change is written to audit_log.",
    )
    actions = hold.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = add_action(actions, "add", _add, "place a hold and print its id",
                     "Place a legal hold on a device or a patient for a time window, and print its id.")
    who = add.add_mutually_exclusive_group(required=True)
    who.add_argument("--device", metavar="ID", help="the held device")
    who.add_argument("--patient", metavar="REF", help="the held patient: every device associated with REF (table "
                     "associations) during the window, resolved each time retention runs")
    add.add_argument("--from", dest="from_time", metavar="TIME", required=True,
                     help="start of the window (RFC 3339 with offset, e.g. 2026-11-01T08:00:00Z, or a date: 00:00 UTC)")
    add.add_argument("--to", dest="to_time", metavar="TIME", help="end of the window, excluded (default: until released)")
    add.add_argument("--reason", metavar="TEXT", required=True, help="why (a case or matter number); recorded and audited")
    rel = add_action(actions, "release", _release, "release a hold",
                     "Release hold HOLD_ID: its rows return to retention, unless another active hold covers them.")
    rel.add_argument("hold_id", metavar="HOLD_ID", help="the hold's id, as `hold add` printed and `hold list` shows")
    rel.add_argument("--reason", metavar="TEXT", required=True, help="why; recorded and audited")
    lst = add_action(actions, "list", _list, "list holds", "List active holds (with --all, released ones too).")
    lst.add_argument("--all", action="store_true", help="include released holds")
    lst.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    return hold
