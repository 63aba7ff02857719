"""Could device A write as device B over MQTT? No: the broker's ACL refuses it, and the gateway
refuses what gets past a permissive broker (topic mismatch, unregistered, revoked), each
refusal in ``rejected`` and ``audit_log``, none of its readings stored.

Real mosquitto (TLS, password file, ACL), real PostgreSQL, the gateway as a subprocess.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest
import trustme

from gateway.cli import main
from tests.harness import PROFILES, GatewayProcess, Mosquitto, MqttTls, device_acl, wait_for, write_password_file
from tests.integration.support import Publisher, expected_readings, fetch_readings
from tests.integration.test_ingest import count, fetch

pytestmark = pytest.mark.integration

T = (int(time.time()) - 600) * 1000
_ids = itertools.count(1)
REGISTRATION = {"VITALGATE_AUTH_REQUIRE_REGISTRATION": "true", "VITALGATE_AUTH_REFRESH_S": "3600"}


def envelope(device: str, i: int, *, profile: bool = True) -> dict:
    """A pulse-oximeter envelope whose readings are unique to (device, i)."""
    env: dict = {"v": 1, "device_id": device, "seq": i, "firmware": "1.0",
                 "numerics": [{"t": T + i * 1000 + sum(map(ord, device)), "values": {"spo2": 90 + i % 10, "pulse_rate": 60 + i}}]}
    if profile:
        env["profile"] = "pulse_oximeter"
    return env


def publisher(port: int, **kw: object) -> Publisher:
    """A Publisher whose close() does not wait out paho's 1 s reconnect delay after the broker refused it."""
    return Publisher(port, reconnect_delay_s=0.1, **kw)  # type: ignore[arg-type]


def registry_cli(monkeypatch: pytest.MonkeyPatch, dsn: str, *argv: str) -> int:
    """`vitalgate ...` in this process, configured by the environment like an operator's shell."""
    for var in [v for v in os.environ if v.startswith("VITALGATE_")]:
        monkeypatch.delenv(var)  # the test run's own settings (VITALGATE_KEEP_SERVICES) are no gateway keys
    monkeypatch.setenv("VITALGATE_DATABASE_URL", dsn)
    monkeypatch.setenv("VITALGATE_PROFILES_DIR", str(PROFILES))
    return main(list(argv))


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator:
    made: list[GatewayProcess] = []

    def make(dsn: str, mqtt_url: str, env: dict[str, str]) -> GatewayProcess:
        gw = GatewayProcess(tmp_path / f"gw{len(made)}" / "gateway.log", database_url=dsn, mqtt_url=mqtt_url,
                            client_id=f"gw-identity-{next(_ids)}-{time.monotonic_ns()}", env={**REGISTRATION, **env})
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.stop()


def test_the_broker_acl_lets_a_device_publish_only_its_own_topic(tmp_path, db_dsn, gateways, monkeypatch, capsys):
    ca = trustme.CA()
    ca_pem, cert_pem, key_pem = tmp_path / "ca.pem", tmp_path / "broker.pem", tmp_path / "broker.key"
    ca.cert_pem.write_to_path(ca_pem)
    server = ca.issue_cert("127.0.0.1")
    server.cert_chain_pems[0].write_to_path(cert_pem)
    server.private_key_pem.write_to_path(key_pem)
    users = {"po-a": "secret-a", "po-b": "secret-b", "vitalgate": "secret-gw"}
    acl = tmp_path / "acl"
    acl.write_text("\n".join(device_acl("vitalgate")) + "\n")
    broker = Mosquitto(tmp_path / "mq", tls=MqttTls(ca_pem, cert_pem, key_pem),
                       password_file=write_password_file(tmp_path / "passwd", users), acl_file=acl,
                       extra_config=("log_type debug",))  # mosquitto logs ACL denials at debug level
    broker.start()
    try:
        assert "secret-a" not in (tmp_path / "passwd").read_text()  # hashed by mosquitto_passwd -U
        assert registry_cli(monkeypatch, db_dsn, "db", "migrate") == 0
        for dev in ("po-a", "po-b"):
            assert registry_cli(monkeypatch, db_dsn, "devices", "add", dev, "--profile", "pulse_oximeter") == 0
        capsys.readouterr()
        gw = gateways(db_dsn, broker.tls_url, {"VITALGATE_MQTT_TLS_CA": str(ca_pem), "VITALGATE_MQTT_USERNAME": "vitalgate",
                                               "VITALGATE_MQTT_PASSWORD": "secret-gw"})
        gw.start()

        # no credentials, wrong password, plain port without credentials: refused at CONNECT
        for kw in ({"tls_ca": str(ca_pem)}, {"tls_ca": str(ca_pem), "username": "po-a", "password": "secret-b"}, {}):
            port = broker.port if not kw else broker.tls_port
            p = publisher(port, protocol=mqtt.MQTTv5, **kw)
            assert p.wait_connected().is_failure, kw
            p.close()

        # A's credentials, B's topic and device_id. mosquitto 2.0 answers the QoS 1 PUBLISH with a
        # PUBACK (MQTT 5: reason 0x87 Not authorized; MQTT 3.1.1 cannot refuse in a PUBACK, so
        # a plain one), drops the message and then closes the connection.
        spoof = orjson.dumps(envelope("po-b", 1))
        for proto, cid, answer in ((mqtt.MQTTv5, "po-a-v5", "Not authorized"), (mqtt.MQTTv311, "po-a-v311", "Success")):
            p = publisher(broker.tls_port, protocol=proto, client_id=cid, username="po-a", password="secret-a",
                          tls_ca=str(ca_pem))
            assert not p.wait_connected().is_failure
            p.publish("devices/po-b/telemetry", spoof)
            p.wait_acked()
            assert [rc.getName() for rc in p.puback_reasons.values()] == [answer]  # type: ignore[attr-defined]
            wait_for(lambda cid=cid: f"Bad socket read/write on client {cid}" in broker.log_tail(400), timeout=10,
                     message=f"the broker closing {cid}'s connection")
            p.close()
        log = broker.log_tail(400)
        assert "Denied PUBLISH from po-a-v5 (d0, q1, r0, m1, 'devices/po-b/telemetry'" in log
        assert "Denied PUBLISH from po-a-v311 (d0, q1, r0, m1, 'devices/po-b/telemetry'" in log
        # then A on its own topic: stored, and it arrives after the refused ones would have
        own = publisher(broker.tls_port, client_id="po-a-own", username="po-a", password="secret-a", tls_ca=str(ca_pem))
        assert not own.wait_connected().is_failure
        own.publish("devices/po-a/telemetry", orjson.dumps(envelope("po-a", 2)))
        own.wait_acked()
        assert [rc.getName() for rc in own.puback_reasons.values()] == ["Success"]  # type: ignore[attr-defined]
        own.close()

        wait_for(lambda: count(db_dsn, "SELECT count(*) FROM ingests") == 1, timeout=30, message=gw.log_tail)
        assert [r["device_id"] for r in fetch(db_dsn, "SELECT device_id FROM ingests")] == ["po-a"]
        assert count(db_dsn, "SELECT count(*) FROM readings WHERE device_id = 'po-b'") == 0
        assert count(db_dsn, "SELECT count(*) FROM rejected") == 0  # the gateway never saw the spoofed payloads
        assert gw.metric("gateway_messages_received_total") == 1
        assert gw.terminate() == 0
    finally:
        broker.cleanup()


def test_a_device_certificate_is_its_broker_identity(tmp_path, db_dsn, gateways, monkeypatch, capsys):
    """Mutual TLS at the broker: the certificate's CN is the MQTT username the ACL binds to a topic."""
    ca = trustme.CA()
    ca_pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(ca_pem)
    files = {}
    for name, identity in (("broker", "127.0.0.1"), ("vitalgate", "vitalgate"), ("po-a", "po-a")):
        files[name] = tmp_path / f"{name}.pem"
        ca.issue_cert(identity, common_name=identity).private_key_and_cert_chain_pem.write_to_path(files[name])
    stranger = tmp_path / "stranger.pem"  # a certificate naming po-a, from another CA
    trustme.CA().issue_cert("po-a", common_name="po-a").private_key_and_cert_chain_pem.write_to_path(stranger)
    acl = tmp_path / "acl"
    acl.write_text("\n".join(device_acl("vitalgate")) + "\n")
    broker = Mosquitto(tmp_path / "mq", tls=MqttTls(ca_pem, files["broker"], files["broker"], require_certificate=True,
                                                   use_identity_as_username=True), acl_file=acl)
    broker.start()
    try:
        assert registry_cli(monkeypatch, db_dsn, "db", "migrate") == 0
        assert registry_cli(monkeypatch, db_dsn, "devices", "add", "po-a", "--profile", "pulse_oximeter") == 0
        capsys.readouterr()
        gw = gateways(db_dsn, broker.tls_url, {"VITALGATE_MQTT_TLS_CA": str(ca_pem), "VITALGATE_MQTT_TLS_CERT": str(files["vitalgate"]),
                                               "VITALGATE_MQTT_TLS_KEY": str(files["vitalgate"])})
        gw.start()

        # no client certificate, or one the broker's CA did not sign: the TLS handshake fails (TLS 1.3:
        # after the client's side completed), and no CONNACK ever comes
        for cert, error in ((None, "peer did not return a certificate"), (str(stranger), "certificate verify failed")):
            p = publisher(broker.tls_port, protocol=mqtt.MQTTv5, tls_ca=str(ca_pem), tls_cert=cert)
            wait_for(lambda error=error: f"SSL routines::{error}" in broker.log_tail(100), timeout=10,
                     message=lambda: broker.log_tail())
            assert p.connack is None
            p.close()
        anonymous = publisher(broker.port, protocol=mqtt.MQTTv5)  # the plain listener: no identity, refused
        assert anonymous.wait_connected().is_failure
        anonymous.close()

        dev = publisher(broker.tls_port, protocol=mqtt.MQTTv5, client_id="po-a-cert", tls_ca=str(ca_pem),
                        tls_cert=str(files["po-a"]))
        assert not dev.wait_connected().is_failure
        dev.publish("devices/po-b/telemetry", orjson.dumps(envelope("po-b", 1)))
        dev.wait_acked()
        assert [rc.getName() for rc in dev.puback_reasons.values()] == ["Not authorized"]  # type: ignore[attr-defined]
        dev.close()
        dev = publisher(broker.tls_port, protocol=mqtt.MQTTv5, client_id="po-a-cert2", tls_ca=str(ca_pem),
                        tls_cert=str(files["po-a"]))
        own = envelope("po-a", 2)
        dev.publish("devices/po-a/telemetry", orjson.dumps(own))
        dev.wait_acked()
        dev.close()
        wait_for(lambda: count(db_dsn, "SELECT count(*) FROM ingests") == 1, timeout=30, message=gw.log_tail)
        assert asyncio.run(fetch_readings(db_dsn)) == expected_readings([own])
        assert count(db_dsn, "SELECT count(*) FROM rejected") == 0
        assert gw.terminate() == 0
    finally:
        broker.cleanup()


# (topic device, envelope device, profile in the envelope, expected reason or None if stored, audit action)
ROUND = [
    ("po-a", "po-a", True, None, None),
    ("po-a", "po-c", True, "device_id: 'po-c' does not match the device id 'po-a' of the topic", "identity.mismatch"),
    ("po-c", "po-c", False, None, None),  # no profile: the registered one
    ("po-x", "po-x", True, "device_id: 'po-x' is not registered", "device.unregistered"),
    ("po-c", "po-a", True, "device_id: 'po-a' does not match the device id 'po-c' of the topic", "identity.mismatch"),
    ("po-r", "po-r", True, "device_id: 'po-r' is revoked", "device.revoked"),
    ("po-x", "po-a", True, "device_id: 'po-a' does not match the device id 'po-x' of the topic", "identity.mismatch"),
    ("po-x", "po-x", False, "device_id: 'po-x' is not registered", "device.unregistered"),
]


def test_spoofed_unregistered_and_revoked_envelopes_are_all_refused_and_audited(db_dsn, broker, gateways, monkeypatch, capsys):
    assert registry_cli(monkeypatch, db_dsn, "db", "migrate") == 0
    for dev in ("po-a", "po-c", "po-r"):
        assert registry_cli(monkeypatch, db_dsn, "devices", "add", dev, "--profile", "pulse_oximeter") == 0
    assert registry_cli(monkeypatch, db_dsn, "devices", "revoke", "po-r") == 0
    capsys.readouterr()
    n_registry_audit = count(db_dsn, "SELECT count(*) FROM audit_log")
    gw = gateways(db_dsn, broker.url, {})
    gw.start()

    pub = Publisher(broker.port, protocol=mqtt.MQTTv5)
    stored: list[dict] = []
    refused: list[tuple[str, str, str, str]] = []  # topic device, envelope device, reason, action
    for i in range(25):
        for j, (topic_dev, dev, profile, reason, action) in enumerate(ROUND):
            env = envelope(dev, i * len(ROUND) + j, profile=profile)
            payload = orjson.dumps(env)
            pub.publish(f"devices/{topic_dev}/telemetry", payload)
            if reason is None:
                stored.append(env)
            else:
                refused.append((topic_dev, dev, reason, action))
    pub.wait_acked()
    pub.close()
    wait_for(lambda: count(db_dsn, "SELECT count(*) FROM ingests") == len(stored)
             and count(db_dsn, "SELECT count(*) FROM rejected") == len(refused), timeout=60, message=gw.log_tail)

    rejected = fetch(db_dsn, "SELECT topic_or_path, device_id, reason, payload_sha256 FROM rejected ORDER BY id")
    assert [(r["topic_or_path"], r["reason"], r["device_id"]) for r in rejected] == [
        (f"devices/{t}/telemetry", reason, t) for t, _, reason, _ in refused]
    audit = fetch(db_dsn, f"SELECT * FROM audit_log WHERE id > {n_registry_audit} ORDER BY id")
    assert [(a["actor"], a["action"], a["target"], a["outcome"]) for a in audit] == [
        (f"mqtt:{t}", action, dev, "denied") for t, dev, _, action in refused]  # target: the device claimed
    assert [a["correlation_id"] for a in audit] == [bytes(r["payload_sha256"]).hex() for r in rejected]
    assert [orjson.loads(a["detail"])["reason"] for a in audit] == [r["reason"] for r in rejected]

    readings = asyncio.run(fetch_readings(db_dsn))
    assert readings == expected_readings(stored)  # every valid reading, and none of a refused envelope
    assert {r["profile"] for r in fetch(db_dsn, "SELECT DISTINCT profile FROM ingests")} == {"pulse_oximeter"}
    assert gw.metric("gateway_audit_events_total") == len(refused)
    assert gw.terminate() == 0


def test_a_device_revoked_while_the_gateway_runs_is_refused_from_the_next_envelope(db_dsn, broker, gateways, monkeypatch, capsys):
    assert registry_cli(monkeypatch, db_dsn, "db", "migrate") == 0
    assert registry_cli(monkeypatch, db_dsn, "devices", "add", "po-a", "--profile", "pulse_oximeter") == 0
    capsys.readouterr()
    gw = gateways(db_dsn, broker.url, {})  # refresh_s = 3600: only the CLI's NOTIFY can tell the gateway
    gw.start()
    pub = Publisher(broker.port)
    first = envelope("po-a", 1)
    pub.publish("devices/po-a/telemetry", orjson.dumps(first))
    pub.wait_acked()
    wait_for(lambda: count(db_dsn, "SELECT count(*) FROM ingests") == 1, timeout=30, message=gw.log_tail)

    mark = len(gw.log_text())
    assert registry_cli(monkeypatch, db_dsn, "devices", "revoke", "po-a") == 0
    wait_for(lambda: "Device registry loaded." in gw.log_text()[mark:] and "trigger=notify" in gw.log_text()[mark:],
             timeout=20, message=lambda: f"the gateway reloading the registry on NOTIFY:\n{gw.log_tail()}")
    after = [envelope("po-a", i) for i in (2, 3)]
    for env in after:
        pub.publish("devices/po-a/telemetry", orjson.dumps(env))
    pub.wait_acked()
    pub.close()
    wait_for(lambda: count(db_dsn, "SELECT count(*) FROM rejected") == 2, timeout=30, message=gw.log_tail)
    assert [r["reason"] for r in fetch(db_dsn, "SELECT reason FROM rejected ORDER BY id")] == ["device_id: 'po-a' is revoked"] * 2
    assert count(db_dsn, "SELECT count(*) FROM ingests") == 1
    assert asyncio.run(fetch_readings(db_dsn)) == expected_readings([first])
    assert [r["action"] for r in fetch(db_dsn, "SELECT action FROM audit_log ORDER BY id")] == [
        "device.add", "device.revoke", "device.revoked", "device.revoked"]
    assert gw.terminate() == 0
