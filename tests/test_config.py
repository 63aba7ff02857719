"""Configuration: file + environment, validated, with errors naming the key and the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load
from gateway.errors import ConfigError
from gateway.cli import main

REPO = Path(__file__).resolve().parent.parent


def test_sample_config_loads_and_lists_every_key():
    cfg = load(REPO / "gateway.sample.toml", environ={})
    assert cfg == load(None, environ={"VITALGATE_GATEWAY_ID": cfg.gateway_id})
    text = (REPO / "gateway.sample.toml").read_text()
    for name in cfg.__struct_fields__:
        value = getattr(cfg, name)
        if hasattr(value, "__struct_fields__"):
            assert f"[{name}]" in text
            for key in value.__struct_fields__:
                assert f"{key} =" in text or f"# {key} =" in text, f"{name}.{key} missing from the sample"
        else:
            assert f"{name} =" in text or f"# {name} =" in text, f"{name} missing from the sample"


def test_environment_overrides_file(tmp_path: Path):
    f = tmp_path / "g.toml"
    f.write_text('gateway_id = "from-file"\n[mqtt]\nurl = "mqtt://file:1883"\n[batch]\nmax_rows = 100\n')
    cfg = load(f, environ={"VITALGATE_MQTT_URL": "mqtt://env:1884", "VITALGATE_DATABASE_URL": "postgresql://x/y",
                           "VITALGATE_PROFILES_DIR": "/p", "VITALGATE_BATCH_MAX_AGE_S": "0.5",
                           "VITALGATE_MQTT_ENABLED": "true"})
    assert cfg.gateway_id == "from-file"
    assert cfg.mqtt.url == "mqtt://env:1884"
    assert cfg.database.url == "postgresql://x/y"
    assert cfg.profiles.dir == "/p"
    assert cfg.batch.max_rows == 100 and cfg.batch.max_age_s == 0.5
    assert cfg.mqtt_client_id == "vitalgate-from-file"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"VITALGATE_BATCH_MAX_ROWS": "0"}, "VITALGATE_BATCH_MAX_ROWS (batch.max_rows): Expected `int` >= 1"),
        ({"VITALGATE_BATCH_MAX_ROWS": "many"}, "VITALGATE_BATCH_MAX_ROWS (batch.max_rows): Expected `int`, got `str`"),
        ({"VITALGATE_MQTT_PROTOCOL": "4"}, "VITALGATE_MQTT_PROTOCOL (mqtt.protocol): Invalid enum value '4'"),
        ({"VITALGATE_DATABSE_URL": "x"}, "VITALGATE_DATABSE_URL: unknown setting"),
        ({"VITALGATE_GATEWAY_ID": "has space"}, "VITALGATE_GATEWAY_ID (gateway_id): Expected `str` matching regex"),
    ],
)
def test_bad_values_name_the_variable_and_key(environ: dict[str, str], message: str):
    with pytest.raises(ConfigError) as info:
        load(None, environ=environ)
    assert message in str(info.value)


def test_bad_file_key_is_named(tmp_path: Path):
    f = tmp_path / "g.toml"
    f.write_text("[batch]\nmax_rowz = 5\n")
    with pytest.raises(ConfigError) as info:
        load(f, environ={})
    assert str(info.value) == f"{f}: batch: Object contains unknown field `max_rowz`"


def test_run_refuses_to_start_on_bad_config(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.setenv("VITALGATE_RETRY_MAX_S", "-3")
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert "VITALGATE_RETRY_MAX_S (retry.max_s): Expected `float` > 0.0" in err
