"""What the failure suite (``test_faults_*.py``) shares: a paced QoS 1 load that records
what the broker acknowledged, ``/readyz`` probes, and the line each test prints naming its
fault and the time to recover."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from tests.harness import wait_for
from tests.integration.support import encode, publish_paced, pulse_ox_envelopes, topic

__all__ = ["Load", "Readyz", "report"]

Probe = tuple[int, dict]


class Readyz:
    """``GET /readyz`` of a gateway: (status, body); ``via`` runs the request elsewhere
    (``Netns.call``, for a gateway in a namespace of its own)."""

    def __init__(self, port: int, via: Callable[[Callable[[], Probe]], Probe] | None = None) -> None:
        self.port = port
        self.via = via
        self.seen: list[tuple[float, int, dict]] = []  # (monotonic, status, body) of every probe

    def _get(self) -> Probe:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def __call__(self) -> Probe:
        status, body = self.via(self._get) if self.via is not None else self._get()
        self.seen.append((time.monotonic(), status, body))
        return status, body

    def check(self, name: str) -> dict:
        """The latest probe's check ``name``."""
        return next(c for c in self.seen[-1][2]["checks"] if c["name"] == name)

    def wait(self, ready: bool, timeout: float, *, failing: str | None = None) -> float:
        """Wait until ``/readyz`` says ``ready`` (when not ready and ``failing`` is given:
        with that check failing); return the seconds waited."""
        t0 = time.monotonic()

        def reached() -> bool:
            status, body = self()
            if ready:
                return status == 200
            return status == 503 and (failing is None or not self.check(failing)["ok"])

        wait_for(reached, timeout=timeout, interval=0.2,
                 message=lambda: f"/readyz never {'ready' if ready else 'not ready'}: {self.seen[-1][1:] if self.seen else None}")
        return time.monotonic() - t0


class Load:
    """Pulse-oximeter envelopes published at QoS 1 at a fleet's pace from a thread; every
    one must end in the database exactly once."""

    def __init__(self, port: int, *, devices: int, per_device: int, per_second: float, prefix: str = "po") -> None:
        self.envelopes = pulse_ox_envelopes(devices, per_device, prefix=prefix)
        payloads = [(topic(e), encode(e, i)) for i, e in enumerate(self.envelopes)]
        self.thread = publish_paced(port, payloads, per_second=per_second)

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the publisher did not get every PUBACK"


def report(fault: str, **figures: float) -> None:
    """The line the suite's output keeps: the fault injected and the measured recovery."""
    text = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in figures.items())
    print(f"\nfault: {fault}; {text}")
