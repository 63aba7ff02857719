"""``vitalgate profiles check DIR``: load and validate device profiles without starting.

The same loader the gateway runs at start-up (``gateway.profiles.load_profiles``): an
invalid profile is reported with its file and key, and the exit status is 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gateway.errors import ProfileError
from gateway.profiles import load_profiles

__all__ = ["add_parser", "check"]


def check(directory: str) -> int:
    """Validate every ``*.toml`` in ``directory``; print one line per profile, or the error.

    Returns:
        0 when every profile is valid, 2 otherwise (the message names the file and key).
    """
    try:
        profiles = load_profiles(directory)
    except ProfileError as exc:
        print(f"vitalgate profiles check: {exc}", file=sys.stderr)
        return 2
    for name in sorted(profiles):
        p = profiles[name]
        kinds = [m.kind for m in p.metrics.values()]
        silent = sum(r.when == "silent" for r in p.alerts)
        print(
            f"{name} {p.version}: {kinds.count('numeric')} numeric and {kinds.count('waveform')} waveform metrics, "
            f"{len(p.alerts) - silent} threshold and {silent} silent alert rules"
        )
    print(f"{len(profiles)} profiles OK in {directory}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    return check(args.dir)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``profiles`` (with its ``check`` action) on the top-level subparsers."""
    p = subparsers.add_parser(
        "profiles", help="work with device profiles",
        description="Work with the device profiles (device_profiles/*.toml, PROTOCOL section 2).",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = actions.add_parser(
        "check", help="validate a folder of device profiles",
        description="Load and validate every *.toml profile in DIR exactly as the gateway does at "
        "start-up, and list them. An invalid profile is reported with its file and key "
        "(for example 'device_profiles/x.toml: alerts[2].clear: must be >= threshold for a below alert').",
        epilog="exit status: 0 when all profiles are valid, 2 otherwise.",
    )
    c.add_argument("dir", metavar="DIR", help="folder of device profiles (*.toml, not recursive)")
    c.set_defaults(func=_cmd_check, prog=c.prog)
    return p
