"""The live stream's cost and latency, on a throwaway gateway (HTTPS), PostgreSQL and TimescaleDB.

Same run, same gateway:
1. ``no clients``: a poster process sends envelopes of 10 readings, 50 per request, over
   4 keep-alive TLS connections, flat out for ``--seconds``; committed readings/s.
2. ``50 clients``: the same load while 50 stream clients watch the posted devices: 45
   read everything, 5 never read (a 4 KiB receive buffer, nothing read: the gateway must
   drop them, not wait). Committed readings/s and the gateway's peak RSS.
3. Latency, under the load of 2: a probe device's envelope is posted alone every 100 ms;
   the time from sending it to its event reaching a stream client is an upper bound of
   commit-to-client (the commit happens in between): p50, p99, max.

    python -m bench.stream [--seconds 20] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

DEVICES = [f"sb-{i:03d}" for i in range(100)]


def _poster(url: str, cafile: str, tokens: dict[str, str], seconds: float, out: mp.Queue) -> None:
    import ssl

    async def main() -> int:
        ctx = ssl.create_default_context(cafile=cafile)
        done = 0
        stop = time.monotonic() + seconds
        async with aiohttp.ClientSession(base_url=url, connector=aiohttp.TCPConnector(ssl=ctx, limit=4)) as s:
            async def worker(w: int) -> None:
                nonlocal done
                seq = 0
                while time.monotonic() < stop:
                    dev = DEVICES[(w * 7 + seq) % len(DEVICES)]
                    t0 = int(time.time() * 1000) - 60_000 + (seq % 50) * 10
                    envs = [{"v": 1, "device_id": dev, "seq": seq * 100 + k, "profile": "pulse_oximeter",
                             "numerics": [{"t": t0 + k * 11 + j, "values": {"spo2": 95 + j % 4}} for j in range(10)]}
                            for k in range(50)]
                    seq += 1
                    async with s.post("/v1/telemetry", data=orjson.dumps(envs), headers={
                            "Authorization": f"Bearer {tokens[dev]}", "Content-Type": "application/json"}) as r:
                        await r.read()
                        if r.status == 202:
                            done += 500
            await asyncio.gather(*(worker(w) for w in range(4)))
        return done

    out.put(asyncio.run(main()))


def _load(gw, seconds: float) -> float:
    q: mp.Queue = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=_poster, args=(gw.url, str(gw.workdir / "certs" / "server-ca.pem"),
                                                              gw.tokens, seconds, q))
    start = time.monotonic()
    p.start()
    n = q.get(timeout=seconds + 120)
    p.join()
    return n / (time.monotonic() - start)


async def _reader(gw, dev: str, seen: dict[str, float], stop: asyncio.Event) -> None:
    ctx = gw.ssl_context()
    async with aiohttp.ClientSession(base_url=gw.url, connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        async with s.get("/v1/stream", params={"device": dev}, headers={"Authorization": f"Bearer {gw.keys['read']}"},
                         timeout=aiohttp.ClientTimeout(total=None)) as r:
            while not stop.is_set():
                try:
                    line = await asyncio.wait_for(r.content.readline(), 1.0)
                except asyncio.TimeoutError:
                    continue
                if not line:
                    return
                if line.startswith(b"data: ") and b'"sb-probe"' in line:
                    for rd in orjson.loads(line[6:])["readings"]:
                        seen.setdefault(f"probe-{rd['t']}", time.monotonic())


def _stalled(gw, dev: str) -> socket.socket:
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", gw.port))
    s = gw.ssl_context().wrap_socket(raw, server_hostname="127.0.0.1")
    s.sendall(f"GET /v1/stream?device={dev} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {gw.keys['read']}\r\n\r\n"
              .encode())
    return s


async def run(seconds: float, workers: int) -> dict:
    from bench.common import rss_mib
    from tests.harness import HttpsGateway
    from tests.harness import PostgresCluster

    work = Path(tempfile.mkdtemp(prefix="vitalgate-bench-stream-"))
    pg = PostgresCluster(work / "pg")
    pg.start()
    probe = "sb-probe"
    gw = HttpsGateway(work / "gw", pg.create_database("bench_stream"), DEVICES + [probe], workers=workers,
                      settings={"VITALGATE_HTTP_RATE_LIMIT_PER_S": "100000", "VITALGATE_HTTP_RATE_LIMIT_BURST": "100000"})
    try:
        gw.start()
        base = _load(gw, seconds)
        stop = asyncio.Event()
        seen: dict[str, float] = {}
        readers = [asyncio.create_task(_reader(gw, DEVICES[i % len(DEVICES)], {}, stop)) for i in range(44)]
        readers.append(asyncio.create_task(_reader(gw, probe, seen, stop)))
        stalled = [_stalled(gw, DEVICES[i]) for i in range(5)]
        await asyncio.sleep(1.0)
        loop = asyncio.get_running_loop()
        load = loop.run_in_executor(None, _load, gw, seconds)
        sent: dict[str, float] = {}
        peak = 0.0
        async with aiohttp.ClientSession(base_url=gw.url, connector=aiohttp.TCPConnector(ssl=gw.ssl_context())) as s:
            end = time.monotonic() + seconds - 1
            i = 0
            while time.monotonic() < end:
                t = int(time.time() * 1000) + i
                env = {"v": 1, "device_id": probe, "seq": i, "profile": "pulse_oximeter",
                       "numerics": [{"t": t, "values": {"spo2": 97}}]}
                sent[f"probe-{t}"] = time.monotonic()
                async with s.post("/v1/telemetry", data=orjson.dumps(env), headers={
                        "Authorization": f"Bearer {gw.tokens[probe]}", "Content-Type": "application/json"}) as r:
                    await r.read()
                peak = max(peak, rss_mib(gw.proc.pid) or 0.0)
                i += 1
                await asyncio.sleep(0.1)
        with_clients = await load
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*readers, return_exceptions=True)
        dropped = gw.proc.log_text().count("Stream client disconnected")
        for st in stalled:
            st.close()
        lat = sorted(seen[k] - v for k, v in sent.items() if k in seen)
        return {
            "workers": workers, "seconds": seconds,
            "no_clients_readings_per_s": round(base), "with_50_clients_readings_per_s": round(with_clients),
            "ratio": round(with_clients / base, 3), "slow_clients_disconnected": dropped,
            "gateway_peak_rss_mib": round(peak, 1),
            "probe_events": len(lat), "probe_sent": len(sent),
            "send_to_event_ms": {"p50": round(1000 * statistics.median(lat), 1),
                                 "p99": round(1000 * lat[int(0.99 * (len(lat) - 1))], 1),
                                 "max": round(1000 * lat[-1], 1)} if lat else None,
        }
    finally:
        gw.stop()
        pg.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    res = asyncio.run(run(args.seconds, args.workers))
    json.dump(res, sys.stdout, indent=2)
    print()
    lat = res["send_to_event_ms"]
    ok = lat is not None and lat["p99"] < 500 and res["ratio"] >= 0.95 and res["probe_events"] == res["probe_sent"]
    print("targets (p99 < 500 ms, rate within 5%, every probe seen):", "met" if ok else "NOT met", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
