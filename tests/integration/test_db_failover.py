"""Database failover under load: a synchronous standby is promoted after the primary is killed.

A primary and a hot standby (``pg_basebackup -R``, synchronous: the primary names it in
``synchronous_standby_names``), both throwaway on loopback; one real gateway on the
multi-host URL ``...host1,host2/db?target_session_attrs=read-write`` with
``database.require_sync_standby``; a real mosquitto; devices publishing at QoS 1.

The fault: the standby's WAL receiver is stopped (SIGSTOP) under load, so the primary's
COMMITs wait for it (``wait_event = 'SyncRep'``): committed locally, not confirmed. Then the
primary's postmaster gets SIGKILL, the receiver resumes (it still reads the WAL the
primary had sent before dying, so some of those commits reach the standby and some do
not), and the standby is promoted. The gateway saw every waiting COMMIT fail with the
connection: outcome unknown. What must hold:

- nothing the gateway counted as committed before the kill is missing on the standby
  (it acknowledges only commits the standby confirmed);
- every envelope published is in the promoted database exactly once, ingests and
  readings: an unknown commit that did reach the standby is found by the dedupe and not
  stored again, one that did not is stored by the retry;
- the gateway never exits, and its registry connection follows the new primary: a
  revocation sent by ``NOTIFY`` there applies (the periodic refresh is an hour away).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

import asyncpg
import pytest

from tests.harness import GatewayProcess, PostgresCluster, StandbyCluster, vitalgate, wait_for
from tests.integration.support import (
    Publisher, encode, expected_readings, fetch_readings, publish_paced, pulse_ox_envelopes, topic,
)

pytestmark = pytest.mark.integration

_STORED = re.compile(r'^gateway_envelopes_total\{[^}]*outcome="stored"[^}]*\} (\S+)$', re.M)


def _q(dsn: str, sql: str) -> object:
    async def run() -> object:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def _counter(pattern: re.Pattern[str], text: str) -> float:
    return sum(float(v) for v in pattern.findall(text))


def test_primary_killed_under_load_standby_promoted_nothing_lost_nothing_duplicated(tmp_path: Path, broker):
    # Not under tmp_path: a pytest session starting meanwhile makes /tmp/pytest-of-<user>
    # 0700 again, and the postgres user could no longer reach the data for pg_ctl promote.
    pg_dir = Path(tempfile.mkdtemp(prefix="vitalgate-failover-"))
    primary = PostgresCluster(pg_dir / "pg1")
    standby = StandbyCluster(pg_dir / "pg2", primary, name="standby1")
    stopped: list[int] = []
    gw = None
    try:
        primary.start()
        primary.create_database("failover")
        standby.start()
        standby.make_synchronous()
        url = (f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/failover"
               "?target_session_attrs=read-write")
        on_standby = standby.dsn("failover")

        envelopes = pulse_ox_envelopes(60, 200)  # 12,000 envelopes, ~15 s at 800/s
        devices = sorted({e["device_id"] for e in envelopes})
        fleet = tmp_path / "fleet.csv"
        fleet.write_text("device_id,profile\n" + "".join(f"{d},pulse_oximeter\n" for d in devices))
        vitalgate(url, "db", "migrate")  # the CLI on the multi-host URL
        vitalgate(url, "devices", "import", str(fleet), "--no-tokens")

        gw = GatewayProcess(tmp_path / "gw" / "gateway.log", database_url=url, mqtt_url=broker.url,
                            client_id="gw-failover", env={
                                "VITALGATE_DATABASE_REQUIRE_SYNC_STANDBY": "true",
                                "VITALGATE_AUTH_REQUIRE_REGISTRATION": "true",
                                "VITALGATE_AUTH_REFRESH_S": "3600",  # only NOTIFY can apply a revocation quickly
                                "VITALGATE_BATCH_MAX_ROWS": "400",
                                "VITALGATE_RETRY_MAX_S": "1",
                                "VITALGATE_DATABASE_CONNECT_TIMEOUT_S": "3",
                            })
        gw.start()
        assert "synchronous_standby_names=standby1" in gw.log_since_start(), gw.log_tail()
        assert "standbys=standby1:streaming:sync" in gw.log_since_start(), gw.log_tail()

        # The first device is left out of the load: it is revoked after the failover.
        load = [e for e in envelopes if e["device_id"] != devices[0]]
        payloads = [(topic(e), encode(e, i)) for i, e in enumerate(load)]
        publisher = publish_paced(broker.port, payloads, per_second=800)
        wait_for(lambda: int(_q(on_standby, "SELECT count(*) FROM ingests")) > 3000, timeout=60, interval=0.1,
                 message="3,000 envelopes replicated before the fault")

        # Fault: commits wait for a standby that does not answer, then the primary dies.
        receiver = int(_q(on_standby, "SELECT pid FROM pg_stat_wal_receiver"))
        os.kill(receiver, signal.SIGSTOP)
        stopped.append(receiver)
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
        wait_for(lambda: int(primary.psql(waiting)) >= 1, timeout=30, interval=0.02,
                 message="a COMMIT waiting for the synchronous standby")
        primary.kill()  # SIGKILL of the postmaster
        killed_at = time.monotonic()
        metrics = gw.metrics_text() or ""
        acked_at_kill = _counter(_STORED, metrics)
        os.kill(receiver, signal.SIGCONT)
        stopped.remove(receiver)
        # the standby replays what it received before the primary died
        replayed = "SELECT pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()"
        wait_for(lambda: _q(on_standby, replayed) is True and _q(on_standby, "SELECT status FROM pg_stat_wal_receiver") is None,
                 timeout=30, interval=0.05, message="the standby replayed all it received")
        on_standby_at_kill = int(_q(on_standby, "SELECT count(*) FROM ingests"))
        assert on_standby_at_kill >= acked_at_kill, (
            f"the gateway counted {acked_at_kill:.0f} envelopes committed, the standby has {on_standby_at_kill}")
        # The WAL of the waiting COMMITs sat in the receiver's socket when the primary died: the
        # standby has envelopes whose commit the gateway saw fail. Its retry must not store them again.
        unknown_on_standby = on_standby_at_kill - int(acked_at_kill)
        assert unknown_on_standby > 0, "no COMMIT of unknown outcome reached the standby: the fault was not injected"
        assert gw.alive(), gw.log_tail()

        standby.promote()
        promoted_at = time.monotonic()
        wait_for(lambda: int(_q(on_standby, "SELECT count(*) FROM ingests")) > on_standby_at_kill, timeout=60,
                 interval=0.05, message=lambda: f"a commit on the promoted standby\n{gw.log_tail()}")
        recovered_at = time.monotonic()
        print(f"\nfault: SIGSTOP of the standby's WAL receiver under load (COMMITs waiting in SyncRep), "
              f"SIGKILL of the primary's postmaster, pg_ctl promote of the standby; "
              f"gateway committed {acked_at_kill:.0f} envelopes before the kill, the standby {on_standby_at_kill} "
              f"({unknown_on_standby} of them from COMMITs of unknown outcome); "
              f"kill to promoted {promoted_at - killed_at:.2f} s, promoted to first commit "
              f"{recovered_at - promoted_at:.2f} s, kill to first commit {recovered_at - killed_at:.2f} s")

        publisher.join(120)
        assert not publisher.is_alive(), "the broker did not acknowledge every publish"
        want = expected_readings(load)
        wait_for(lambda: int(_q(on_standby, "SELECT count(*) FROM ingests")) >= len(load) or not gw.alive(),
                 timeout=180, interval=0.25,
                 message=lambda: f"ingests {_q(on_standby, 'SELECT count(*) FROM ingests')} of {len(load)}")
        assert gw.alive(), gw.log_tail()
        got = asyncio.run(fetch_readings(on_standby))
        missing, extra = want - got, got - want
        assert not missing, f"{sum(missing.values())} readings missing, e.g. {list(missing)[:3]}"
        assert not extra, f"{sum(extra.values())} readings duplicated or extra, e.g. {list(extra)[:3]}"
        assert int(_q(on_standby, "SELECT count(*) FROM ingests")) == len(load)
        assert int(_q(on_standby, "SELECT count(*) FROM (SELECT 1 FROM ingests GROUP BY device_id, payload_sha256 "
                                  "HAVING count(*) > 1) d")) == 0
        n_blocks = sum(len(e.get("waveforms", [])) for e in load)
        assert int(_q(on_standby, "SELECT count(*) FROM waveform_blocks")) == n_blocks
        assert int(_q(on_standby, "SELECT count(*) FROM rejected")) == 0

        # The registry followed the new primary: reconnected, and LISTENs there.
        wait_for(lambda: "trigger=reconnect" in gw.log_since_start(), timeout=30,
                 message=lambda: f"the registry reloaded after reconnecting\n{gw.log_tail()}")
        vitalgate(url, "devices", "revoke", devices[0])
        revoked = next(e for e in envelopes if e["device_id"] == devices[0])
        pub = Publisher(broker.port)
        pub.publish(topic(revoked), encode(revoked, 0))
        pub.wait_acked()
        pub.close()
        wait_for(lambda: int(_q(on_standby, "SELECT count(*) FROM rejected WHERE reason LIKE '%is revoked'")) == 1,
                 timeout=30, interval=0.1, message=lambda: f"the revoked device refused\n{gw.log_tail()}")
        assert gw.starts == 1 and gw.alive()
        assert gw.terminate() == 0
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if gw is not None:
            gw.stop()
        standby.cleanup()
        primary.cleanup()
        if not os.environ.get("VITALGATE_KEEP_SERVICES"):
            shutil.rmtree(pg_dir, ignore_errors=True)
