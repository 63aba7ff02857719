"""The HTTPS source: an aiohttp server on the gateway's event loop.

Lifecycle (the ``Source`` protocol): ``start()`` binds the port (so a bad certificate or
a taken port stops start-up), ``run()`` serves until ``close()``; ``stop_intake()`` closes
the listening sockets and answers 503 to new requests on open connections, while
requests already taken keep waiting for their commit; ``close()`` (after the pipeline
drained) answers what still waits with 503, closes idle keep-alive connections and
lets handlers finish for up to ``drain_s``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.config import HttpConfig
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.sources import Intake, SourceContext, SourceHealth

from . import admin, telemetry  # noqa: F401 - importing registers their operations
from .api import CORRELATION_HEADER, ERROR_RENDERERS, ERROR_WORDS, OPERATIONS, ApiError, ErrorBody, Operation, json_response, operation
from .auth import RateLimiter, Registry
from .context import CONTEXT, CORRELATION, PRINCIPAL, Context
from .openapi import document
from .ui import add_ui_routes

__all__ = ["HttpSource", "build", "server_ssl_context"]

log = logging.getLogger("gateway.sources.http")

_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_PATH_PARAM = re.compile(r"\{([a-z_]+)\}")


def server_ssl_context(cfg: HttpConfig) -> ssl.SSLContext | None:
    """TLS 1.2+ from ``tls_cert``/``tls_key``; client certificates verified against
    ``tls_client_ca`` when set (optional, so bearer tokens still work; a certificate that
    does not verify fails the handshake)."""
    if cfg.tls_cert is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    ctx.set_alpn_protocols(["http/1.1"])
    if cfg.tls_client_ca is not None:
        ctx.load_verify_locations(cafile=cfg.tls_client_ca)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def _correlation_id(request: web.Request) -> str:
    for name in ("X-Correlation-Id", "X-Request-Id"):
        value = request.headers.get(name)
        if value is not None and _SANE_ID.match(value):
            return value
    return uuid.uuid4().hex


def _error(request: web.Request, status: int, reason: str, headers: dict[str, str] | None = None,
           errors: list[str] | None = None) -> web.Response:
    for prefix, render in ERROR_RENDERERS.items():
        if request.path.startswith(prefix):
            return render(status, reason, request[CORRELATION], headers or {})
    body = ErrorBody(error=ERROR_WORDS.get(status, "error"), reason=reason, correlation_id=request[CORRELATION],
                     errors=errors or [])
    return json_response(status, body, headers)


@web.middleware
async def _middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
    """Correlation id on every answer, JSON error bodies, one counter per status."""
    ctx = request.app[CONTEXT]
    request[CORRELATION] = cid = _correlation_id(request)
    try:
        response = await handler(request)
    except ApiError as exc:
        response = _error(request, exc.status, exc.reason, exc.headers, exc.errors)
    except web.HTTPException as exc:  # the router's 404/405, aiohttp's own 413
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow",)}
        status = exc.status
        reason = {404: "path: no such resource", 405: f"method: {request.method} is not allowed here"}.get(
            status, exc.reason or "request refused")
        response = _error(request, status, reason, headers)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("Request failed unexpectedly.", extra={"path": request.path, "correlation_id": cid})
        response = _error(request, 500, "gateway: unexpected error; see the gateway log for this correlation id")
    response.headers[CORRELATION_HEADER] = cid
    ctx.metrics.http_requests.labels(str(response.status)).inc()
    return response


def _guard(op: Operation) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Wrap a handler with the authentication and scope its declaration asks for.

    ``device``: a device token or client certificate (an API key is refused: posting
    telemetry is for devices). ``api_key``: a ``vgk_`` key holding ``op.scope`` (a device
    credential is refused). Refusals are 401/403 and audited; then the caller's rate limit.
    """
    handler = op.handler
    if op.auth == "none":
        return handler

    async def guarded(request: web.Request) -> web.StreamResponse:
        ctx = request.app[CONTEXT]
        principal = await ctx.authenticate(request)
        if op.auth == "device" and principal.device_id is None:
            ctx.audit(request, principal.actor, "authz.denied", op.path, {"needs": "device credential"})
            raise ApiError(403, "authorization: posting telemetry needs a device token or client certificate, "
                                "not an API key")
        if op.auth == "api_key":
            if principal.kind != "api_key":
                ctx.audit(request, principal.actor, "authz.denied", op.path, {"needs": f"scope {op.scope}"})
                raise ApiError(403, f"authorization: needs an API key with scope {op.scope!r}; "
                                    "device credentials may only post telemetry")
            if op.scope is not None and op.scope not in principal.scopes:
                ctx.audit(request, principal.actor, "authz.denied", op.path, {"needs": f"scope {op.scope}",
                          "scopes": sorted(principal.scopes)})
                raise ApiError(403, f"authorization: the API key lacks scope {op.scope!r}")
        request[PRINCIPAL] = principal
        ctx.check_rate(principal)
        return await handler(request)

    guarded.__name__ = handler.__name__
    return guarded


@operation(
    "GET",
    "/openapi.json",
    operation_id="getOpenApi",
    summary="This OpenAPI 3.1 document",
    auth="none",
    responses={200: ("The document.", None)},
)
async def _openapi(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    return web.Response(body=ctx.openapi, content_type="application/json")


def build_app(ctx: Context) -> web.Application:
    """The aiohttp application for ``ctx``: every declared operation plus ``/openapi.json``."""
    app = web.Application(middlewares=[_middleware], client_max_size=ctx.cfg.max_body_bytes + 1)
    app[CONTEXT] = ctx
    for op in OPERATIONS:
        route = _PATH_PARAM.sub(lambda m: "{" + m.group(1) + ":[^/]+}", op.path)
        app.router.add_route(op.method, route, _guard(op))
    add_ui_routes(app)
    return app


def build(cfg: HttpConfig, ctx: SourceContext) -> HttpSource:
    """The HTTPS source of the ``http`` section (``gateway.sources.SOURCES``)."""
    if ctx.registry is None:
        raise ConfigError("http.enabled: the HTTPS source needs the device registry")
    return HttpSource(cfg, intake=ctx.intake, registry=ctx.registry, metrics=ctx.metrics, gateway_id=ctx.gateway_id,
                      reuse_port=ctx.workers > 1)


class HttpSource:
    """``POST /v1/telemetry`` and the API-key operations, over HTTPS (see the module docstring)."""

    def __init__(
        self,
        cfg: HttpConfig,
        *,
        intake: Intake,
        registry: Registry,
        metrics: Metrics,
        gateway_id: str,
        drain_s: float = 10.0,
        reuse_port: bool = False,
    ) -> None:
        self._cfg = cfg
        self._drain_s = drain_s
        # Only workers of one gateway share the port: a second gateway started by mistake on
        # the same port must fail at start-up, not silently take part of the traffic.
        self._reuse_port = reuse_port
        self.ctx = Context(cfg=cfg, intake=intake, registry=registry, metrics=metrics, gateway_id=gateway_id,
                           limiter=RateLimiter(cfg.rate_limit_per_s, cfg.rate_limit_burst), openapi=document(cfg))
        self._app = build_app(self.ctx)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._closed = asyncio.Event()
        self._unlisten: asyncio.Task[None] | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self._cfg.tls_cert else "http"
        return f"{scheme}://{self._cfg.host}:{self.port}"

    async def start(self) -> None:
        """Bind and listen; ``ConfigError`` naming the key on a bad certificate or an address in use."""
        cfg = self._cfg
        try:
            ssl_context = server_ssl_context(cfg)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"http.tls_cert/http.tls_key/http.tls_client_ca: cannot load: {exc}") from None
        self._runner = web.AppRunner(
            self._app,
            access_log=None,
            handle_signals=False,
            auto_decompress=False,  # gzip is inflated by body.gunzip, with its size limit
            shutdown_timeout=self._drain_s,
            keepalive_timeout=75.0,
        )
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self._cfg.host, self._cfg.port, ssl_context=ssl_context,
                                 reuse_port=self._reuse_port, backlog=1024)
        try:
            await self._site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError(f"http.host/http.port: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}") from None
        server = self._site._server  # noqa: SLF001 - the bound port when configured as 0
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._cfg.port
        log.info("HTTPS listening." if ssl_context else "HTTP listening (plaintext).",
                 extra={"address": self.url, "mutual_tls": self._cfg.tls_client_ca is not None})

    async def run(self) -> None:
        if self._runner is None:
            await self.start()
        await self._closed.wait()

    def health(self) -> SourceHealth:
        if self.port is None or self._runner is None:
            return SourceHealth(False, "http: not listening")
        if not self.ctx.accepting:
            return SourceHealth(False, f"http: stopped taking requests on {self._cfg.host}:{self.port}")
        return SourceHealth(True, f"http: listening on {self._cfg.host}:{self.port}")

    def stop_intake(self) -> None:
        """New requests get 503; the listening sockets close; requests already taken wait for their commit."""
        self.ctx.accepting = False
        if self.ctx.throttle is not None:
            self.ctx.throttle.flush()  # the pipeline still takes audit events while it drains
        if self._site is not None and self._unlisten is None:
            self._unlisten = asyncio.get_running_loop().create_task(self._site.stop(), name="http-unlisten")

    async def close(self) -> None:
        self.ctx.accepting = False
        for fut in list(self.ctx.waiting):
            fut.cancel()  # its handler answers 503: the drain ended before its commit
        if self._unlisten is not None:
            await asyncio.gather(self._unlisten, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._closed.set()
