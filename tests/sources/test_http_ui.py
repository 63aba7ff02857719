"""The central-station page's routes (``gateway.sources.http.ui``) on the real HTTPS source app.

The page must load with no credentials, come only from the gateway (no external URL in any
of its files: the hospital network has no internet), and forbid anything else by CSP.
tests/integration/test_ui.py drives it in a real browser against the real gateway.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from importlib import resources

import aiohttp
import orjson
import pytest
import pytest_asyncio

from gateway.config import HttpConfig
from gateway.metrics import Metrics
from gateway.model import Flag
from gateway.registry import StaticRegistry
from gateway.sources.http import HttpSource

STATIC = resources.files("gateway.ui").joinpath("static")


@pytest_asyncio.fixture
async def base() -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    cfg = HttpConfig(enabled=True, port=0, allow_plaintext=True)
    source = HttpSource(cfg, intake=object(), registry=StaticRegistry(), metrics=Metrics(),  # type: ignore[arg-type]
                        gateway_id="gw-test")
    await source.start()
    runner = asyncio.create_task(source.run())
    async with aiohttp.ClientSession() as session:
        yield session, source.url
    source.stop_intake()
    await source.close()
    await runner


@pytest.mark.asyncio
async def test_the_page_loads_without_credentials_with_a_strict_csp(base):
    session, url = base
    async with session.get(f"{url}/ui", allow_redirects=False) as r:
        assert r.status == 308 and r.headers["Location"] == "/ui/"
    async with session.get(f"{url}/ui/") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/html")
        csp = r.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        page = await r.text()
        etag = r.headers["ETag"]
    assert '<script type="module" src="app.js">' in page
    async with session.get(f"{url}/ui/", headers={"If-None-Match": etag}) as r:
        assert r.status == 304
    for name, ctype in (("app.js", "text/javascript"), ("stream.js", "text/javascript"),
                        ("waveform.js", "text/javascript"), ("style.css", "text/css")):
        async with session.get(f"{url}/ui/{name}") as r:
            assert r.status == 200, name
            assert r.headers["Content-Type"].startswith(ctype), name
            assert await r.read() == STATIC.joinpath(name).read_bytes()


@pytest.mark.asyncio
async def test_flags_come_from_the_model_and_unknown_files_are_404(base):
    session, url = base
    async with session.get(f"{url}/ui/flags.json") as r:
        assert r.status == 200
        assert orjson.loads(await r.read()) == {f.name: int(f) for f in Flag}
    for path in ("/ui/nope.js", "/ui/../gateway/config.py", "/ui/%2e%2e/__init__.py"):
        async with session.get(f"{url}{path}") as r:
            assert r.status == 404, path
            assert (await r.json())["reason"] == "path: no such resource"


def test_no_file_of_the_page_names_another_origin():
    files = [f for f in STATIC.iterdir() if f.is_file()]
    assert {f.name for f in files} >= {"index.html", "app.js", "style.css"}
    external = re.compile(r"""(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}|@import|url\(\s*['"]?(?!data:)""", re.I)
    found = [f"{f.name}: {m.group(0)}" for f in files for m in external.finditer(f.read_text())]
    assert not found, found
