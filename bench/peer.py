"""``make bench-peer``: the stress load through a Node-RED MQTT -> PostgreSQL flow, beside the gateway.

The peer is what users would build instead: Node-RED 4 (Node-RED 5 needs Node.js 22) with
an ``mqtt in`` node (QoS 1, persistent session, JSON) wired to a ``function`` node that
writes each message's readings with the ``pg`` package (Node-RED's
``functionExternalModules``; ``node-red-contrib-postgresql`` is not in the registry reachable
here): one multi-row ``INSERT`` into ``readings`` per message, from a pool of 10
connections, as fast as messages arrive. It stores readings only: no provenance row, no
dedupe, no checks, no alerts, and it acknowledges each message when it arrives, not when
it is stored, so a failed INSERT is a lost message.

Both get the same load in the same run, on the same throwaway PostgreSQL+TimescaleDB and
mosquitto: the stress scenario of ``bench.e2e`` (pulse oximeters, 10 numeric readings per
envelope, flat out), JSON only (the flow has no MessagePack decoder). The gateway runs
first (``live`` mode), then Node-RED, each against a fresh database. Node-RED is given
``--peer-timeout`` seconds after the publishers finish; its figures are what it had stored
by then: rows stored vs published, the rate over its commit window, its peak resident
memory and the errors its log shows. The ratio is Node-RED / gateway, committed readings/s.

``make bench-peer`` installs Node-RED and ``pg`` with npm into ``bench/.peer/`` (ignored by
git) and runs ``python -m bench.peer``; results go to ``bench/results/<stamp>-peer.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import asyncpg

from bench import e2e
from bench.common import forget_mqtt_session, git_revision, machine_info
from bench.fleet import Fleet
from tests.harness import REPO, cpu_seconds, free_port, rss_mib

PEER_DIR = REPO / "bench" / ".peer"
RED_JS = PEER_DIR / "node_modules" / "node-red" / "red.js"

FUNCTION = r"""
let pool = global.get('vg_pool');
if (!pool) {
    pool = new pg.Pool({ connectionString: env.get('VG_DSN'), max: 10 });
    pool.on('error', (err) => node.warn('pool: ' + err.message));
    global.set('vg_pool', pool);
}
const p = msg.payload;
const rows = [];
const params = [];
for (const n of (p.numerics || [])) {
    const t = new Date(n.t);
    for (const [m, v] of Object.entries(n.values)) {
        const i = params.length;
        rows.push(`($${i + 1}, $${i + 2}, $${i + 3}, $${i + 4}, 0, 0)`);
        params.push(t, p.device_id, m, v);
    }
}
if (rows.length) {
    pool.query('INSERT INTO readings (time, device_id, metric, value, flags, ingest_id) VALUES ' + rows.join(', '),
               params)
        .then(() => node.done())
        .catch((err) => node.error('insert failed: ' + err.message, msg));
}
return null;
"""


def flows(mqtt_port: int, client_id: str) -> list[dict[str, Any]]:
    return [
        {"id": "vgtab", "type": "tab", "label": "vitalgate peer bench"},
        {"id": "vgbroker", "type": "mqtt-broker", "name": "bench", "broker": "127.0.0.1", "port": str(mqtt_port),
         "clientid": client_id, "autoConnect": True, "usetls": False, "protocolVersion": "4", "keepalive": "60",
         "cleansession": False, "autoUnsubscribe": True, "birthTopic": "", "closeTopic": "", "willTopic": ""},
        {"id": "vgin", "type": "mqtt in", "z": "vgtab", "name": "telemetry", "topic": "devices/+/telemetry", "qos": "1",
         "datatype": "json", "broker": "vgbroker", "nl": False, "rap": True, "rh": 0, "inputs": 0, "x": 150, "y": 80,
         "wires": [["vgfn"]]},
        {"id": "vgfn", "type": "function", "z": "vgtab", "name": "insert readings", "func": FUNCTION, "outputs": 0,
         "timeout": 0, "noerr": 0, "initialize": "", "finalize": "", "libs": [{"var": "pg", "module": "pg"}],
         "x": 380, "y": 80, "wires": []},
    ]


SETTINGS = """module.exports = {
    flowFile: 'flows.json',
    credentialSecret: false,
    uiPort: %d,
    uiHost: '127.0.0.1',
    functionExternalModules: true,
    externalModules: { modules: { allowInstall: false } },
    logging: { console: { level: 'warn', metrics: false, audit: false } },
    editorTheme: { projects: { enabled: false } },
};
"""


class NodeRed:
    def __init__(self, work: Path, dsn: str, mqtt_port: int) -> None:
        self.work = work
        self.client_id = f"nodered-bench-{os.getpid()}"
        self.port = free_port()
        (PEER_DIR / "flows.json").write_text(json.dumps(flows(mqtt_port, self.client_id), indent=1))
        (PEER_DIR / "settings.js").write_text(SETTINGS % self.port)
        self.log_path = work / "node-red.log"
        self.env = {**os.environ, "VG_DSN": dsn, "NODE_OPTIONS": "--max-old-space-size=4096"}
        self.proc: Any = None

    def start(self, timeout: float = 60.0) -> None:
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(["node", str(RED_JS), "--userDir", str(PEER_DIR), "--settings",
                                      str(PEER_DIR / "settings.js")], cwd=PEER_DIR, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Node-RED exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/flows", timeout=1).read()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"Node-RED not up after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def errors(self) -> int:
        return sum(1 for line in self.log_path.read_text(errors="replace").splitlines() if "[error]" in line)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


async def _peer_run(cfg: e2e.E2EConfig, pg: Any, mq: Any, work: Path, timeout_s: float) -> dict[str, Any]:
    from gateway.sinks.schema import migrate

    dsn = pg.create_database("bench_peer")
    conn = await asyncpg.connect(dsn)
    red = NodeRed(work, dsn, mq.port)
    result: dict[str, Any] = {"peer": "Node-RED mqtt in -> function (pg) -> PostgreSQL"}
    try:
        await migrate(conn)
        red.start()
        # Subscribed (the session exists) before anything is published.
        for _ in range(100):
            if "Connected to broker" in red.log_path.read_text(errors="replace"):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        versions = subprocess.run(["node", "-e", "console.log(require('node-red/package.json').version + ' ' + "
                                   "require('pg/package.json').version + ' ' + process.version)"],
                                  cwd=PEER_DIR, capture_output=True, text=True).stdout.split()
        result["versions"] = dict(zip(("node-red", "pg", "node"), versions))
        fleet = Fleet(e2e._stress_fleet_config(cfg, mq.url, "bench-peer"))
        await asyncio.to_thread(fleet.start)
        samples: list[dict[str, float]] = []
        t0 = time.monotonic()
        t_pub_end: float | None = None
        last_print = 0.0
        while True:
            n = int(await conn.fetchval("SELECT count(*) FROM readings"))
            now = time.monotonic()
            samples.append({"t": now - t0, "rows": n, "rss_mib": rss_mib(red.proc.pid) or 0.0,
                            "cpu_s": cpu_seconds(red.proc.pid)})
            if now - last_print >= 1.0:
                st = fleet.stats()
                print(f"  peer t={now - t0:5.0f}s published {st.acked_readings:,} readings, stored {n:,}, Node-RED "
                      f"RSS {samples[-1]['rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
                last_print = now
            if t_pub_end is None and fleet.done():
                fleet.join(1)
                t_pub_end = now
            st = fleet.stats()
            if t_pub_end is not None and (n >= st.published_readings or now - t_pub_end > timeout_s):
                break
            if red.proc.poll() is not None:
                result["exited"] = red.proc.returncode
                break
            await asyncio.sleep(0.5)
        fleet.kill()
        st = fleet.stats()
        stored = samples[-1]["rows"]
        moving = [s for a, s in zip(samples, samples[1:]) if s["rows"] > a["rows"]]
        t_first = next((a["t"] for a, s in zip(samples, samples[1:]) if s["rows"] > a["rows"]), 0.0)
        t_last = moving[-1]["t"] if moving else 0.0
        result.update({
            "published_readings": st.published_readings, "published_envelopes": st.published,
            "publish_rate_envelopes_per_s": st.published / max(1e-9, (t_pub_end or t0) - t0),
            "stored_readings": stored, "lost_readings": st.published_readings - stored,
            "complete": stored == st.published_readings,
            "commit_window_s": t_last - t_first,
            "readings_per_s": stored / (t_last - t_first) if t_last > t_first else None,
            "peak_rss_mib": max(s["rss_mib"] for s in samples), "cpu_s": samples[-1]["cpu_s"],
            "log_errors": red.errors(), "log_tail": red.log_tail(15),
            "waited_after_publishing_s": timeout_s, "samples": samples[::2],
        })
        return result
    finally:
        red.stop()
        await conn.close()
        try:
            forget_mqtt_session(mq.url, red.client_id)
        except OSError:
            pass


async def run(readings: int, timeout_s: float) -> dict[str, Any]:
    cfg = e2e.E2EConfig(readings=readings, encoding="json", modes=["live"], bare_subscriber=False, raw_repeats=1)
    pg, mq, work = e2e.make_services()
    results: dict[str, Any] = {"bench": "peer", "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                               "git": git_revision(), "machine": machine_info(),
                               "config": {"readings": readings, "envelopes": cfg.envelopes, "encoding": "json",
                                          "peer_timeout_s": timeout_s}}
    try:
        pg.start()
        mq.start()
        print(f"=== gateway: {readings:,} readings, JSON, flat out ===", file=sys.stderr, flush=True)
        gw = await e2e.run(cfg, (pg, mq, work))
        e2e.print_table(gw, out=sys.stderr)
        results["gateway"] = gw
        print(f"\n=== Node-RED: the same load (up to {timeout_s:.0f} s after publishing) ===", file=sys.stderr,
              flush=True)
        try:
            results["node_red"] = await _peer_run(cfg, pg, mq, work, timeout_s)
        except Exception as exc:  # noqa: BLE001 - reported
            results["node_red"] = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        e2e.stop_services(pg, mq, work)
    g = (gw.get("runs") or [{}])[0]
    nr = results["node_red"]
    if g.get("window") and nr.get("readings_per_s"):
        results["ratio_node_red_to_gateway"] = nr["readings_per_s"] / g["window"]["readings_per_s"]
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--readings", type=int, default=1_000_000)
    ap.add_argument("--peer-timeout", type=float, default=90.0,
                    help="seconds Node-RED gets after the publishers finish (default %(default)s)")
    a = ap.parse_args(argv)
    if not RED_JS.exists():
        print(f"{RED_JS} is missing: run make bench-peer (npm install into bench/.peer)", file=sys.stderr)
        return 2
    results = asyncio.run(run(a.readings, a.peer_timeout))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = e2e.RESULTS_DIR / f"{stamp}-peer.json"
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    g = results["gateway"]["runs"][0]
    nr = results["node_red"]
    print("\npeer comparison, same load (pulse oximeters, 10 readings per envelope, JSON, flat out):")
    if "window" in g:
        print(f"  gateway : {g['committed']['readings']:,} of {g['published']['published_readings']:,} readings stored, "
              f"{g['window']['readings_per_s']:,.0f} readings/s, zero loss {'yes' if g['zero_loss'] else 'NO'}, "
              f"peak RSS {g['gateway_peak_rss_mib']:.0f} MiB")
    if "error" in nr:
        print(f"  Node-RED: FAILED: {nr['error']}")
    else:
        print(f"  Node-RED: {nr['stored_readings']:,} of {nr['published_readings']:,} readings stored "
              f"({nr['lost_readings']:,} lost) within {nr['waited_after_publishing_s']:.0f} s after publishing, "
              f"{_rate(nr['readings_per_s'])} readings/s over {nr['commit_window_s']:.1f} s, peak RSS "
              f"{nr['peak_rss_mib']:.0f} MiB, {nr['log_errors']:,} errors logged")
    if "ratio_node_red_to_gateway" in results:
        print(f"  ratio Node-RED / gateway, committed readings/s: {results['ratio_node_red_to_gateway']:.2f}")
    print(f"results: {os.path.relpath(path, Path.cwd())}")
    return 0


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


if __name__ == "__main__":
    sys.exit(main())
