"""``vitalgate health``: exit 0 if the gateway on this host answers ``/healthz``, 1 if not.

Meant for a container's HEALTHCHECK and for scripts: it asks the gateway's own metrics
listener (``metrics_host:metrics_port``; a wildcard host is asked on the loopback
address), so it needs no database or broker credentials and judges only what the
running gateway reports about itself. With ``--workers N`` every worker is asked (worker
``i`` listens on ``metrics_port + i``) and all must answer 200.
"""

from __future__ import annotations

import argparse
import http.client
import sys
import urllib.error
import urllib.request
from typing import Any

from gateway.cli.common import Invalid, add_config_option, load_config
from gateway.cli.run import _workers_arg

__all__ = ["add_parser", "health_url"]

_WILDCARD = {"", "0.0.0.0", "::", "[::]"}


def health_url(host: str, port: int) -> str:
    """The ``/healthz`` URL of a gateway whose metrics listen on ``host:port``."""
    host = "127.0.0.1" if host in _WILDCARD else host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


def _status(url: str, timeout: float) -> str | None:
    """None if ``url`` answers 200, else what went wrong."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - our own http:// URL
            status = r.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, http.client.HTTPException) as exc:  # refused, timed out, reset
        return str(getattr(exc, "reason", None) or exc)
    return None if status == 200 else f"HTTP {status}"


def _health(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if cfg.metrics_port == 0:
        raise Invalid("metrics_port is 0: the gateway serves no health endpoint")
    workers = args.workers if args.workers is not None else cfg.workers
    healthy = True
    for i in range(workers):
        url = health_url(cfg.metrics_host, cfg.metrics_port + i)
        problem = _status(url, args.timeout)
        if problem is not None:
            print(f"vitalgate health: {url}: {problem}", file=sys.stderr)
            healthy = False
    return 0 if healthy else 1


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``health`` on the top-level subparsers."""
    p = add_config_option(subparsers.add_parser(
        "health",
        help="exit 0 if the gateway on this host is healthy, 1 if not",
        description="GET /healthz from the running gateway's metrics listener (metrics_host:metrics_port; "
        "a wildcard host is asked on 127.0.0.1), of every worker with --workers. Exit 0 when all answer HTTP 200; "
        "1 on any other answer or none; "
        "2 if the configuration is invalid or metrics_port is 0. For container health checks.",
    ))
    p.add_argument("--workers", "-w", metavar="N", type=_workers_arg,
                   help="ask the N workers of `vitalgate run --workers N` (ports metrics_port .. metrics_port+N-1); "
                   "default: the workers key / VITALGATE_WORKERS")
    p.add_argument("--timeout", type=float, default=3.0, metavar="S", help="seconds to wait for each answer (default 3)")
    p.set_defaults(func=_health, prog=p.prog)
    return p
