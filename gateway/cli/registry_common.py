"""What ``vitalgate devices`` and ``vitalgate keys`` share.

Each change is made by ``gateway.registry_store`` in one transaction with its ``audit_log``
rows (actor ``cli:<unix user>``) and a ``NOTIFY vitalgate_registry`` delivered at commit,
so running gateways reload the registry at once. Tokens and keys are printed once, on
stdout alone (messages go to stderr), and only their SHA-256 is stored.
"""

from __future__ import annotations

import argparse
import getpass
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from gateway.cli.common import Invalid, Refused, add_config_option, connect
from gateway.config import GatewayConfig
from gateway.registry_store import Refused as StoreRefused
from gateway.registry_store import RegistryStore

__all__ = ["EXIT_HELP", "MAX_TEXT", "add_action", "check_text", "iso", "print_table", "registry"]

MAX_TEXT = 1024
EXIT_HELP = "exit status: 0 done; 1 refused (nothing changed); 2 invalid arguments, input or configuration, or no database."
# the store's field at fault -> the argument the operator wrote
_ARGUMENTS = {"device_id": "DEVICE_ID", "cert_subject": "--cert-subject", "key_id": "KEY_ID"}


def _actor() -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):
        user = f"uid{os.getuid()}"
    return f"cli:{user}"


@asynccontextmanager
async def registry(cfg: GatewayConfig, arguments: Mapping[str, str] | None = None) -> AsyncIterator[RegistryStore]:
    """The registry store over one connection (``connect``'s errors), acting for this Unix user.

    A refusal by the store becomes ``Refused`` naming the argument at fault; ``arguments``
    overrides which argument names a store field (``{"device_id": "FILE"}`` for an import).
    """
    names = {**_ARGUMENTS, **(arguments or {})}
    async with connect(cfg) as conn:
        try:
            yield RegistryStore(conn, _actor())
        except StoreRefused as exc:
            raise Refused(f"{names[exc.field]}: {exc}") from None


def check_text(value: str | None, what: str) -> str | None:
    """``value`` if it is fit to store as free text (or ``None``); else ``Invalid`` naming ``what``."""
    if value is None:
        return None
    if not value.strip() or len(value) > MAX_TEXT or "\x00" in value:
        raise Invalid(f"{what}: must be 1 to {MAX_TEXT} characters, not blank, without NUL")
    return value


def iso(value: Any) -> str | None:  # noqa: ANN401 - a datetime or None, as asyncpg returns it
    """A timestamp column in ISO 8601, ``None`` kept."""
    return value.isoformat() if value is not None else None


def print_table(table: list[tuple[str, ...]]) -> None:
    """Rows (the first the header) in columns as wide as their widest value."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def add_action(parent: Any, name: str, func: Callable[[argparse.Namespace], object], help_: str,  # noqa: ANN401
               description: str, profiles: bool = False) -> argparse.ArgumentParser:
    """A ``devices``/``keys`` action: ``--config`` (and ``--profiles``), the exit status in its help."""
    p = parent.add_parser(name, help=help_, description=description, epilog=EXIT_HELP)
    add_config_option(p, help="TOML configuration file, for database.url (default: $VITALGATE_CONFIG, else built-in defaults)")
    if profiles:
        p.add_argument("--profiles", metavar="DIR",
                       help="device profiles folder the profile names are checked against (default: profiles.dir)")
    p.set_defaults(func=func, prog=p.prog)
    return p
