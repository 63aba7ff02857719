"""HL7 feed bench: messages/s to a local MLLP listener, and the outbox's cost on the stress rate.

Two figures, one run, throwaway PostgreSQL and mosquitto (``bench.e2e.make_services``), the
listener ``tests/hl7_listener.py`` as its own process (the EHR, ACKing AA):

1. **Sender rate**: ``--messages`` alarm rows (PCD-04, the larger message) are put in the
   outbox of a fresh database for 100 patients, then the feed (``gateway.hl7.feed.Feed``, in
   this process) renders, sends and settles them all; messages/s = rows / time to the last
   one settled. One MLLP conversation, each message waits for its ACK.
2. **Outbox cost**: the e2e ``live`` stress scenario twice on the same services, the feed
   off, then on (every fleet device associated with a patient: alarms written to the outbox
   in the alert events' transactions, numerics every ``--cadence-s`` by the job, the sender
   running); committed readings/s of each and the ratio on/off.

    python -m bench.hl7 [--messages 2000] [--readings 60000] [--cadence-s 1]

Measured on the shared 2-core machine, load average 11-15 from other work (two runs):
sender 48 and 89 messages/s; stress with the feed on / off 20,157 / 25,602 readings/s (0.79)
and 13,014 / 10,671 (1.22): the ratio is inside the noise of this machine. The fleet lays its
readings up to 45 s ahead of the wall clock, so the numerics job runs but finds no completed
period with readings during the stress window (its cost is the query, not the rows).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench import e2e
from bench.fleet import Fleet
from gateway.config import Hl7Config
from gateway.hl7.feed import Feed
from gateway.metrics import Metrics
from gateway.profiles import load_profiles
from gateway.sinks.schema import migrate
from tests.harness import PROFILES, REPO, free_port


class _Listener:
    def __init__(self, out: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.hl7_listener", "--port", str(self.port),
                                      "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().startswith("listening")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


_FILL = """
INSERT INTO hl7_outbox (kind, patient_ref, location, alert_id, phase, body)
SELECT 'alarm', 'P' || (i % 100), 'ICU-' || (i % 100), i / 2, CASE i % 2 WHEN 0 THEN 'start' ELSE 'end' END,
       jsonb_build_object('device_id', 'po-' || (i % 100), 'rule', 'spo2_low', 'metric', 'spo2', 'priority', 'high',
                          'value', 85, 'at', 1764187200000 + i, 'opened_at', 1764187200000, 'alert_id', i / 2,
                          'phase', CASE i % 2 WHEN 0 THEN 'start' ELSE 'end' END, 'profile', 'pulse_oximeter')
FROM generate_series(0, $1 - 1) AS i
"""


async def sender_rate(dsn: str, port: int, messages: int) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        await conn.execute(_FILL, messages)
        cfg = Hl7Config(enabled=True, port=port, numerics="off", poll_s=0.01)
        stop = asyncio.Event()
        feed = Feed(conn, cfg, load_profiles(PROFILES), Metrics())
        watch = await asyncpg.connect(dsn)
        t0 = time.perf_counter()
        task = asyncio.create_task(feed.run(stop))
        try:
            while True:  # the outbox is the condition: every row settled
                await asyncio.sleep(0.05)
                if task.done():
                    task.result()
                if not await watch.fetchval("SELECT count(*) FROM hl7_outbox WHERE status <> 'sent'"):
                    break
            elapsed = time.perf_counter() - t0
        finally:
            stop.set()
            await task
            await watch.close()
    finally:
        await conn.close()
    return {"messages": messages, "seconds": elapsed, "messages_per_s": messages / elapsed}


class _Associated:
    """The e2e services' PostgreSQL, with every fleet device associated in each new database."""

    def __init__(self, pg: Any, devices: list[str]) -> None:
        self._pg, self._devices = pg, devices

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pg, name)

    def create_database(self, name: str) -> str:
        dsn = self._pg.create_database(name)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # this thread's loop runs the bench
            pool.submit(asyncio.run, self._seed(dsn)).result()
        return dsn

    async def _seed(self, dsn: str) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
            await conn.execute("INSERT INTO associations (device_id, patient_ref, location, started_at)"
                               " SELECT d, 'P-' || d, 'WARD-1', now() - interval '1 day' FROM unnest($1::text[]) d",
                               self._devices)
        finally:
            await conn.close()


async def outbox_cost(readings: int, port: int, cadence_s: int, services: tuple[Any, Any, Path]) -> dict[str, Any]:
    pg, mq, work = services
    cfg = e2e.E2EConfig(readings=readings, modes=["live"], bare_subscriber=False)
    devices = Fleet(e2e._stress_fleet_config(cfg, mq.url, "hl7")).device_ids
    off = await e2e._run_mode("live", cfg, pg, mq, work)
    cfg.gateway_env = {"VITALGATE_HL7_ENABLED": "true", "VITALGATE_HL7_PORT": str(port),
                       "VITALGATE_HL7_CADENCE_S": str(cadence_s), "VITALGATE_HL7_DELAY_S": "0.5"}
    on = await e2e._run_mode("live_hl7", cfg, _Associated(pg, devices), mq, work)
    conn = await asyncpg.connect(pg.dsn(on["database"]))
    try:
        outbox = dict(await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE kind = 'alarm') AS alarms, count(*) FILTER (WHERE kind = 'numerics')"
            " AS numerics, count(*) FILTER (WHERE status = 'sent') AS sent FROM hl7_outbox"))
    finally:
        await conn.close()
    r_off, r_on = off["window"]["readings_per_s"], on["window"]["readings_per_s"]
    return {"devices": len(devices), "readings": readings, "cadence_s": cadence_s,
            "off_readings_per_s": r_off, "on_readings_per_s": r_on, "ratio_on_off": r_on / r_off,
            "alerts": on["committed"]["alerts"], "outbox": outbox,
            "zero_loss": off["zero_loss"] and on["zero_loss"]}


async def run(messages: int, readings: int, cadence_s: int) -> dict[str, Any]:
    pg, mq, work = e2e.make_services(True)
    pg.start()
    mq.start()
    listener = _Listener(work / "hl7-received.ndjson")
    try:
        print(f"hl7: sender, {messages:,} messages ...", file=sys.stderr)
        rate = await sender_rate(pg.create_database("bench_hl7_sender"), listener.port, messages)
        print(f"hl7: stress live, feed off then on, {readings:,} readings each ...", file=sys.stderr)
        cost = await outbox_cost(readings, listener.port, cadence_s, (pg, mq, work))
    finally:
        listener.close()
        e2e.stop_services(pg, mq, work)
    return {"sender": rate, "stress": cost}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hl7", description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=2000, help="alarm messages for the sender rate")
    ap.add_argument("--readings", type=int, default=60_000, help="readings per stress run (10 per envelope)")
    ap.add_argument("--cadence-s", type=int, default=1, help="numerics period during the stress run")
    a = ap.parse_args(argv)
    res = asyncio.run(run(a.messages, a.readings, a.cadence_s))
    s, c = res["sender"], res["stress"]
    print(f"sender: {s['messages']:,} PCD-04 messages in {s['seconds']:.2f} s = {s['messages_per_s']:,.0f} messages/s")
    print(f"stress live, {c['devices']} associated devices, numerics every {c['cadence_s']} s: "
          f"feed off {c['off_readings_per_s']:,.0f} readings/s, on {c['on_readings_per_s']:,.0f} readings/s, "
          f"ratio {c['ratio_on_off']:.2f}; outbox {c['outbox']} from {c['alerts']} alert episodes; "
          f"zero loss {c['zero_loss']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
