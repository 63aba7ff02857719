"""The ``vitalgate`` command line. The only module that chooses the event loop (uvloop)."""

from __future__ import annotations

import argparse
import re
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec

from gateway import __version__
from gateway.errors import ConfigError, GatewayError

log = logging.getLogger("gateway")

_ENV_HELP = """\
configuration:
  A TOML file (--config, or VITALGATE_CONFIG) plus environment overrides named
  VITALGATE_<SECTION>_<KEY> or VITALGATE_<KEY> for top-level keys, for example
  VITALGATE_DATABASE_URL, VITALGATE_MQTT_URL, VITALGATE_MQTT_CLIENT_ID,
  VITALGATE_PROFILES_DIR, VITALGATE_GATEWAY_ID, VITALGATE_BATCH_MAX_ROWS,
  VITALGATE_METRICS_PORT, VITALGATE_LOG_LEVEL, VITALGATE_HTTP_ENABLED,
  VITALGATE_AUTH_REQUIRE_REGISTRATION. `vitalgate config show` prints the
  result; gateway.sample.toml lists every key with its default.
"""


def _run_async(factory: Callable[[], Coroutine[Any, Any, int]]) -> int:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(factory())


def _load_config(args: argparse.Namespace):  # noqa: ANN202
    from gateway.config import load

    return load(args.config)


def _cmd_run(args: argparse.Namespace) -> int:
    from gateway.app import Gateway
    from gateway.logs import setup_logging

    cfg = _load_config(args)
    if args.workers is not None:
        cfg = msgspec.structs.replace(cfg, workers=args.workers)
    setup_logging(cfg.log_level)
    if cfg.workers > 1:
        from gateway.workers import for_worker, worker_index

        index = worker_index()
        if index is None:
            from gateway.workers.supervisor import supervise

            return supervise(cfg, args.config)
        cfg = for_worker(cfg, index)

    async def main() -> int:
        gw = Gateway(cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, gw.handle_exit, sig)
        try:
            await gw.startup()
        except GatewayError as exc:
            log.error("Start-up failed.", extra={"error": str(exc)})
            return 2
        if gw.should_exit.is_set():
            return 0
        return await gw.run()

    return _run_async(main)


def _cmd_db_migrate(args: argparse.Namespace) -> int:
    import asyncpg

    from gateway.sinks.schema import SCHEMA_VERSION, migrate

    cfg = _load_config(args)

    async def main() -> int:
        where = _mask_password(cfg.database.url)
        try:
            conn = await asyncpg.connect(cfg.database.url, timeout=cfg.database.connect_timeout_s)
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            print(f"vitalgate: cannot connect to {where}: {exc or type(exc).__name__}", file=sys.stderr)
            return 2
        try:
            applied = await migrate(conn)
        except asyncpg.PostgresError as exc:
            print(f"vitalgate: migration failed on {where}: {exc} (SQLSTATE {exc.sqlstate})", file=sys.stderr)
            return 2
        finally:
            await conn.close()
        if applied:
            print(f"Applied migrations {', '.join(map(str, applied))}; schema version {SCHEMA_VERSION}.")
        else:
            print(f"Schema is up to date (version {SCHEMA_VERSION}).")
        return 0

    return _run_async(main)


def _workers_arg(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to 64, got {value!r}")
    return n


def _mask_password(url: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _cmd_config_show(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    data = msgspec.to_builtins(cfg)
    for section in ("database", "mqtt"):
        if data[section].get("password"):
            data[section]["password"] = "***"
        data[section]["url"] = _mask_password(data[section]["url"])
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(data), indent=2).decode() + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitalgate",
        description="Ingestion gateway for connected medical devices: MQTT and HTTPS telemetry in, "
        "from registered devices only, validated, checked and alerted, stored in TimescaleDB with provenance.",
        epilog=_ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vitalgate {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", metavar="FILE", help="TOML configuration file (default: $VITALGATE_CONFIG, else built-in defaults)")
        return p

    run = with_config(sub.add_parser(
        "run",
        help="run the gateway",
        description="Run the gateway: migrate the schema, load the device registry, subscribe the "
        "telemetry topic (and serve POST /v1/telemetry when http.enabled), write batches, acknowledge "
        "(PUBACK, HTTP 202) after commit. SIGTERM or SIGINT stops it gracefully (a second one forces).",
        epilog=_ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ))
    run.add_argument(
        "--workers", "-w", metavar="N", type=_workers_arg,
        help="run N gateway processes sharing the load (MQTT 5 shared subscription; each device's "
        "payloads are handled by one of them); overrides the workers key / VITALGATE_WORKERS (default 1)",
    )
    run.set_defaults(func=_cmd_run)

    db = sub.add_parser("db", help="database administration", description="Database administration.")
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    mig = with_config(db_sub.add_parser(
        "migrate", help="create or upgrade the schema (idempotent)",
        description="Create the TimescaleDB extension, the tables of PROTOCOL section 3 and their indexes, "
        "and record the schema version. Running it again changes nothing.",
    ))
    mig.set_defaults(func=_cmd_db_migrate)

    conf = sub.add_parser("config", help="inspect the configuration", description="Inspect the configuration.")
    conf_sub = conf.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = with_config(conf_sub.add_parser(
        "show", help="print the effective configuration (file + environment) as JSON",
        description="Validate and print the effective configuration; exit 2 naming the bad key if invalid.",
    ))
    show.set_defaults(func=_cmd_config_show)

    try:
        from gateway.replay import add_replay_parser
    except ImportError:  # pragma: no cover - replay is part of the package
        pass
    else:
        add_replay_parser(sub)
    try:
        from gateway.profiles_cli import add_profiles_parser
    except ImportError:  # pragma: no cover
        pass
    else:
        add_profiles_parser(sub)
    from gateway.registry_cli import add_registry_parsers

    add_registry_parsers(sub)
    from gateway.query.cli import add_parsers as add_association_parsers

    add_association_parsers(sub)  # associate, dissociate
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"vitalgate: configuration error: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"vitalgate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
