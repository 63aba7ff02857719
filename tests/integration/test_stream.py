"""GET /v1/stream against the real gateway, database and TLS stack.

Readings go in through ``POST /v1/telemetry`` (answered after commit) and must come out of
the stream: resumed with Last-Event-ID, nothing inside the window is missed or repeated;
a client that never reads is disconnected while ingestion goes on; with ``--workers 2``
a client sees devices owned by either worker, whichever worker serves it.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
import zlib
from collections.abc import Iterator

import aiohttp
import orjson
import pytest

from tests.harness.https import HttpsGateway, cli, running_gateway
from tests.harness import PostgresCluster
from tests.harness import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

T0 = (int(time.time()) - 600) * 1000


def _gateway(pg_cluster: PostgresCluster, devices: list[str], workers: int = 1) -> Iterator[HttpsGateway]:
    with running_gateway(pg_cluster, f"stream_{workers}", devices, workers=workers) as g:
        yield g


@pytest.fixture
def gw(pg_cluster: PostgresCluster) -> Iterator[HttpsGateway]:
    yield from _gateway(pg_cluster, ["st-a", "st-b"])


def envelope(device: str, i: int, *, samples: int = 0) -> dict:
    env: dict = {"v": 1, "device_id": device, "seq": i, "profile": "pulse_oximeter",
                 "numerics": [{"t": T0 + i * 1000, "values": {"spo2": 95 + i % 4, "pulse_rate": 60 + i % 9}}]}
    if samples:
        env["waveforms"] = [{"metric": "pleth", "t0": T0 + i * 1000, "hz": 125.0,
                             "samples": [round(0.001 * (k % 997), 3) for k in range(samples)]}]
    return env


async def post(s: aiohttp.ClientSession, gw: HttpsGateway, envs: list[dict]) -> None:
    async with s.post("/v1/telemetry", data=orjson.dumps(envs), headers={
            "Authorization": f"Bearer {gw.tokens[envs[0]['device_id']]}", "Content-Type": "application/json"}) as r:
        assert r.status == 202, await r.text()


class Sse:
    """An open event stream: ``next()`` returns (id, event, data) of the next event."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.last_id: str | None = None
        self.pending: list[tuple[str | None, str, dict]] = []
        self.worker: int | None = None  # the worker serving it (its "open" event)

    async def next(self, timeout: float = 10.0) -> tuple[str | None, str, dict]:
        if self.pending:
            return self.pending.pop()
        fields: dict[str, str] = {}
        while True:
            line = (await asyncio.wait_for(self.response.content.readline(), timeout)).decode()
            if line == "":
                raise EOFError("stream closed")
            line = line.rstrip("\n")
            if not line:
                if "event" in fields:
                    if "id" in fields:
                        self.last_id = fields["id"]
                    return fields.get("id"), fields["event"], orjson.loads(fields["data"])
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            fields[name] = value


async def open_stream(s: aiohttp.ClientSession, gw: HttpsGateway, last_id: str | None = None, **q: str) -> Sse:
    headers = {"Authorization": f"Bearer {gw.keys['read']}"}
    if last_id:
        headers["Last-Event-ID"] = last_id
    r = await s.get("/v1/stream", params=q, headers=headers, timeout=aiohttp.ClientTimeout(total=None, sock_read=None))
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream"), await r.text()
    sse = Sse(r)
    first = await sse.next()  # "open", or what a resumed stream replays first
    if first[1] != "open":
        sse.pending.append(first)
    else:
        sse.worker = first[2]["worker"]
    return sse


async def readings_until(sse: Sse, want: set, got: list) -> None:
    """Collect (device, t, metric) of reading events into ``got`` until ``want`` is covered."""
    while not want <= set(got):
        _, event, data = await sse.next()
        if event == "reading":
            got.extend((data["device_id"], r["t"], r["metric"]) for r in data["readings"])
        assert event != "gap", data


async def test_resumed_client_misses_nothing_inside_the_window(gw: HttpsGateway):
    dev = "st-a"
    async with aiohttp.ClientSession(base_url=gw.url, connector=aiohttp.TCPConnector(ssl=gw.ssl_context())) as s:
        sse = await open_stream(s, gw, device=dev)
        await post(s, gw, [envelope(dev, i) for i in range(10)])
        await post(s, gw, [envelope("st-b", i) for i in range(10)])  # not watched
        got: list = []
        await readings_until(sse, {(dev, T0 + i * 1000, "spo2") for i in range(10)}, got)
        assert all(d == dev for d, _, _ in got)
        last = sse.last_id
        sse.response.close()
        for i in range(10, 40, 3):  # commits while no one listens
            await post(s, gw, [envelope(dev, k) for k in range(i, i + 3)])
        resumed = await open_stream(s, gw, last_id=last, device=dev)
        await post(s, gw, [envelope(dev, 40)])
        want = {(dev, T0 + i * 1000, m) for i in range(41) for m in ("spo2", "pulse_rate")}
        await readings_until(resumed, want, got)
        assert sorted(got) == sorted(want)  # every reading once: none missed, none repeated
        # an id older than the window, or not ours, says so instead of pretending
        stale = await open_stream(s, gw, last_id="1", device=dev)
        assert stale.last_id is not None
        resumed.response.close()
        stale.response.close()


async def test_a_client_that_never_reads_is_disconnected_while_ingestion_goes_on(gw: HttpsGateway):
    dev = "st-b"
    ctx = gw.ssl_context()
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", gw.port))
    slow = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    slow.sendall(f"GET /v1/stream?device={dev} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {gw.keys['read']}\r\n\r\n"
                 .encode())
    async with aiohttp.ClientSession(base_url=gw.url, connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        reader = await open_stream(s, gw, device=dev)  # a reading client of the same device keeps up
        started = time.monotonic()
        latencies = []
        for i in range(0, 400, 4):  # ~200 KiB of events per request: far beyond the 4 MiB buffer in total
            t = time.monotonic()
            await post(s, gw, [envelope(dev, k, samples=5000) for k in range(i, i + 4)])
            latencies.append(time.monotonic() - t)
            if "Stream client disconnected" in gw.proc.log_text():
                break
        wait_for(lambda: "Stream client disconnected: it left too many events unread." in gw.proc.log_text(),
                 timeout=30, message="the slow client was never disconnected")
        assert max(latencies) < 5, latencies  # ingestion never waited for the slow client
        got: list = []
        await readings_until(reader, {(dev, T0 + i * 1000, "spo2") for i in range(len(latencies) * 4)}, got)
    slow.settimeout(10)
    with pytest.raises((ConnectionError, ssl.SSLError, OSError, EOFError)):
        while slow.recv(1 << 20):  # what was in flight, then the end
            pass
        raise EOFError
    slow.close()
    assert time.monotonic() - started < 120


@pytest.fixture
def gw2(pg_cluster: PostgresCluster) -> Iterator[HttpsGateway]:
    yield from _gateway(pg_cluster, [f"wk-{i}" for i in range(8)], workers=2)


async def test_stream_shows_devices_of_either_worker(gw2: HttpsGateway):
    by_owner: dict[int, str] = {}
    for d in gw2.devices:
        by_owner.setdefault(zlib.crc32(d.encode()) % 2, d)
    devs = [by_owner[0], by_owner[1]]
    for k, d in enumerate(devs):
        cli(gw2.dsn, "associate", d, "--patient", f"W-{k}", "--location", f"WARD-9/bed-{k}")
    async with aiohttp.ClientSession(base_url=gw2.url, connector=aiohttp.TCPConnector(ssl=gw2.ssl_context(),
                                                                                        force_close=True)) as s:
        streams = []
        for _ in range(40):  # connections land on either worker (SO_REUSEPORT): have both serve some
            streams.append(await open_stream(s, gw2, location="WARD-9/"))
            if len(streams) >= 4 and {x.worker for x in streams} == {0, 1}:
                break
        assert {x.worker for x in streams} == {0, 1}
        for i in range(3):
            for d in devs:
                await post(s, gw2, [envelope(d, i)])
        for sse in streams:
            got: list = []
            await readings_until(sse, {(d, T0 + i * 1000, "spo2") for d in devs for i in range(3)}, got)
            assert len(got) == len(set(got)) == 12
        # a patient filter, resumed on whichever worker takes the reconnect
        pat = await open_stream(s, gw2, patient="W-1")
        await post(s, gw2, [envelope(devs[1], 3)])
        got = []
        await readings_until(pat, {(devs[1], T0 + 3000, "spo2")}, got)
        last = pat.last_id
        assert last is not None and len(last.split(".")) == 2
        pat.response.close()
        await post(s, gw2, [envelope(devs[1], 4)])
        again = await open_stream(s, gw2, last_id=last, patient="W-1")
        got = []
        await readings_until(again, {(devs[1], T0 + 4000, "spo2"), (devs[1], T0 + 4000, "pulse_rate")}, got)
        assert (devs[1], T0 + 3000, "spo2") not in got
        for sse in streams + [again]:
            sse.response.close()
