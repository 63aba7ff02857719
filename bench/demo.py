"""``make demo``: a simulated ward streaming into vitalgate on this machine's own services.

Uses the machine's PostgreSQL (127.0.0.1:5432, user postgres) and Mosquitto
(127.0.0.1:1883), starting them if they are not running. The database
``vitalgate_demo`` is **dropped and created afresh at every run** (so a schema change
never meets old tables); it stays after the demo for you to query.

Steps: start ``vitalgate run`` as a subprocess (gateway id ``demo``, a new MQTT client id
per run, a free metrics port), wait until it has subscribed, run a fleet of a few hundred
simulated devices (mostly pulse oximeters and patient monitors, which send one envelope
per second; the other device types report at their profiles' intervals, a thermometer
once a minute; JSON and MessagePack mixed; a few deliberately malformed payloads) for
``--seconds``, printing one progress line per second; then stop the fleet, wait until
everything published is committed, stop the gateway with SIGTERM (exit code 0 expected)
and print a summary with example queries. At the end the gateway's persistent MQTT
session is removed from the broker, which would otherwise queue telemetry for it forever.

With ``--keep`` (``make demo KEEP=1``) the fleet and the gateway run until Ctrl-C instead,
and the central-station page is served: the demo prints its URL (plain HTTP on 127.0.0.1)
and a ``telemetry:read`` API key, having put the first monitors and oximeters in beds of
ward ``ICU-A/``; Ctrl-C then drains and summarises as above.

Exit code 0 when everything published was committed (or quarantined) and the gateway
exited cleanly; 1 otherwise, with the reason and the tail of the gateway's log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import forget_mqtt_session
from bench.fleet import Fleet, FleetConfig, device_id
from tests.harness import PROFILES, REPO, CliError, GatewayProcess, free_port, vitalgate

DB = "vitalgate_demo"
PG_HOST, PG_PORT = "127.0.0.1", 5432
MQTT_HOST, MQTT_PORT = "127.0.0.1", 1883
ADMIN_DSN = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/postgres"
DEMO_DSN = f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{DB}"
MQTT_URL = f"mqtt://{MQTT_HOST}:{MQTT_PORT}"
PG_START = ["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "start"]
PG_RESTART = ["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "restart"]
MOSQUITTO_START = ["mosquitto", "-d", "-c", "/etc/mosquitto/mosquitto.conf"]
WORKDIR = REPO / ".demo"

# Mostly pulse oximeters and patient monitors; a few of every other shipped device type.
MIX = {
    "pulse_oximeter": 0.45, "patient_monitor": 0.30, "ventilator": 0.05, "nibp_cuff": 0.04, "infusion_pump": 0.05,
    "thermometer": 0.04, "cgm": 0.04, "weight_scale": 0.03,
}


class DemoError(Exception):
    """A step failed; the message says which and why."""


def _say(msg: str) -> None:
    print(msg, flush=True)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _wait_port(host: str, port: int, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not _port_open(host, port):
        if time.monotonic() > deadline:
            raise DemoError(f"{what} is not accepting connections on {host}:{port} after {timeout:.0f} s")
        time.sleep(0.2)


def _run(cmd: list[str], what: str) -> None:
    _say(f"Starting {what}: {' '.join(cmd)}")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DemoError(f"could not start {what}: {exc}") from exc
    if r.returncode != 0:
        raise DemoError(f"could not start {what} ({' '.join(cmd)} exited {r.returncode}):\n{r.stderr.strip()}")


def register_fleet(fleet: Fleet, workdir: Path) -> int:
    """Migrate the demo database and register every simulated device (``vitalgate devices import``),
    so that the gateway runs as in a hospital: registered devices only."""
    csv = workdir / "devices.csv"
    rows = [f"{device_id(p, n)},{p}" for p in sorted(fleet.per_profile) for n in range(1, fleet.per_profile[p] + 1)]
    csv.write_text("device_id,profile\n" + "\n".join(rows) + "\n")
    for args in (["db", "migrate"], ["devices", "import", str(csv), "--no-tokens"]):
        try:
            vitalgate(DEMO_DSN, *args, timeout=120)
        except CliError as exc:
            raise DemoError(str(exc)) from None
    return len(rows)


def open_station(fleet: Fleet, http_port: int, beds: int = 24) -> str:
    """Keys for the page (read) and for placing devices in beds (admin); the first ``beds``
    monitors and oximeters go to ``ICU-A/Bed NN``. Returns the read key."""
    keys = {}
    for name, scope in (("central-station", "telemetry:read"), ("demo-admin", "admin")):
        try:
            keys[scope] = vitalgate(DEMO_DSN, "keys", "add", name, "--scope", scope, timeout=60).strip()
        except CliError as exc:
            raise DemoError(str(exc)) from None
    devices = [device_id(p, n) for p in ("patient_monitor", "pulse_oximeter") for n in range(1, fleet.per_profile.get(p, 0) + 1)]
    for bed, dev in enumerate(devices[:beds], start=1):
        body = {"device_id": dev, "patient_ref": f"PT-{1000 + bed}", "location": f"ICU-A/Bed {bed:02d}"}
        req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/associations", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {keys['admin']}",
                                              "Content-Type": "application/json"}, method="POST")
        try:
            urllib.request.urlopen(req, timeout=10).close()
        except OSError as exc:
            _say(f"Could not put {dev} in a bed ({exc}); the page shows it under all locations.")
            break
    return keys["telemetry:read"]


def ensure_services() -> None:
    """Start the machine's PostgreSQL and Mosquitto if they are not running."""
    if not _port_open(PG_HOST, PG_PORT):
        _run(PG_START, "PostgreSQL")
        _wait_port(PG_HOST, PG_PORT, "PostgreSQL")
    if not _port_open(MQTT_HOST, MQTT_PORT):
        _run(MOSQUITTO_START, "Mosquitto")
        _wait_port(MQTT_HOST, MQTT_PORT, "Mosquitto")


async def _connect(dsn: str, timeout: float = 30.0) -> asyncpg.Connection:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncpg.connect(dsn, timeout=5)
        except (OSError, asyncpg.CannotConnectNowError, asyncpg.PostgresConnectionError) as exc:
            if time.monotonic() > deadline:
                raise DemoError(f"cannot connect to PostgreSQL at {PG_HOST}:{PG_PORT}: {exc}") from exc
            await asyncio.sleep(0.3)


async def prepare_database() -> None:
    """TimescaleDB preloaded (enabling it once if needed), then a fresh ``vitalgate_demo``."""
    conn = await _connect(ADMIN_DSN)
    try:
        available = await conn.fetchval("SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'")
        if not available:
            raise DemoError("TimescaleDB is not installed for this PostgreSQL: run `make setup` first")
        preload = await conn.fetchval("SHOW shared_preload_libraries")
        libs = [x.strip() for x in preload.split(",") if x.strip()]
        if "timescaledb" not in libs:
            value = ",".join([*libs, "timescaledb"])
            _say(f"PostgreSQL does not preload TimescaleDB: setting shared_preload_libraries = '{value}' "
                 "(ALTER SYSTEM) and restarting it, once.")
            await conn.execute(f"ALTER SYSTEM SET shared_preload_libraries = '{value}'")
            await conn.close()
            _run(PG_RESTART, "PostgreSQL (restart)")
            conn = await _connect(ADMIN_DSN)
        await conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {DB}")
    finally:
        await conn.close()


async def _counts(conn: asyncpg.Connection) -> dict[str, int]:
    try:
        row = await conn.fetchrow(
            """SELECT (SELECT count(*) FROM ingests) AS ingests,
                      (SELECT count(*) FROM readings) AS readings,
                      (SELECT count(*) FROM rejected) AS rejected"""
        )
    except asyncpg.UndefinedTableError:
        return {"ingests": 0, "readings": 0, "rejected": 0}
    return dict(row)


def _line(elapsed: float, pub: Any, c: dict[str, int], rate: float, rrate: float) -> str:
    return (
        f"[{elapsed:5.1f}s] published {pub.published:,} (acked {pub.acked:,}) | committed {c['ingests']:,} envelopes, "
        f"{c['readings']:,} readings | rejected {c['rejected']:,} | {rate:,.0f} envelopes/s, {rrate:,.0f} readings/s"
    )


async def _summary(conn: asyncpg.Connection, seconds: float) -> dict[str, Any]:
    s: dict[str, Any] = {}
    s["ingests"] = await conn.fetchval("SELECT count(*) FROM ingests")
    s["readings"] = await conn.fetchval("SELECT count(*) FROM readings")
    s["flagged"] = await conn.fetchval("SELECT count(*) FROM readings WHERE flags <> 0")
    s["blocks"] = await conn.fetchval("SELECT count(*) FROM waveform_blocks")
    s["samples"] = await conn.fetchval("SELECT coalesce(sum(cardinality(samples)), 0) FROM waveform_blocks")
    s["rejected"] = await conn.fetchval("SELECT count(*) FROM rejected")
    s["reasons"] = await conn.fetch(
        "SELECT reason, count(*) AS n FROM rejected GROUP BY reason ORDER BY n DESC, reason LIMIT 3"
    )
    s["alerts"] = await conn.fetchval("SELECT count(*) FROM alerts")
    s["alerts_active"] = await conn.fetchval("SELECT count(*) FROM alerts WHERE cleared_at IS NULL")
    s["alert_rules"] = await conn.fetch(
        "SELECT rule, priority, count(*) AS n FROM alerts GROUP BY rule, priority ORDER BY n DESC, rule LIMIT 5"
    )
    s["profiles"] = await conn.fetch("SELECT profile, count(*) AS n FROM ingests GROUP BY profile ORDER BY n DESC")
    s["encodings"] = await conn.fetch("SELECT encoding, count(*) AS n FROM ingests GROUP BY encoding ORDER BY encoding")
    s["tables"] = await conn.fetch(
        """SELECT relname, n_live_tup FROM pg_stat_user_tables
           WHERE relname IN ('ingests', 'alerts', 'rejected') ORDER BY relname"""
    )
    s["seconds"] = seconds
    return s


def _print_summary(s: dict[str, Any], pub: Any) -> None:
    psql = f"psql -h {PG_HOST} -U postgres -d {DB}"
    rate_env = s["ingests"] / s["seconds"] if s["seconds"] else 0
    rate_read = s["readings"] / s["seconds"] if s["seconds"] else 0
    _say("")
    _say("=== vitalgate demo: summary ===")
    profiles = ", ".join(f"{r['profile']} {r['n']:,}" for r in s["profiles"])
    encodings = ", ".join(f"{r['encoding']} {r['n']:,}" for r in s["encodings"])
    _say(f"Envelopes committed   {s['ingests']:,} of {pub.published:,} published ({profiles})")
    _say(f"Encodings             {encodings}")
    _say(f"Numeric readings      {s['readings']:,} ({s['flagged']:,} carry a quality flag)")
    _say(f"Waveform samples      {s['samples']:,} in {s['blocks']:,} blocks")
    _say(f"Rejected (quarantine) {s['rejected']:,} of {pub.published_malformed:,} malformed payloads sent")
    for r in s["reasons"]:
        _say(f"    {r['n']:>4} x {r['reason']}")
    _say(f"Alerts opened         {s['alerts']:,} ({s['alerts_active']:,} still active)")
    for r in s["alert_rules"]:
        _say(f"    {r['n']:>4} x {r['rule']} ({r['priority']})")
    rows = s["readings"] + s["blocks"] + sum(r["n_live_tup"] for r in s["tables"])
    _say(f"Rows in the database  {rows:,} (readings {s['readings']:,}, waveform_blocks {s['blocks']:,}, "
         + ", ".join(f"{r['relname']} {r['n_live_tup']:,}" for r in s["tables"]) + ")")
    _say(f"Rate                  {rate_env:,.0f} envelopes/s, {rate_read:,.0f} readings/s, "
         f"{s['samples'] / s['seconds'] if s['seconds'] else 0:,.0f} waveform samples/s over {s['seconds']:.0f} s")
    _say("")
    _say("Try (the database stays until the next `make demo`):")
    _say(f"  # latest vitals of one patient monitor\n  {psql} -c \"SELECT time, metric, value, flags FROM readings "
         "WHERE device_id = 'pm-000001' ORDER BY time DESC, metric LIMIT 12\"")
    _say(f"  # SpO2 of the whole ward in 5-second buckets\n  {psql} -c \"SELECT time_bucket('5 seconds', time) AS t, "
         "round(avg(value)::numeric, 1) AS avg_spo2, min(value) AS min_spo2, count(DISTINCT device_id) AS devices "
         "FROM readings WHERE metric = 'spo2' AND flags = 0 GROUP BY t ORDER BY t\"")
    _say(f"  # alert episodes, most recent first\n  {psql} -c \"SELECT device_id, rule, priority, opened_at, cleared_at, "
         "trigger_value FROM alerts ORDER BY opened_at DESC LIMIT 10\"")


async def demo(args: argparse.Namespace) -> int:
    ensure_services()
    await prepare_database()
    WORKDIR.mkdir(exist_ok=True)
    log = WORKDIR / "gateway.log"
    if log.exists():
        shutil.move(log, WORKDIR / "gateway.previous.log")
    client_id = f"vitalgate-demo-{uuid.uuid4().hex[:8]}"
    http_port = free_port()
    # --keep serves the central-station page: plain HTTP, bound to this machine only
    page_env = {"VITALGATE_HTTP_ENABLED": "true", "VITALGATE_HTTP_PORT": str(http_port),
                "VITALGATE_HTTP_ALLOW_PLAINTEXT": "true"} if args.keep else {}
    gw = GatewayProcess(
        log, database_url=DEMO_DSN, mqtt_url=MQTT_URL, client_id=client_id, gateway_id="demo",
        profiles_dir=PROFILES, metrics_port=free_port(),
        env={"VITALGATE_LOG_LEVEL": "INFO", "VITALGATE_AUTH_REQUIRE_REGISTRATION": "true", **page_env},
    )
    fleet: Fleet | None = None
    conn: asyncpg.Connection | None = None
    try:
        from gateway.profiles import load_profiles

        shipped = load_profiles(PROFILES)
        mix = {p: w for p, w in MIX.items() if p in shipped}
        cfg = FleetConfig(
            url=MQTT_URL, profiles_dir=str(PROFILES), devices=args.devices, mix=mix,
            processes=args.processes, interval_s=1.0, seconds=None, encoding="mixed", mqtt_version="5", client="paho",
            malformed=args.malformed, seed=int(time.time()) % 100_000, client_id_prefix="demo",
        )
        fleet = Fleet(cfg)
        registered = await asyncio.to_thread(register_fleet, fleet, WORKDIR)
        _say(f"Registered {registered} devices (vitalgate devices import; the gateway refuses any other device).")
        _say(f"Starting the gateway (log: {log.relative_to(REPO)}, metrics: http://127.0.0.1:{gw.metrics_port}/metrics)")
        gw.spawn()
        try:
            ready = await asyncio.to_thread(gw.wait_ready, 90.0)
        except (RuntimeError, TimeoutError) as exc:
            raise DemoError(str(exc)) from None
        _say(f"Gateway subscribed after {ready:.1f} s. Fleet: {cfg.devices} devices ("
             + ", ".join(f"{p} {n}" for p, n in fleet.per_profile.items())
             + f"), each device reporting at its profile's intervals (oximeters and monitors every second), "
             f"for {args.seconds:.0f} s.")
        conn = await _connect(DEMO_DSN)
        if args.keep:  # Ctrl-C is for this process (and the gateway, which drains on it), not the publishers
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        await asyncio.to_thread(fleet.start)
        interrupted = asyncio.Event()
        if args.keep:
            key = await asyncio.to_thread(open_station, fleet, http_port)
            _say(f"\nCentral station: http://127.0.0.1:{http_port}/ui/?ward=ICU-A/\nAPI key (telemetry:read): {key}\n"
                 "Running until Ctrl-C.\n")
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, interrupted.set)
        t0 = time.monotonic()
        prev = (t0, 0, 0)
        tty = sys.stdout.isatty()
        while True:
            await asyncio.sleep(1.0)
            if interrupted.is_set():
                break
            fleet.check()
            if not gw.alive():
                raise DemoError(f"the gateway exited with code {gw.proc.returncode} during the demo")
            now = time.monotonic()
            c = await _counts(conn)
            pub = fleet.stats()
            rate = (c["ingests"] - prev[1]) / (now - prev[0])
            rrate = (c["readings"] - prev[2]) / (now - prev[0])
            prev = (now, c["ingests"], c["readings"])
            line = _line(now - t0, pub, c, rate, rrate)
            print(("\r" + line + "\x1b[K") if tty else line, end="" if tty else "\n", flush=True)
            if not args.keep and now - t0 >= args.seconds:
                break
        if tty:
            print()
        if args.keep:
            return await _stop_kept(gw, fleet, conn, t0)
        fleet.stop()
        if not await asyncio.to_thread(fleet.join, 60.0):
            raise DemoError("the fleet did not stop within 60 s")
        pub = fleet.stats()
        if pub.acked != pub.published or pub.acked_malformed != pub.published_malformed:
            raise DemoError(f"the broker acknowledged {pub.acked:,} of {pub.published:,} envelopes")
        _say(f"Fleet stopped: {pub.published:,} envelopes and {pub.published_malformed:,} malformed payloads "
             "published and acknowledged by the broker. Waiting for the gateway to commit them all ...")
        deadline = time.monotonic() + args.drain_timeout
        while True:
            c = await _counts(conn)
            if c["ingests"] >= pub.published and c["rejected"] >= pub.published_malformed:
                break
            if not gw.alive():
                raise DemoError(f"the gateway exited with code {gw.proc.returncode} while draining")
            if time.monotonic() > deadline:
                raise DemoError(
                    f"after {args.drain_timeout:.0f} s only {c['ingests']:,} of {pub.published:,} envelopes are committed "
                    f"and {c['rejected']:,} of {pub.published_malformed:,} malformed payloads quarantined"
                )
            await asyncio.sleep(0.2)
        elapsed = time.monotonic() - t0
        _say("All committed. Stopping the gateway (SIGTERM) ...")
        code = await asyncio.to_thread(gw.stop, 60.0)
        if code != 0:
            raise DemoError(f"the gateway exited with code {code} after SIGTERM (expected 0)")
        _say("Gateway exited with code 0.")
        s = await _summary(conn, elapsed)
        _print_summary(s, pub)
        lost = pub.published - s["ingests"]
        if lost or s["rejected"] != pub.published_malformed:
            _say(f"\nMISMATCH: {lost:,} envelopes published but not committed; {s['rejected']:,} rejected for "
                 f"{pub.published_malformed:,} malformed sent.")
            return 1
        return 0
    except DemoError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        if gw.proc is not None:
            print(f"--- last lines of {log} ---\n{gw.log_tail(40)}", file=sys.stderr)
        return 1
    finally:
        if fleet is not None:
            fleet.kill()
        gw.kill()
        if conn is not None:
            await conn.close()
        try:
            forget_mqtt_session(MQTT_URL, client_id)
        except OSError:
            pass


async def _stop_kept(gw: GatewayProcess, fleet: Fleet, conn: asyncpg.Connection, t0: float) -> int:
    """After Ctrl-C with --keep: the gateway got it too (same terminal) and drains by itself;
    it gets SIGTERM only if it did not. What the fleet published meanwhile stays unread."""
    asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
    fleet.stop()
    if not await asyncio.to_thread(fleet.join, 60.0):
        raise DemoError("the fleet did not stop within 60 s")
    try:
        code = await asyncio.to_thread(gw.proc.wait, 10.0)
    except subprocess.TimeoutExpired:
        code = await asyncio.to_thread(gw.stop, 60.0)
    if code != 0:
        raise DemoError(f"the gateway exited with code {code} after Ctrl-C (expected 0)")
    _say("Gateway drained and exited with code 0.")
    _print_summary(await _summary(conn, time.monotonic() - t0), fleet.stats())
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="how long the fleet runs (default %(default)s)")
    ap.add_argument("--devices", type=int, default=300, help="simulated devices (default %(default)s)")
    ap.add_argument("--processes", type=int, default=2, help="publisher processes (default %(default)s)")
    ap.add_argument("--malformed", type=float, default=0.003,
                    help="probability per envelope of an extra malformed payload (default %(default)s)")
    ap.add_argument("--drain-timeout", type=float, default=60.0, help="seconds to wait for the last commits")
    ap.add_argument("--keep", action="store_true",
                    help="serve the central-station page and run until Ctrl-C (prints its URL and an API key)")
    args = ap.parse_args(argv)
    try:
        return asyncio.run(demo(args))
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
