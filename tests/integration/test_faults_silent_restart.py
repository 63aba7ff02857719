"""A device that goes quiet while the gateway is down still gets its ``silent`` alert.

The fault: a power cut takes a device and the gateway's host together. The device never
reports again, so a restore that waits for the device's next reading would never arm its
``silent`` rule. At start the gateway arms the silent rules of every device seen within
``checks.silent_restore_horizon_s`` (``gateway.restore``), and the episode opens at the
contract's ``at``: latest reading + ``after_s`` (``probe_silent``: 30 s).
"""

from __future__ import annotations

import time

import pytest

from tests.harness import wait_for
from tests.integration.support import Publisher, encode, topic
from tests.integration.test_ingest import count, fetch, wait_ingests

pytestmark = pytest.mark.integration

AFTER_S = 30  # probe_silent of device_profiles/pulse_oximeter.toml


def test_a_device_quiet_across_a_restart_opens_silent_at_latest_plus_after_s(db_dsn, broker, gateway_factory):
    gw = gateway_factory(db_dsn)
    gw.start()
    # readings 18 s old at publication: the deadline (latest + 30 s) is 12 s ahead, room to stop
    latest = (int(time.time()) - 18) * 1000
    envelopes = [{"v": 1, "device_id": "po-quiet", "seq": s, "profile": "pulse_oximeter",
                  "numerics": [{"t": latest - (4 - s) * 1000, "values": {"spo2": 97, "pulse_rate": 70}}]}
                 for s in range(5)]
    envelopes.append({"v": 1, "device_id": "po-long-gone", "seq": 0, "profile": "pulse_oximeter",  # outside the horizon
                      "numerics": [{"t": latest - 3_600_000, "values": {"spo2": 97, "pulse_rate": 70}}]})
    pub = Publisher(broker.port)
    for i, e in enumerate(envelopes):
        pub.publish(topic(e), encode(e, i))
    pub.wait_acked()
    pub.close()
    wait_ingests(db_dsn, len(envelopes), timeout=60, gw=gw)
    assert gw.terminate() == 0
    stopped_at = time.time() * 1000
    assert stopped_at < latest + AFTER_S * 1000, "the first gateway ran past the deadline: not a restart test"
    assert count(db_dsn, "SELECT count(*) FROM alerts") == 0

    # the device stays quiet; the gateway comes back
    gw2 = gateway_factory(db_dsn, env={"VITALGATE_CHECKS_SILENT_RESTORE_HORIZON_S": "1800"})
    gw2.start()
    restarted_at = time.time() * 1000
    rows = wait_for(lambda: fetch(db_dsn, "SELECT device_id, rule, (extract(epoch FROM opened_at) * 1000)::bigint AS at,"
                                          " cleared_at FROM alerts"),
                    timeout=AFTER_S + 30, interval=0.25, message=lambda: f"no silent episode\n{gw2.log_tail()}")
    opened = time.time() * 1000
    assert [(r["device_id"], r["rule"], r["at"], r["cleared_at"]) for r in rows] == [
        ("po-quiet", "probe_silent", latest + AFTER_S * 1000, None)]
    assert "Recent devices restored; their silent rules are armed. devices=1" in gw2.log_text()
    print(f"\nfault: gateway stopped {(latest + AFTER_S * 1000 - stopped_at) / 1000:.1f} s before a device's silent "
          f"deadline, the device quiet across the restart; silent episode opened {(opened - restarted_at) / 1000:.1f} s "
          f"after the restart, at = latest + {AFTER_S} s")
    # one episode, not one per tick: a later look finds the same single row
    assert count(db_dsn, "SELECT count(*) FROM alerts") == 1
    assert gw2.terminate() == 0
