"""deploy/ and the Dockerfile: what can be checked without running a container.

- ``deploy/compose.yaml`` validates against the Compose Specification's JSON schema,
  vendored as ``tests/deploy/compose-spec.json`` (github.com/compose-spec/compose-spec,
  ``schema/compose-spec.json`` at commit 170098ba07d9f53c383a41bfd4c5166b0a4529a6,
  Apache-2.0), so no network is needed; and its gateway settings load as a configuration.
- Prometheus' own ``promtool`` checks the scrape config and the rules, and runs the rule
  unit tests of ``tests/deploy/vitalgate_rules_test.yml``.
- Every metric the rules name exists in a real gateway's ``/metrics``, with the labels
  the rules match on.
- The broker's ACL is the one README documents; the image runs as non-root with a
  HEALTHCHECK through ``vitalgate health``, whose exit status is tested here.
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jsonschema_rs
import orjson
import pytest
import yaml

from gateway.cli import main
from gateway.cli.health import health_url
from gateway.config import load
from tests.harness import GatewayProcess, Mosquitto, free_port, wait_for
from tests.integration.support import Publisher

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
RULES = DEPLOY / "prometheus" / "rules" / "vitalgate.yml"
RULE_TESTS = REPO / "tests" / "deploy" / "vitalgate_rules_test.yml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


# ------------------------------------------------------------------ compose


def test_compose_file_is_valid_against_the_compose_specification():
    schema = json.loads((REPO / "tests" / "deploy" / "compose-spec.json").read_text())
    validator = jsonschema_rs.validator_for(schema)
    errors = [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert errors == []
    # the schema does refuse what is wrong (a misspelt key, a bad healthcheck)
    broken = compose()
    broken["services"]["gateway"]["healthcheck"]["test"] = 5
    broken["services"]["mosquitto"]["restart_policy"] = "always"
    assert len(list(validator.iter_errors(broken))) == 2


def test_compose_stack_has_the_services_operations_needs():
    services = compose()["services"]
    assert services["timescaledb"]["image"].startswith("timescale/timescaledb:")
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    gw = services["gateway"]
    assert gw["build"] == {"context": "..", "dockerfile": "Dockerfile"} and (REPO / "Dockerfile").is_file()
    # run and health agree on the number of workers (one YAML anchor)
    assert gw["command"][:2] == ["run", "--workers"] and int(gw["command"][2]) >= 2
    assert gw["healthcheck"]["test"] == ["CMD", "vitalgate", "health", "--workers", gw["command"][2]]
    assert gw["depends_on"]["timescaledb"]["condition"] == "service_healthy"
    # Grafana gets deploy/grafana where its provisioning expects it
    mounts = {v.split(":")[0]: v.split(":")[1] for v in services["grafana"]["volumes"]}
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["./grafana/dashboards"] == "/var/lib/grafana/dashboards/vitalgate"
    assert services["prometheus"]["volumes"][0] == "./prometheus:/etc/prometheus:ro"


def test_compose_bind_mounts_exist_or_are_made_per_installation():
    per_installation = {"./mosquitto/vitalgate.passwd", "./mosquitto/tls", "./mosquitto/tls/ca.pem"}
    ignored = (DEPLOY / "mosquitto" / ".gitignore").read_text().split()
    assert {"vitalgate.passwd", "tls/"} <= set(ignored)  # never committed by accident
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith(".") or source in per_installation or source.startswith("./grafana/"):
                continue  # named volumes; files made at installation; deploy/grafana is tested with Grafana
            assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"


def test_compose_gateway_environment_is_a_valid_configuration():
    env = compose()["services"]["gateway"]["environment"]
    # compose interpolates ${VAR:?message}; any value will do for loading
    environ = {k: re.sub(r"\$\{[^}]*\}", "x", str(v)) for k, v in env.items()}
    cfg = load(None, environ=environ)
    assert cfg.mqtt.url.startswith("mqtts://mosquitto:") and cfg.mqtt.tls_ca and cfg.auth.require_registration
    assert cfg.metrics_host == "0.0.0.0" and cfg.log.format == "json"
    targets = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"][0]["static_configs"][0]["targets"]
    workers = int(compose()["services"]["gateway"]["command"][2])
    assert targets == [f"gateway:{cfg.metrics_port + i}" for i in range(workers)]  # one target per worker


def test_broker_config_is_the_one_readme_documents():
    readme = (REPO / "README.md").read_text()
    acl = re.search(r"```\n(# vitalgate\.acl:.*?)```", readme, re.S)
    assert acl is not None
    assert (DEPLOY / "mosquitto" / "vitalgate.acl").read_text() == acl.group(1)
    conf = [line.split("#")[0].split() for line in (DEPLOY / "mosquitto" / "mosquitto.conf").read_text().splitlines()]
    directives = {words[0]: words[1:] for words in conf if words}
    assert directives["allow_anonymous"] == ["false"] and directives["per_listener_settings"] == ["false"]
    assert [w for w in conf if w and w[0] == "listener"] == [["listener", "8883"]]  # TLS only
    assert {"cafile", "certfile", "keyfile", "acl_file", "password_file"} <= directives.keys()
    assert directives["persistence"] == ["true"] and directives["max_queued_messages"] == ["0"]


# ------------------------------------------------------------------ Prometheus


def promtool(*args: str, cwd: Path = REPO) -> str:
    exe = shutil.which("promtool")
    assert exe, "promtool not found: `make setup` installs Debian's prometheus package, which ships it"
    r = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def test_promtool_accepts_the_config_and_the_rules():
    out = promtool("check", "config", str(PROMETHEUS))
    assert "1 rule files found" in out  # the rule_files glob resolves next to the config
    assert "SUCCESS: 10 rules found" in promtool("check", "rules", str(RULES))


def test_alert_rules_fire_on_what_they_are_for():
    assert "SUCCESS" in promtool("test", "rules", str(RULE_TESTS))


def test_promtool_rule_tests_can_fail(tmp_path: Path):
    broken = RULE_TESTS.read_text().replace("'0+10x30'", "'0+2x30'")  # rejects at 2%: no page
    (tmp_path / "t.yml").write_text(broken.replace("../../deploy", str(DEPLOY)))
    r = subprocess.run([shutil.which("promtool") or "promtool", "test", "rules", "t.yml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "VitalgateRejectsRising" in r.stdout + r.stderr


def rule_selectors() -> dict[str, set[str]]:
    """Metric name -> label names its selectors match on, over every rule expression."""
    out: dict[str, set[str]] = {}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            for name, matchers in re.findall(r"\b(gateway_[a-z0-9_]+)(?:\{([^}]*)\})?", rule["expr"]):
                out.setdefault(name, set()).update(re.findall(r"(\w+)\s*=~?", matchers))
    return out


def exposition_names(text: str) -> dict[str, set[str]]:
    """Series name -> label names, from a Prometheus text exposition (TYPE lines give series not yet set)."""
    out: dict[str, set[str]] = {}
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("",), "gauge": ("",), "summary": ("_sum", "_count")}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            out.setdefault(name, set())  # the family, as documentation names it
            for suffix in suffixes.get(kind, ("",)):
                out.setdefault(name + suffix, set())
        elif line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s", line)
            assert m, line
            out.setdefault(m.group(1), set()).update(re.findall(r'(\w+)="', m.group(2) or ""))
    return out


def declared_labels() -> dict[str, set[str]]:
    """Series name -> label names as gateway.metrics declares them (for series a scrape has not shown yet)."""
    from prometheus_client.metrics import MetricWrapperBase

    from gateway.metrics import Metrics

    out: dict[str, set[str]] = {}
    for metric in vars(Metrics()).values():
        if isinstance(metric, MetricWrapperBase):
            for family in metric.describe():
                suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
                for suffix in suffixes:
                    extra = {"le"} if suffix == "_bucket" else set()
                    out[family.name + suffix] = set(metric._labelnames) | extra  # noqa: SLF001
    return out


@pytest.fixture
def gateway(db_dsn: str, mosquitto: Mosquitto, tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(tmp_path / "gw" / "gateway.log", database_url=db_dsn, mqtt_url=mosquitto.url,
                        client_id=f"deploy-{time.monotonic_ns()}")
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


@pytest.mark.integration
def test_every_metric_of_the_rules_and_readme_is_in_a_real_scrape(gateway: GatewayProcess, mosquitto: Mosquitto):
    # one stored and one rejected envelope, so the labelled series the rules match on exist
    t = int(time.time() * 1000) - 5000
    good = {"v": 1, "device_id": "po-deploy", "seq": 0, "profile": "pulse_oximeter",
            "numerics": [{"t": t, "values": {"spo2": 97, "pulse_rate": 70}}]}
    bad = {**good, "seq": 1, "numerics": [{"t": t + 1000, "values": {"spo2": "high"}}]}
    pub = Publisher(mosquitto.port)
    for env in (good, bad):
        pub.publish("devices/po-deploy/telemetry", orjson.dumps(env))
    pub.wait_acked()
    pub.close()
    wait_for(lambda: gateway.metric("gateway_envelopes_total") >= 2, timeout=30, message=gateway.log_tail,
             ignore=(KeyError,))
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=10).read().decode()
    series = exposition_names(scrape)
    selectors = rule_selectors()
    assert len(selectors) >= 7
    declared = declared_labels()
    for name, labels in selectors.items():
        assert name in series, f"{name} (alert rules) is not exported by the gateway"
        # a series never incremented in this run shows no labels: gateway.metrics declares them
        known = series[name] | (declared.get(name, set()) if not series[name] else set())
        assert labels <= known, f"{name}: rules match on {labels - known}, not exported"
    assert series["gateway_envelopes_total"] >= {"source", "outcome"}  # seen in the scrape itself
    readme = (REPO / "README.md").read_text()
    operating = readme[readme.index("## Operating vitalgate"):]
    operating = operating[:operating.index("\n## ", 1)]
    documented = set(re.findall(r"`(gateway_[a-z0-9_]+)", operating))
    assert documented >= {re.sub(r"_bucket$", "", name) for name in selectors}
    assert documented - set(series) == set()  # README names no metric the gateway lacks
    # and the container's health check passes against it
    env = {k: v for k, v in gateway.env.items() if k != "VITALGATE_LOG_FORMAT"}
    r = subprocess.run([sys.executable, "-m", "gateway", "health"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ image and `vitalgate health`


def test_dockerfile_runs_as_non_root_with_a_health_check():
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    runtime = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM ")):]
    users = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert 'RUN test "$(id -u vitalgate)" != 0 && test "$(id -g vitalgate)" != 0' in runtime
    assert runtime.index(next(x for x in runtime if x.startswith("RUN test"))) < runtime.index(f"USER {users[-1]}")
    checks = [line for line in runtime if line.startswith("HEALTHCHECK ")]
    assert len(checks) == 1 and checks[0].endswith('CMD ["vitalgate", "health"]')


class _Health(http.server.BaseHTTPRequestHandler):
    status = {}  # port -> status code answered on /healthz

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        code = self.status[self.server.server_address[1]] if self.path == "/healthz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_servers() -> Iterator[list[int]]:
    """Two consecutive ports answering /healthz with ``_Health.status[port]`` (a worker each)."""
    for _ in range(50):
        base = free_port()
        try:
            servers = [http.server.ThreadingHTTPServer(("127.0.0.1", base + i), _Health) for i in range(2)]
            break
        except OSError:
            continue
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    yield [base, base + 1]
    for s in servers:
        s.shutdown()
        s.server_close()


def test_health_exit_status(health_servers, monkeypatch, capsys):
    first, second = health_servers
    monkeypatch.setenv("VITALGATE_METRICS_PORT", str(first))
    _Health.status.update({first: 200, second: 200})
    assert main(["health"]) == 0
    assert main(["health", "--workers", "2"]) == 0
    _Health.status[second] = 503
    assert main(["health"]) == 0  # one worker asked
    assert main(["health", "--workers", "2"]) == 1
    assert f"http://127.0.0.1:{second}/healthz: HTTP 503" in capsys.readouterr().err
    monkeypatch.setenv("VITALGATE_WORKERS", "2")  # the configuration's workers are the default
    assert main(["health"]) == 1
    monkeypatch.setenv("VITALGATE_METRICS_PORT", str(free_port()))  # nobody listens
    monkeypatch.delenv("VITALGATE_WORKERS")
    assert main(["health", "--timeout", "2"]) == 1
    assert "Connection refused" in capsys.readouterr().err
    monkeypatch.setenv("VITALGATE_METRICS_PORT", "0")
    assert main(["health"]) == 2


def test_health_asks_a_wildcard_listener_on_the_loopback_address():
    assert health_url("0.0.0.0", 9464) == "http://127.0.0.1:9464/healthz"
    assert health_url("::", 9465) == "http://127.0.0.1:9465/healthz"
    assert health_url("10.0.0.5", 9464) == "http://10.0.0.5:9464/healthz"
    assert health_url("::1", 9464) == "http://[::1]:9464/healthz"
