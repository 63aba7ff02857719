"""/healthz and /readyz: the contract's bodies, a stuck loop reported, probes that do not load the database.

The event loop runs in a thread of its own here, as the gateway's loop runs beside the
metrics server's threads; the probes are called from the test's thread like a scrape.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from gateway.config import HealthConfig
from gateway.errors import SinkError
from gateway.health import READINESS_CHECKS, Health
from gateway.metrics import Metrics
from gateway.sources import SourceHealth


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    t = threading.Thread(target=lp.run_forever, daemon=True)
    t.start()
    yield lp
    lp.call_soon_threadsafe(lp.stop)
    t.join(5)
    lp.close()


class FakeDatabase:
    def __init__(self) -> None:
        self.pings = 0
        self.error: SinkError | None = None

    async def ping(self, timeout_s: float) -> None:
        self.pings += 1
        if self.error is not None:
            raise self.error


class FakeSource:
    def __init__(self, state: SourceHealth) -> None:
        self.state = state

    def health(self) -> SourceHealth:
        return self.state


class FakeWriter:
    write_error: tuple[SinkError, float] | None = None


class FakeIntake:
    backed_up = False
    pending_bytes = 3 << 20


class FakeRegistry:
    reloads = 1
    size = 12


def ready_health(loop: asyncio.AbstractEventLoop, **cfg: float) -> tuple[Health, FakeDatabase]:
    h = Health(HealthConfig(**cfg), loop)  # type: ignore[arg-type]
    db = FakeDatabase()
    f = h.facts
    f.database, f.writer, f.intake, f.max_pending_bytes = db, FakeWriter(), FakeIntake(), 44 << 20
    f.sources = {"mqtt": FakeSource(SourceHealth(True, "mqtt: connected to 127.0.0.1:1883"))}
    f.registry, f.registry_required = FakeRegistry(), True
    return h, db


def body(answer: tuple[int, bytes]) -> tuple[int, dict]:
    return answer[0], json.loads(answer[1])


def by_name(doc: dict) -> dict[str, dict]:
    return {c["name"]: c for c in doc["checks"]}


def test_healthz_reports_the_loop_lag(loop):
    h, _ = ready_health(loop)
    status, doc = body(h.healthz())
    assert status == 200
    assert doc["status"] == "ok"
    [check] = doc["checks"]
    assert check["name"] == "event_loop" and check["ok"] is True
    assert check["detail"].startswith("lag ") and check["detail"].endswith(" ms")


def test_healthz_fails_while_the_loop_is_stuck(loop):
    h, _ = ready_health(loop, max_loop_lag_s=0.2)
    release = threading.Event()
    loop.call_soon_threadsafe(lambda: release.wait(10))  # a blocking call on the loop
    try:
        t0 = time.monotonic()
        status, doc = body(h.healthz())
        assert time.monotonic() - t0 < 2.0  # answered from outside the loop, at the bound
    finally:
        release.set()
    assert status == 503
    assert doc == {"status": "fail", "checks": [{"name": "event_loop", "ok": False,
                                                 "detail": "no answer within 200 ms"}]}
    assert body(h.healthz())[0] == 200  # the loop runs again


def test_readyz_names_every_check_when_ready(loop):
    h, _ = ready_health(loop)
    status, doc = body(h.readyz())
    assert status == 200 and doc["status"] == "ready"
    assert [c["name"] for c in doc["checks"]] == list(READINESS_CHECKS)
    assert all(c["ok"] is True and isinstance(c["detail"], str) for c in doc["checks"])
    checks = by_name(doc)
    assert checks["database"]["detail"].startswith("SELECT 1 in ")
    assert checks["broker"]["detail"] == "mqtt: connected to 127.0.0.1:1883"
    assert checks["registry"]["detail"] == "loaded, 12 devices"
    assert checks["writer"]["detail"] == "3.0 MiB of payloads held, budget 44.0 MiB"


def test_database_probe_is_cached_and_says_why_it_failed(loop):
    h, db = ready_health(loop, database_cache_s=60.0)
    for _ in range(5):
        assert body(h.readyz())[0] == 200
    assert db.pings == 1  # probes within the cache do not reach the database

    h2, db2 = ready_health(loop, database_cache_s=0.0)
    db2.error = SinkError("no answer to SELECT 1 within 2 s", retriable=True)
    status, doc = body(h2.readyz())
    assert status == 503 and doc["status"] == "not_ready"
    checks = by_name(doc)
    assert checks["database"] == {"name": "database", "ok": False, "detail": "no answer to SELECT 1 within 2 s"}
    assert all(c["ok"] for n, c in checks.items() if n != "database")  # the others still say what they see
    db2.error = None
    assert body(h2.readyz())[0] == 200


def test_writer_names_the_write_error_while_retrying(loop):
    h, _ = ready_health(loop)
    h.facts.writer.write_error = (  # type: ignore[union-attr]
        SinkError("write failed: could not extend file: No space left on device", retriable=True, sqlstate="53100"),
        12.4,
    )
    status, doc = body(h.readyz())
    assert status == 503
    assert by_name(doc)["writer"] == {
        "name": "writer", "ok": False,
        "detail": "commits failing for 12 s, retrying (SQLSTATE 53100): write failed: could not extend file: "
                  "No space left on device",
    }


def test_writer_backed_up(loop):
    h, _ = ready_health(loop)
    h.facts.intake = type("Full", (), {"backed_up": True, "pending_bytes": 45 << 20})()  # type: ignore[assignment]
    status, doc = body(h.readyz())
    assert status == 503
    assert by_name(doc)["writer"]["detail"] == "backed up: 45.0 MiB of payloads held, budget 44.0 MiB"


def test_broker_and_intake(loop):
    h, _ = ready_health(loop, max_paused_s=30.0)
    h.facts.sources = {"mqtt": FakeSource(SourceHealth(False, "mqtt: not connected to 127.0.0.1:1883: refused")),
                       "http": FakeSource(SourceHealth(True, "http: listening on 127.0.0.1:8443"))}
    status, doc = body(h.readyz())
    assert status == 503
    assert by_name(doc)["broker"] == {
        "name": "broker", "ok": False,
        "detail": "mqtt: not connected to 127.0.0.1:1883: refused; http: listening on 127.0.0.1:8443"}
    paused = SourceHealth(True, "mqtt: connected; reads paused", paused_s=10.0)
    h.facts.sources = {"mqtt": FakeSource(paused)}
    status, doc = body(h.readyz())
    assert status == 200 and by_name(doc)["intake"]["detail"] == "paused for 10 s (bound 30 s)"
    h.facts.sources = {"mqtt": FakeSource(SourceHealth(True, "mqtt: connected; reads paused", paused_s=31.0))}
    status, doc = body(h.readyz())
    assert status == 503
    assert by_name(doc)["intake"] == {"name": "intake", "ok": False,
                                      "detail": "mqtt paused for 31 s, longer than 30 s"}
    h.facts.sources = {"mqtt": FakeSource(SourceHealth(True, "mqtt: connected"))}
    h.facts.stopping = True
    assert by_name(body(h.readyz())[1])["intake"] == {"name": "intake", "ok": False,
                                                      "detail": "shutting down: intake stopped"}


def test_not_ready_before_startup_builds_the_parts(loop):
    h = Health(HealthConfig(), loop)
    h.facts.registry_required = True
    status, doc = body(h.readyz())
    assert status == 503
    assert {c["name"]: c["ok"] for c in doc["checks"]} == dict.fromkeys(READINESS_CHECKS, False)
    assert by_name(doc)["database"]["detail"] == "not connected yet"


def test_readyz_fails_every_check_when_the_loop_is_stuck(loop):
    h, _ = ready_health(loop, max_loop_lag_s=0.1, database_timeout_s=0.1)
    release = threading.Event()
    loop.call_soon_threadsafe(lambda: release.wait(10))
    try:
        status, doc = body(h.readyz())
    finally:
        release.set()
    assert status == 503
    assert doc["checks"] == [{"name": n, "ok": False, "detail": "event loop did not answer within 200 ms"}
                             for n in READINESS_CHECKS]


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type", "")


def test_metrics_port_serves_metrics_and_probes(loop):
    h, db = ready_health(loop, database_cache_s=0.0)
    metrics = Metrics()
    metrics.batches.inc(3)
    server = metrics.serve("127.0.0.1", 0, h.routes())
    try:
        base = f"http://127.0.0.1:{server.port}"
        status, text, _ = _get(f"{base}/metrics")
        assert status == 200 and b"gateway_batches_written_total 3.0" in text
        status, text, ctype = _get(f"{base}/healthz")
        assert status == 200 and ctype == "application/json" and json.loads(text)["status"] == "ok"
        status, text, _ = _get(f"{base}/readyz")
        assert status == 200 and json.loads(text)["status"] == "ready"
        db.error = SinkError("SELECT 1 failed: connection refused", retriable=True)
        status, text, _ = _get(f"{base}/readyz")
        assert status == 503 and json.loads(text)["status"] == "not_ready"
    finally:
        server.close()
