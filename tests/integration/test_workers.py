"""``vitalgate run --workers 2``: device affinity by forwarding, exactly once, and a killed worker restarted.

The broker spreads the shared subscription's messages over both workers round-robin, so
about half of every device's envelopes arrive at the worker that does not own it and
are forwarded. A device's next envelope is published only once its previous one is
committed, so its order is unambiguous however loaded the machine is (a forwarded envelope
and its successor taken directly could otherwise race); the checks and alert rules then
see, per device, exactly what ``vitalgate replay`` sees.
"""

from __future__ import annotations

import os
import re
import signal
import time

import orjson
import pytest

from gateway.model import FLAG_NAMES
from gateway.profiles import load_profiles
from gateway.replay import Replay
from gateway.workers import owner_of
from tests.harness import PROFILES, wait_for
from tests.integration.support import Publisher, encode, publish_paced, pulse_ox_envelopes, topic
from tests.integration.test_ingest import assert_exactly_once, count, fetch, wait_ingests
from tests.integration.test_live_vs_replay import RECORDINGS, episodes_from_replay, shifted

pytestmark = pytest.mark.integration

WORKERS = 2


def start_workers(gateway_factory, dsn: str, env: dict[str, str] | None = None):  # noqa: ANN001, ANN201
    gw = gateway_factory(dsn, env=env)
    gw.args = ["--workers", str(WORKERS)]
    gw.subscriptions = WORKERS
    gw.start()
    return gw


def worker_pids(gw) -> dict[int, int]:  # noqa: ANN001
    """Worker index -> pid of its latest start, from the supervisor's log."""
    pids: dict[int, int] = {}
    for m in re.finditer(r"Worker started\. worker=(\d+) pid=(\d+)", gw.log_text()):
        pids[int(m.group(1))] = int(m.group(2))
    return pids


def worker_metric(gw, index: int, name: str) -> float:  # noqa: ANN001
    """One metric of worker ``index``, served on ``metrics_port + index``."""
    import urllib.request

    body = urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port + index}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(name + " "))


def devices_of(n: int) -> list[str]:
    return [f"wk-{i:03d}" for i in range(n)]


def test_two_workers_keep_each_device_on_its_owner_and_agree_with_replay(db_dsn, broker, gateway_factory):
    now_ms = int(time.time() * 1000)
    recordings = {name: shifted(name, now_ms) for name in RECORDINGS}
    # 48 patients, 16 per recording, each with its own device id
    per_device: dict[str, list[bytes]] = {}
    for i, dev in enumerate(devices_of(48)):
        lines = recordings[RECORDINGS[i % len(RECORDINGS)]]
        out = []
        for line in lines:
            env = orjson.loads(line)
            env["device_id"] = dev
            out.append(orjson.dumps(env))
        per_device[dev] = out
    owners = {dev: owner_of(dev, WORKERS) for dev in per_device}
    assert set(owners.values()) == set(range(WORKERS))

    rounds = max(map(len, per_device.values()))
    ordered = [per_device[d][k] for k in range(rounds) for d in per_device if k < len(per_device[d])]
    replay = Replay(load_profiles(PROFILES))
    records = list(replay.feed(ordered)) + [replay.summary()]
    summary = records[-1]
    assert summary["rejected"] == 0

    gw = start_workers(gateway_factory, db_dsn)
    pub = Publisher(broker.port)
    published = 0
    for k in range(rounds):  # round k: envelope k of every device, once round k-1 is committed
        for dev, lines in per_device.items():
            if k < len(lines):
                pub.publish(f"devices/{dev}/telemetry", lines[k])
                published += 1
        wait_for(lambda: count(db_dsn, "SELECT count(*) FROM ingests") >= published, timeout=60,
                 message=lambda: f"round {k}: fewer than {published} ingests committed\n{gw.log_tail()}")
    pub.wait_acked()
    pub.close()
    wait_ingests(db_dsn, len(ordered), timeout=60, gw=gw)

    # exactly once
    assert count(db_dsn, "SELECT count(*) FROM ingests") == len(ordered)
    assert count(db_dsn, "SELECT count(*) FROM readings") == summary["readings"]
    # affinity: every envelope of a device was taken by the worker that owns it
    rows = fetch(db_dsn, "SELECT device_id, array_agg(DISTINCT gateway_id) AS gws FROM ingests GROUP BY device_id")
    assert {r["device_id"]: list(r["gws"]) for r in rows} == {d: [f"test-gw-w{o}"] for d, o in owners.items()}
    # both workers received payloads of devices they do not own, and forwarded them
    log = gw.log_text()
    assert log.count("Subscribed.") == WORKERS and "topic=$share/vitalgate/devices/+/telemetry" in log
    forwarded = [worker_metric(gw, i, "gateway_forwarded_messages_total") for i in range(WORKERS)]
    assert all(f > len(ordered) / 8 for f in forwarded), forwarded
    assert sum(forwarded) < len(ordered)
    # same flags and alert episodes as the offline replay of the same input
    for bit, flag in enumerate(FLAG_NAMES):
        live = count(db_dsn, f"SELECT (SELECT count(*) FROM readings WHERE flags & {1 << bit} <> 0)"
                             f" + (SELECT count(*) FROM waveform_blocks WHERE flags & {1 << bit} <> 0)")
        assert live == summary["flags"][flag], flag
    assert summary["flags"]["FLATLINE"] > 0 and summary["flags"]["OUT_OF_RANGE"] > 0
    episodes = fetch(db_dsn, """SELECT device_id, rule, priority, metric,
                                       (extract(epoch FROM opened_at) * 1000)::bigint AS o, trigger_value,
                                       (extract(epoch FROM cleared_at) * 1000)::bigint AS c, clear_value
                                  FROM alerts WHERE rule NOT LIKE '%silent' ORDER BY device_id, rule, opened_at""")
    live_episodes = [tuple(r) for r in episodes]
    assert live_episodes == episodes_from_replay(records)
    assert sum(e[1] == "spo2_low" for e in live_episodes) == 16
    assert gw.terminate() == 0
    assert "Supervisor stopped. drained=True" in gw.log_text()


def test_a_killed_worker_is_restarted_and_nothing_is_lost_or_duplicated(db_dsn, broker, gateway_factory):
    envelopes = pulse_ox_envelopes(60, 60, prefix="wk")
    payloads = [(topic(e), encode(e, i)) for i, e in enumerate(envelopes)]
    # batches held up to 1 s: the killed worker always holds payloads forwarded to it, uncommitted
    gw = start_workers(gateway_factory, db_dsn, env={"VITALGATE_BATCH_MAX_AGE_S": "1.0"})
    victim = 1
    before = worker_pids(gw)
    assert set(before) == {0, 1}
    publisher = publish_paced(broker.port, payloads, per_second=900)  # ~4 s of load
    wait_for(lambda: count(db_dsn, "SELECT count(*) FROM ingests") > 600, timeout=60, interval=0.02)
    os.kill(before[victim], signal.SIGKILL)
    wait_for(lambda: worker_pids(gw).get(victim, before[victim]) != before[victim], timeout=30,
             message=lambda: f"worker {victim} not restarted:\n{gw.log_tail()}")
    wait_for(lambda: gw.log_text().count("Subscribed.") >= WORKERS + 1, timeout=60,
             message=lambda: f"restarted worker never subscribed:\n{gw.log_tail()}")
    publisher.join(120)
    assert not publisher.is_alive()
    wait_ingests(db_dsn, len(envelopes), timeout=120, gw=gw)
    assert_exactly_once(db_dsn, envelopes)
    assert "Worker exited unexpectedly; restarting it. worker=1 exit_code=-9" in gw.log_text()
    # affinity held across the restart too
    rows = fetch(db_dsn, "SELECT device_id, array_agg(DISTINCT gateway_id) AS gws FROM ingests GROUP BY device_id")
    assert all(list(r["gws"]) == [f"test-gw-w{owner_of(r['device_id'], WORKERS)}"] for r in rows)
    assert gw.terminate() == 0
