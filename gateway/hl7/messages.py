"""HL7 v2.6 messages of the device feed, built and read with python-hl7; no I/O, no clock.

- ``numerics_message``: IHE PCD-01 (DEC) ``ORU^R01``: MSH, PID, PV1, then per device one
  OBR and one OBX per numeric (MDC code in OBX-3, containment ``<MDS>.<VMD>.<channel>.<metric>``
  in OBX-4, UCUM unit in OBX-6, reference range in OBX-7, abnormal flag in OBX-8,
  observation time in OBX-14, the device in OBX-18).
- ``alarm_message``: IHE PCD-04 (ACM) ``ORU^R40``: one OBR per alarm and its facets as OBX
  rows ``<containment>.<facet>``: 1 the event (with abnormal flag, priority and source kind
  in OBX-8), 2 the source metric's value, 3 the event phase, 4 the alarm state.
- ``read_ack``: MSA-1, MSA-2 and the receiver's reason out of an ACK.

Every value taken from data passes through the library's escaping, so a ``^`` or ``|`` in a
patient reference cannot change the message's structure. Times are UTC, to the millisecond.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import hl7

__all__ = ["ACK_OK", "Ack", "Alarm", "DeviceNumerics", "Header", "Numeric", "PCD01_PROFILE", "PCD04_PROFILE",
           "alarm_message", "control_id", "hl7_time", "numerics_message", "read_ack"]

SEPARATORS = "\r|~^&"
# MSH-21 conformance profiles (IHE PCD Technical Framework)
PCD01_PROFILE = ("IHE_PCD_001", "IHE PCD", "1.3.6.1.4.1.19376.1.6.1.1.1", "ISO")
PCD04_PROFILE = ("IHE_PCD_ACM_001", "IHE PCD", "1.3.6.1.4.1.19376.1.6.4.4", "ISO")
MONITORING = ("182777000", "monitoring of patient", "SCT")  # OBR-4 of PCD-01
EVT_ALARM = ("196616", "MDC_EVT_ALARM", "MDC")
EVT_HI = ("196648", "MDC_EVT_HI", "MDC")
EVT_LO = ("196670", "MDC_EVT_LO", "MDC")
ATTR_EVENT_PHASE = ("68481", "MDC_ATTR_EVENT_PHASE", "MDC")
ATTR_ALARM_STATE = ("68482", "MDC_ATTR_ALARM_STATE", "MDC")
PRIORITY = {"high": "PH", "medium": "PM", "low": "PL"}  # IHE PCD alert priority (OBX-8)
ACK_OK = frozenset({"AA", "CA"})
EQUIPMENT_NS = "VITALGATE"

Value = str | tuple[str, ...] | list["str | tuple[str, ...]"]  # plain, components, repetitions


@dataclass(frozen=True, slots=True)
class Header:
    """MSH-3..6 and MSH-11: who sends, who receives, production or test."""

    sending_application: str = "VITALGATE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    processing_id: str = "P"
    patient_id_authority: str = ""  # PID-3.4, the assigning authority of patient references


@dataclass(frozen=True, slots=True)
class Numeric:
    """One OBX of PCD-01: a metric's value with its codes, limits and flag."""

    index: int  # 1-based position of the metric in its profile: the last level of OBX-4
    mdc: str
    mdc_code: int
    unit: str  # UCUM
    value: float
    at_ms: int
    reference_range: str = ""
    abnormal: str = ""  # L, H or empty


@dataclass(frozen=True, slots=True)
class DeviceNumerics:
    """One OBR of PCD-01: a device's numerics over ``[start_ms, end_ms)``."""

    device_id: str
    start_ms: int
    end_ms: int
    numerics: Sequence[Numeric]


@dataclass(frozen=True, slots=True)
class Alarm:
    """One alert episode's transition, for PCD-04."""

    alert_id: int
    device_id: str
    rule: str
    phase: str  # start | end
    priority: str  # high | medium | low
    at_ms: int
    opened_ms: int
    direction: str  # below | above | silent
    source: Numeric | None = None  # the metric that raised it, None for technical alarms


@dataclass(frozen=True, slots=True)
class Ack:
    code: str  # MSA-1
    control_id: str  # MSA-2
    reason: str  # MSA-3 and ERR, as text

    @property
    def accepted(self) -> bool:
        return self.code in ACK_OK


def control_id(outbox_id: int) -> str:
    """MSH-10 of an outbox row: the same on every resend, so a receiver can drop a repeat."""
    return f"VG{outbox_id}"


def hl7_time(ms: int) -> str:
    """HL7 DTM in UTC with milliseconds: ``20251126120000.123+0000``."""
    t = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    return f"{t:%Y%m%d%H%M%S}.{ms % 1000:03d}+0000"


def _number(v: float) -> str:
    return format(v, ".6g") if v != int(v) or abs(v) >= 1e15 else str(int(v))


class _Builder:
    """Segments as python-hl7 containers; text values escaped by the library."""

    def __init__(self) -> None:
        self.msg = hl7.Message(sequence=[], separators=SEPARATORS)

    def _text(self, value: str) -> str:
        return self.msg.escape(value) if value else value

    def _field(self, value: Value) -> hl7.Field:
        reps = value if isinstance(value, list) else [value]
        out = []
        for rep in reps:
            if isinstance(rep, tuple):
                out.append(self.msg.create_repetition([self.msg.create_component([self._text(c)]) for c in rep]))
            else:
                out.append(self._text(rep))
        return self.msg.create_field(out)

    def add(self, name: str, *fields: Value) -> None:
        seg = self.msg.create_segment([self.msg.create_field([name])])
        seg.extend(self._field(f) for f in fields)
        self.msg.append(seg)

    def msh(self, header: Header, *, created_ms: int, kind: tuple[str, str, str], control: str,
            profile: tuple[str, ...]) -> None:
        seg = self.msg.create_segment([self.msg.create_field(["MSH"]), self.msg.create_field(["|"]),
                                       self.msg.create_field(["^~\\&"])])
        seg.extend(self._field(f) for f in (
            header.sending_application, header.sending_facility, header.receiving_application,
            header.receiving_facility, hl7_time(created_ms), "", kind, control, header.processing_id, "2.6",
            "", "", "AL", "NE", "", "", "", "", profile))
        self.msg.append(seg)

    def patient(self, header: Header, patient_ref: str, location: str | None) -> None:
        self.add("PID", "1", "", (patient_ref, "", "", header.patient_id_authority, "PI"))
        self.add("PV1", "1", "I", (location or "",))


def numerics_message(header: Header, *, control: str, created_ms: int, patient_ref: str, location: str | None,
                     devices: Sequence[DeviceNumerics]) -> hl7.Message:
    """PCD-01 ``ORU^R01``: one OBR per device, one OBX per numeric."""
    b = _Builder()
    b.msh(header, created_ms=created_ms, kind=("ORU", "R01", "ORU_R01"), control=control, profile=PCD01_PROFILE)
    b.patient(header, patient_ref, location)
    n_obx = 0
    for i, dev in enumerate(devices, 1):
        order = (f"{dev.device_id}-{dev.start_ms}", EQUIPMENT_NS)
        b.add("OBR", str(i), order, order, MONITORING, "", "", hl7_time(dev.start_ms), hl7_time(dev.end_ms))
        for num in dev.numerics:
            n_obx += 1
            b.add("OBX", str(n_obx), "NM", (str(num.mdc_code), num.mdc, "MDC"), f"1.1.1.{num.index}",
                  _number(num.value), (num.unit, num.unit, "UCUM"), num.reference_range, num.abnormal, "", "", "R",
                  "", "", hl7_time(num.at_ms), "", "", "", (dev.device_id, EQUIPMENT_NS))
    return b.msg


def alarm_message(header: Header, *, control: str, created_ms: int, patient_ref: str, location: str | None,
                  alarm: Alarm) -> hl7.Message:
    """PCD-04 ``ORU^R40``: the alarm's OBR and its facets."""
    b = _Builder()
    b.msh(header, created_ms=created_ms, kind=("ORU", "R40", "ORU_R40"), control=control, profile=PCD04_PROFILE)
    b.patient(header, patient_ref, location)
    ident = (str(alarm.alert_id), EQUIPMENT_NS)
    end = hl7_time(alarm.at_ms) if alarm.phase == "end" else ""
    b.add("OBR", "1", ident, ident, EVT_ALARM, "", "", hl7_time(alarm.opened_ms), end)
    src = alarm.source
    where = f"1.1.1.{src.index}" if src is not None else "1.0.0.0"
    event = {"below": EVT_LO, "above": EVT_HI}.get(alarm.direction, EVT_ALARM)
    flag = {"below": "L", "above": "H"}.get(alarm.direction, "A")
    kind = "ST" if src is None else "SP"  # technical or physiological source
    equipment = (alarm.device_id, EQUIPMENT_NS)
    at = hl7_time(alarm.at_ms)
    b.add("OBX", "1", "CWE", EVT_ALARM, f"{where}.1", (*event, alarm.rule, alarm.rule, "L"), "", "",
          [flag, PRIORITY[alarm.priority], kind], "", "", "F", "", "", at, "", "", "", equipment)
    n = 1
    if src is not None:
        n += 1
        b.add("OBX", str(n), "NM", (str(src.mdc_code), src.mdc, "MDC"), f"{where}.2", _number(src.value),
              (src.unit, src.unit, "UCUM"), src.reference_range, src.abnormal, "", "", "F", "", "", at, "", "", "",
              equipment)
    b.add("OBX", str(n + 1), "ST", ATTR_EVENT_PHASE, f"{where}.3", alarm.phase, "", "", "", "", "", "F")
    b.add("OBX", str(n + 2), "ST", ATTR_ALARM_STATE, f"{where}.4", "active" if alarm.phase == "start" else "inactive",
          "", "", "", "", "", "F")
    return b.msg


def read_ack(text: str) -> Ack:
    """The acknowledgement in ``text``; ``ValueError`` naming what is missing when it is none."""
    try:
        msg = hl7.parse(text)
        msa = msg.segment("MSA")
    except (KeyError, hl7.ParseException) as exc:
        raise ValueError(f"not an HL7 acknowledgement (no MSA segment): {exc}") from None
    code = _get(msa, 1).strip().upper()
    if not code:
        raise ValueError("acknowledgement without MSA-1")
    reasons = [_get(msa, 3)]
    for err in msg.segments("ERR") if any(str(s[0]) == "ERR" for s in msg) else []:
        # ERR-8 (user message), ERR-3 (HL7 error code: its text), ERR-1 (v2.4: location, code and text)
        reasons += [_get(err, 8), _get(err, 3, 2), _get(err, 1, 4, 2)]
    reason = "; ".join(dict.fromkeys(r.strip() for r in reasons if r.strip()))
    return Ack(code=code, control_id=_get(msa, 2).strip(), reason=reason)


def _get(segment: hl7.Segment, field: int, component: int = 1, sub: int = 1) -> str:
    try:
        return str(segment.extract_field(field_num=field, component_num=component, subcomponent_num=sub))
    except IndexError:
        return ""
