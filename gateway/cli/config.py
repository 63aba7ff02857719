"""``vitalgate config show``: the effective configuration, passwords masked."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import msgspec

from gateway.cli.common import add_config_option, load_config, mask_password

__all__ = ["add_parser"]


def _show(args: argparse.Namespace) -> int:
    data = msgspec.to_builtins(load_config(args))
    for section in ("database", "mqtt"):
        if data[section].get("password"):
            data[section]["password"] = "***"
        data[section]["url"] = mask_password(data[section]["url"])
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(data), indent=2).decode() + "\n")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``config`` (with its ``show`` action) on the top-level subparsers."""
    p = subparsers.add_parser("config", help="inspect the configuration", description="Inspect the configuration.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = add_config_option(actions.add_parser(
        "show", help="print the effective configuration (file + environment) as JSON",
        description="Validate and print the effective configuration; exit 2 naming the bad key if invalid.",
    ))
    show.set_defaults(func=_show, prog=show.prog)
    return p
