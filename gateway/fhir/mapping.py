"""Stored readings as FHIR R4 resources: Observation, Device, Provenance. Pure: rows in, dicts out.

One Observation per numeric reading, per waveform block (``valueSampledData``) and per
non-invasive blood pressure measurement: the systolic, diastolic and mean readings of one
device, time and envelope become one Observation (LOINC 85354-9, MDC 150020) with a
component each. Codes and units come from the reading's profile (PROTOCOL section 2):
MDC (``urn:iso:std:iso:11073:10101``) always, LOINC when the profile has one, UCUM units.

Observation ids are stable and derived from the reading's key: ``<ingest>-<time ms>-<h>``
(``-<n>`` for the n-th Observation of one key, n > 0), ``h`` the first 12 hex digits of
SHA-256 over ``device \\0 metric``. FHIR ids allow 64 characters of ``[A-Za-z0-9.-]``, too
few for a device id and a metric name, so the two are found again from the ingest and time
(``store.observation_by_id``) and checked against ``h``.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from gateway.model import ARTIFACT_FLAGS, Flag
from gateway.profiles import MetricSpec, Profile

__all__ = [
    "MDC", "LOINC", "UCUM", "VITALS_PROFILE", "FLAG_SYSTEM", "FLAGS_EXTENSION", "BP", "BP_PANEL_LOINC",
    "BP_PANEL_MDC", "Row", "Catalog", "ObsKey", "observation", "observation_id", "parse_observation_id",
    "device_fhir_id", "device", "provenance", "instant", "group", "patient_reference",
]

MDC = "urn:iso:std:iso:11073:10101"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
VITALS_PROFILE = "http://hl7.org/fhir/StructureDefinition/vitalsigns"
FLAG_SYSTEM = "urn:vitalgate:quality-flag"  # interpretation codes: the PROTOCOL flag names
FLAGS_EXTENSION = "urn:vitalgate:fhir:quality-flags"  # valueInteger: the stored bitmask
SECURITY = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
DEVICE_SYSTEM = "urn:vitalgate:device"
GATEWAY_SYSTEM = "urn:vitalgate:gateway"
INGEST_SYSTEM = "urn:vitalgate:ingest"
PROFILE_SYSTEM = "urn:vitalgate:profile"
SHA256_EXTENSION = "urn:vitalgate:fhir:payload-sha256"
PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"

# The vital-signs LOINC set of R4 (observation-vitalsignresult) plus US Core's pulse-oximetry code.
VITAL_SIGNS = frozenset({"85353-1", "9279-1", "8867-4", "2708-6", "59408-5", "8310-5", "8302-2", "9843-4",
                         "29463-7", "39156-5", "85354-9", "8480-6", "8462-4"})
# US Core sends 2708-6 (the R4 vital-signs code) next to 59408-5
LOINC_ALSO = {"59408-5": "2708-6"}
BP_PANEL_LOINC = "85354-9"
BP_PANEL_MDC = 150020
BP_COMPONENTS = frozenset({150021, 150022, 150023})  # MDC_PRESS_BLD_NONINV_SYS / _DIA / _MEAN
BP = ":bp"  # the group name of a blood pressure Observation (never a metric name: those have no colon)

_FHIR_ID = re.compile(r"^[A-Za-z0-9.-]{1,64}$")
_OBS_ID = re.compile(r"^([0-9]{1,19})-([0-9]{1,16})-([0-9a-f]{12})(?:-([1-9][0-9]{0,5}))?$")
_FLAG_TEXT = {
    Flag.OUT_OF_RANGE: "outside the profile's plausible range (artifact)",
    Flag.SPIKE: "rate of change above the profile's max_rate (artifact)",
    Flag.FLATLINE: "value unchanged for flatline_s or longer",
    Flag.GAP: "gap before this sample longer than expected",
    Flag.CLOCK_FUTURE: "timestamp ahead of receipt beyond the allowed skew",
    Flag.CLOCK_STALE: "timestamp older than the allowed staleness at receipt",
    Flag.OUT_OF_ORDER: "earlier than the device's last stored reading of this metric",
    Flag.NOT_FINITE: "NaN or infinite samples (artifact)",
}


@dataclass(frozen=True, slots=True)
class Row:
    """One stored reading (``value``) or waveform block (``hz``, ``samples``), with its group name."""

    t: int  # epoch ms
    device_id: str
    group: str  # the metric, or BP for a blood pressure component
    ingest_id: int
    metric: str
    value: float | None
    hz: float | None
    samples: Sequence[float] | None
    flags: int
    profile: str | None  # the envelope's profile (the device's when the ingest is gone)

    @property
    def key(self) -> tuple[int, str, str, int]:
        return (self.t, self.device_id, self.group, self.ingest_id)


@dataclass(frozen=True, slots=True)
class ObsKey:
    """What identifies one Observation: the rows' key and its place among Observations of that key."""

    t: int
    device_id: str
    group: str
    ingest_id: int
    n: int = 0


class Catalog:
    """The metric facts of every profile: codes, units, which metrics form a blood pressure."""

    def __init__(self, profiles: Mapping[str, Profile]) -> None:
        self.profiles = dict(profiles)
        self._any: dict[str, MetricSpec] = {}
        for p in sorted(self.profiles.values(), key=lambda p: p.name):
            for m, s in p.metrics.items():
                self._any.setdefault(m, s)
        self.bp_metrics = sorted({m for p in self.profiles.values() for m, s in p.metrics.items()
                                  if s.kind == "numeric" and s.mdc_code in BP_COMPONENTS})

    def spec(self, profile: str | None, metric: str) -> MetricSpec | None:
        """The metric of ``profile``; of any profile when that one is unknown or lacks it."""
        p = self.profiles.get(profile) if profile else None
        if p is not None and metric in p.metrics:
            return p.metrics[metric]
        return self._any.get(metric)

    def metrics_for(self, system: str | None, code: str) -> tuple[set[str], bool]:
        """The metric names whose Observation.code carries ``system|code`` (``system`` None: any),
        and whether the blood pressure panel does."""
        names: set[str] = set()
        for p in self.profiles.values():
            for m, s in p.metrics.items():
                if s.mdc_code in BP_COMPONENTS and s.kind == "numeric":
                    continue  # only inside the panel, as components (FHIR: component-code)
                if system in (None, MDC) and code == str(s.mdc_code):
                    names.add(m)
                if system in (None, LOINC) and s.loinc is not None and code in (s.loinc, LOINC_ALSO.get(s.loinc)):
                    names.add(m)
        panel = (system in (None, LOINC) and code == BP_PANEL_LOINC) or (system in (None, MDC)
                                                                         and code == str(BP_PANEL_MDC))
        return names, panel and bool(self.bp_metrics)


def instant(ms: int) -> str:
    """Epoch ms as a FHIR instant, UTC with the offset known (+00:00)."""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")


def _h(device_id: str, group: str) -> str:
    return hashlib.sha256(f"{device_id}\0{group}".encode()).hexdigest()[:12]


def observation_id(k: ObsKey) -> str:
    base = f"{k.ingest_id}-{k.t}-{_h(k.device_id, k.group)}"
    return base if k.n == 0 else f"{base}-{k.n}"


def parse_observation_id(text: str) -> tuple[int, int, str, int] | None:
    """``(ingest_id, t, h, n)`` of an id this module made; None for anything else."""
    m = _OBS_ID.match(text)
    if m is None or int(m.group(1)) >= 2**63:
        return None
    return int(m.group(1)), int(m.group(2)), m.group(3), int(m.group(4) or 0)


def matches(k: ObsKey, h: str) -> bool:
    return _h(k.device_id, k.group) == h


def device_fhir_id(device_id: str) -> str:
    """The Device id: the device id itself when FHIR allows it, else ``x-`` and its SHA-256 prefix."""
    if _FHIR_ID.match(device_id):
        return device_id
    return "x-" + hashlib.sha256(device_id.encode()).hexdigest()[:40]


def patient_reference(ref: str) -> dict[str, Any]:
    """The association's patient: by id when ``patient_ref`` is a valid FHIR id, always by identifier."""
    out: dict[str, Any] = {"type": "Patient", "identifier": {"value": ref}}
    if _FHIR_ID.match(ref):
        out["reference"] = f"Patient/{ref}"
    return out


def group(rows: Iterable[Row]) -> Iterator[tuple[ObsKey, list[Row]]]:
    """Rows (ordered by key, then metric, value, flags) as Observations, in the same order.

    A blood pressure group yields one Observation per repeat of its components (the k-th
    systolic with the k-th diastolic and mean); any other group one per row."""
    pending: list[Row] = []
    for r in rows:
        if pending and pending[0].key != r.key:
            yield from _split(pending)
            pending = []
        pending.append(r)
    if pending:
        yield from _split(pending)


def _split(rows: list[Row]) -> Iterator[tuple[ObsKey, list[Row]]]:
    t, d, g, i = rows[0].key
    if g != BP:
        for n, r in enumerate(rows):
            yield ObsKey(t, d, g, i, n), [r]
        return
    parts: list[list[Row]] = []
    seen: dict[str, int] = {}
    for r in rows:
        k = seen.get(r.metric, 0)
        seen[r.metric] = k + 1
        if k == len(parts):
            parts.append([])
        parts[k].append(r)
    for n, part in enumerate(parts):
        yield ObsKey(t, d, g, i, n), part


def _coding(spec: MetricSpec | None, metric: str) -> tuple[dict[str, Any], str | None]:
    if spec is None:  # a metric no loaded profile knows: its name is all there is
        return {"text": metric}, None
    codings: list[dict[str, Any]] = [{"system": MDC, "code": str(spec.mdc_code), "display": spec.mdc}]
    if spec.loinc is not None:
        codings.append({"system": LOINC, "code": spec.loinc})
        if spec.loinc in LOINC_ALSO:
            codings.append({"system": LOINC, "code": LOINC_ALSO[spec.loinc]})
    return {"coding": codings, "text": spec.description or metric}, spec.loinc


def _quantity(value: float, spec: MetricSpec | None) -> dict[str, Any]:
    if spec is None:
        return {"value": value}
    return {"value": value, "unit": spec.unit, "system": UCUM, "code": spec.unit}


def _interpretation(flags: int) -> list[dict[str, Any]]:
    codings = [{"system": FLAG_SYSTEM, "code": f.name, "display": _FLAG_TEXT.get(f, f.name)} for f in Flag if flags & f]
    return [{"coding": codings, "text": "quality flags"}] if codings else []


def _sample(x: float) -> str:
    if math.isnan(x):
        return "E"
    if math.isinf(x):
        return "U" if x > 0 else "L"
    return str(np.float32(x))  # the shortest text that reads back as the stored float32


def _sampled(row: Row, spec: MetricSpec | None) -> dict[str, Any]:
    origin = {"value": 0} if spec is None else {"value": 0, "unit": spec.unit, "system": UCUM, "code": spec.unit}
    assert row.hz is not None and row.samples is not None
    return {"origin": origin, "period": 1000.0 / row.hz, "dimensions": 1,
            "data": " ".join(_sample(x) for x in row.samples)}


def observation(k: ObsKey, rows: Sequence[Row], catalog: Catalog, patient: str | None) -> dict[str, Any]:
    """The Observation of ``rows`` (one Observation's rows, see ``group``); ``patient``: the
    patient associated with the device at the reading's time, if any."""
    flags = 0
    for r in rows:
        flags |= r.flags
    obs: dict[str, Any] = {"resourceType": "Observation", "id": observation_id(k), "status": "final"}
    if k.group == BP:
        code: dict[str, Any] = {"coding": [{"system": MDC, "code": str(BP_PANEL_MDC), "display": "MDC_PRESS_BLD_NONINV"},
                                           {"system": LOINC, "code": BP_PANEL_LOINC}],
                                "text": "Blood pressure panel"}
        loinc: str | None = BP_PANEL_LOINC
    else:
        spec = catalog.spec(rows[0].profile, rows[0].metric)
        code, loinc = _coding(spec, rows[0].metric)
    vital = loinc in VITAL_SIGNS
    meta: dict[str, Any] = {}
    if vital and patient is not None:  # the profile requires a subject
        meta["profile"] = [VITALS_PROFILE]
    if flags & ARTIFACT_FLAGS:  # a consumer drops these: the value is not a patient state
        meta["security"] = [{"system": SECURITY, "code": "UNRELIABLE", "display": "unreliable"}]
    if meta:
        obs["meta"] = meta
    if flags:
        obs["extension"] = [{"url": FLAGS_EXTENSION, "valueInteger": flags}]
    if vital:
        obs["category"] = [{"coding": [{"system": CATEGORY, "code": "vital-signs", "display": "Vital Signs"}]}]
    obs["code"] = code
    if patient is not None:
        obs["subject"] = patient_reference(patient)
    obs["effectiveDateTime"] = instant(k.t)
    if k.group == BP:
        comps = []
        for r in rows:
            spec = catalog.spec(r.profile, r.metric)
            c_code, _ = _coding(spec, r.metric)
            comp: dict[str, Any] = {"code": c_code, "valueQuantity": _quantity(float(r.value or 0.0), spec)}
            if r.flags:
                comp["interpretation"] = _interpretation(r.flags)
            comps.append(comp)
    else:
        r = rows[0]
        spec = catalog.spec(r.profile, r.metric)
        if r.samples is not None:
            obs["valueSampledData"] = _sampled(r, spec)
        else:
            obs["valueQuantity"] = _quantity(float(r.value or 0.0), spec)
    if flags:
        obs["interpretation"] = _interpretation(flags)
    obs["device"] = {"reference": f"Device/{device_fhir_id(k.device_id)}", "display": k.device_id}
    if k.group == BP:
        obs["component"] = comps
    return obs


def device(device_id: str, status: str, profile: Profile | None, profile_name: str | None) -> dict[str, Any]:
    """A Device: its id as identifier, status (revoked -> inactive), type from its profile."""
    out: dict[str, Any] = {
        "resourceType": "Device", "id": device_fhir_id(device_id),
        "identifier": [{"system": DEVICE_SYSTEM, "value": device_id}],
        "status": {"active": "active", "revoked": "inactive"}.get(status, "unknown"),
        "deviceName": [{"name": device_id, "type": "user-friendly-name"}],
    }
    if profile_name is not None:
        out["type"] = {"coding": [{"system": PROFILE_SYSTEM, "code": profile_name,
                                   **({"display": profile.profile.description} if profile and
                                      profile.profile.description else {})}],
                       "text": (profile.profile.description if profile else None) or profile_name}
        if profile is not None:
            out["version"] = [{"type": {"text": "profile"}, "value": profile.version}]
    return out


def provenance(obs_id: str, k: ObsKey, ingest: Mapping[str, Any]) -> dict[str, Any]:
    """The Provenance of an Observation: the device measured, the gateway received and stored
    the envelope (``ingests``), whose payload SHA-256 names it exactly."""
    return {
        "resourceType": "Provenance", "id": obs_id,
        "target": [{"reference": f"Observation/{obs_id}"}],
        "occurredDateTime": instant(k.t),
        "recorded": instant(int(ingest["received_at"])),
        "agent": [
            {"type": {"coding": [{"system": PARTICIPANT, "code": "performer", "display": "Performer"}]},
             "who": {"reference": f"Device/{device_fhir_id(k.device_id)}", "display": k.device_id}},
            {"type": {"coding": [{"system": PARTICIPANT, "code": "assembler", "display": "Assembler"}]},
             "who": {"type": "Device", "identifier": {"system": GATEWAY_SYSTEM, "value": ingest["gateway_id"]},
                     "display": f"vitalgate gateway {ingest['gateway_id']}"}},
        ],
        "entity": [{
            "role": "source",
            "extension": [{"url": SHA256_EXTENSION, "valueString": bytes(ingest["payload_sha256"]).hex()}],
            "what": {"identifier": {"system": INGEST_SYSTEM, "value": str(ingest["id"])},
                     "display": f"envelope received over {ingest['source']} at {ingest['topic_or_path']}"
                                f" from {ingest['principal'] or ingest['device_id']}"},
        }],
    }


def patient_at(associations: Sequence[Any], t: int) -> str | None:
    """The patient of the association (``started_at``/``ended_at`` in epoch ms) open at ``t``."""
    for a in associations:
        if a.started_at <= t and (a.ended_at is None or t < a.ended_at):
            return a.patient_ref
    return None


def coded(k: ObsKey, rows: Sequence[Row], catalog: Catalog, codes: Sequence[tuple[str | None, str]]) -> bool:
    """Whether the Observation of ``rows`` carries one of ``codes`` in Observation.code."""
    if not codes:
        return True
    if k.group == BP:
        return any((s in (None, LOINC) and c == BP_PANEL_LOINC) or (s in (None, MDC) and c == str(BP_PANEL_MDC))
                   for s, c in codes)
    spec = catalog.spec(rows[0].profile, rows[0].metric)
    if spec is None:
        return False
    loincs = {spec.loinc, LOINC_ALSO.get(spec.loinc or "")} - {None}
    return any((s in (None, MDC) and c == str(spec.mdc_code)) or (s in (None, LOINC) and c in loincs)
               for s, c in codes)
