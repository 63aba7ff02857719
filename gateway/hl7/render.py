"""An outbox row, with the device's profile, as the HL7 message it stands for; pure.

The row holds facts (values, times, rule names), the profile the codes: MDC code and UCUM
unit of each metric, its position in the profile (the last level of OBX-4), the reference
range (the profile's alert thresholds, the plausible limits where a side has none) and the
direction of each rule (an open ``below`` rule flags its metric L, ``above`` H). The same row
renders to the same bytes every time, so a resend is an identical repeat.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import hl7

from gateway.hl7.messages import Alarm, DeviceNumerics, Header, Numeric, alarm_message, control_id, numerics_message
from gateway.profiles import Profile

__all__ = ["OutboxRow", "RenderError", "reference_range", "render"]


class RenderError(ValueError):
    """The row cannot become a message (its profile or metric is gone); the reason says which."""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    kind: str  # numerics | alarm
    patient_ref: str
    location: str | None
    created_ms: int
    body: Mapping[str, Any]


def reference_range(profile: Profile, metric: str) -> tuple[float, float]:
    """(low, high) alarm limits of ``metric``: the highest ``below`` and lowest ``above`` threshold,
    the plausible limits where the profile sets none."""
    low, high = profile.metrics[metric].plausible
    below = [r.threshold for r in profile.alerts if r.metric == metric and r.when == "below" and r.threshold is not None]
    above = [r.threshold for r in profile.alerts if r.metric == metric and r.when == "above" and r.threshold is not None]
    return (max(below) if below else low, min(above) if above else high)


def _range_text(profile: Profile, metric: str) -> str:
    low, high = reference_range(profile, metric)
    return f"{low:g}-{high:g}"


def _profile(profiles: Mapping[str, Profile], name: str | None, device_id: str) -> Profile:
    if name is None or name not in profiles:
        raise RenderError(f"device {device_id}: profile {name!r} is not loaded")
    return profiles[name]


def _numeric(profile: Profile, metric: str, value: float, at_ms: int, abnormal: str) -> Numeric:
    if metric not in profile.metrics:
        raise RenderError(f"profile {profile.profile.name}: no metric {metric!r}")
    spec = profile.metrics[metric]
    return Numeric(index=list(profile.metrics).index(metric) + 1, mdc=spec.mdc, mdc_code=spec.mdc_code, unit=spec.unit,
                   value=float(value), at_ms=int(at_ms), reference_range=_range_text(profile, metric), abnormal=abnormal)


def _flags(profile: Profile, open_rules: list[str]) -> dict[str, str]:
    flags: dict[str, str] = {}
    for rule in profile.alerts:
        if rule.name in open_rules and rule.metric is not None and rule.when in ("below", "above"):
            flags[rule.metric] = "L" if rule.when == "below" else "H"
    return flags


def render(row: OutboxRow, profiles: Mapping[str, Profile], header: Header) -> hl7.Message:
    """The message of ``row``; ``RenderError`` when the profile it needs is not loaded."""
    body = row.body
    common = dict(control=control_id(row.id), created_ms=row.created_ms, patient_ref=row.patient_ref,
                  location=row.location)
    if row.kind == "alarm":
        profile = _profile(profiles, body.get("profile"), body["device_id"])
        rule = next((r for r in profile.alerts if r.name == body["rule"]), None)
        direction = rule.when if rule is not None else "silent"
        source = None
        if body.get("metric") is not None and body.get("value") is not None:
            flag = "" if body["phase"] == "end" else {"below": "L", "above": "H"}.get(direction, "")
            source = _numeric(profile, body["metric"], body["value"], body["at"], flag)
        alarm = Alarm(alert_id=int(body["alert_id"]), device_id=body["device_id"], rule=body["rule"],
                      phase=body["phase"], priority=body["priority"], at_ms=int(body["at"]),
                      opened_ms=int(body["opened_at"]), direction=direction, source=source)
        return alarm_message(header, alarm=alarm, **common)
    devices = []
    for dev in body["devices"]:
        profile = _profile(profiles, dev.get("profile"), dev["device_id"])
        flags = _flags(profile, dev.get("alerts") or [])
        # OBX in the profile's metric order, whatever order the database aggregated them in
        order = sorted(dev["metrics"], key=lambda m: list(profile.metrics).index(m) if m in profile.metrics else -1)
        numerics = [_numeric(profile, m, dev["metrics"][m][0], dev["metrics"][m][1], flags.get(m, "")) for m in order]
        devices.append(DeviceNumerics(device_id=dev["device_id"], start_ms=int(body["start"]), end_ms=int(body["end"]),
                                      numerics=numerics))
    return numerics_message(header, devices=devices, **common)
