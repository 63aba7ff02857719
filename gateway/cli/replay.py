"""``vitalgate replay``: run a recording through ``gateway.replay.Replay``, print NDJSON.

The replay itself (decode, checks, alert rules, the replay clock) is ``gateway.replay``;
this module reads the file or stdin, writes one JSON object per line and sets the exit
status.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, BinaryIO, TextIO

import orjson

from gateway.errors import GatewayError
from gateway.profiles import load_profiles
from gateway.replay import Replay

__all__ = ["add_parser", "run"]


def run(path: str, profiles_dir: str, default_profile: str | None, out: TextIO) -> int:
    """Replay the recording at ``path`` (``-`` for stdin) and print NDJSON to ``out``.

    Returns:
        0 when the recording was replayed (rejected lines included); 2 when the profiles are
        invalid or the file cannot be read (the reason goes to stderr).
    """
    try:
        profiles = load_profiles(profiles_dir)
        if default_profile is not None and default_profile not in profiles:
            raise GatewayError(f"--default-profile: unknown profile {default_profile!r} in {profiles_dir}")
        replay = Replay(profiles, default_profile)
        with (open(path, "rb") if path != "-" else _stdin()) as stream:
            for record in replay.feed(stream):
                out.write(orjson.dumps(record).decode() + "\n")
    except GatewayError as exc:
        print(f"vitalgate replay: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"vitalgate replay: {path}: {exc.strerror}", file=sys.stderr)
        return 2
    out.write(orjson.dumps(replay.summary()).decode() + "\n")
    out.flush()
    return 0


def _stdin() -> BinaryIO:
    return open(sys.stdin.fileno(), "rb", closefd=False)


_DESCRIPTION = """\
Run a recording through the same decode, validation, checks and alert rules as live
ingestion, with no database or broker, and print NDJSON to stdout (PROTOCOL section 4):
one {"type": "alert", ...} object per alert opening or closing, one {"type": "rejected",
"line": N, "reason": ...} per envelope that fails validation, and a final
{"type": "summary", ...}. Output is deterministic.
"""

_EPILOG = """\
FILE holds one JSON envelope per line. A line may carry "received_at" (epoch ms) beside
the envelope's fields: the receipt time used by the clock checks and as the replay clock
for silent alerts. Without it, receipt time is the envelope's latest reading time.

examples:
  vitalgate replay --profiles device_profiles device_profiles/examples/desaturation.ndjson
  vitalgate replay --profiles device_profiles --default-profile pulse_oximeter rec.ndjson

exit status: 0 when replayed (even with rejected lines), 2 on invalid profiles or an
unreadable file.
"""


def _cmd_replay(args: argparse.Namespace) -> int:
    return run(args.file, args.profiles, args.default_profile, sys.stdout)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``replay`` on the top-level subparsers; its handler returns the exit status."""
    p = subparsers.add_parser(
        "replay", help="replay a recording offline through decode, checks and alert rules",
        description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--profiles", metavar="DIR", required=True, help="folder of device profiles (*.toml)")
    p.add_argument(
        "--default-profile", metavar="NAME", default=None,
        help="profile of envelopes that name none (else they are rejected: there is no device registry offline)",
    )
    p.add_argument("file", metavar="FILE", help="the recording, one JSON envelope per line ('-' for stdin)")
    p.set_defaults(func=_cmd_replay, prog=p.prog)
    return p
