"""deploy/grafana: every panel's query runs, and names only what exists.

Grafana itself cannot run here, so this checks what Grafana would send:

- unit part: the provisioning files and dashboards parse; every panel uses a provisioned
  data source; every SQL panel has its expected columns declared below (a new panel must be
  declared); every variable a query names is defined; every metric a PromQL expression
  names is exported by ``gateway.metrics.Metrics``, and every label it groups by is one of
  that metric's labels;
- integration part: a real gateway on a throwaway TimescaleDB (the project's schema, data
  ingested over MQTT, associations inserted), then every SQL query of every panel and query
  variable is run after substituting Grafana's macros and variables as below, and must return
  at least one row with exactly the declared columns; and every PromQL metric name must be
  in a real scrape of that gateway's ``/metrics``.

Substitution (what Grafana's PostgreSQL data source does with ``timescaledb: true``):
``$__timeFilter(c)`` -> ``c BETWEEN <from> AND <to>`` (the last 6 hours);
``$__timeGroupAlias(c, i)`` -> ``time_bucket(i, c) AS "time"``, ``$__timeGroup(c, i)`` ->
``time_bucket(i, c)``, with ``$__interval`` -> ``'1m'``; ``$var``/``${var}`` -> the value in
``VARIABLES`` (multi-value variables as Grafana renders them: quoted and comma-separated).
"""

from __future__ import annotations

import datetime
import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import yaml
from prometheus_client import generate_latest

from gateway.metrics import Metrics
from tests.harness import REPO, GatewayProcess, Mosquitto, PostgresCluster, await_for
from tests.integration.support import Publisher

GRAFANA = REPO / "deploy" / "grafana"
DASHBOARDS = {"ward-overview.json": "Ward overview", "patient-trends.json": "Patient trends", "gateway.json": "Gateway"}
PG_UID, PROM_UID = "vitalgate-timescaledb", "vitalgate-prometheus"

# (dashboard title, panel title or "$variable") -> the columns its query returns, in order
EXPECTED: dict[tuple[str, str], tuple[str, ...]] = {
    ("Ward overview", "Open alerts by priority"): ("priority", "open"),
    ("Ward overview", "Alerts opened (5 min)"): ("time", "metric", "opened"),
    ("Ward overview", "Latest per bed"): ("bed", "patient", "device", "hr", "spo2", "rr", "nibp_sys", "nibp_dia", "temp",
                                          "last_reading", "alarm"),
    ("Ward overview", "Open alerts"): ("time", "bed", "patient", "device", "rule", "priority", "metric", "value"),
    ("Patient trends", "$patient"): ("patient_ref",),
    ("Patient trends", "$metric"): ("metric",),
    ("Patient trends", "Vital signs (mean per interval)"): ("time", "metric", "value"),
    ("Patient trends", "Hourly range"): ("time", "metric", "min", "mean", "max", "readings"),
    ("Patient trends", "Alert episodes"): ("time", "cleared", "device", "bed", "rule", "priority", "metric", "value"),
    ("Patient trends", "Devices and beds"): ("time", "ended", "device", "bed"),
}
WARD, PATIENT = "ICU-A/", "PT-2001"
VARIABLES = {"ward": WARD, "patient": PATIENT, "metric": "'spo2','pulse_rate'"}
WINDOW_S = 6 * 3600


def _dashboards() -> list[dict[str, Any]]:
    return [json.loads((GRAFANA / "dashboards" / name).read_text()) for name in DASHBOARDS]


def sql_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title or $variable, SQL) of every SQL target and SQL query variable."""
    out = []
    for d in _dashboards():
        for var in d["templating"]["list"]:
            if var["type"] == "query" and var["datasource"]["uid"] == PG_UID:
                out.append((d["title"], f"${var['name']}", var["query"]))
        for p in d["panels"]:
            for t in p.get("targets", []):
                if "rawSql" in t:
                    out.append((d["title"], p["title"], t["rawSql"]))
    return out


def promql() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for d in _dashboards() for p in d["panels"] for t in p.get("targets", [])
            if "expr" in t]


def substitute(sql: str, now: datetime.datetime) -> str:
    """Grafana's macros and variables, as documented in the module docstring."""
    start, end = now - datetime.timedelta(seconds=WINDOW_S), now
    sql = sql.replace("$__interval", "'1m'")
    sql = re.sub(r"\$__timeFilter\(([^)]+)\)", lambda m: f"{m[1]} BETWEEN '{start.isoformat()}' AND '{end.isoformat()}'", sql)
    sql = re.sub(r"\$__timeGroupAlias\(([^,]+),\s*([^)]+)\)", lambda m: f'time_bucket({m[2]}, {m[1]}) AS "time"', sql)
    sql = re.sub(r"\$__timeGroup\(([^,]+),\s*([^)]+)\)", lambda m: f"time_bucket({m[2]}, {m[1]})", sql)
    sql = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: VARIABLES[m[1] or m[2]], sql)
    assert "$" not in sql, sql
    return sql


def exported(exposition: str) -> set[str]:
    """Sample names of a Prometheus text exposition, with a histogram's _bucket/_sum/_count
    (a labelled metric with no sample yet shows only in its # TYPE line)."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names.update(f"{name}{s}" for s in ("_bucket", "_sum", "_count"))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(gateway_[a-z0-9_]+)\b", expr))


# ------------------------------------------------------------------ unit part


def test_provisioning_names_the_dashboards_and_both_data_sources():
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "timescaledb.yaml").read_text())
    by_uid = {d["uid"]: d for d in ds["datasources"]}
    assert by_uid[PG_UID]["type"] == "postgres" and by_uid[PG_UID]["jsonData"]["timescaledb"] is True
    assert by_uid[PG_UID]["secureJsonData"]["password"].startswith("${"), "credentials come from the environment"
    assert by_uid[PROM_UID]["type"] == "prometheus"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "dashboards.yaml").read_text())["providers"]
    assert [p["type"] for p in providers] == ["file"]
    assert sorted(d["title"] for d in _dashboards()) == sorted(DASHBOARDS.values())
    assert len({d["uid"] for d in _dashboards()}) == len(DASHBOARDS)
    for d in _dashboards():
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), d["title"]
        for p in d["panels"]:
            uids = {p["datasource"]["uid"], *(t["datasource"]["uid"] for t in p["targets"])}
            assert uids <= set(by_uid), (d["title"], p["title"], uids)


def test_every_sql_query_is_declared_and_its_variables_defined():
    queries = sql_queries()
    assert {(d, p) for d, p, _ in queries} == set(EXPECTED)
    defined = {d["title"]: {v["name"] for v in d["templating"]["list"]} for d in _dashboards()}
    for dash, panel, sql in queries:
        used = {a or b for a, b in re.findall(r"\$\{(\w+)\}|\$(?!__)(\w+)", sql)}
        assert used <= defined[dash], (dash, panel, used - defined[dash])
        substitute(sql, datetime.datetime.now(datetime.timezone.utc))  # no macro left behind


def test_every_promql_metric_and_label_exists():
    m = Metrics()
    names = exported(generate_latest(m.registry).decode())
    labels = {}
    for metric in vars(m).values():
        if hasattr(metric, "_labelnames"):
            base = metric._name  # noqa: SLF001 - the family name without _total
            for suffix in ("", "_total", "_bucket", "_sum", "_count"):
                labels[base + suffix] = set(metric._labelnames) | ({"le"} if suffix == "_bucket" else set())  # noqa: SLF001
    exprs = promql()
    assert len(exprs) >= 10
    for title, expr in exprs:
        used = metric_names(expr)
        assert used, (title, expr)
        assert used <= names, (title, sorted(used - names))
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            wanted = {g.strip() for g in group.split(",")}
            have = set().union(*(labels[u] for u in used))
            assert wanted <= have, (title, expr, wanted - have)


def test_substitution_renders_what_grafana_would():
    now = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    sql = substitute("SELECT $__timeGroupAlias(b, $__interval), x FROM t WHERE $__timeFilter(b) "
                     "AND p = '$patient' AND l LIKE '${ward}%' AND m IN ($metric)", now)
    assert sql == ("SELECT time_bucket('1m', b) AS \"time\", x FROM t WHERE b BETWEEN '2026-01-01T21:04:05+00:00' AND "
                   "'2026-01-02T03:04:05+00:00' AND p = 'PT-2001' AND l LIKE 'ICU-A/%' AND m IN ('spo2','pulse_rate')")


# ------------------------------------------------------------------ integration part


def _envelope(device: str, seq: int, t0: int, n: int, spo2: float, pr: float) -> bytes:
    return orjson.dumps({"v": 1, "device_id": device, "seq": seq, "profile": "pulse_oximeter",
                         "numerics": [{"t": t0 + k * 1000, "values": {"spo2": spo2, "pulse_rate": pr}}
                                      for k in range(n)]})


@pytest.mark.integration
@pytest.mark.asyncio
async def test_every_query_returns_rows_of_its_columns_on_real_data(pg_cluster: PostgresCluster, mosquitto: Mosquitto,
                                                                    tmp_path: Path):
    name = f"grafana_{time.monotonic_ns() % 10**10}"
    dsn = pg_cluster.create_database(name)
    gw = GatewayProcess(tmp_path / "gw" / "gateway.log", database_url=dsn, mqtt_url=mosquitto.url,
                        client_id=f"grafana-{time.monotonic_ns()}")
    try:
        gw.start()  # migrates the schema
        now_ms = int(time.time() * 1000)
        conn = await asyncpg.connect(dsn)
        try:
            # PT-2001: an older device in another bed (ended), then gf-po-1 in the ward; PT-2002 next bed.
            await conn.executemany(
                "INSERT INTO associations (device_id, patient_ref, location, started_at, ended_at) "
                "VALUES ($1, $2, $3, now() - $4::interval, now() - $5::interval)",
                [("gf-po-0", PATIENT, "ED/Bay 2", datetime.timedelta(hours=5), datetime.timedelta(hours=3))])
            await conn.executemany(
                "INSERT INTO associations (device_id, patient_ref, location, started_at) VALUES ($1, $2, $3, now() - $4::interval)",
                [("gf-po-1", PATIENT, f"{WARD}Bed 01", datetime.timedelta(hours=3)),
                 ("gf-po-2", "PT-2002", f"{WARD}Bed 02", datetime.timedelta(hours=3))])
            pub = Publisher(mosquitto.port)
            pub.wait_connected()
            t_old = now_ms - 4 * 3600_000
            pub.publish("devices/gf-po-0/telemetry", _envelope("gf-po-0", 0, t_old, 120, 97, 70))
            t0 = now_ms - 20 * 60_000
            for i, dev in enumerate(("gf-po-1", "gf-po-2")):
                pub.publish(f"devices/{dev}/telemetry", _envelope(dev, 0, t0, 20 * 60 - 30, 96 - i, 72 + i))
            # the last 25 s of gf-po-1 below 90: spo2_low (high) opens and stays open
            pub.publish("devices/gf-po-1/telemetry", _envelope("gf-po-1", 1, now_ms - 25_000, 25, 85, 75))
            pub.wait_acked(60)
            pub.close()

            async def ready() -> bool:
                return bool(await conn.fetchval(
                    "SELECT count(*) FROM alerts WHERE device_id = 'gf-po-1' AND cleared_at IS NULL")) and bool(
                    await conn.fetchval("SELECT count(DISTINCT device_id) = 3 FROM readings_1m"))

            await await_for(ready, timeout=60, interval=0.2, message=lambda: f"data never committed:\n{gw.log_tail()}")

            now = datetime.datetime.now(datetime.timezone.utc)
            for dash, panel, sql in sql_queries():
                stmt = await conn.prepare(substitute(sql, now))
                columns = tuple(a.name for a in stmt.get_attributes())
                rows = await stmt.fetch()
                assert columns == EXPECTED[(dash, panel)], (dash, panel, columns)
                assert rows, (dash, panel, "no rows")
            # spot checks that the joins mean what they say
            by_panel = {(d, p): s for d, p, s in sql_queries()}
            ward_rows = await conn.fetch(substitute(by_panel[("Ward overview", "Latest per bed")], now))
            assert [(r["bed"], r["patient"]) for r in ward_rows] == [(f"{WARD}Bed 01", PATIENT), (f"{WARD}Bed 02", "PT-2002")]
            assert ward_rows[0]["alarm"] == "high" and ward_rows[0]["spo2"] == 85
            beds = await conn.fetch(substitute(by_panel[("Patient trends", "Devices and beds")], now))
            assert [r["device"] for r in beds] == ["gf-po-1", "gf-po-0"]
        finally:
            await conn.close()

        body = urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=10).read().decode()
        names = exported(body)
        for title, expr in promql():
            assert metric_names(expr) <= names, (title, sorted(metric_names(expr) - names))
    finally:
        gw.stop()
        pg_cluster.drop_database(name)
