"""The central-station page: ``GET /ui/`` and its static files, served from the package.

The page is three plain files (``gateway/ui/static``: HTML, an ES module, CSS) read once
when the application is built: no build step and no external URL, because a hospital
network has no internet. Loading the page needs no credentials; every API call it makes
carries the API key the user typed, so the page itself holds no data. ``/ui/flags.json``
gives the page the quality-flag bits from ``gateway.model.Flag``, so their values are
written once.
"""

from __future__ import annotations

import hashlib
from importlib import resources

import orjson
from aiohttp import web

from gateway.model import Flag

__all__ = ["UI_PATHS", "add_ui_routes"]

# Served beside the API operations, outside /openapi.json: a page, not an API.
UI_PATHS = ("/ui", "/ui/", "/ui/{name}")

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Everything from this origin only: a page that shows patients' vitals must not load, post
# or frame anything else.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidated by ETag: an upgraded gateway serves its own page at once
}


def _load() -> dict[str, tuple[bytes, str]]:
    files: dict[str, tuple[bytes, str]] = {}
    for entry in resources.files("gateway.ui").joinpath("static").iterdir():
        suffix = entry.name[entry.name.rfind("."):]
        if entry.is_file() and suffix in _TYPES:
            files[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    flags = {f.name: int(f) for f in Flag}
    files["flags.json"] = (orjson.dumps(flags), "application/json")
    return files


def add_ui_routes(app: web.Application) -> None:
    """Add ``/ui`` (a redirect), ``/ui/`` (the page) and ``/ui/{name}`` (its files) to ``app``."""
    files = _load()
    etags = {name: hashlib.sha256(body).hexdigest()[:20] for name, (body, _) in files.items()}

    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("name") or "index.html"
        if name not in files:
            raise web.HTTPNotFound()
        body, content_type = files[name]
        etag = f'"{etags[name]}"'
        headers = {**_HEADERS, "ETag": etag, "Content-Type": content_type}
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, headers=headers)

    async def redirect(request: web.Request) -> web.StreamResponse:
        # returned, not raised: the error middleware turns raised HTTP exceptions into JSON errors
        return web.Response(status=308, headers={"Location": "/ui/"})

    redirect_path, page_path, file_path = UI_PATHS
    app.router.add_get(redirect_path, redirect)
    app.router.add_get(page_path, serve)
    app.router.add_get(file_path, serve)
