"""``vitalgate run``: start the gateway (or a supervisor of ``--workers N`` gateways)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any

import msgspec

from gateway.cli.common import ENV_HELP, add_config_option, load_config
from gateway.errors import GatewayError

__all__ = ["add_parser"]

log = logging.getLogger("gateway")


def _workers_arg(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to 64, got {value!r}")
    return n


def _cmd_run(args: argparse.Namespace) -> int | Coroutine[Any, Any, int]:
    # imported here: `vitalgate --help` and the registry commands need none of the gateway's runtime
    from gateway.app import Gateway
    from gateway.logs import setup_logging

    cfg = load_config(args)
    if args.workers is not None:
        cfg = msgspec.structs.replace(cfg, workers=args.workers)
    setup_logging(cfg.log.level, cfg.log.format, repeat_window_s=cfg.log.repeat_window_s)
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

    return main()


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``run`` on the top-level subparsers."""
    p = add_config_option(subparsers.add_parser(
        "run",
        help="run the gateway",
        description="Run the gateway: migrate the schema, load the device registry, subscribe the "
        "telemetry topic (and serve POST /v1/telemetry when http.enabled), write batches, acknowledge "
        "(PUBACK, HTTP 202) after commit. SIGTERM or SIGINT stops it gracefully (a second one forces).",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ))
    p.add_argument(
        "--workers", "-w", metavar="N", type=_workers_arg,
        help="run N gateway processes sharing the load (MQTT 5 shared subscription; each device's "
        "payloads are handled by one of them); overrides the workers key / VITALGATE_WORKERS (default 1)",
    )
    p.set_defaults(func=_cmd_run, prog=p.prog)
    return p
