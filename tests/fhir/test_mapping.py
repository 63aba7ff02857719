"""Readings to FHIR R4: every resource validates; one reading of each kind goes to an
Observation and back to the same value, unit, code and time; ids are stable and read back."""

from __future__ import annotations

import math
from datetime import datetime
from decimal import Decimal

import numpy as np
import pytest

from gateway.fhir import mapping
from gateway.fhir.capability import statement
from gateway.fhir.mapping import BP, Catalog, ObsKey, Row
from gateway.model import Flag
from gateway.profiles import load_profiles
from tests.harness import PROFILES
from tests.fhir.validate import validate

CATALOG = Catalog(load_profiles(PROFILES))
T = 1_764_187_200_123


def _ms(text: str) -> int:
    return round(datetime.fromisoformat(text).timestamp() * 1000)


def row(metric: str, value: float | None = None, *, t: int = T, device: str = "pm-1", ingest: int = 7,
        profile: str = "patient_monitor", flags: int = 0, hz: float | None = None, samples=None) -> Row:
    g = BP if metric in CATALOG.bp_metrics else metric
    return Row(t=t, device_id=device, group=g, ingest_id=ingest, metric=metric, value=value, hz=hz,
               samples=samples, flags=flags, profile=profile)


def one(rows: list[Row], patient: str | None = "MRN-1") -> dict:
    [(k, part)] = list(mapping.group(rows))
    return mapping.observation(k, part, CATALOG, patient)


def test_numeric_round_trip():
    obs = one([row("spo2", 97.0)])
    m = validate(obs)
    spec = CATALOG.spec("patient_monitor", "spo2")
    assert m.valueQuantity.value == Decimal("97.0") and m.valueQuantity.code == spec.unit == "%"
    assert m.valueQuantity.system == mapping.UCUM
    codes = {(c.system, c.code) for c in m.code.coding}
    assert (mapping.MDC, "150456") in codes and (mapping.LOINC, "59408-5") in codes and (mapping.LOINC, "2708-6") in codes
    assert _ms(obs["effectiveDateTime"]) == T
    assert obs["category"][0]["coding"][0]["code"] == "vital-signs"
    assert obs["meta"]["profile"] == [mapping.VITALS_PROFILE]
    assert obs["subject"] == {"type": "Patient", "identifier": {"value": "MRN-1"}, "reference": "Patient/MRN-1"}
    assert obs["device"]["reference"] == "Device/pm-1"
    assert "interpretation" not in obs and "extension" not in obs


def test_no_vital_signs_profile_without_a_loinc_vital_sign_or_a_subject():
    pi = one([row("perfusion_index", 2.5)])
    validate(pi)
    assert "category" not in pi and "meta" not in pi and [c["system"] for c in pi["code"]["coding"]] == [mapping.MDC]
    alone = one([row("heart_rate", 70.0)], patient=None)
    validate(alone)
    assert "subject" not in alone and "meta" not in alone and alone["category"]  # a vital sign, but no subject


def test_blood_pressure_is_one_observation_with_components_and_round_trips():
    rows = [row("nibp_dia", 80.0, profile="nibp_cuff"), row("nibp_mean", 93.0, profile="nibp_cuff"),
            row("nibp_sys", 120.0, profile="nibp_cuff")]
    obs = one(rows)
    m = validate(obs)
    assert {(c.system, c.code) for c in m.code.coding} == {(mapping.LOINC, "85354-9"), (mapping.MDC, "150020")}
    assert "valueQuantity" not in obs and obs["category"][0]["coding"][0]["code"] == "vital-signs"
    back = {}
    for comp in m.component:
        loinc = next(c.code for c in comp.code.coding if c.system == mapping.LOINC)
        mdc = next(c.code for c in comp.code.coding if c.system == mapping.MDC)
        back[(mdc, loinc)] = (float(comp.valueQuantity.value), comp.valueQuantity.code)
    assert back == {("150021", "8480-6"): (120.0, "mm[Hg]"), ("150022", "8462-4"): (80.0, "mm[Hg]"),
                    ("150023", "8478-0"): (93.0, "mm[Hg]")}
    assert _ms(obs["effectiveDateTime"]) == T


def test_waveform_round_trips_through_sampled_data_with_non_finite_samples():
    samples = [float(np.float32(x)) for x in (0.01, -0.5, 1e-5, 3.25, 123456.78)] + [math.nan, math.inf, -math.inf]
    obs = one([row("pleth", hz=125.0, samples=samples, flags=int(Flag.NOT_FINITE))])
    m = validate(obs)
    sd = m.valueSampledData
    assert float(sd.period) == 8.0 and sd.dimensions == 1 and float(sd.origin.value) == 0 and sd.origin.code == "1"
    back = []
    for text in sd.data.split(" "):
        back.append({"E": math.nan, "U": math.inf, "L": -math.inf}.get(text) if text in "EUL" else
                    float(np.float32(float(text))) * float(sd.factor or 1) + float(sd.origin.value))
    assert len(back) == len(samples)
    for a, b in zip(back, samples):
        assert (math.isnan(a) and math.isnan(b)) or a == b
    assert 1000.0 / float(sd.period) == 125.0
    assert {(c.system, c.code) for c in m.code.coding} == {(mapping.MDC, "150452")}
    assert _ms(obs["effectiveDateTime"]) == T
    # NOT_FINITE is an artifact: marked so a consumer can drop it
    assert obs["meta"]["security"][0]["code"] == "UNRELIABLE"
    assert obs["extension"] == [{"url": mapping.FLAGS_EXTENSION, "valueInteger": 128}]


def test_flags_are_visible_and_artifacts_marked():
    obs = one([row("spo2", 150.0, flags=int(Flag.OUT_OF_RANGE | Flag.GAP))])
    validate(obs)
    assert [c["code"] for c in obs["interpretation"][0]["coding"]] == ["OUT_OF_RANGE", "GAP"]
    assert obs["meta"]["security"][0]["code"] == "UNRELIABLE"
    gap = one([row("spo2", 95.0, flags=int(Flag.GAP))])
    validate(gap)
    assert "security" not in gap["meta"] and gap["interpretation"][0]["coding"][0]["code"] == "GAP"


def test_ids_are_stable_and_read_back():
    k = ObsKey(T, "pm-1", "spo2", 7, 0)
    assert mapping.observation_id(k) == mapping.observation_id(ObsKey(T, "pm-1", "spo2", 7, 0))
    ingest, t, h, n = mapping.parse_observation_id(mapping.observation_id(k))
    assert (ingest, t, n) == (7, T, 0) and mapping.matches(k, h)
    assert not mapping.matches(ObsKey(T, "pm-1", "heart_rate", 7), h)
    k3 = ObsKey(T, "pm-1", BP, 2**62, 3)
    assert mapping.parse_observation_id(mapping.observation_id(k3))[3] == 3
    assert len(mapping.observation_id(k3)) <= 64
    for bad in ("", "x", "1-2", "1-2-zzzzzzzzzzzz", "1-2-0123456789ab-0", "99999999999999999999-1-0123456789ab"):
        assert mapping.parse_observation_id(bad) is None, bad


def test_a_repeated_key_makes_distinct_observations():
    rows = [row("spo2", 96.0), row("spo2", 97.0)]
    got = list(mapping.group(rows))
    assert [k.n for k, _ in got] == [0, 1]
    assert len({mapping.observation_id(k) for k, _ in got}) == 2
    bp = [row("nibp_dia", 80.0, profile="nibp_cuff"), row("nibp_dia", 81.0, profile="nibp_cuff"),
          row("nibp_sys", 120.0, profile="nibp_cuff")]
    parts = list(mapping.group(bp))
    assert [[r.value for r in p] for _, p in parts] == [[80.0, 120.0], [81.0]]


def test_codes_follow_the_rows_profile():
    # pulse_rate is MDC 149546 in nibp_cuff, 149530 in pulse_oximeter
    a = one([row("pulse_rate", 70.0, profile="nibp_cuff")])
    b = one([row("pulse_rate", 70.0, profile="pulse_oximeter")])
    assert a["code"]["coding"][0]["code"] == "149546" and b["code"]["coding"][0]["code"] == "149530"


def test_device_and_provenance_validate():
    profiles = load_profiles(PROFILES)
    d = mapping.device("po_1.x", "revoked", profiles["pulse_oximeter"], "pulse_oximeter")
    validate(d)
    assert d["id"].startswith("x-") and d["status"] == "inactive" and d["identifier"][0]["value"] == "po_1.x"
    validate(mapping.device("pm-1", "unregistered", None, None))
    k = ObsKey(T, "pm-1", "spo2", 7)
    prov = mapping.provenance(mapping.observation_id(k), k, {
        "id": 7, "received_at": T + 40, "device_id": "pm-1", "source": "https", "principal": "pm-1",
        "gateway_id": "gw-1", "topic_or_path": "/v1/telemetry", "payload_sha256": bytes(range(32))})
    m = validate(prov)
    assert m.target[0].reference == f"Observation/{mapping.observation_id(k)}"
    assert prov["entity"][0]["extension"][0]["valueString"] == bytes(range(32)).hex()
    assert _ms(prov["recorded"]) == T + 40


def test_capability_statement_validates():
    validate(statement("2026-01-01T00:00:00+00:00"))


def test_outcome_validates():
    from gateway.fhir.routes import outcome

    import orjson

    r = outcome(400, "date: bad", "abc", {})
    validate(orjson.loads(r.body))
    assert r.content_type == "application/fhir+json"


@pytest.mark.parametrize("patient", ["MRN 1/2", "a" * 100])
def test_patients_whose_ref_is_no_fhir_id_are_referenced_by_identifier(patient):
    obs = one([row("spo2", 97.0)], patient=patient)
    validate(obs)
    assert obs["subject"] == {"type": "Patient", "identifier": {"value": patient}}


def test_the_validator_refuses_what_r4_refuses():
    obs = one([row("spo2", 97.0)])
    for broken in ({k: v for k, v in obs.items() if k != "code"}, {**obs, "status": "done"},
                   {**obs, "effectiveDateTime": "yesterday"}, {**obs, "id": "a_b"}, {**obs, "valueFoo": 1}):
        with pytest.raises(Exception):  # noqa: B017 - pydantic's ValidationError
            validate(broken)
