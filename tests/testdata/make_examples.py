"""Writes the example recordings of device_profiles/examples/ (run from the repository root).

    .venv/bin/python -m tests.testdata.make_examples

The expected replay output beside each recording is written by ``tests/test_replay.py``
when ``VITALGATE_REGENERATE=1`` is set; review the diff before committing it.
"""

from __future__ import annotations

import math
from pathlib import Path

import orjson

EXAMPLES = Path(__file__).resolve().parents[2] / "device_profiles" / "examples"
T0 = 1_764_187_200_000  # 2025-11-26T20:00:00Z


def _envelopes(device: str, spo2: list[float], pr: list[float], per: int = 5, start: int = T0, seq0: int = 0,
               pleth: dict[int, list[float]] | None = None, received: dict[int, int] | None = None) -> list[dict]:
    """Oximeter envelopes of ``per`` one-second readings each."""
    out = []
    for k in range(0, len(spo2), per):
        numerics = [
            {"t": start + (k + i) * 1000, "values": {"spo2": spo2[k + i], "pulse_rate": pr[k + i]}}
            for i in range(min(per, len(spo2) - k))
        ]
        env: dict = {"v": 1, "device_id": device, "seq": seq0 + k // per, "profile": "pulse_oximeter",
                     "firmware": "2.4.1", "numerics": numerics}
        if pleth and k in pleth:
            env["waveforms"] = [{"metric": "pleth", "t0": start + k * 1000, "hz": 125, "samples": pleth[k]}]
        if received and k in received:
            env["received_at"] = received[k]
        out.append(env)
    return out


def desaturation() -> list[dict]:
    """SpO2 drifts below 90 % for about 40 s, hovers around the limit, recovers; tachycardia."""
    spo2 = [97.0] * 10 + [96, 95, 94, 93, 92, 91, 90, 89.5, 89, 88] + [87.0] * 20 + [88, 89, 90.5, 89.5, 91, 90, 91.5, 92, 94, 96]
    spo2 += [97.0] * 10
    pr = [78.0] * 15 + [85, 92, 99, 106, 113, 120, 122, 124] + [125.0] * 12 + [121, 118, 116, 114, 110, 100, 90, 85, 80, 78]
    pr += [76.0] * (len(spo2) - len(pr))
    return _envelopes("po-000123", spo2, pr)


def _pleth(seconds: int, start_s: int, off: range) -> list[float]:
    """A 125 Hz plethysmogram at 72 /min; saturated (11.5) while the probe is off."""
    out = []
    for i in range(seconds * 125):
        s = start_s + i / 125
        out.append(11.5 if int(s) in off else round(0.5 + 0.4 * math.sin(2 * math.pi * 1.2 * s), 3))
    return out


def probe_off() -> list[dict]:
    """The probe comes off for 8 s (device sentinels 127 % / 511 /min, pleth saturated), then one glitch."""
    spo2 = [97.0] * 10 + [127.0] * 8 + [96.0] * 10 + [70.0] + [96.0] * 6
    pr = [72.0] * 10 + [511.0] * 8 + [74.0] * 17
    pleth = {k: _pleth(5, k, range(10, 18)) for k in range(0, 35, 5)}
    return _envelopes("po-000456", spo2, pr, pleth=pleth)


def frozen_sensor() -> list[dict]:
    """Both numerics freeze at one value for 150 s, and one envelope is lost (a 10 s gap)."""
    spo2 = [97.0, 96.0, 97.0, 98.0, 97.0] + [95.0] * 150
    pr = [70.0, 71.0, 72.0, 71.0, 70.0] + [80.0] * 150
    envs = _envelopes("po-000789", spo2, pr, per=10)
    return envs[:8] + envs[9:]


def silent_device() -> list[dict]:
    """po-000002 stops sending for 70 s while po-000001 goes on; receipt times are recorded."""
    quiet = range(T0 + 20_000, T0 + 90_000)
    lines = []
    for k in range(0, 120, 5):
        t = T0 + k * 1000
        for dev in ("po-000001", "po-000002"):
            if dev == "po-000002" and t in quiet:
                continue
            numerics = [{"t": t + i * 1000, "values": {"spo2": 97.0, "pulse_rate": 70.0 + i}} for i in range(5)]
            lines.append({"v": 1, "device_id": dev, "profile": "pulse_oximeter", "numerics": numerics,
                          "received_at": t + 4_000 + 180})
    return lines


def main() -> None:
    EXAMPLES.mkdir(parents=True, exist_ok=True)
    for name, make in (("desaturation", desaturation), ("probe_off", probe_off),
                       ("frozen_sensor", frozen_sensor), ("silent_device", silent_device)):
        path = EXAMPLES / f"{name}.ndjson"
        path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in make()))
        print(path)


if __name__ == "__main__":
    main()
