"""Changes to the device registry and API keys, as the database sees them.

Each change is one transaction that also writes its ``audit_log`` rows (one per target,
sharing one correlation id per store) and sends ``NOTIFY vitalgate_registry``; PostgreSQL
delivers the notification at commit, so running gateways reload exactly when the change
becomes visible, and a change that rolls back is neither audited nor announced.

The store checks the registry's state (already registered, not registered, already
revoked) under row locks and raises ``Refused`` naming the field at fault; it validates no
arguments: callers pass ids and profiles they have checked. Only SHA-256 hashes of tokens
and keys reach the database.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

import asyncpg
import orjson

from gateway.errors import GatewayError
from gateway.registry import NOTIFY_CHANNEL, NewSecret

__all__ = ["Refused", "RegistryStore", "DEVICE_COLUMNS"]

DEVICE_COLUMNS = ("device_id", "profile", "status", "created_at", "updated_at", "revoked_at", "token_id",
                  "token_created_at", "cert_subject", "note")
_KEY_COLUMNS = "key_id, name, scopes, status, created_at, revoked_at"
_NOTIFY_MAX = 7000  # pg_notify payloads must stay under 8000 bytes

_AUDIT = """
INSERT INTO audit_log (actor, action, target, outcome, correlation_id, detail)
SELECT $1, $2, t, 'success', $3, d::jsonb FROM unnest($4::text[], $5::text[]) AS u(t, d)
"""
_INSERT_DEVICES = """
INSERT INTO devices (device_id, profile, token_id, token_sha256, token_created_at)
SELECT d, p, t, h, CASE WHEN t IS NULL THEN NULL ELSE now() END
FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[]) AS u(d, p, t, h)
"""

Field = Literal["device_id", "cert_subject", "key_id"]


class Refused(GatewayError):
    """The registry's state refuses the change (``field`` is at fault); nothing was changed."""

    def __init__(self, field: Field, message: str) -> None:
        self.field = field
        super().__init__(message)


class RegistryStore:
    """The registry's tables over one connection, on behalf of ``actor`` (``cli:<user>``)."""

    def __init__(self, conn: asyncpg.Connection, actor: str) -> None:
        self.conn = conn
        self.actor = actor
        self.correlation_id = uuid.uuid4().hex

    async def _audit(self, action: str, targets: Sequence[str], details: Sequence[dict[str, object]]) -> None:
        await self.conn.execute(_AUDIT, self.actor, action, self.correlation_id, list(targets),
                                [orjson.dumps(d).decode() for d in details])

    async def _notify(self, payload: str) -> None:
        await self.conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, payload[:_NOTIFY_MAX])

    # ---------------------------------------------------------------- devices

    async def add_device(self, device_id: str, profile: str, token: NewSecret,
                         cert_subject: str | None = None, note: str | None = None) -> None:
        """Register ``device_id``; ``Refused`` if it, or ``cert_subject``, is taken."""
        async with self.conn.transaction():
            try:
                async with self.conn.transaction():  # a savepoint: after the error we can still look up the clash
                    await self.conn.execute(
                        "INSERT INTO devices (device_id, profile, token_id, token_sha256, token_created_at, cert_subject, note)"
                        " VALUES ($1, $2, $3, $4, now(), $5, $6)",
                        device_id, profile, token.id, token.sha256, cert_subject, note,
                    )
            except asyncpg.UniqueViolationError as exc:
                if exc.constraint_name == "devices_cert_subject_key":
                    other = await self.conn.fetchval("SELECT device_id FROM devices WHERE cert_subject = $1", cert_subject)
                    raise Refused("cert_subject", f"{cert_subject!r} is already the subject of device {other!r}") from None
                raise Refused("device_id", f"device {device_id!r} is already registered") from None
            await self._audit("device.add", [device_id],
                              [{"profile": profile, "token_id": token.id, "cert_subject": cert_subject}])
            await self._notify(f"device:{device_id}")

    async def devices(self, status: str | None = None) -> list[asyncpg.Record]:
        """Every device (``DEVICE_COLUMNS``), or those of ``status``, by device id."""
        return await self.conn.fetch(
            f"SELECT {', '.join(DEVICE_COLUMNS)} FROM devices WHERE $1::text IS NULL OR status = $1 ORDER BY device_id",
            status,
        )

    async def device(self, device_id: str) -> asyncpg.Record:
        """The device's row (``DEVICE_COLUMNS``); ``Refused`` if it is not registered."""
        row = await self.conn.fetchrow(f"SELECT {', '.join(DEVICE_COLUMNS)} FROM devices WHERE device_id = $1", device_id)
        if row is None:
            raise Refused("device_id", f"device {device_id!r} is not registered")
        return row

    async def audit_of(self, target: str, limit: int = 10) -> list[asyncpg.Record]:
        """The latest ``limit`` audit entries about ``target``, newest first."""
        return await self.conn.fetch(
            "SELECT at, actor, action, outcome FROM audit_log WHERE target = $1 ORDER BY at DESC, id DESC LIMIT $2",
            target, limit,
        )

    async def revoke_device(self, device_id: str) -> None:
        """Revoke ``device_id``; ``Refused`` if it is not registered or already revoked."""
        async with self.conn.transaction():
            status = await self.conn.fetchval("SELECT status FROM devices WHERE device_id = $1 FOR UPDATE", device_id)
            if status is None:
                raise Refused("device_id", f"device {device_id!r} is not registered")
            if status == "revoked":
                raise Refused("device_id", f"device {device_id!r} is already revoked")
            await self.conn.execute(
                "UPDATE devices SET status = 'revoked', revoked_at = now(), updated_at = now() WHERE device_id = $1",
                device_id,
            )
            await self._audit("device.revoke", [device_id], [{}])
            await self._notify(f"device:{device_id}")

    async def rotate_token(self, device_id: str, token: NewSecret) -> None:
        """Replace the device's token by ``token``; ``Refused`` if not registered or revoked."""
        async with self.conn.transaction():
            row = await self.conn.fetchrow("SELECT status, token_id FROM devices WHERE device_id = $1 FOR UPDATE", device_id)
            if row is None:
                raise Refused("device_id", f"device {device_id!r} is not registered")
            if row["status"] == "revoked":
                raise Refused("device_id", f"device {device_id!r} is revoked; a revoked device gets no new token")
            await self.conn.execute(
                "UPDATE devices SET token_id = $2, token_sha256 = $3, token_created_at = now(), updated_at = now()"
                " WHERE device_id = $1",
                device_id, token.id, token.sha256,
            )
            await self._audit("device.rotate_token", [device_id], [{"old_token_id": row["token_id"], "token_id": token.id}])
            await self._notify(f"device:{device_id}")

    async def registered(self, device_ids: Sequence[str]) -> set[str]:
        """Those of ``device_ids`` that are registered (whatever their status)."""
        rows = await self.conn.fetch("SELECT device_id FROM devices WHERE device_id = ANY($1::text[])", list(device_ids))
        return {r[0] for r in rows}

    async def import_devices(
        self,
        rows: Sequence[tuple[int, str, str]],
        tokens: Sequence[NewSecret] | None,
        source: str,
        before_commit: Callable[[], Awaitable[None] | None] | None = None,
    ) -> None:
        """Register ``(line, device_id, profile)`` rows of file ``source`` in one transaction.

        ``tokens`` gives the i-th device the i-th token, or is ``None`` for devices without
        one. ``before_commit`` runs last inside the transaction (the caller writes the tokens
        out there): if it fails, nothing is imported. ``Refused`` if a device was
        registered since the caller looked (``registered``): nothing is imported either.
        """
        ids = [d for _, d, _ in rows]
        none = [None] * len(rows)
        async with self.conn.transaction():
            try:
                await self.conn.execute(
                    _INSERT_DEVICES, ids, [p for _, _, p in rows],
                    [t.id for t in tokens] if tokens else none, [t.sha256 for t in tokens] if tokens else none,
                )
            except asyncpg.UniqueViolationError as exc:
                raise Refused("device_id", f"a device of {source} was registered meanwhile: {exc.detail or exc}") from None
            await self._audit("device.import", ids, [
                {"file": source, "line": n, "profile": p, "token_id": tokens[i].id if tokens else None}
                for i, (n, _, p) in enumerate(rows)
            ])
            await self._notify(f"import:{len(rows)}")
            if before_commit is not None:
                pending = before_commit()
                if pending is not None:
                    await pending

    # ---------------------------------------------------------------- API keys

    async def add_key(self, key: NewSecret, name: str, scopes: Sequence[str]) -> None:
        """Store API key ``key`` (its hash) named ``name`` with ``scopes``."""
        async with self.conn.transaction():
            await self.conn.execute(
                "INSERT INTO api_keys (key_id, name, scopes, key_sha256) VALUES ($1, $2, $3, $4)",
                key.id, name, list(scopes), key.sha256,
            )
            await self._audit("api_key.add", [key.id], [{"name": name, "scopes": list(scopes)}])
            await self._notify(f"key:{key.id}")

    async def keys(self) -> list[asyncpg.Record]:
        """Every API key (never its hash), oldest first."""
        return await self.conn.fetch(f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY created_at, key_id")

    async def revoke_key(self, key_id: str) -> None:
        """Revoke API key ``key_id``; ``Refused`` if there is none or it is already revoked."""
        async with self.conn.transaction():
            status = await self.conn.fetchval("SELECT status FROM api_keys WHERE key_id = $1 FOR UPDATE", key_id)
            if status is None:
                raise Refused("key_id", f"no API key {key_id!r}")
            if status == "revoked":
                raise Refused("key_id", f"API key {key_id!r} is already revoked")
            await self.conn.execute("UPDATE api_keys SET status = 'revoked', revoked_at = now() WHERE key_id = $1", key_id)
            await self._audit("api_key.revoke", [key_id], [{}])
            await self._notify(f"key:{key_id}")
