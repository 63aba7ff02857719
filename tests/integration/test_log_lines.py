"""A real gateway whose stderr is not a terminal writes JSON lines with the stable fields, and no secret."""

from __future__ import annotations

import orjson
import pytest

from tests.harness import wait_for
from tests.integration.support import Publisher, pulse_ox_envelopes, topic

pytestmark = pytest.mark.integration

SECRET = "vgd_0123456789abcdef_" + "Q" * 43


def test_gateway_not_on_a_terminal_writes_parseable_json_lines(db_dsn, gateway_factory, broker):
    gw = gateway_factory(db_dsn, env={"VITALGATE_LOG_FORMAT": "auto"})  # the default; its log is a file
    gw.start()
    good = pulse_ox_envelopes(1, 1)[0]
    bad = {**good, "seq": 1, "numerics": [{"t": good["numerics"][0]["t"], "values": {SECRET: 1}}]}
    pub = Publisher(broker.port)
    for env in (good, bad):
        pub.publish(topic(env), orjson.dumps(env))
    pub.wait_acked()
    pub.close()

    def rejected() -> dict | None:
        return next((x for x in map(orjson.loads, gw.log_text().splitlines()) if x["event"] == "Payload rejected."), None)

    line = wait_for(rejected, timeout=30, message=gw.log_tail)
    assert gw.terminate() == 0
    records = [orjson.loads(x) for x in gw.log_text().splitlines()]  # every line is one JSON object
    assert records and all({"ts", "level", "logger", "event"} <= x.keys() for x in records)
    assert {x["event"] for x in records} >= {"Gateway running.", "Subscribed.", "Payload rejected.", "Stopped."}
    assert line["level"] == "warning" and line["logger"] == "gateway.pipeline"
    assert line["device_id"] == good["device_id"] and line["source"] == "mqtt"
    assert line["reason"].startswith("numerics[0].values.vgd_0123456789abcdef_***: unknown metric")
    assert SECRET not in gw.log_text() and "Q" * 43 not in gw.log_text()
