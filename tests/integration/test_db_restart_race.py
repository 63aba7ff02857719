"""A database restart never stops the gateway: the pooled connection that read the server's
FATAL before its end of stream is terminated and the operation retried, never a dead writer.

The fault: PostgreSQL ends every session on ``pg_ctl restart -m fast`` (and on
``pg_terminate_backend``) with a FATAL message, then closes the socket. An idle pooled
connection reads the FATAL with no operation waiting, which leaves asyncpg's protocol
stuck "consuming until sync"; while the end of stream is still unread the pool lends that
connection, and its first statement raises ``InternalClientError('cannot switch to state
12; another operation (2) is in progress')``, which used to escape the writer's retry and
stop the gateway. ``LateEofRelay`` widens the gap between the two from microseconds to a
fraction of a second, so each restart hits the window instead of one in several.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request

import asyncpg
import pytest

from gateway.errors import SinkError
from gateway.metrics import Metrics
from gateway.sinks.timescale import TimescaleSink
from gateway.writepolicy import WritePolicy
from tests.harness import await_for, wait_for
from tests.integration.late_eof import LateEofRelay
from tests.integration.support import Publisher, encode, pulse_ox_envelopes, topic
from tests.integration.test_ingest import assert_exactly_once, count, wait_ingests

pytestmark = pytest.mark.integration

KEYS = [("po-race", b"\x01" * 32)]


def via(dsn: str, relay: LateEofRelay) -> str:
    host_port = dsn.split("@", 1)[1].split("/", 1)
    return f"{dsn.split('@', 1)[0]}@127.0.0.1:{relay.port}/{host_port[1]}"


async def terminate_sessions(dsn: str, application_name: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            application_name))
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_a_connection_that_read_the_fatal_is_terminated_and_the_lookup_retried(db_dsn):
    relay = LateEofRelay("127.0.0.1", int(db_dsn.rsplit(":", 1)[1].split("/", 1)[0]), eof_delay_s=2.0).start()
    sink = TimescaleSink(via(db_dsn, relay), gateway_id="race")
    try:
        await sink.start()
        assert await sink.known(KEYS) == {}  # the lookup's statement is prepared: the next one binds (state 12)
        assert await terminate_sessions(db_dsn, "vitalgate:race") >= 1
        # the backend is gone and its FATAL passed on; its end of stream is held back
        await await_for(lambda: relay.holding >= 1, timeout=10, message="the relay holds an end of stream")
        await asyncio.sleep(0)  # one loop turn: the client reads the FATAL that is already in its socket
        with pytest.raises(SinkError) as caught:
            await sink.known(KEYS)
        assert caught.value.retriable, caught.value
        assert "another operation" in str(caught.value) or "closed" in str(caught.value), caught.value

        # the same fault under the writer's retry: answered, not raised
        await sink.known(KEYS)
        assert await terminate_sessions(db_dsn, "vitalgate:race") >= 1
        await await_for(lambda: relay.holding >= 1, timeout=10, message="the relay holds an end of stream")
        await asyncio.sleep(0)
        metrics = Metrics()
        policy = WritePolicy(sink, metrics, retry_initial_s=0.05, retry_max_s=0.2)
        assert await policy.retry("duplicate lookup", lambda: sink.known(KEYS)) == {}
        # and probes see a working database again at once
        await sink.ping(2.0)
    finally:
        await sink.close()
        relay.close()


class PacedThroughRestarts:
    """Publishes at QoS 1 at a fleet's pace through broker restarts: paho keeps what it could
    not send and resends what was not acknowledged after it reconnects; done once the broker
    has acknowledged every message (by message id: a message queued while disconnected
    counts too)."""

    def __init__(self, port: int, messages: list[tuple[str, bytes]], per_second: float) -> None:
        self.pub = Publisher(port, reconnect_delay_s=0.2)
        self.messages = messages
        self.per_second = per_second
        self.mids: list[int] = []
        self.thread = threading.Thread(target=self._run, name="paced-publisher", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        for i, (t, payload) in enumerate(self.messages):
            delay = start + i / self.per_second - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # paces the input; waits for no condition
            self.mids.append(self.pub.client.publish(t, payload, qos=1).mid)

    def wait_acked(self, timeout: float) -> None:
        self.thread.join(timeout)
        acked = self.pub.puback_reasons
        wait_for(lambda: all(m in acked for m in self.mids), timeout=timeout,
                 message=lambda: f"broker acked {sum(m in acked for m in self.mids)} of {len(self.mids)}")
        self.pub.close()


def readyz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_ten_broker_then_database_restarts_under_qos1_load_never_stop_the_gateway(pg_cluster, db_dsn, broker,
                                                                                  gateway_factory):
    """Each cycle: the broker restarts (persistence keeps the session), then within a second
    PostgreSQL restarts with ``-m fast``, under QoS 1 load; ten cycles in one test."""
    relay = LateEofRelay(pg_cluster.host, pg_cluster.port, eof_delay_s=0.3).start()
    try:
        gw = gateway_factory(via(db_dsn, relay), env={"VITALGATE_RETRY_MAX_S": "1.0"})
        gw.start()
        envelopes = pulse_ox_envelopes(30, 400)  # 12,000 envelopes at 300/s: load through every cycle
        payloads = [(topic(e), encode(e, i)) for i, e in enumerate(envelopes)]
        publisher = PacedThroughRestarts(broker.port, payloads, per_second=300)
        started = time.monotonic()
        recoveries = []
        for cycle in range(10):
            before = count(db_dsn, "SELECT count(*) FROM ingests")
            broker.restart()
            t0 = time.monotonic()
            pg_cluster.restart()
            assert gw.alive(), f"cycle {cycle}: the gateway stopped\n{gw.log_tail()}"
            wait_for(lambda: count(db_dsn, "SELECT count(*) FROM ingests") > before or not gw.alive(),
                     timeout=60, interval=0.1, message=lambda: f"cycle {cycle}: no commit after the restarts")
            assert gw.alive(), f"cycle {cycle}: the gateway stopped\n{gw.log_tail()}"
            recoveries.append(time.monotonic() - t0)
        publisher.wait_acked(180)
        wait_ingests(db_dsn, len(envelopes), timeout=120, gw=gw)
        assert_exactly_once(db_dsn, envelopes)
        wait_for(lambda: readyz(gw.metrics_port)[0] == 200, timeout=30, message=lambda: str(readyz(gw.metrics_port)))
        log = gw.log_text()
        assert "Task failed; stopping." not in log
        print(f"\nfault: 10 x (mosquitto restart, then pg_ctl restart -m fast) under QoS 1 load, FATAL->EOF "
              f"widened to 0.3 s; recovery to the next commit: max {max(recoveries):.1f} s, "
              f"mean {sum(recoveries) / len(recoveries):.1f} s; "
              f"client-state errors retried: {log.count('another operation')}; "
              f"total {time.monotonic() - started:.0f} s")
        assert gw.terminate() == 0
    finally:
        relay.close()
