"""``vitalgate cluster init|status``: the NATS JetStream side of cluster mode."""

from __future__ import annotations

import argparse
from typing import Any

from gateway.cli.common import Invalid, add_config_option, load_config
from gateway.cluster import setup
from gateway.cluster.engine import EngineError, connect

__all__ = ["add_parser"]


def _address(text: str | None) -> tuple[str, int] | None:
    if not text:
        return None
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise Invalid(f"--mqtt: expected HOST:PORT, got {text!r}")
    return host, int(port)


async def _init(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    try:
        nc = await connect(cfg.nats, name="vitalgate-cluster-init")
    except EngineError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise Invalid(f"nats.servers: cannot connect to {cfg.nats.servers}: {exc}") from None
    try:
        for line in await setup.init(nc, cfg.nats, None if args.no_database else cfg.database.url, _address(args.mqtt)):
            print(line)
    finally:
        await nc.close()
    return 0


async def _status(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    try:
        nc = await connect(cfg.nats, name="vitalgate-cluster-status")
    except EngineError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise Invalid(f"nats.servers: cannot connect to {cfg.nats.servers}: {exc}") from None
    try:
        parts, live = await setup.status(nc, cfg.nats, cfg.database.url)
    finally:
        await nc.close()
    print(f"members: {', '.join(sorted(live)) or '(none)'}")
    print(f"{'partition':<16} {'owner':<36} {'epoch':>6} {'pending':>9} {'unacked':>8} pinned")
    for s in parts:
        print(f"{s.consumer:<16} {s.owner or '-':<36} {s.epoch if s.epoch is not None else '-':>6} "
              f"{s.pending:>9} {s.ack_pending:>8} {'yes' if s.pinned else 'no'}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``cluster`` (``init``, ``status``) on the top-level subparsers."""
    p = subparsers.add_parser("cluster", help="NATS JetStream cluster mode: set up, show partitions",
                              description="Cluster mode ([nats] section): the partition consumers, their owners and lag.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = add_config_option(actions.add_parser(
        "init", help="create the partition consumers, the membership bucket and partition_owners (idempotent)",
        description="Create or update one durable pull consumer per partition on $MQTT_msgs (pinned_client "
        "priority group), the membership KV bucket and the partition_owners table, and print the account "
        "mappings every server must carry. Run it before devices publish, and again after changing [nats].",
        epilog="exit status: 0 done; 2 invalid configuration, a server older than 2.11, the engine or the "
        "database refusing.",
    ))
    init.add_argument("--mqtt", metavar="HOST:PORT", help="an MQTT listener of the cluster: one connection there "
                      "creates $MQTT_msgs when no MQTT client has connected yet")
    init.add_argument("--no-database", action="store_true", help="do not create partition_owners (the gateways "
                      "create it at start)")
    init.set_defaults(func=_init, prog=init.prog)
    st = add_config_option(actions.add_parser(
        "status", help="partitions with their owners, epochs and lag; the live members",
        description="Per partition: the owner recorded in partition_owners and its epoch, the messages not yet "
        "delivered (pending) and delivered but not acknowledged (unacked), and whether a gateway holds the pin.",
        epilog="exit status: 0 done; 2 invalid configuration or the engine unreachable.",
    ))
    st.set_defaults(func=_status, prog=st.prog)
    return p
