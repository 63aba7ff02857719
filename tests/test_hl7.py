"""The HL7 feed's pure parts: messages, rendering from an outbox row, ACKs, periods, config."""

from __future__ import annotations

import hl7
import pytest

from gateway.config import load
from gateway.errors import ConfigError
from gateway.hl7.messages import Header, hl7_time, read_ack
from gateway.hl7.outbox import periods_due
from gateway.hl7.render import OutboxRow, RenderError, reference_range, render
from gateway.profiles import load_profiles
from tests.harness import PROFILES

PROFILE_SET = load_profiles(PROFILES)
T = 1764187200000  # 2025-11-26T20:00:00Z
HEADER = Header(sending_facility="ICU", receiving_application="EHR", patient_id_authority="HOSP")


def _numerics(devices: list[dict]) -> OutboxRow:
    return OutboxRow(id=42, kind="numerics", patient_ref="MRN|7^A", location="ICU~3", created_ms=T + 5_500,
                     body={"start": T - 60_000, "end": T, "devices": devices})


def test_numerics_message_segment_by_segment():
    row = _numerics([{"device_id": "po-1", "profile": "pulse_oximeter", "alerts": ["spo2_low"],
                      "metrics": {"pulse_rate": [72.0, T - 1000], "spo2": [88.5, T - 2000]}}])
    text = str(render(row, PROFILE_SET, HEADER))
    msg = hl7.parse(text)
    assert str(msg) == text
    assert [str(s[0]) for s in msg] == ["MSH", "PID", "PV1", "OBR", "OBX", "OBX"]
    msh = msg.segment("MSH")
    assert (str(msh(3)), str(msh(4)), str(msh(5)), str(msh(7))) == ("VITALGATE", "ICU", "EHR", hl7_time(T + 5_500))
    assert (str(msh(9)), str(msh(10)), str(msh(11)), str(msh(12))) == ("ORU^R01^ORU_R01", "VG42", "P", "2.6")
    assert (str(msh(15)), str(msh(16))) == ("AL", "NE")
    assert str(msh(21)) == "IHE_PCD_001^IHE PCD^1.3.6.1.4.1.19376.1.6.1.1.1^ISO"
    # values with separators are escaped, and read back whole
    pid = msg.segment("PID")
    assert [pid.extract_field(field_num=3, component_num=c) for c in (1, 4, 5)] == ["MRN|7^A", "HOSP", "PI"]
    assert msg["PV1.3"] == "ICU~3"
    obr = msg.segment("OBR")
    assert str(obr(4)) == "182777000^monitoring of patient^SCT"
    assert (str(obr(7)), str(obr(8))) == (hl7_time(T - 60_000), hl7_time(T))
    spo2, pr = msg.segments("OBX")  # profile order, whatever order the body lists them in
    assert [str(spo2(i)) for i in (1, 2, 3, 4, 5, 6, 7, 8, 11, 14, 18)] == [
        "1", "NM", "150456^MDC_PULS_OXIM_SAT_O2^MDC", "1.1.1.1", "88.5", "%^%^UCUM", "90-100", "L", "R",
        hl7_time(T - 2000), "po-1^VITALGATE"]
    assert [str(pr(i)) for i in (3, 4, 5, 6, 7, 8)] == [
        "149530^MDC_PULS_OXIM_PULS_RATE^MDC", "1.1.1.2", "72", "/min^/min^UCUM", "50-120", ""]


def test_one_obr_per_device():
    row = _numerics([{"device_id": d, "profile": "pulse_oximeter", "alerts": [], "metrics": {"spo2": [97, T - 1]}}
                     for d in ("po-1", "po-2")])
    msg = hl7.parse(str(render(row, PROFILE_SET, HEADER)))
    assert [str(s[0]) for s in msg][3:] == ["OBR", "OBX", "OBR", "OBX"]
    assert [str(o(18)) for o in msg.segments("OBX")] == ["po-1^VITALGATE", "po-2^VITALGATE"]
    assert [str(o(1)) for o in msg.segments("OBR")] == ["1", "2"]


def _alarm(**over) -> OutboxRow:
    body = {"device_id": "po-1", "rule": "pulse_rate_high", "metric": "pulse_rate", "priority": "medium",
            "value": 131.0, "at": T, "opened_at": T, "alert_id": 9, "phase": "start", "profile": "pulse_oximeter"}
    return OutboxRow(id=7, kind="alarm", patient_ref="P1", location=None, created_ms=T + 1, body={**body, **over})


def test_alarm_message_facets():
    msg = hl7.parse(str(render(_alarm(), PROFILE_SET, HEADER)))
    assert [str(s[0]) for s in msg] == ["MSH", "PID", "PV1", "OBR", "OBX", "OBX", "OBX", "OBX"]
    assert str(msg.segment("MSH")(9)) == "ORU^R40^ORU_R40"
    assert str(msg.segment("MSH")(21)) == "IHE_PCD_ACM_001^IHE PCD^1.3.6.1.4.1.19376.1.6.4.4^ISO"
    obr = msg.segment("OBR")
    assert (str(obr(3)), str(obr(4)), str(obr(7)), str(obr(8))) == (
        "9^VITALGATE", "196616^MDC_EVT_ALARM^MDC", hl7_time(T), "")
    event, source, phase, state = msg.segments("OBX")
    assert str(event(4)) == "1.1.1.2.1" and str(event(8)) == "H~PM~SP"
    assert str(event(5)) == "196648^MDC_EVT_HI^MDC^pulse_rate_high^pulse_rate_high^L"
    assert (str(source(4)), str(source(5)), str(source(8))) == ("1.1.1.2.2", "131", "H")
    assert (str(phase(5)), str(state(5))) == ("start", "active")


def test_alarm_end_and_technical_alarm():
    end = hl7.parse(str(render(_alarm(phase="end", at=T + 30_000, value=110.0), PROFILE_SET, HEADER)))
    assert str(end.segment("OBR")(8)) == hl7_time(T + 30_000)
    _, source, phase, state = end.segments("OBX")
    assert (str(source(8)), str(phase(5)), str(state(5))) == ("", "end", "inactive")
    silent = hl7.parse(str(render(_alarm(rule="probe_silent", metric=None, value=None), PROFILE_SET, HEADER)))
    event = silent.segments("OBX")[0]
    assert len(silent.segments("OBX")) == 3 and str(event(4)) == "1.0.0.0.1" and str(event(8)) == "A~PM~ST"


def test_same_row_same_bytes():
    assert str(render(_alarm(), PROFILE_SET, HEADER)) == str(render(_alarm(), PROFILE_SET, HEADER))


def test_unknown_profile_is_a_render_error_naming_it():
    with pytest.raises(RenderError, match="'gone'"):
        render(_alarm(profile="gone"), PROFILE_SET, HEADER)


def test_reference_range_from_thresholds_then_plausible():
    po = PROFILE_SET["pulse_oximeter"]
    assert reference_range(po, "spo2") == (90.0, 100.0)
    assert reference_range(po, "pulse_rate") == (50.0, 120.0)
    assert reference_range(po, "perfusion_index") == (0.0, 20.0)


def test_read_ack_codes_and_reasons():
    msg = hl7.parse(str(render(_alarm(), PROFILE_SET, HEADER)))
    ack = msg.create_ack("AR", message_id="A1")
    err = ack.create_segment([ack.create_field(["ERR"])])
    err.assign_field("unknown patient", 8)
    ack.append(err)
    got = read_ack(str(ack))
    assert (got.code, got.control_id, got.reason, got.accepted) == ("AR", "VG7", "unknown patient", False)
    assert read_ack(str(msg.create_ack("CA", message_id="A2"))).accepted
    with pytest.raises(ValueError, match="MSA"):
        read_ack(str(msg))


def test_periods_due():
    kw = dict(cadence_ms=60_000, delay_ms=5_000, catch_up=3)
    now = 10 * 60_000 + 4_000  # 00:10:04: the period ending 00:10 is not due until 00:10:05
    assert periods_due(now, done_until_ms=None, **kw) == [8 * 60_000]  # first run: the last complete one
    assert periods_due(now + 1_000, done_until_ms=None, **kw) == [9 * 60_000]
    assert periods_due(now + 1_000, done_until_ms=9 * 60_000, **kw) == [9 * 60_000]
    assert periods_due(now + 1_000, done_until_ms=10 * 60_000, **kw) == []
    assert periods_due(now + 1_000, done_until_ms=0, **kw) == [7 * 60_000, 8 * 60_000, 9 * 60_000]  # catch-up cap


def test_config_hl7_section():
    cfg = load(environ={"VITALGATE_HL7_ENABLED": "true", "VITALGATE_HL7_PORT": "6661"})
    assert cfg.hl7.enabled and cfg.hl7.port == 6661 and cfg.hl7.on_reject == "park" and cfg.hl7.on_error == "retry"
    assert not load(environ={}).hl7.enabled  # off by default
    with pytest.raises(ConfigError, match="multiple of 60"):
        load(environ={"VITALGATE_HL7_NUMERICS": "rollup", "VITALGATE_HL7_CADENCE_S": "30"})
    with pytest.raises(ConfigError, match="hl7.on_reject"):
        load(environ={"VITALGATE_HL7_ON_REJECT": "drop"})
