"""The device registry and API keys, cached in memory for the hot path.

``Registry.start(dsn)`` loads the ``devices`` and ``api_keys`` tables once, then keeps the
cache fresh over one dedicated connection: it ``LISTEN``s on ``vitalgate_registry`` (the
CLI notifies after each change, so a revocation takes effect within a round trip) and
every ``refresh_s`` it compares a cheap change marker (row counts and latest
``updated_at``/``created_at``) and reloads when it moved. A lost connection is
reconnected with backoff, and the whole registry is reloaded afterwards (notifications
sent meanwhile are lost); until then the last loaded copy keeps serving.

Lookups never touch the database: ``device()`` is one dict lookup. Credentials:

- device token ``vgd_<token_id>_<secret>``, API key ``vgk_<key_id>_<secret>``; ids are 16
  hex digits, secrets ``secrets.token_urlsafe(32)`` (32 random bytes). Only the SHA-256
  of the secret is stored, and compared in constant time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import asyncpg

from gateway.errors import RegistryError
from gateway.retry import DATABASE_ERRORS, Backoff

__all__ = [
    "Device",
    "ApiKey",
    "NewSecret",
    "Registry",
    "StaticRegistry",
    "NOTIFY_CHANNEL",
    "SCOPES",
    "new_token",
    "new_api_key",
    "hash_secret",
    "split_secret",
]

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "vitalgate_registry"
SCOPES = ("telemetry:read", "admin")  # telemetry:write is implicit for devices
TOKEN_PREFIX = "vgd"
KEY_PREFIX = "vgk"
_SECRET_BYTES = 32
_ID_RE = re.compile(r"^[0-9a-f]{16}$")
_DUMMY_HASH = hashlib.sha256(b"no such credential").digest()

Status = Literal["active", "revoked"]


@dataclass(frozen=True)
class Device:
    """A registered device. ``token_id`` is ``None`` for a device without a token (MQTT only)."""

    device_id: str
    profile: str
    status: Status
    token_id: str | None = None
    cert_subject: str | None = None


@dataclass(frozen=True)
class ApiKey:
    """An API key of a reader or operator."""

    key_id: str
    name: str
    scopes: frozenset[str]
    status: Status


class NewSecret(NamedTuple):
    """A credential just made: ``text`` is what its holder presents, ``sha256`` what is stored."""

    id: str
    secret: str
    text: str
    sha256: bytes


def hash_secret(secret: str) -> bytes:
    """SHA-256 of the secret part of a token or key (what the database stores)."""
    return hashlib.sha256(secret.encode()).digest()


def _new(prefix: str) -> NewSecret:
    ident = secrets.token_hex(8)
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    return NewSecret(ident, secret, f"{prefix}_{ident}_{secret}", hash_secret(secret))


def new_token() -> NewSecret:
    """A new device token ``vgd_<token_id>_<secret>``."""
    return _new(TOKEN_PREFIX)


def new_api_key() -> NewSecret:
    """A new API key ``vgk_<key_id>_<secret>``."""
    return _new(KEY_PREFIX)


def split_secret(text: str, prefix: str) -> tuple[str, str] | None:
    """``(id, secret)`` of ``<prefix>_<id>_<secret>``, or ``None`` when it is not of that form."""
    head, sep, rest = text.partition("_")
    if head != prefix or not sep:
        return None
    ident, sep, secret = rest.partition("_")
    if not sep or not _ID_RE.match(ident) or len(secret) < 43:  # 32 bytes of token_urlsafe
        return None
    return ident, secret


class _Snapshot:
    """One consistent copy of the registry; replaced whole, never changed in place."""

    __slots__ = ("devices", "by_token", "by_cert", "keys")

    def __init__(
        self,
        devices: Iterable[tuple[Device, bytes | None]] = (),
        keys: Iterable[tuple[ApiKey, bytes]] = (),
    ) -> None:
        self.devices: dict[str, Device] = {}
        self.by_token: dict[str, tuple[Device, bytes]] = {}
        self.by_cert: dict[str, Device] = {}
        for dev, digest in devices:
            self.devices[dev.device_id] = dev
            if dev.token_id is not None and digest is not None:
                self.by_token[dev.token_id] = (dev, digest)
            if dev.cert_subject is not None:
                self.by_cert[dev.cert_subject] = dev
        self.keys: dict[str, tuple[ApiKey, bytes]] = {k.key_id: (k, digest) for k, digest in keys}


def _matches(secret: str, digest: bytes | None) -> bool:
    return hmac.compare_digest(hash_secret(secret), digest if digest is not None else _DUMMY_HASH) and digest is not None


_LOAD_DEVICES = "SELECT device_id, profile, status, token_id, token_sha256, cert_subject FROM devices"
_LOAD_KEYS = "SELECT key_id, name, scopes, status, key_sha256 FROM api_keys"
_MARKER = """
SELECT (SELECT count(*) FROM devices), (SELECT max(updated_at) FROM devices),
       (SELECT count(*) FROM api_keys),
       (SELECT max(greatest(created_at, revoked_at)) FROM api_keys)
"""


class Registry:
    """The registry cache of one gateway process (see the module docstring)."""

    def __init__(self, *, refresh_s: float = 5.0, connect_timeout_s: float = 10.0, command_timeout_s: float = 60.0,
                 retry_initial_s: float = 0.2, retry_max_s: float = 10.0) -> None:
        self._snap = _Snapshot()
        self.refresh_s = refresh_s
        self._connect_timeout = connect_timeout_s
        # Every statement has a deadline: behind a link that drops packets without a reset the
        # change-marker poll would otherwise wait for TCP to give up (about 15 minutes with
        # Linux's tcp_retries2 = 15), serving a stale registry (a revoked device accepted) all along.
        self._command_timeout = command_timeout_s
        self._retry = (retry_initial_s, retry_max_s)
        self._dsn: str | None = None
        self._conn: asyncpg.Connection | None = None
        self._marker: tuple[object, ...] | None = None
        self._notified = asyncio.Event()
        self._lost = asyncio.Event()
        self._lock = asyncio.Lock()  # one query at a time on the connection (refresh() beside the follower)
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0  # completed loads since start, for tests and logs

    # ------------------------------------------------------------------ lookups
    def device(self, device_id: str) -> Device | None:
        """The registered device, whatever its status, or ``None``."""
        return self._snap.devices.get(device_id)

    def profile_of(self, device_id: str) -> str | None:
        """The profile the device is registered with, or ``None`` when it is not registered."""
        dev = self._snap.devices.get(device_id)
        return None if dev is None else dev.profile

    def authenticate_token(self, token: str) -> Device | None:
        """The active device whose token this is, or ``None`` (unknown, wrong secret, revoked)."""
        parts = split_secret(token, TOKEN_PREFIX)
        if parts is None:
            return None
        token_id, secret = parts
        hit = self._snap.by_token.get(token_id)
        if not _matches(secret, hit[1] if hit else None):
            return None
        dev = hit[0]  # type: ignore[index]
        return dev if dev.status == "active" else None

    def authenticate_cert(self, subject: str) -> Device | None:
        """The active device registered with this certificate subject (mutual TLS), or ``None``."""
        dev = self._snap.by_cert.get(subject)
        return dev if dev is not None and dev.status == "active" else None

    def authenticate_api_key(self, key: str) -> ApiKey | None:
        """The active API key this is, or ``None`` (unknown, wrong secret, revoked)."""
        parts = split_secret(key, KEY_PREFIX)
        if parts is None:
            return None
        key_id, secret = parts
        hit = self._snap.keys.get(key_id)
        if not _matches(secret, hit[1] if hit else None):
            return None
        api_key = hit[0]  # type: ignore[index]
        return api_key if api_key.status == "active" else None

    @property
    def size(self) -> int:
        """Registered devices (any status)."""
        return len(self._snap.devices)

    # ---------------------------------------------------------------- lifecycle
    async def start(self, dsn: str) -> None:
        """Load the registry and start following its changes; raise ``RegistryError`` if it cannot be read."""
        self._dsn = dsn
        try:
            await self._connect()
            await self._reload("start")
        except DATABASE_ERRORS as exc:
            await self._drop_connection()
            hint = "; run `vitalgate db migrate`" if isinstance(exc, asyncpg.UndefinedTableError) else ""
            raise RegistryError(f"device registry: cannot load it: {exc}{hint}") from exc
        self._task = asyncio.create_task(self._follow(), name="registry-refresh")

    async def close(self) -> None:
        """Stop following changes and close the connection."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._drop_connection()

    async def refresh(self) -> None:
        """Reload now and return once reloaded; raise ``RegistryError`` while disconnected."""
        if self._conn is None:
            raise RegistryError("device registry: not connected")
        try:
            await self._reload("request")
        except DATABASE_ERRORS as exc:
            raise RegistryError(f"device registry: cannot reload it: {exc}") from exc

    async def _connect(self) -> None:
        assert self._dsn is not None
        conn = await asyncpg.connect(
            self._dsn, timeout=self._connect_timeout, command_timeout=self._command_timeout,
            server_settings={"application_name": "vitalgate:registry"},
        )
        self._lost.clear()
        conn.add_termination_listener(lambda _c: self._lost.set())
        await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
        self._conn = conn

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await asyncio.wait_for(conn.close(), 5.0)
        except DATABASE_ERRORS:
            conn.terminate()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, _payload: str) -> None:
        self._notified.set()

    async def _reload(self, why: str) -> None:
        conn = self._conn
        if conn is None:
            raise asyncpg.InterfaceError("the registry connection was closed")
        async with self._lock, conn.transaction(isolation="repeatable_read", readonly=True):
            marker = tuple(await conn.fetchrow(_MARKER))
            rows = await conn.fetch(_LOAD_DEVICES)
            krows = await conn.fetch(_LOAD_KEYS)
        snap = _Snapshot(
            ((Device(r[0], r[1], r[2], r[3], r[5]), None if r[4] is None else bytes(r[4])) for r in rows),
            ((ApiKey(r[0], r[1], frozenset(r[2]), r[3]), bytes(r[4])) for r in krows),
        )
        self._snap = snap
        self._marker = marker
        self.reloads += 1
        log.info(
            "Device registry loaded.",
            extra={"trigger": why, "devices": len(snap.devices),
                   "revoked": sum(d.status == "revoked" for d in snap.devices.values()), "api_keys": len(snap.keys)},
        )

    async def _follow(self) -> None:
        backoff = Backoff(*self._retry)
        while True:
            try:
                if self._conn is None:
                    await self._connect()
                    await self._reload("reconnect")
                    backoff.reset()
                await self._wait_for_change()
            except asyncio.CancelledError:
                raise
            except DATABASE_ERRORS as exc:
                await self._drop_connection()
                delay = backoff.next_delay()
                log.warning(
                    "Device registry connection lost; serving the last loaded copy and reconnecting.",
                    extra={"error": str(exc) or type(exc).__name__, "retry_in_s": round(delay, 2)},
                )
                await asyncio.sleep(delay)

    async def _wait_for_change(self) -> None:
        notified = asyncio.ensure_future(self._notified.wait())
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait({notified, lost}, timeout=self.refresh_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            notified.cancel()
            lost.cancel()
        if self._lost.is_set():
            raise asyncpg.InterfaceError("the registry connection was closed")
        conn = self._conn
        assert conn is not None
        if self._notified.is_set():
            self._notified.clear()
            await self._reload("notify")
            return
        async with self._lock:
            marker = tuple(await conn.fetchrow(_MARKER))
        if marker != self._marker:
            await self._reload("refresh")


class StaticRegistry(Registry):
    """A registry built in memory, for tests of the modules that use one (no database)."""

    def __init__(self, devices: Iterable[Device] = (), api_keys: Iterable[ApiKey] = ()) -> None:
        super().__init__()
        self._devices: list[tuple[Device, bytes | None]] = [(d, None) for d in devices]
        self._keys: list[tuple[ApiKey, bytes]] = [(k, _DUMMY_HASH) for k in api_keys]
        self._rebuild()

    def _rebuild(self) -> None:
        self._snap = _Snapshot(self._devices, self._keys)

    def add_device(self, device_id: str, profile: str, *, status: Status = "active",
                   cert_subject: str | None = None, token: bool = True) -> str | None:
        """Register a device (replacing one of that id); return its new token (``None`` with ``token=False``)."""
        cred = new_token() if token else None
        dev = Device(device_id, profile, status, cred.id if cred else None, cert_subject)
        self._devices = [e for e in self._devices if e[0].device_id != device_id] + [(dev, cred.sha256 if cred else None)]
        self._rebuild()
        return cred.text if cred else None

    def revoke_device(self, device_id: str) -> None:
        self._devices = [
            ((Device(d.device_id, d.profile, "revoked", d.token_id, d.cert_subject), h) if d.device_id == device_id else (d, h))
            for d, h in self._devices
        ]
        self._rebuild()

    def add_api_key(self, name: str, scopes: Iterable[str], *, status: Status = "active") -> str:
        """Add an API key; return the key to present."""
        cred = new_api_key()
        self._keys.append((ApiKey(cred.id, name, frozenset(scopes), status), cred.sha256))
        self._rebuild()
        return cred.text

    async def start(self, dsn: str = "") -> None:  # noqa: ARG002 - same signature as Registry
        return None

    async def close(self) -> None:
        return None

    async def refresh(self) -> None:
        return None
