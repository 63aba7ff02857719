"""Who is calling: device tokens, client certificates, API keys with scopes, rate limits.

Credentials, in this order:

- ``Authorization: Bearer vgd_...``: a device token; the device is the token's owner.
- ``Authorization: Bearer vgk_...``: an API key; it may call the operations whose scope it
  holds (``telemetry:read``, ``admin``). Scopes are independent: ``admin`` does not imply
  ``telemetry:read``. ``telemetry:write`` (posting telemetry) belongs to device credentials
  only and is never granted to a key.
- No ``Authorization`` header and a client certificate verified against
  ``http.tls_client_ca`` (mutual TLS): the device is the one registered with a
  ``cert_subject`` (``--cert-subject``: the RFC 4514 subject, the CN or a SAN URI) the
  certificate carries; otherwise the certificate's SAN URI ``urn:vitalgate:device:<id>``
  when it has exactly one; otherwise its subject CN when that is a device id. A device
  registered with a ``cert_subject`` accepts only a certificate that carries it. The
  principal recorded in ``ingests`` is the certificate subject (RFC 4514, e.g.
  ``CN=po-1,O=Acme``).

Every refusal is audited (``auth.failure``, ``authz.denied``, ``device.unregistered``,
``device.revoked``) with the caller's address and the request's correlation id. Repeated
authentication failures from one address are throttled (``AuditThrottle``): the first few
of an interval are audited one by one, the rest become one row with their count, so a
hostile client cannot grow ``audit_log`` without bound.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from aiohttp import web

from gateway.model import DEVICE_ID_PATTERN, AuditEvent

from .api import ApiError

__all__ = [
    "AuditThrottle",
    "Principal",
    "Registry",
    "RateLimiter",
    "authenticate",
    "cert_identity",
    "DEVICE_URI_PREFIX",
    "SCOPES",
]

DEVICE_URI_PREFIX = "urn:vitalgate:device:"
SCOPES = ("telemetry:read", "admin")
_DEVICE_RE = re.compile(DEVICE_ID_PATTERN)
_WWW_AUTH = 'Bearer realm="vitalgate"'
_WWW_AUTH_INVALID = 'Bearer realm="vitalgate", error="invalid_token"'

T = TypeVar("T")


class _Device(Protocol):
    device_id: str
    profile: str | None
    status: str
    token_id: str | None
    cert_subject: str | None


class _ApiKey(Protocol):
    key_id: str
    name: str
    scopes: frozenset[str]
    status: str


class Registry(Protocol):
    """The device registry as this source uses it (``gateway.registry.Registry``).

    Methods may be plain or ``async``; both are awaited correctly.
    """

    def device(self, device_id: str) -> _Device | None | Awaitable[_Device | None]: ...

    def authenticate_token(self, token: str) -> _Device | None | Awaitable[_Device | None]: ...

    def authenticate_api_key(self, key: str) -> _ApiKey | None | Awaitable[_ApiKey | None]: ...


async def _call(value: T | Awaitable[T]) -> T:
    if inspect.isawaitable(value):
        return await value  # type: ignore[no-any-return]
    return value  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. ``name`` is what provenance and the audit log record."""

    kind: Literal["device_token", "certificate", "api_key"]
    name: str  # device token id, certificate subject or API key id
    device_id: str | None = None  # device credentials only
    scopes: frozenset[str] = frozenset()

    @property
    def actor(self) -> str:
        return f"https:{self.name}"

    @property
    def limit_key(self) -> str:
        return self.device_id if self.device_id is not None else f"key:{self.name}"


# ------------------------------------------------------------------ client certificates

_SHORT = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


def _escape(value: str) -> str:
    out = re.sub(r'([,+"\\<>;=])', r"\\\1", value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def subject_string(subject: Iterable[Iterable[tuple[str, str]]]) -> str:
    """``ssl.getpeercert()['subject']`` as an RFC 4514 string (last RDN first), e.g. ``CN=po-1,O=Acme``."""
    rdns = ["+".join(f"{_SHORT.get(k, k)}={_escape(v)}" for k, v in rdn) for rdn in subject]
    return ",".join(reversed(rdns))


def cert_names(cert: dict[str, Any]) -> set[str]:
    """What a registered ``cert_subject`` may be: the RFC 4514 subject, the CN or a SAN URI."""
    names = {subject_string(cert.get("subject", ()))}
    names.update(v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName")
    names.update(v for k, v in cert.get("subjectAltName", ()) if k == "URI")
    return names


def cert_identity(cert: dict[str, Any]) -> tuple[str | None, str]:
    """``(device_id, subject)`` of a verified client certificate; ``device_id`` is ``None``
    when the certificate names no device (see the module docstring for the rule)."""
    subject = subject_string(cert.get("subject", ()))
    uris = [v[len(DEVICE_URI_PREFIX):] for k, v in cert.get("subjectAltName", ()) if k == "URI"
            and v.startswith(DEVICE_URI_PREFIX)]
    if uris:
        if len(uris) == 1 and _DEVICE_RE.match(uris[0]):
            return uris[0], subject
        return None, subject
    cns = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    if len(cns) == 1 and _DEVICE_RE.match(cns[0]):
        return cns[0], subject
    return None, subject


def peer_certificate(request: web.Request) -> dict[str, Any] | None:
    """The client certificate the TLS handshake verified, or ``None``."""
    transport = request.transport
    if transport is None:
        return None
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    return cert or None


# ------------------------------------------------------------------ authentication

Audit = Callable[[str, str, str | None, dict[str, object] | None], None]  # (actor, action, target, detail)


def _unauthenticated(reason: str, *, presented: bool) -> ApiError:
    return ApiError(401, reason, headers={"WWW-Authenticate": _WWW_AUTH_INVALID if presented else _WWW_AUTH})


async def authenticate(request: web.Request, registry: Registry, audit: Audit) -> Principal:
    """The caller's principal, or ``ApiError`` 401/403 (audited)."""
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            audit("https:anonymous", "auth.failure", None, {"reason": "malformed Authorization header"})
            raise _unauthenticated("authorization: expected 'Bearer <token>'", presented=True)
        if token.startswith("vgd_"):
            dev = await _call(registry.authenticate_token(token))
            if dev is None:
                audit("https:anonymous", "auth.failure", None, {"reason": "unknown or revoked device token"})
                raise _unauthenticated("authorization: unknown or revoked device token", presented=True)
            return Principal("device_token", dev.token_id or dev.device_id, device_id=dev.device_id)
        if token.startswith("vgk_"):
            key = await _call(registry.authenticate_api_key(token))
            if key is None:
                audit("https:anonymous", "auth.failure", None, {"reason": "unknown or revoked API key"})
                raise _unauthenticated("authorization: unknown or revoked API key", presented=True)
            return Principal("api_key", key.key_id, scopes=frozenset(key.scopes))
        audit("https:anonymous", "auth.failure", None, {"reason": "unrecognized bearer token"})
        raise _unauthenticated("authorization: not a device token (vgd_...) or API key (vgk_...)", presented=True)
    cert = peer_certificate(request)
    if cert is None:
        audit("https:anonymous", "auth.failure", None, {"reason": "no credentials"})
        raise _unauthenticated("authorization: missing; send a Bearer token or a client certificate", presented=False)
    device_id, subject = cert_identity(cert)
    actor = f"https:{subject}"
    names = cert_names(cert)
    bound = getattr(registry, "authenticate_cert", None)  # a subject registered for a device (devices.cert_subject)
    if bound is not None:  # an explicit binding wins over the names the certificate carries
        for name in sorted(names):
            dev = await _call(bound(name))
            if dev is not None:
                device_id = dev.device_id
                break
    if device_id is None:
        audit(actor, "auth.failure", None, {"reason": "certificate names no device"})
        raise _unauthenticated(
            f"client certificate: names no device (expected SAN URI {DEVICE_URI_PREFIX}<id> or a CN that is a device id)",
            presented=True,
        )
    dev = await _call(registry.device(device_id))
    if dev is None:
        audit(actor, "device.unregistered", device_id, {"credential": "certificate"})
        raise ApiError(403, f"client certificate: device {device_id!r} is not registered")
    if dev.status != "active":
        audit(actor, "device.revoked", device_id, {"credential": "certificate"})
        raise ApiError(403, f"client certificate: device {device_id!r} is revoked")
    if dev.cert_subject and dev.cert_subject not in names:
        audit(actor, "auth.failure", device_id, {"reason": "certificate subject differs from the registered one",
                                                 "registered": dev.cert_subject})
        raise ApiError(403, f"client certificate: subject {subject!r} is not the one registered for {device_id!r}")
    return Principal("certificate", subject, device_id=device_id)


def audit_event(actor: str, action: str, target: str | None, *, remote: str | None, correlation_id: str,
                detail: dict[str, object] | None) -> AuditEvent:
    return AuditEvent(
        at_ms=int(time.time() * 1000),
        actor=actor,
        action=action,
        target=target,
        outcome="denied",
        source_addr=remote,
        correlation_id=correlation_id,
        detail=detail,
    )


# ------------------------------------------------------------------ audit throttle


@dataclass
class _Window:
    start: float
    written: int = 0  # events of this interval audited one by one
    count: int = 0  # events of this interval held back for the summary row
    reasons: Counter[str] = field(default_factory=Counter)
    first_ms: int = 0
    last: AuditEvent | None = None
    timer: asyncio.TimerHandle | None = None


class AuditThrottle:
    """One source address's repeated authentication failures, bounded in ``audit_log``.

    Per (address, action) and ``interval_s``: the first ``each`` events are audited as they
    come; the rest are counted and written as one row when the interval ends (``detail``:
    ``repeated``, ``interval_s``, ``first_at``, ``last_at`` in epoch ms, ``reasons`` with
    their counts; the other fields are the last event's). At most ``max_addresses``
    intervals are tracked: beyond that the oldest is closed early (its summary written), so
    memory stays bounded and no failure goes uncounted. ``flush()`` writes what is held.
    """

    def __init__(self, emit: Callable[[AuditEvent], None], *, interval_s: float = 60.0, each: int = 10,
                 max_addresses: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._emit = emit
        self.interval_s = interval_s
        self.each = each
        self._max = max_addresses
        self._clock = clock
        self._windows: dict[tuple[str | None, str], _Window] = {}

    def record(self, event: AuditEvent) -> None:
        key = (event.source_addr, event.action)
        now = self._clock()
        w = self._windows.get(key)
        if w is not None and now - w.start >= self.interval_s:
            self._close(key)
            w = None
        if w is None:
            w = self._windows[key] = _Window(now)
            if len(self._windows) > self._max:
                self._close(next(iter(self._windows)))
        if w.written < self.each:
            w.written += 1
            self._emit(event)
            return
        if w.count == 0:
            w.first_ms = event.at_ms
            w.timer = asyncio.get_running_loop().call_later(self.interval_s - (now - w.start), self._close, key)
        w.count += 1
        w.last = event
        w.reasons[str((event.detail or {}).get("reason", event.action))] += 1

    def _close(self, key: tuple[str | None, str]) -> None:
        w = self._windows.pop(key, None)
        if w is None:
            return
        if w.timer is not None:
            w.timer.cancel()
        if w.count and w.last is not None:
            last = w.last
            self._emit(AuditEvent(
                at_ms=last.at_ms, actor=last.actor, action=last.action, target=last.target, outcome=last.outcome,
                source_addr=last.source_addr, correlation_id=last.correlation_id,
                detail={"repeated": w.count, "interval_s": self.interval_s, "first_at": w.first_ms,
                        "last_at": last.at_ms, "reasons": dict(w.reasons)},
            ))

    def flush(self) -> None:
        """Write every summary held (shutdown)."""
        for key in list(self._windows):
            self._close(key)

    def __len__(self) -> int:
        return len(self._windows)


# ------------------------------------------------------------------ rate limit


class RateLimiter:
    """A token bucket per caller: ``rate`` requests per second sustained, ``burst`` at once.

    Memory is bounded: beyond ``max_keys`` callers, buckets that are full again (idle
    callers) are dropped, which forgets nothing that matters.
    """

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str) -> float:
        """Spend one token: 0.0 when allowed, else the seconds until one is available."""
        now = self._clock()
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self._max_keys:
                self._prune(now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        full = [k for k, (tokens, at) in self._buckets.items() if tokens + (now - at) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after(seconds: float) -> str:
    """A Retry-After value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
