"""The HL7 feed end to end: real gateway, PostgreSQL, mosquitto, and an MLLP listener process.

The listener (``tests/hl7_listener.py``, python-hl7) plays the EHR: it records every message
before it ACKs. Pulse oximeters of three associated patients (and one unassociated device)
publish alarm cycles in the past and live readings now, so the feed carries ORU^R40 alarms
and ORU^R01 numerics together. The tests prove:
- each message parses back with the library and carries, segment by segment, the fields of
  PCD-01 / PCD-04;
- a listener killed mid-stream and restarted loses nothing and duplicates nothing beyond
  identical repeats of one MSH-10; each patient's messages arrive in outbox order;
- an AR parks the message with the receiver's reason, an AE holds the patient's later
  messages back while it is retried, and the other patients' messages still flow.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import asyncpg
import hl7
import orjson
import pytest

from gateway.sinks.schema import migrate
from tests.harness import REPO, await_for, free_port, wait_for
from tests.integration.support import Publisher

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

PATIENTS = {"po-1": ("P1", "ICU-1"), "po-2": ("P2", "ICU-2"), "po-3": ("P3^X", "ICU-3")}  # P3^X: escaping
CYCLES = 8  # alarm open + close per cycle and device


class Listener:
    """``tests/hl7_listener.py`` as a process on a fixed port; restartable after a kill."""

    def __init__(self, out: Path, port: int, *args: str) -> None:
        self.out, self.port, self.args = out, port, list(args)
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.hl7_listener", "--port", str(self.port),
                                      "--out", str(self.out), *self.args], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("listening"), f"listener did not start: {line!r}"

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    def received(self) -> list[dict]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.endswith("}")]


def _ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def alarm_envelopes(device: str, t0: int) -> list[dict]:
    """CYCLES of spo2 85 x5 then 95, 3 s apart: each run below 90 lasts 12 s (opens spo2_low at
    its 5th reading, for_s 10 s) and 95 closes it; 10 points in 3 s stay under max_rate."""
    out, t, seq = [], t0, 0
    for _ in range(CYCLES):
        for v in (85, 85, 85, 85, 85, 95):
            out.append({"v": 1, "device_id": device, "seq": seq, "profile": "pulse_oximeter",
                        "numerics": [{"t": t, "values": {"spo2": v, "pulse_rate": 72}}]})
            t += 3000
            seq += 1
    return out


async def _seed(dsn: str, devices: dict[str, tuple[str, str]]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        for device, (patient, location) in devices.items():
            await conn.execute("INSERT INTO associations (device_id, patient_ref, location, started_at)"
                               " VALUES ($1, $2, $3, now() - interval '1 day')", device, patient, location)
    finally:
        await conn.close()


def _env(port: int, **extra: str) -> dict[str, str]:
    return {"VITALGATE_HL7_ENABLED": "true", "VITALGATE_HL7_PORT": str(port), "VITALGATE_HL7_CADENCE_S": "1",
            "VITALGATE_HL7_DELAY_S": "0.5", "VITALGATE_HL7_POLL_S": "0.05", "VITALGATE_HL7_RETRY_INITIAL_S": "0.1",
            "VITALGATE_HL7_RETRY_MAX_S": "0.5", "VITALGATE_HL7_ACK_TIMEOUT_S": "5",
            "VITALGATE_HL7_RECEIVING_APPLICATION": "EHR", **{f"VITALGATE_HL7_{k.upper()}": v for k, v in extra.items()}}


def _publish(broker_port: int, envelopes: list[dict]) -> None:
    pub = Publisher(broker_port)
    try:
        for env in envelopes:
            pub.publish(f"devices/{env['device_id']}/telemetry", orjson.dumps(env))
        pub.wait_acked()
    finally:
        pub.close()


def _live(broker_port: int, devices: list[str], stop: threading.Event) -> threading.Thread:
    """Each device one envelope a second with t = now: spo2 85 for po-1 (its alert opens), 97 else."""

    def run() -> None:
        pub = Publisher(broker_port)
        seq = 10_000
        while not stop.is_set():
            now = int(time.time() * 1000)
            for d in devices:
                pub.publish(f"devices/{d}/telemetry", orjson.dumps({
                    "v": 1, "device_id": d, "seq": seq, "profile": "pulse_oximeter",
                    "numerics": [{"t": now, "values": {"spo2": 85 if d == "po-1" else 97, "pulse_rate": 70}}]}))
            seq += 1
            stop.wait(1.0)  # paces the input, like a device's clock; nothing waits on it
        pub.wait_acked()
        pub.close()

    t = threading.Thread(target=run, name="live", daemon=True)
    t.start()
    return t


async def _outbox(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch("SELECT id, kind, patient_ref, status, ack_code, reason, attempts, body::text AS body"
                                " FROM hl7_outbox ORDER BY id")
    finally:
        await conn.close()


def _sample(text: str | None, selector: str) -> float:
    """The value of one labelled sample (``name{a="x",b="y"}``) in a /metrics text; 0 when absent."""
    for line in (text or "").splitlines():
        if line.startswith(selector + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _hl7_time(ms: int) -> str:
    return f"{datetime.fromtimestamp(ms / 1000, tz=timezone.utc):%Y%m%d%H%M%S}.{ms % 1000:03d}+0000"


def check_alarm(raw: str, row: asyncpg.Record) -> None:
    msg = hl7.parse(raw)
    body = orjson.loads(row["body"])
    if body["rule"] == "probe_silent":  # technical: no source metric, at the device (MDS) level
        assert [str(s[0]) for s in msg] == ["MSH", "PID", "PV1", "OBR", "OBX", "OBX", "OBX"]
        event = msg.segments("OBX")[0]
        assert str(event(4)) == "1.0.0.0.1" and str(event(8)) == "A~PM~ST"
        assert str(event(5)) == "196616^MDC_EVT_ALARM^MDC^probe_silent^probe_silent^L"
        return
    assert body["rule"] == "spo2_low"
    assert [str(s[0]) for s in msg] == ["MSH", "PID", "PV1", "OBR", "OBX", "OBX", "OBX", "OBX"]
    msh = msg.segment("MSH")
    assert str(msg.segment("MSH")(9)) == "ORU^R40^ORU_R40" and str(msg["MSH.10"]) == f"VG{row['id']}"
    assert str(msg["MSH.12"]) == "2.6" and str(msg["MSH.5"]) == "EHR" and str(msg["MSH.15"]) == "AL"
    assert str(msh(21)) == "IHE_PCD_ACM_001^IHE PCD^1.3.6.1.4.1.19376.1.6.4.4^ISO"
    patient, location = PATIENTS[body["device_id"]]
    assert msg["PID.3.1"] == patient and str(msg["PV1.3"]) == location
    obr = msg.segment("OBR")
    assert str(obr(4)) == "196616^MDC_EVT_ALARM^MDC" and str(obr(3)) == f"{body['alert_id']}^VITALGATE"
    event, source, phase, state = msg.segments("OBX")
    assert str(event(3)) == "196616^MDC_EVT_ALARM^MDC" and str(event(4)) == "1.1.1.1.1"
    assert str(event(5)) == "196670^MDC_EVT_LO^MDC^spo2_low^spo2_low^L"
    assert str(event(8)) == "L~PH~SP"  # below its limit, high priority, physiological
    assert str(event(14)) == _hl7_time(body["at"])
    assert str(event(18)) == f"{body['device_id']}^VITALGATE"
    assert str(source(2)) == "NM" and str(source(3)) == "150456^MDC_PULS_OXIM_SAT_O2^MDC"
    assert str(source(4)) == "1.1.1.1.2" and float(str(source(5))) == body["value"]
    assert str(source(6)) == "%^%^UCUM" and str(source(7)) == "90-100"
    assert str(phase(3)) == "68481^MDC_ATTR_EVENT_PHASE^MDC" and str(phase(5)) == body["phase"]
    assert str(state(3)) == "68482^MDC_ATTR_ALARM_STATE^MDC"
    assert str(state(5)) == ("active" if body["phase"] == "start" else "inactive")


def check_numerics(raw: str, row: asyncpg.Record) -> bool:
    """Checks a numerics message; returns whether its spo2 carried the L flag (po-1's open alert)."""
    msg = hl7.parse(raw)
    body = orjson.loads(row["body"])
    assert str(msg.segment("MSH")(9)) == "ORU^R01^ORU_R01" and str(msg["MSH.10"]) == f"VG{row['id']}"
    assert str(msg.segment("MSH")(21)) == "IHE_PCD_001^IHE PCD^1.3.6.1.4.1.19376.1.6.1.1.1^ISO"
    names = [str(s[0]) for s in msg]
    assert names[:3] == ["MSH", "PID", "PV1"] and names[3] == "OBR" and set(names[4:]) == {"OBX"}
    (device,) = body["devices"]
    assert msg["PID.3.1"] == PATIENTS[device["device_id"]][0]
    assert str(msg.segment("OBR")(4)) == "182777000^monitoring of patient^SCT"
    flagged = False
    for obx in msg.segments("OBX"):
        code = str(obx(3))
        metric = {"150456^MDC_PULS_OXIM_SAT_O2^MDC": "spo2", "149530^MDC_PULS_OXIM_PULS_RATE^MDC": "pulse_rate"}[code]
        value, t = device["metrics"][metric]
        assert str(obx(2)) == "NM" and float(str(obx(5))) == value
        assert str(obx(4)) == ("1.1.1.1" if metric == "spo2" else "1.1.1.2")  # containment: profile order
        assert str(obx(6)) == ("%^%^UCUM" if metric == "spo2" else "/min^/min^UCUM")
        assert str(obx(7)) == ("90-100" if metric == "spo2" else "50-120")
        assert str(obx(18)) == f"{device['device_id']}^VITALGATE"
        assert str(obx(14)) == _hl7_time(t)
        flagged |= metric == "spo2" and str(obx(8)) == "L"
    return flagged


async def test_feed_survives_a_listener_kill_in_order_and_complete(db_dsn, broker, gateway_factory, tmp_path):
    await _seed(db_dsn, PATIENTS)
    port = free_port()
    listener = Listener(tmp_path / "received.ndjson", port, "--ack-delay-ms", "15")
    listener.start()
    gw = gateway_factory(db_dsn, env=_env(port))
    stop = threading.Event()
    try:
        gw.start()
        t0 = _ms(datetime.now(timezone.utc)) - 3_600_000
        history = [e for d in (*PATIENTS, "po-x") for e in alarm_envelopes(d, t0)]  # po-x: not associated
        _publish(broker.port, history)
        live = _live(broker.port, ["po-1", "po-2", "po-3", "po-x"], stop)  # after: not out of order
        expected_alarms = 2 * CYCLES * len(PATIENTS)
        wait_for(lambda: len(listener.received()) >= 25, timeout=60, message="25 messages before the kill")
        listener.kill()
        before = len(listener.received())
        wait_for(lambda: gw.metric("gateway_hl7_transport_errors_total", 0) > 0, timeout=30,
                 message="the gateway noticed the listener's death")
        listener.start()
        wait_for(lambda: sum(r["type"] == "ORU^R40^ORU_R40" for r in listener.received()) >= expected_alarms,
                 timeout=90, message=lambda: f"alarms received: {len(listener.received())}")
        wait_for(lambda: sum(r["type"] == "ORU^R01^ORU_R01" and r["patient"] == "P1"
                             for r in listener.received()) >= 15, timeout=60, message="live numerics")
        stop.set()
        live.join(30)
        await await_for(lambda: _all_settled(db_dsn), timeout=60, message="every outbox row sent")
        episodes = await _episodes(db_dsn, list(PATIENTS))
    finally:
        stop.set()
        gw.stop()
        listener.stop()
    rows = {r["id"]: r for r in await _outbox(db_dsn)}
    received = listener.received()
    assert before >= 25 and len(received) > before

    # nothing lost: every row was received and ACKed; nothing else was received
    assert all(r["status"] == "sent" and r["ack_code"] == "AA" for r in rows.values())
    by_control: dict[str, list[str]] = defaultdict(list)
    for r in received:
        by_control[r["control_id"]].append(r["raw"])
    assert set(by_control) == {f"VG{i}" for i in rows}
    # nothing duplicated but identical repeats of one MSH-10 (the message in flight at the kill)
    assert all(len(set(raws)) == 1 for raws in by_control.values())
    repeats = sum(len(raws) - 1 for raws in by_control.values())
    assert repeats <= 2, f"{repeats} repeats"

    # alarms: one start per episode of an associated device and one end per closed one, none of po-x
    alarms = [r for r in rows.values() if r["kind"] == "alarm"]
    assert len(alarms) == episodes and len(alarms) >= expected_alarms
    assert {orjson.loads(r["body"])["device_id"] for r in alarms} == set(PATIENTS)
    for r in alarms:
        check_alarm(by_control[f"VG{r['id']}"][0], r)
    flagged = [check_numerics(by_control[f"VG{r['id']}"][0], r) for r in rows.values() if r["kind"] == "numerics"]
    assert any(flagged), "po-1's numerics carry the L flag of its open alert"

    # per patient, first arrivals follow the outbox order
    seen: set[str] = set()
    order: dict[str, list[int]] = defaultdict(list)
    for r in received:
        if r["control_id"] not in seen:
            seen.add(r["control_id"])
            order[r["patient"]].append(int(r["control_id"][2:]))
    assert set(order) == {"P1", "P2", "P3^X"}
    for patient, ids in order.items():
        assert ids == sorted(ids), f"{patient} out of order"


async def _episodes(dsn: str, devices: list[str]) -> int:
    """Alarm messages the alerts table calls for: a start per episode, an end per closed one."""
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT count(*) + count(cleared_at) FROM alerts WHERE device_id = ANY($1)", devices)
    finally:
        await conn.close()


async def _all_settled(dsn: str) -> bool:
    rows = await _outbox(dsn)
    return bool(rows) and all(r["status"] == "sent" for r in rows)


async def test_ar_parks_with_reason_and_ae_holds_the_patient(db_dsn, broker, gateway_factory, tmp_path):
    await _seed(db_dsn, PATIENTS)
    port = free_port()
    listener = Listener(tmp_path / "received.ndjson", port, "--reject", "P2=unknown patient P2",
                        "--error", "P3^X=engine busy")
    listener.start()
    gw = gateway_factory(db_dsn, env=_env(port, numerics="off"))
    try:
        gw.start()
        t0 = _ms(datetime.now(timezone.utc)) - 3_600_000
        _publish(broker.port, [e for d in PATIENTS for e in alarm_envelopes(d, t0)])
        per_patient = 2 * CYCLES

        async def settled() -> bool:
            rows = await _outbox(db_dsn)
            by = defaultdict(list)
            for r in rows:
                by[r["patient_ref"]].append(r)
            return (len(by["P1"]) == per_patient and all(r["status"] == "sent" for r in by["P1"])
                    and len(by["P2"]) == per_patient and all(r["status"] == "parked" for r in by["P2"])
                    and len(by["P3^X"]) == per_patient and by["P3^X"][0]["attempts"] >= 3)

        await await_for(settled, timeout=60, message="P1 sent, P2 parked, P3 retried")
        rows = await _outbox(db_dsn)
        metrics = gw.metrics_text()
    finally:
        gw.stop()
        listener.stop()
    p2 = [r for r in rows if r["patient_ref"] == "P2"]
    assert all(r["ack_code"] == "AR" and r["reason"] == "unknown patient P2" for r in p2)
    p3 = [r for r in rows if r["patient_ref"] == "P3^X"]
    assert p3[0]["status"] == "pending" and p3[0]["ack_code"] == "AE" and p3[0]["reason"] == "engine busy"
    assert all(r["status"] == "pending" and r["attempts"] == 0 for r in p3[1:])  # held behind the first
    got = listener.received()
    assert {r["control_id"] for r in got if r["patient"] == "P3^X"} == {f"VG{p3[0]['id']}"}
    assert _sample(metrics, 'gateway_hl7_messages_total{kind="alarm",outcome="parked"}') == per_patient
    assert _sample(metrics, 'gateway_hl7_messages_total{kind="alarm",outcome="accepted"}') == per_patient
    assert _sample(metrics, 'gateway_hl7_messages_total{kind="alarm",outcome="retried"}') >= 3
    assert _sample(metrics, 'gateway_hl7_acks_total{code="AR"}') == per_patient


async def test_rollup_numerics_once_per_patient_and_period(db_dsn):
    """The periodic job on its own: a period's rollup mean per associated device, the open alert's
    rule beside it, one row per (patient, period), and nothing more when the job runs again."""
    from gateway.hl7.outbox import enqueue_numerics

    conn = await asyncpg.connect(db_dsn)
    try:
        await migrate(conn)
        base = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
        await conn.execute("INSERT INTO associations (device_id, patient_ref, location, started_at)"
                           " VALUES ('po-1', 'P1', 'ICU-1', $1), ('po-2', 'P1', 'ICU-1', $1), ('po-9', 'P9', NULL, $1)",
                           base)
        await conn.execute("INSERT INTO devices (device_id, profile) VALUES ('po-1', 'pulse_oximeter'),"
                           " ('po-2', 'pulse_oximeter')")
        # po-1: two minutes of spo2 (means 90 and 96 -> 93 over the period); po-2: one; po-3 unassociated
        await conn.execute(
            "INSERT INTO readings_1m (device_id, metric, bucket, min, max, sum, count) VALUES"
            " ('po-1', 'spo2', $1, 88, 92, 540, 6), ('po-1', 'spo2', $1 + interval '1 minute', 95, 97, 576, 6),"
            " ('po-2', 'spo2', $1, 97, 97, 97, 1), ('po-3', 'spo2', $1, 50, 50, 50, 1)", base)
        await conn.execute("INSERT INTO alerts (device_id, rule, metric, priority, opened_at)"
                           " VALUES ('po-1', 'spo2_low', 'spo2', 'high', $1)", base)
        end_ms = _ms(base) + 120_000
        kw = dict(cadence_ms=120_000, delay_ms=5_000, mode="rollup", catch_up=5)
        assert await enqueue_numerics(conn, now_ms=end_ms + 5_000, **kw) == 1
        assert await enqueue_numerics(conn, now_ms=end_ms + 5_000, **kw) == 0  # cursor: nothing due
        await conn.execute("DELETE FROM hl7_feed_cursor")
        assert await enqueue_numerics(conn, now_ms=end_ms + 5_000, **kw) == 0  # unique (patient, period)
        rows = await conn.fetch("SELECT patient_ref, location, period_start, body::text AS body FROM hl7_outbox")
    finally:
        await conn.close()
    assert len(rows) == 1 and rows[0]["patient_ref"] == "P1" and rows[0]["location"] == "ICU-1"
    body = orjson.loads(rows[0]["body"])
    assert (body["start"], body["end"]) == (_ms(base), end_ms)
    assert body["devices"] == [
        {"device_id": "po-1", "profile": "pulse_oximeter", "alerts": ["spo2_low"], "metrics": {"spo2": [93.0, end_ms]}},
        {"device_id": "po-2", "profile": "pulse_oximeter", "alerts": [], "metrics": {"spo2": [97.0, end_ms]}},
    ]
