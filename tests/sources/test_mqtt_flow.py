"""OrderedAcks: PUBACKs leave in arrival order whatever order the commits complete in."""

from __future__ import annotations

import random

from gateway.sources.mqtt import OrderedAcks


def test_acks_are_sent_in_arrival_order_when_commits_complete_out_of_order():
    sent: list[tuple[int, int]] = []
    acks = OrderedAcks(lambda mid, qos: sent.append((mid, qos)))
    callbacks = [acks.track(mid, 1) for mid in range(1, 101)]
    order = list(range(100))
    random.Random(5).shuffle(order)
    done: set[int] = set()
    for i in order:
        callbacks[i]()
        done.add(i)
        # exactly the longest prefix of completed messages has been acknowledged, in order
        prefix = 0
        while prefix in done:
            prefix += 1
        assert sent == [(mid, 1) for mid in range(1, prefix + 1)]
    assert len(acks) == 0


def test_a_second_ack_is_harmless_and_a_closed_connection_sends_nothing():
    sent: list[int] = []
    acks = OrderedAcks(lambda mid, _qos: sent.append(mid))
    a, b = acks.track(7, 1), acks.track(8, 1)
    a()
    a()
    assert sent == [7]
    acks.close()  # reconnected: the broker redelivers 8 on the new connection
    b()
    assert sent == [7]


class _Gate:
    """A ReadGate whose inputs the test sets; reads are "paused" without a socket."""

    def __init__(self, monkeypatch, max_mib: int = 100) -> None:  # noqa: ANN001
        from gateway.metrics import Metrics
        from gateway.sources import mqtt_flow

        self.held = 0.0
        self.rss_mib = 10
        monkeypatch.setattr(mqtt_flow, "resident_bytes", lambda: self.rss_mib << 20)
        self.metrics = Metrics()
        self.gate = mqtt_flow.ReadGate(self.metrics, lambda: self.held >= 1.0, lambda: self.held, max_mib << 20)

    def step(self, held: float, rss_mib: int) -> str | None:
        self.held, self.rss_mib = held, rss_mib
        self.gate._govern()  # noqa: SLF001
        assert self.metrics.intake_paused._value.get() == (self.gate._paused is not None)  # noqa: SLF001
        return self.gate._paused  # noqa: SLF001


def test_pauses_at_the_budget_and_resumes_below_three_quarters(monkeypatch):
    g = _Gate(monkeypatch)
    assert g.step(0.5, 10) is None
    assert g.step(1.0, 10) == "held"
    assert g.step(0.8, 10) == "held"  # hysteresis
    assert g.step(0.7, 10) is None


def test_pauses_near_the_memory_bound_while_something_is_held(monkeypatch):
    g = _Gate(monkeypatch)
    assert g.step(0.0, 95) is None  # nothing held: pausing would free nothing
    assert g.step(0.2, 95) == "memory"
    assert g.step(0.1, 85) == "memory"  # above the low watermark, payloads still held
    assert g.step(0.1, 70) is None


def test_memory_kept_with_nothing_held_stops_memory_pauses_until_it_falls(monkeypatch):
    g = _Gate(monkeypatch)
    assert g.step(0.3, 95) == "memory"
    assert g.step(0.0, 95) is None  # all written, memory still high: not ours to free
    assert g.step(0.3, 95) is None  # no more memory pauses ...
    assert g.step(1.0, 95) == "held"  # ... the payload budget still holds
    assert g.step(0.5, 95) is None
    assert g.step(0.0, 70) is None  # under the low watermark: memory pauses are armed again
    assert g.step(0.3, 95) == "memory"
