"""Device profiles: the shipped ones, validation naming file and key, the check command, name ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway.cli.profiles import check
from gateway.errors import ProfileError
from gateway.profiles import Interner, load_profile, load_profiles

PROFILES_DIR = Path(__file__).resolve().parent.parent / "device_profiles"
SHIPPED = {"pulse_oximeter", "patient_monitor", "nibp_cuff", "thermometer", "cgm", "infusion_pump", "ventilator", "weight_scale"}

# IEEE 11073-10101 codes of shared/reference/metrics.toml (partition 2 << 16 | term code).
SOURCED_CODES = {
    "MDC_PULS_OXIM_SAT_O2": 150456, "MDC_PULS_OXIM_PULS_RATE": 149530, "MDC_ECG_HEART_RATE": 147842,
    "MDC_RESP_RATE": 151562, "MDC_PRESS_BLD_NONINV_SYS": 150021, "MDC_PRESS_BLD_NONINV_DIA": 150022,
    "MDC_PRESS_BLD_NONINV_MEAN": 150023, "MDC_TEMP_BODY": 150364, "MDC_ECG_ELEC_POTL_II": 131330,
    "MDC_PULS_OXIM_PLETH": 150452, "MDC_CONC_GLU_ISF": 160212, "MDC_PULS_OXIM_PERF_REL": 150448,
    "MDC_CONC_AWAY_CO2_ET": 151708, "MDC_VENT_VOL_TIDAL": 151980, "MDC_VENT_PRESS_AWAY_END_EXP_POS": 151976,
    "MDC_VENT_CONC_AWAY_O2_INSP": 151920, "MDC_FLOW_FLUID_PUMP": 157784, "MDC_VOL_FLUID_DELIV": 157864,
    "MDC_MASS_BODY_ACTUAL": 188736, "MDC_VENT_RESP_RATE": 151586, "MDC_PULS_RATE_NON_INV": 149546,
    "MDC_IMPED_TTHOR": 151780,
}


def test_shipped_profiles_load_and_are_complete() -> None:
    profiles = load_profiles(PROFILES_DIR)
    assert set(profiles) == SHIPPED
    for name, p in profiles.items():
        assert any(r.when in ("below", "above") for r in p.alerts), name
        assert any(r.when == "silent" for r in p.alerts), name
        for mname, m in p.metrics.items():
            assert m.unit and m.mdc.startswith("MDC_"), (name, mname)
            assert m.mdc_code >> 16 == 2, (name, mname)  # partition 2: physiological metrics
            assert SOURCED_CODES[m.mdc] == m.mdc_code, (name, mname)
            assert (m.interval_s if m.kind == "numeric" else m.hz), (name, mname)


def test_patient_monitor_matches_the_icu_bed() -> None:
    pm = load_profiles(PROFILES_DIR)["patient_monitor"]
    numeric = [k for k, m in pm.metrics.items() if m.kind == "numeric"]
    waves = {k: m.hz for k, m in pm.metrics.items() if m.kind == "waveform"}
    assert len(numeric) == 10
    assert {"heart_rate", "resp_rate", "nibp_sys", "nibp_dia", "nibp_mean", "body_temp"} <= set(numeric)
    assert waves == {"ecg_ii": 250.0, "pleth": 125.0, "resp": 62.5}


def test_every_rule_can_open_and_close_inside_the_plausible_range() -> None:
    for p in load_profiles(PROFILES_DIR).values():
        for r in p.alerts:
            if r.when == "silent":
                continue
            lo, hi = p.metrics[r.metric].plausible  # type: ignore[index]
            assert lo < r.threshold < hi and lo <= r.clear <= hi, (p.name, r.name)  # type: ignore[operator]


_VALID = """
[profile]
name = "x"
version = "1.0.0"

[metrics.spo2]
kind = "numeric"
unit = "%"
mdc = "MDC_PULS_OXIM_SAT_O2"
mdc_code = 150456
interval_s = 1.0
plausible = [0.0, 100.0]

[metrics.pleth]
kind = "waveform"
unit = "1"
mdc = "MDC_PULS_OXIM_PLETH"
mdc_code = 150452
hz = 125.0
plausible = [-10.0, 10.0]

[[alerts]]
name = "low"
metric = "spo2"
when = "below"
threshold = 90.0
clear = 92.0
priority = "high"
"""


@pytest.mark.parametrize(
    ("old", "new", "key", "words"),
    [
        ('hz = 125.0', '', "metrics.pleth.hz", "required for waveform"),
        ('hz = 125.0', 'hz = 125.0\ninterval_s = 1.0', "metrics.pleth.interval_s", "hz instead"),
        ('interval_s = 1.0\nplausible = [0.0, 100.0]', 'plausible = [0.0, 100.0]', "metrics.spo2.interval_s", "required"),
        ('threshold = 90.0', 'threshold = 0.0', "alerts[0].threshold", "never open"),
        ('clear = 92.0', 'clear = 89.0', "alerts[0].clear", ">= threshold"),
        ('clear = 92.0', 'clear = 120.0', "alerts[0].clear", "never close"),
        ('metric = "spo2"', 'metric = "pleth"', "alerts[0].metric", "numeric"),
        ('metric = "spo2"', 'metric = "hr"', "alerts[0].metric", "unknown metric"),
        ('priority = "high"', 'priority = "urgent"', "alerts[0].priority", ""),
        ('plausible = [0.0, 100.0]', 'plausible = [100.0, 0.0]', "metrics.spo2.plausible", "low < high"),
        ('mdc_code = 150456', 'mdc_code = "150456"', "metrics.spo2.mdc_code", ""),
        ('kind = "numeric"', 'kind = "numeric"\nmax_rate = -1.0', "metrics.spo2.max_rate", ""),
    ],
)
def test_invalid_profile_names_file_and_key(tmp_path: Path, old: str, new: str, key: str, words: str) -> None:
    assert old in _VALID
    path = tmp_path / "x.toml"
    path.write_text(_VALID.replace(old, new, 1))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    assert info.value.path == str(path) and info.value.key == key
    assert words in info.value.message
    assert str(path) in str(info.value) and key in str(info.value)


def test_the_valid_sample_loads(tmp_path: Path) -> None:
    (tmp_path / "x.toml").write_text(_VALID)
    assert load_profile(tmp_path / "x.toml").name == "x"


def test_profiles_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check(str(PROFILES_DIR)) == 0
    out = capsys.readouterr().out
    assert "8 profiles OK" in out and "patient_monitor 1.0.0: 10 numeric and 3 waveform metrics" in out
    (tmp_path / "a.toml").write_text(_VALID.replace('clear = 92.0', 'clear = 80.0'))
    assert check(str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "a.toml" in err and "alerts[0].clear" in err


def test_profiles_check_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    assert main(["profiles", "check", str(PROFILES_DIR)]) == 0
    assert "8 profiles OK" in capsys.readouterr().out


def _obj(items: list[str]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def test_interner_ids_equal_names_get_equal_ids_whatever_the_objects() -> None:
    names = Interner()
    a1, a2 = "".join(["de", "v-a"]), "".join(["dev", "-a"])  # equal, distinct objects
    assert a1 is not a2
    runs = _obj([a1, a1, a1, "dev-b", "dev-b", a2, a2, a2])  # run path
    assert names.ids(runs).tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    spread = _obj([a2, "dev-b", "dev-c", a1, "dev-b", "dev-c"])  # identity-table path
    assert names.ids(spread).tolist() == [0, 1, 2, 0, 1, 2]
    assert names.ids(spread.copy()).tolist() == [0, 1, 2, 0, 1, 2]  # now from the table
    assert names.names == [a1, "dev-b", "dev-c"]
    assert names.ids(_obj([])).tolist() == []


def test_interner_identity_table_is_bounded() -> None:
    names = Interner()
    for k in range(3):
        batch = _obj([f"name-{k}-{i}" for i in range(3000)])  # fresh objects every time
        assert names.ids(batch).tolist() == list(range(3000 * k, 3000 * (k + 1)))
    assert len(names._addr) <= Interner._KNOWN_OBJECTS  # noqa: SLF001


def test_interner_accepts_lists_and_fixed_width_string_arrays() -> None:
    names = Interner()
    assert names.ids(np.array(["a", "b", "a"])).tolist() == [0, 1, 0]  # dtype <U1
    assert names.ids(["b", "c"]).tolist() == [1, 2]  # type: ignore[arg-type]
