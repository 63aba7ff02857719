"""The sources table: each entry is a config section with ``enabled`` and builds a ``Source``."""

from __future__ import annotations

import pytest

from gateway.config import GatewayConfig
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.sources import SOURCES, SourceContext

pytestmark = pytest.mark.asyncio


class Intake:
    backed_up = False
    in_flight = 0
    pending_bytes = 0

    def submit(self, raw):  # noqa: ANN001
        pass


def context(registry: object | None, workers: int = 1) -> SourceContext:
    return SourceContext(intake=Intake(), metrics=Metrics(), registry=registry, gateway_id="gw-a",  # type: ignore[arg-type]
                         workers=workers, held_fraction=lambda: 0.0, max_memory_bytes=0)


async def test_every_source_is_a_config_section_and_builds_a_source():
    cfg = GatewayConfig()
    assert list(SOURCES) == ["mqtt", "nats", "http"]
    for name, kind in SOURCES.items():
        section = getattr(cfg, name)
        assert isinstance(section.enabled, bool), f"{name}: its section needs 'enabled'"
        source = kind.build(section, context(registry=object()))
        for method in ("start", "run", "stop_intake", "close"):
            assert callable(getattr(source, method)), f"{name}: no {method}()"


async def test_the_table_and_the_config_sections_name_the_same_sources():
    """A source section with no entry in SOURCES (or the reverse) would be silently ignored."""
    assert list(GatewayConfig().source_sections()) == list(SOURCES)


async def test_all_sources_off_is_refused_naming_each():
    import msgspec

    from gateway.config import HttpConfig, MqttConfig

    with pytest.raises(ValueError, match="mqtt.enabled and nats.enabled and http.enabled are all false"):
        GatewayConfig(mqtt=msgspec.structs.replace(MqttConfig(), enabled=False), http=HttpConfig(enabled=False))


async def test_mqtt_takes_its_client_id_and_shared_subscription_from_the_context():
    cfg = GatewayConfig()
    one = SOURCES["mqtt"].build(cfg.mqtt, context(None))
    assert (one._client_id, one._subscription) == ("vitalgate-gw-a", "devices/+/telemetry")  # noqa: SLF001
    two = SOURCES["mqtt"].build(cfg.mqtt, context(None, workers=2))
    assert two._subscription == "$share/vitalgate/devices/+/telemetry"  # noqa: SLF001


async def test_https_needs_the_registry():
    assert SOURCES["http"].needs_registry
    with pytest.raises(ConfigError, match="http.enabled"):
        SOURCES["http"].build(GatewayConfig().http, context(None))
