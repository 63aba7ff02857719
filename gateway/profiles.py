"""Device profiles (PROTOCOL section 2): one TOML file per device type.

``load_profiles(dir)`` reads every ``*.toml`` in a folder and refuses, with a
``ProfileError`` naming the file and the key, anything that breaks the format.
"""

from __future__ import annotations

import ctypes
import math
import re
import weakref
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import numpy as np
from msgspec import Meta, Struct

from gateway.errors import ProfileError

__all__ = ["MetricSpec", "AlertRule", "ProfileInfo", "Profile", "load_profile", "load_profiles", "Interner", "Names", "SHARED_NAMES"]

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


def _key_of(err: msgspec.ValidationError, data: bytes | None = None) -> tuple[str, str]:
    """Split msgspec's ``message - at `$.a.b[0]``` into (``a.b[0]``, message).

    msgspec reports a value inside a table of metrics as ``$.metrics[...]`` without the
    metric's name; ``data`` (the file) lets the name be found.
    """
    text = str(err)
    if data is not None and "`$.metrics[...]" in text:
        found = _metric_at_fault(data)
        if found is not None:
            return found
    match = _PATH.search(text)
    if not match:
        return "", text
    key = match.group(1).lstrip(".")
    message = text[: match.start()].rstrip(" -at").strip()
    return key, message


def _metric_at_fault(data: bytes) -> tuple[str, str] | None:
    """(``metrics.<name>.<key>``, message) of the first metric that fails on its own."""
    try:
        raw = msgspec.toml.decode(data)
    except msgspec.DecodeError:
        return None
    metrics = raw.get("metrics") if isinstance(raw, dict) else None
    if not isinstance(metrics, dict):
        return None
    for name, spec in metrics.items():
        try:
            msgspec.convert(spec, MetricSpec)
        except msgspec.ValidationError as exc:
            key, message = _key_of(exc)
            return f"metrics.{name}" + (f".{key}" if key else ""), message
    return None


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
            if m.hz is None:
                raise ProfileError(path, f"{key}.hz", "required for waveform metrics (samples per second)")
            if m.interval_s is not None:
                raise ProfileError(path, f"{key}.interval_s", "waveform metrics give hz instead")
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
        # Readings outside plausible are artifacts and never feed rules: a rule whose
        # threshold or clear level lies beyond it could never open or never close.
        lo, hi = spec.plausible
        if (rule.when == "below" and rule.threshold <= lo) or (rule.when == "above" and rule.threshold >= hi):
            raise ProfileError(path, f"{key}.threshold", f"outside the plausible range [{lo}, {hi}] of {rule.metric!r}: the alert could never open")
        if (rule.when == "below" and rule.clear > hi) or (rule.when == "above" and rule.clear < lo):
            raise ProfileError(path, f"{key}.clear", f"outside the plausible range [{lo}, {hi}] of {rule.metric!r}: the alert could never close")
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
        key, message = _key_of(exc, data)
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
    per-device state with these ids, so that a whole batch is looked up at once. Ids are
    labels only: nothing observable depends on their values.
    """

    _MEMO = 4
    _KNOWN_OBJECTS = 4096

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []  # id -> name
        self._memo: list[tuple[weakref.ref[np.ndarray], np.ndarray]] = []
        # Identity table (see ids): addresses of str objects seen (sorted), their
        # ids, and the objects themselves, kept alive so that no address can be reused.
        self._addr = np.empty(0, dtype=np.uint64)
        self._addr_ids = np.empty(0, dtype=np.int64)
        self._addr_objects: list[str] = []

    def __missing__(self, key: str) -> int:
        value = self[key] = len(self)
        self.names.append(key)
        return value

    def ids(self, names: np.ndarray) -> np.ndarray:
        """Ids of an object array of ``str``, as ``int64``; unseen names get new ids.

        No Python loop over the names. The addresses of the ``str`` objects are read
        straight from the object array's buffer (``_addresses``), which gives two shortcuts:

        - Runs of the very same object (columns repeat one device and profile object for all
          readings of an envelope) are looked up once, through the dict.
        - Arrays that repeat a handful of objects (msgspec decodes every occurrence of a
          dict key, a metric name, to one cached ``str``) are matched against a sorted table
          of objects seen before, kept alive so that no address can be reused; only the
          others go through the dict.

        The last few arrays looked up are remembered (by identity, while alive), so the
        checks and the alert engine share the work on one batch. Treat the result as
        read-only.
        """
        for ref, known in self._memo:
            if ref() is names:
                return known
        n = len(names)
        if n == 0:
            return np.empty(0, dtype=np.int64)
        flat = np.ascontiguousarray(names, dtype=object)  # also accepts lists and str arrays
        addr = _addresses(flat)
        starts = np.flatnonzero(np.concatenate([[True], addr[1:] != addr[:-1]]))
        if 2 * len(starts) <= n:
            run_ids = np.fromiter(map(self.__getitem__, flat[starts]), dtype=np.int64, count=len(starts))
            out = np.repeat(run_ids, np.diff(np.append(starts, n)))
        else:
            out = self._by_table(flat, addr)
        if isinstance(names, np.ndarray):
            self._memo = [(weakref.ref(names), out), *self._memo[: self._MEMO - 1]]
        return out

    def _by_table(self, flat: np.ndarray, addr: np.ndarray) -> np.ndarray:
        n = len(flat)
        if len(self._addr):
            pos = np.minimum(np.searchsorted(self._addr, addr), len(self._addr) - 1)
            hit = self._addr[pos] == addr
            out = self._addr_ids[pos]
        else:
            hit, out = np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64)
        miss = np.flatnonzero(~hit)
        if len(miss):
            out[miss] = np.fromiter(map(self.__getitem__, flat[miss]), dtype=np.int64, count=len(miss))
            self._remember(addr[miss], flat[miss], out[miss])
        return out

    def _remember(self, addr: np.ndarray, objects: np.ndarray, ids: np.ndarray) -> None:
        new, first = np.unique(addr, return_index=True)
        if len(self._addr) + len(new) > self._KNOWN_OBJECTS:  # names that are not cached objects
            self._addr, self._addr_ids, self._addr_objects = self._addr[:0], self._addr_ids[:0], []
            if len(new) > self._KNOWN_OBJECTS:
                return
        self._addr_objects.extend(objects[first].tolist())
        merged = np.concatenate([self._addr, new])
        order = np.argsort(merged, kind="stable")
        self._addr = merged[order]
        self._addr_ids = np.concatenate([self._addr_ids, ids[first]])[order]


def _addresses(objects: np.ndarray) -> np.ndarray:
    """The object pointers of a C-contiguous object array, as uint64 (a copy).

    Valid as identities only while the objects are alive (held by the array).
    """
    n = len(objects)
    return np.ctypeslib.as_array((ctypes.c_uint64 * n).from_address(objects.ctypes.data)).copy()


class Names:
    """The interners of device, metric and profile names.

    ``SHARED_NAMES`` is the process-wide instance the checks and the alert engine use by
    default, so that a batch's names are looked up once for both. Not thread-safe: use the
    checks and rules from one thread (the pipeline runs them on its event loop).
    """

    def __init__(self) -> None:
        self.devices = Interner()
        self.metrics = Interner()
        self.profiles = Interner()


SHARED_NAMES = Names()
