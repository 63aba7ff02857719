"""``vitalgate export fhir``: a patient's or a device's Observations as FHIR Bulk Data NDJSON.

One Observation per line, oldest first, the same resources ``GET /fhir/r4/Observation``
answers (``gateway.fhir``). Rows stream from a server-side cursor inside one read-only
transaction (one snapshot: a reading committed during the export is either in it or not),
and each line is written as soon as its Observation is complete, so memory stays bounded
however long the window. The export is audited (``export.fhir``) before the first line.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any, TextIO

import orjson

from gateway.cli.common import Invalid, add_config_option, connect, load_config, say
from gateway.cli.registry_common import _actor as cli_actor
from gateway.errors import ProfileError
from gateway.fhir.mapping import Catalog
from gateway.fhir.observations import observations, plan
from gateway.fhir.search import SearchError, parse_codes
from gateway.model import DEVICE_ID_PATTERN
from gateway.profiles import load_profiles
from gateway.cli.associations import parse_time

__all__ = ["add_parser"]

_AUDIT = """
INSERT INTO audit_log (actor, action, target, outcome, correlation_id, detail)
VALUES ($1, 'export.fhir', $2, 'success', NULL, $3::jsonb)
"""


async def _run(args: argparse.Namespace) -> None:
    cfg = load_config(args)
    try:
        catalog = Catalog(load_profiles(cfg.profiles.dir))
    except ProfileError as exc:
        raise Invalid(str(exc)) from None
    if args.to <= args.frm:
        raise Invalid("--from: must be before --to")
    subject = ("patient", args.patient) if args.patient is not None else ("device", args.device)
    try:
        codes = parse_codes(args.code) if args.code else []
    except SearchError as exc:
        raise Invalid(str(exc)) from None
    out: TextIO = sys.stdout if args.output in (None, "-") else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
    n = 0
    try:
        async with connect(cfg) as conn:
            p = await plan(conn, catalog, subject, codes, args.frm, args.to)
            target = f"patient:{subject[1]}" if subject[0] == "patient" else subject[1]
            await conn.execute(_AUDIT, cli_actor(), target, orjson.dumps({
                subject[0]: subject[1], "from": args.frm, "to": args.to, "devices": p.devices,
                "codes": [f"{s or ''}|{c}" for s, c in codes]}).decode())
            async with conn.transaction(readonly=True, isolation="repeatable_read"):
                async for _, obs in observations(conn, catalog, p):
                    out.write(orjson.dumps(obs, option=orjson.OPT_APPEND_NEWLINE).decode())
                    n += 1
    finally:
        if out is not sys.stdout:
            out.close()
        else:
            out.flush()
    say(f"Exported {n} Observations.")


def _device(text: str) -> str:
    if not re.match(DEVICE_ID_PATTERN, text):
        raise argparse.ArgumentTypeError(f"must match {DEVICE_ID_PATTERN}")
    return text


def add_parser(subparsers: Any) -> argparse.ArgumentParser:  # noqa: ANN401
    """Register ``export`` (with its ``fhir`` format) on the top-level subparsers."""
    p = subparsers.add_parser("export", help="export stored data in a standard format",
                              description="Export stored readings.")
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    f = add_config_option(formats.add_parser(
        "fhir", help="a patient's or device's Observations as FHIR R4 Bulk Data NDJSON",
        description="Write the Observations of a patient (each associated device within its association) or of "
        "a device, with effective time in [--from, --to), one FHIR R4 Observation per line (Bulk Data NDJSON), "
        "oldest first: the resources GET /fhir/r4/Observation answers. Streams with bounded memory. Reads "
        "readings_all and waveform_blocks_all, so rows kept by a legal hold are included. Audited "
        "(export.fhir).",
        epilog="exit status: 0 done; 2 invalid arguments, configuration or profiles, or the database cannot be "
        "used."))
    who = f.add_mutually_exclusive_group(required=True)
    who.add_argument("--patient", metavar="REF", help="the patient's ADT identifier (patient_ref)")
    who.add_argument("--device", metavar="ID", type=_device, help="the device id")
    f.add_argument("--from", dest="frm", metavar="TIME", type=parse_time, required=True,
                   help="start, inclusive: RFC 3339 with an offset or epoch milliseconds")
    f.add_argument("--to", metavar="TIME", type=parse_time, required=True, help="end, exclusive (same forms)")
    f.add_argument("--code", metavar="[SYSTEM|]CODE[,...]",
                   help="only Observations with one of these codes (LOINC http://loinc.org, MDC "
                   "urn:iso:std:iso:11073:10101)")
    f.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    f.set_defaults(func=_run, prog=f.prog)
    return p
