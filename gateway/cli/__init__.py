"""The ``vitalgate`` command line: the top-level parser, the event loop, the exit status.

One module per command group registers its parser here: ``run``, ``db``, ``config``,
``replay``, ``profiles``, ``devices``, ``keys``, ``retention``, ``hold`` (module ``holds``),
``export``, ``health``, ``cluster``, ``associate`` and ``dissociate``. A command's handler returns its exit
status, or a coroutine that ``main`` runs to get it: this module is the only one that chooses
the event loop (uvloop).

Exit status: 0 done; 1 refused by the registry's or the holds' state, or another retention
run is under way, nothing changed (``Refused``); 2 invalid arguments, configuration, input
or profiles, or the database cannot be used (``Invalid``, ``ConfigError``,
``GatewayError``, and argparse's usage errors); 130 interrupted (SIGINT).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import sys
from collections.abc import Coroutine
from typing import Any

from gateway import __version__
from gateway.cli import config, db, devices, health, keys, profiles, replay, run
from gateway.cli import cluster, export, holds, retention
from gateway.cli.common import ENV_HELP, CommandError, Refused
from gateway.errors import ConfigError, GatewayError

__all__ = ["main", "build_parser"]

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_INVALID = 2
EXIT_INTERRUPTED = 130


def _run_async(coro: Coroutine[Any, Any, int | None]) -> int | None:
    import uvloop  # here only: the one place that chooses the event loop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; each leaf parser sets ``func`` (the handler) and ``prog``."""
    parser = argparse.ArgumentParser(
        prog="vitalgate",
        description="Ingestion gateway for connected medical devices: MQTT and HTTPS telemetry in, "
        "from registered devices only, validated, checked and alerted, stored in TimescaleDB with provenance.",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vitalgate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run.add_parser(sub)
    db.add_parser(sub)
    config.add_parser(sub)
    replay.add_parser(sub)
    profiles.add_parser(sub)
    devices.add_parser(sub)
    keys.add_parser(sub)
    retention.add_parser(sub)
    holds.add_parser(sub)
    health.add_parser(sub)
    export.add_parser(sub)
    cluster.add_parser(sub)
    associations.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command of ``argv`` (default: ``sys.argv[1:]``) and return its exit status."""
    args = build_parser().parse_args(argv)
    try:
        status = args.func(args)
        if inspect.iscoroutine(status):
            status = _run_async(status)
    except CommandError as exc:
        print(f"{args.prog}: {exc}", file=sys.stderr)
        return EXIT_REFUSED if isinstance(exc, Refused) else EXIT_INVALID
    except ConfigError as exc:
        print(f"vitalgate: configuration error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except GatewayError as exc:
        print(f"vitalgate: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_OK if status is None else int(status)
