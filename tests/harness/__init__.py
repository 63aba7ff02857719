"""The test and bench harness: real services, the gateway as a process, samplers, waits.

This package is the one public surface ``bench/`` may import from ``tests/``; nothing
else under ``tests/`` is an API, and nothing under ``tests/`` imports ``bench/`` except
the tests of the bench (``tests/bench/``). ``tests/test_harness_boundaries.py`` checks
both directions. It lives under ``tests/`` because the tests are its first user and it
ships with them; it imports nothing of ``gateway/`` (the gateway runs as a subprocess).

Modules:
    replication: ``StandbyCluster``, a streaming (optionally synchronous) standby of a
        ``PostgresCluster`` made by ``pg_basebackup -R``, with ``promote()``.
    services: throwaway PostgreSQL+TimescaleDB (run as the postgres user) and mosquitto,
        each on a free port in a directory of its own; ``free_port``.
    gateway: ``GatewayProcess`` (``python -m gateway run`` with a config by environment,
        ready on a log line and the metrics endpoint, SIGTERM with a deadline, kill, log)
        and ``vitalgate()`` for the other commands.
    sampler: CPU seconds and resident memory of a process from /proc, /metrics scrapes.
    waits: ``wait_for`` / ``await_for``, polling a condition with a deadline.
    netns: ``Netns``, a network namespace with veth links to the root namespace that a
        test black-holes (link down, no reset), to run the gateway behind a failing network.
    nats: ``NatsCluster``, throwaway nats-server nodes (JetStream, MQTT) from the venv.
"""

from .gateway import PROFILES, REPO, CliError, GatewayExited, GatewayProcess, vitalgate
from .sampler import (
    children, cpu_seconds, descendants, machine_busy_seconds, metric_sum, parent, pid_alive, rss_bytes, rss_mib,
    scrape_metrics, tree_cpu_seconds,
)
from .https import ClientCA, HttpsGateway
from .nats import NatsCluster, NetHosts
from .netns import Netns
from .replication import StandbyCluster
from .services import Mosquitto, MqttTls, PostgresCluster, ServiceError, device_acl, free_port, write_password_file
from .waits import await_for, wait_for

__all__ = [
    "PROFILES", "REPO", "CliError", "ClientCA", "HttpsGateway", "GatewayExited", "GatewayProcess", "Mosquitto",
    "MqttTls", "NatsCluster", "Netns", "NetHosts", "PostgresCluster",
    "ServiceError", "StandbyCluster", "await_for", "children", "cpu_seconds", "descendants", "device_acl", "free_port",
    "machine_busy_seconds", "metric_sum", "parent", "pid_alive", "rss_bytes", "rss_mib", "scrape_metrics",
    "tree_cpu_seconds", "vitalgate", "wait_for", "write_password_file",
]
