"""``vitalgate cluster init`` and ``cluster status``: the engine side an operator sets up and watches.

``init`` is idempotent: it makes sure ``$MQTT_msgs`` exists (the server creates it at the
first MQTT connection), creates or updates one durable consumer per partition (reading back
what the server kept: a server that drops priority groups is refused), creates the
membership bucket and ``partition_owners``, and prints the account mappings the servers
must carry. Consumers must exist before devices publish: ``$MQTT_msgs`` keeps a message
only while some consumer is interested in it.

``status`` shows, per partition, the owner recorded in the database with its epoch, the
messages waiting and those delivered but not yet acknowledged (the lag), and the members.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import asyncpg
import nats

from gateway.cluster.engine import STREAM, EngineError, Layout, Unavailable, api, check_consumer, consumer_config, \
    ensure_mqtt_stream
from gateway.cluster.fence import DDL
from gateway.cluster.membership import Members
from gateway.config import NatsConfig

__all__ = ["init", "status", "PartitionStatus"]


async def _retry(call: Any, what: str, timeout: float = 60.0) -> Any:
    """``await call()`` while the engine answers 503 (a leader election), up to ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.25
    while True:
        try:
            return await call()
        except Unavailable:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


async def init(nc: nats.NATS, cfg: NatsConfig, dsn: str | None, mqtt: tuple[str, int] | None) -> list[str]:
    """Set up streams' consumers, the membership bucket and the owner table; return report lines."""
    layout = Layout.of(cfg)
    lines = []
    info = await ensure_mqtt_stream(nc, mqtt, timeout=90.0)
    replicas = info.get("config", {}).get("num_replicas")
    lines.append(f"stream {STREAM}: replicas {replicas}, retention {info.get('config', {}).get('retention')}")
    if replicas is not None and replicas < cfg.replicas:
        lines.append(f"warning: {STREAM} has {replicas} replicas (mqtt {{ stream_replicas: {cfg.replicas} }} on every "
                     "server, before the first MQTT client connects)")
    for p in range(cfg.partitions):
        wanted = consumer_config(layout, p, cfg)
        subject = f"$JS.API.CONSUMER.CREATE.{STREAM}.{layout.durable(p)}"
        got = await _retry(lambda: api(nc, subject, {"stream_name": STREAM, "config": wanted}, timeout=10.0), subject)
        check_consumer(got, wanted)
    lines.append(f"consumers {layout.durable(0)} .. {layout.durable(cfg.partitions - 1)}: {cfg.partitions} partitions, "
                 f"pinned_client, ack_wait {cfg.ack_wait_s:g}s, priority_timeout {cfg.priority_timeout_s:g}s")
    members = Members(nc, cfg.members_bucket, "", ttl_s=cfg.member_ttl_s, replicas=cfg.replicas)
    await _retry(members.open, "membership bucket")
    lines.append(f"membership bucket {cfg.members_bucket}: ttl {cfg.member_ttl_s:g}s")
    if dsn is not None:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            await conn.execute(DDL)
        finally:
            await conn.close()
        lines.append("table partition_owners: ready")
    maps = ", ".join(f'"{k}": "{v}"' for k, v in layout.mappings().items())
    lines.append(f"every server must carry:  mappings = {{ {maps} }}")
    return lines


@dataclass(frozen=True, slots=True)
class PartitionStatus:
    consumer: str
    owner: str | None
    epoch: int | None
    pending: int
    ack_pending: int
    pinned: bool


async def status(nc: nats.NATS, cfg: NatsConfig, dsn: str | None) -> tuple[list[PartitionStatus], set[str]]:
    """Every partition with its recorded owner and lag, and the live members."""
    layout = Layout.of(cfg)
    owners: dict[str, tuple[str, int]] = {}
    if dsn is not None:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            if await conn.fetchval("SELECT to_regclass('partition_owners') IS NOT NULL"):
                owners = {r[0]: (r[1], r[2]) for r in await conn.fetch("SELECT consumer, owner, epoch FROM partition_owners")}
        finally:
            await conn.close()
    out = []
    for p in range(cfg.partitions):
        name = layout.durable(p)
        try:
            info = await _retry(lambda: api(nc, f"$JS.API.CONSUMER.INFO.{STREAM}.{name}"), name, timeout=20.0)
        except EngineError as exc:
            raise EngineError(f"{exc} (run vitalgate cluster init)") from None
        groups = info.get("priority_groups") or []
        pinned = any(g.get("pinned_client_id") for g in groups)
        owner, epoch = owners.get(name, (None, None))
        out.append(PartitionStatus(name, owner, epoch, int(info.get("num_pending", 0)), int(info.get("num_ack_pending", 0)),
                                   pinned))
    members = Members(nc, cfg.members_bucket, "", ttl_s=cfg.member_ttl_s, replicas=cfg.replicas)
    try:
        await members.open()
        live = await members.live()
    except Exception:  # noqa: BLE001 - the bucket does not exist before init
        live = set()
    return out, live
