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
