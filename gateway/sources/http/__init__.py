"""The HTTPS source: ``POST /v1/telemetry``, API-key operations and ``/openapi.json``.

Modules: ``api`` (wire types, errors, the operation table), ``auth`` (credentials,
scopes, rate limits), ``body`` (bounded reads, gzip, arrays), ``telemetry`` and
``admin`` (the handlers), ``openapi`` (the document), ``server`` (aiohttp lifecycle).
"""

from __future__ import annotations

from .server import HttpSource, build, server_ssl_context

__all__ = ["HttpSource", "build", "server_ssl_context"]
