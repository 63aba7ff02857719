"""What every ``vitalgate`` command shares: the ``--config`` option, typed failures, the database.

A command reports failure by raising ``Invalid`` (exit status 2) or ``Refused`` (exit status
1); ``gateway.cli.main`` prints the message as one line on stderr, prefixed with the command
(``vitalgate devices add: ...``). Every command that touches the database goes through
``connect``, so connection failures and the SQLSTATEs an operator can act on read the same
everywhere and never print a password.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from gateway.config import GatewayConfig, load

__all__ = ["ENV_HELP", "CommandError", "Invalid", "Refused", "add_config_option", "load_config", "mask_password", "connect", "say"]

ENV_HELP = """\
configuration:
  A TOML file (--config, or VITALGATE_CONFIG) plus environment overrides named
  VITALGATE_<SECTION>_<KEY> or VITALGATE_<KEY> for top-level keys, for example
  VITALGATE_DATABASE_URL, VITALGATE_MQTT_URL, VITALGATE_MQTT_CLIENT_ID,
  VITALGATE_PROFILES_DIR, VITALGATE_GATEWAY_ID, VITALGATE_BATCH_MAX_ROWS,
  VITALGATE_METRICS_PORT, VITALGATE_LOG_LEVEL, VITALGATE_HTTP_ENABLED,
  VITALGATE_AUTH_REQUIRE_REGISTRATION. `vitalgate config show` prints the
  result; gateway.sample.toml lists every key with its default.
"""

_CONFIG_HELP = "TOML configuration file (default: $VITALGATE_CONFIG, else built-in defaults)"

# SQLSTATE (or class) -> what the operator can do about it
_HINTS = {
    "42P01": "run `vitalgate db migrate` first",  # undefined_table
    "42501": "the role of database.url lacks this privilege",  # insufficient_privilege
    "08": "the connection broke; a change in flight may or may not have been committed",  # connection_exception
}


class CommandError(Exception):
    """The command stops with this message; ``main`` maps the subclass to the exit status."""


class Invalid(CommandError):
    """Invalid arguments, input or configuration, or the database cannot be used (exit status 2)."""


class Refused(CommandError):
    """The registry's state refuses the change; nothing was changed (exit status 1)."""


def add_config_option(parser: argparse.ArgumentParser, help: str = _CONFIG_HELP) -> argparse.ArgumentParser:  # noqa: A002
    """Add ``--config/-c FILE``; returns ``parser`` for chaining."""
    parser.add_argument("--config", "-c", metavar="FILE", help=help)
    return parser


def load_config(args: argparse.Namespace) -> GatewayConfig:
    """The configuration named by ``--config`` (or the environment); ``ConfigError`` if invalid."""
    return load(args.config)


def mask_password(url: str) -> str:
    """``url`` with the password (if any) replaced by ``***``, fit for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def say(text: str) -> None:
    """A message for the operator: stderr, so stdout keeps only the command's output."""
    print(text, file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _hint(sqlstate: str | None) -> str:
    state = sqlstate or ""
    hint = _HINTS.get(state) or _HINTS.get(state[:2])
    return f": {hint}" if hint else ""


@asynccontextmanager
async def connect(cfg: GatewayConfig) -> AsyncIterator[asyncpg.Connection]:
    """One connection to ``database.url`` for the length of one command, closed on exit.

    Raises:
        Invalid: the database cannot be reached within ``database.connect_timeout_s`` or
            refuses the login, or a statement fails with a database error (the message
            names the masked URL, the SQLSTATE and, when one is known, what to do about it).
    """
    where = mask_password(cfg.database.url)
    try:
        conn = await asyncpg.connect(cfg.database.url, timeout=cfg.database.connect_timeout_s)
    except (OSError, ValueError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
            asyncpg.exceptions.TargetServerAttributeNotMatched) as exc:
        # ValueError: asyncpg's ClientConfigurationError (a malformed URL) is one;
        # TargetServerAttributeNotMatched: no host of a multi-host URL is read-write (yet)
        raise Invalid(f"cannot connect to {where}: {_one_line(exc)}") from None
    try:
        yield conn
    except asyncpg.PostgresError as exc:
        raise Invalid(f"{where}: {_one_line(exc)} (SQLSTATE {exc.sqlstate}){_hint(exc.sqlstate)}") from None
    except OSError as exc:
        raise Invalid(f"lost the connection to {where}: {_one_line(exc)}") from None
    finally:
        await conn.close(timeout=cfg.database.connect_timeout_s)
