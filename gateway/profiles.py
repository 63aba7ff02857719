"""Device profiles (PROTOCOL section 2): one TOML file per device type.

``load_profiles(dir)`` reads every ``*.toml`` in a folder and refuses, with a
``ProfileError`` naming the file and the key, anything that breaks the format.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import numpy as np
from msgspec import Meta, Struct

from gateway.errors import ProfileError

__all__ = ["MetricSpec", "AlertRule", "ProfileInfo", "Profile", "load_profile", "load_profiles", "Interner"]

_NAME = r"^[a-z][a-z0-9_]{0,63}$"
Name = Annotated[str, Meta(pattern=_NAME)]
Positive = Annotated[float, Meta(gt=0)]


class MetricSpec(Struct, frozen=True, forbid_unknown_fields=True):
    """One metric of a device type."""

    kind: Literal["numeric", "waveform"]
    unit: Annotated[str, Meta(min_length=1)]
    mdc: Annotated[str, Meta(pattern=r"^MDC_[A-Z0-9_]+$")]
    mdc_code: Annotated[int, Meta(gt=0, lt=2**32)]
    plausible: tuple[float, float]
    loinc: Annotated[str, Meta(pattern=r"^\d{1,7}-\d$")] | None = None
    interval_s: Positive | None = None
    hz: Positive | None = None
    max_rate: Positive | None = None
    flatline_s: Positive | None = None
    gap_factor: Positive | None = None
    description: str | None = None


class AlertRule(Struct, frozen=True, forbid_unknown_fields=True):
    """One alert rule: ``below``/``above`` a threshold on a metric, or ``silent``."""

    name: Name
    when: Literal["below", "above", "silent"]
    priority: Literal["high", "medium", "low"]
    metric: str | None = None
    threshold: float | None = None
    for_s: Annotated[float, Meta(ge=0)] = 0.0
    clear: float | None = None
    after_s: Positive | None = None


class ProfileInfo(Struct, frozen=True, forbid_unknown_fields=True):
    name: Name
    version: Annotated[str, Meta(pattern=r"^\d+\.\d+\.\d+([.+-][0-9A-Za-z.+-]+)?$")]
    description: str = ""


class Profile(Struct, frozen=True, forbid_unknown_fields=True):
    """A device type: its metrics and its alert rules."""

    profile: ProfileInfo
    metrics: dict[str, MetricSpec]
    alerts: list[AlertRule] = []

    @property
    def name(self) -> str:
        return self.profile.name

    @property
    def version(self) -> str:
        return self.profile.version


_PATH = re.compile(r"`\$((?:\.[A-Za-z0-9_]+|\[\d+\])*)`")


def _key_of(err: msgspec.ValidationError) -> tuple[str, str]:
    """Split msgspec's ``message - at `$.a.b[0]``` into (``a.b[0]``, message)."""
    text = str(err)
    match = _PATH.search(text)
    if not match:
        return "", text
    key = match.group(1).lstrip(".")
    message = text[: match.start()].rstrip(" -at").strip()
    return key, message


def _check(path: str, prof: Profile) -> None:
    """Cross-field rules msgspec cannot express on its own."""
    for mname, m in prof.metrics.items():
        key = f"metrics.{mname}"
        if not re.match(_NAME, mname):
            raise ProfileError(path, key, "metric names are lower-case letters, digits and _")
        lo, hi = m.plausible
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
            raise ProfileError(path, f"{key}.plausible", "must be [low, high] with low < high")
        if m.kind == "numeric":
            if m.interval_s is None:
                raise ProfileError(path, f"{key}.interval_s", "required for numeric metrics")
            if m.hz is not None:
                raise ProfileError(path, f"{key}.hz", "only waveform metrics have a sample rate")
        else:
            if m.max_rate is not None or m.flatline_s is not None:
                bad = "max_rate" if m.max_rate is not None else "flatline_s"
                raise ProfileError(path, f"{key}.{bad}", "applies to numeric metrics only")
    names: set[str] = set()
    for i, rule in enumerate(prof.alerts):
        key = f"alerts[{i}]"
        if rule.name in names:
            raise ProfileError(path, f"{key}.name", f"duplicate alert name {rule.name!r}")
        names.add(rule.name)
        if rule.when == "silent":
            if rule.after_s is None:
                raise ProfileError(path, f"{key}.after_s", "required for silent alerts")
            for extra in ("metric", "threshold", "clear"):
                if getattr(rule, extra) is not None:
                    raise ProfileError(path, f"{key}.{extra}", "not used by silent alerts")
            continue
        if rule.metric is None:
            raise ProfileError(path, f"{key}.metric", f"required for {rule.when} alerts")
        spec = prof.metrics.get(rule.metric)
        if spec is None:
            raise ProfileError(path, f"{key}.metric", f"unknown metric {rule.metric!r}")
        if spec.kind != "numeric":
            raise ProfileError(path, f"{key}.metric", "alert rules apply to numeric metrics")
        if rule.threshold is None or not math.isfinite(rule.threshold):
            raise ProfileError(path, f"{key}.threshold", f"required for {rule.when} alerts")
        if rule.clear is None or not math.isfinite(rule.clear):
            raise ProfileError(path, f"{key}.clear", f"required for {rule.when} alerts")
        if rule.when == "below" and rule.clear < rule.threshold:
            raise ProfileError(path, f"{key}.clear", "must be >= threshold for a below alert")
        if rule.when == "above" and rule.clear > rule.threshold:
            raise ProfileError(path, f"{key}.clear", "must be <= threshold for an above alert")
        if rule.after_s is not None:
            raise ProfileError(path, f"{key}.after_s", "only silent alerts use after_s")


def load_profile(path: str | Path) -> Profile:
    """Load and validate one profile file."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ProfileError(str(p), "", f"cannot read: {exc.strerror}") from None
    try:
        prof = msgspec.toml.decode(data, type=Profile)
    except msgspec.ValidationError as exc:
        key, message = _key_of(exc)
        raise ProfileError(str(p), key, message) from None
    except msgspec.DecodeError as exc:
        raise ProfileError(str(p), "", f"invalid TOML: {exc}") from None
    _check(str(p), prof)
    return prof


def load_profiles(directory: str | Path) -> dict[str, Profile]:
    """Load every ``*.toml`` in ``directory`` (not recursive); names must be unique."""
    d = Path(directory)
    if not d.is_dir():
        raise ProfileError(str(d), "", "profiles directory does not exist")
    out: dict[str, Profile] = {}
    origin: dict[str, Path] = {}
    for f in sorted(d.glob("*.toml")):
        prof = load_profile(f)
        if prof.name in out:
            raise ProfileError(str(f), "profile.name", f"{prof.name!r} is also defined in {origin[prof.name]}")
        out[prof.name] = prof
        origin[prof.name] = f
    if not out:
        raise ProfileError(str(d), "", "no *.toml profiles found")
    return out


class Interner(dict[str, int]):
    """Dense integer ids of names (profiles, metrics, devices), in first-seen order.

    The checks and the alert rules index their per (profile, metric) tables and their
    per-device state with these ids, so that a whole batch is looked up at once.
    """

    def __missing__(self, key: str) -> int:
        value = self[key] = len(self)
        return value

    def ids(self, names: np.ndarray) -> np.ndarray:
        """Ids of an object array of ``str``, as ``int64``; unseen names get new ids.

        Columns built from envelopes repeat the same device and profile for every reading of
        an envelope, so runs of equal neighbours are looked up once. The lookup is a C-level
        ``map`` over the dict (a hash-table factorize), not a Python loop.
        """
        n = len(names)
        if n == 0:
            return np.empty(0, dtype=np.int64)
        change = np.empty(n, dtype=bool)
        change[0] = True
        np.not_equal(names[1:], names[:-1], out=change[1:])
        starts = np.flatnonzero(change)
        if 2 * len(starts) > n:
            return np.fromiter(map(self.__getitem__, names), dtype=np.int64, count=n)
        run_ids = np.fromiter(map(self.__getitem__, names[starts]), dtype=np.int64, count=len(starts))
        return np.repeat(run_ids, np.diff(np.append(starts, n)))
