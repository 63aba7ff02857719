"""Throwaway real services for integration tests and the bench: PostgreSQL+TimescaleDB and mosquitto.

Nothing here is mocked. Each service lives in its own temporary directory, listens on a
free 127.0.0.1 port and never touches the machine's own PostgreSQL (5432) or mosquitto
(1883).

Every service process runs under a small *reaper* (a Python script written into the
service's directory) that

- adopts the processes the service leaves behind (``PR_SET_CHILD_SUBREAPER``) and reaps
  them: this machine's PID 1 does not reap orphans, so a killed postmaster's children
  would otherwise stay behind as zombies;
- stops the service when the process that started it dies, even by SIGKILL, so a
  crashed test run leaves no servers behind;
- exits once no process of the service is left, which gives ``stop()`` and ``kill()``
  one exact condition to wait for.

An ``atexit`` hook also stops whatever is still running when the interpreter exits.

Typical use (see ``tests/conftest.py`` for the fixtures; the benches start their own)::

    cluster = PostgresCluster(Path(tempfile.mkdtemp(prefix="vitalgate-pg-")))
    cluster.start()
    dsn = cluster.create_database("t1")  # the app runs CREATE EXTENSION timescaledb itself
    cluster.kill(); cluster.restart()     # crash and recover, same port and data
    cluster.cleanup()                     # stop + remove the directory
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .sampler import children, pid_alive
from .waits import wait_for

__all__ = ["Mosquitto", "MqttTls", "PostgresCluster", "ServiceError", "device_acl", "free_port", "write_password_file"]

PG_BINDIR = Path(os.environ.get("VITALGATE_PG_BINDIR", "/usr/lib/postgresql/15/bin"))
MOSQUITTO_BIN = os.environ.get("VITALGATE_MOSQUITTO_BIN", "/usr/sbin/mosquitto")
MOSQUITTO_PASSWD_BIN = os.environ.get("VITALGATE_MOSQUITTO_PASSWD_BIN", "/usr/bin/mosquitto_passwd")
HOST = "127.0.0.1"

# A unix socket path must fit in sockaddr_un.sun_path (108 bytes with the NUL).
_MAX_SOCKET_PATH = 100

_REAPER_SOURCE = r'''
"""Reaper for one throwaway service; written by vitalgate's tests/harness/services.py.

usage: reaper.py PIDFILE|- STOP_SIGNAL OUTPUT GRACE_S -- COMMAND...

Runs COMMAND (stdout+stderr appended to OUTPUT), prints its pid, adopts and reaps
every orphan of the service, and exits once no descendant is left. When the parent
dies or SIGTERM arrives it sends STOP_SIGNAL to the pid in PIDFILE (or to COMMAND),
then SIGKILLs every child still there after GRACE_S seconds.
"""
import ctypes, os, signal, sys, time

PR_SET_CHILD_SUBREAPER = 36


def children():
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                found.append(int(entry))
    return found


def target(pidfile, child):
    if pidfile != "-":
        try:
            with open(pidfile) as f:
                return int(f.readline())
        except (OSError, ValueError):
            pass
    return child


def main():
    sep = sys.argv.index("--")
    pidfile, stop_name, output, grace = sys.argv[1:sep]
    command = sys.argv[sep + 1:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.exit(f"prctl(PR_SET_CHILD_SUBREAPER) failed: errno {ctypes.get_errno()}")
    parent = os.getppid()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    out = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    child = os.posix_spawnp(command[0], command, os.environ, file_actions=[
        (os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, out, 1), (os.POSIX_SPAWN_DUP2, out, 2)])
    os.close(out)
    os.close(null)
    print(child, flush=True)
    sys.stdout.close()
    kill_at = None
    status = 0
    while True:
        try:
            pid, wstatus = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid:
            if pid == child:
                status = os.waitstatus_to_exitcode(wstatus)
            continue
        if kill_at is None and (stop or os.getppid() != parent):
            kill_at = time.monotonic() + float(grace)
            try:
                os.kill(target(pidfile, child), getattr(signal, stop_name))
            except (ProcessLookupError, PermissionError):
                pass
        elif kill_at is not None and time.monotonic() > kill_at:
            for pid in children():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            kill_at = float("inf")
        time.sleep(0.02)
    sys.exit(status if status >= 0 else 128 - status)


main()
'''


class ServiceError(RuntimeError):
    """A throwaway service failed to start or stop; the message ends with its log."""


# --------------------------------------------------------------------------- helpers


def _is_root() -> bool:
    return os.geteuid() == 0


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it).

    Another process can still take it before the caller binds it; services that
    need the port again later (a restart) keep it once they have bound it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _make_traversable(path: Path) -> None:
    """Let other users (postgres) pass through every ancestor of ``path`` (adds o+x only)."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


class _Reaped:
    """One service command running under the reaper script (see module docstring)."""

    def __init__(
        self,
        command: list[str],
        *,
        workdir: Path,
        output: Path,
        stop_signal: signal.Signals,
        pidfile: Path | None = None,
        grace_s: float = 20.0,
    ) -> None:
        script = workdir / "reaper.py"
        if not script.exists():
            script.write_text(_REAPER_SOURCE)
        argv = [
            sys.executable, "-I", "-S", str(script),
            str(pidfile) if pidfile else "-", stop_signal.name, str(output), str(grace_s),
            "--", *command,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C in the terminal must not hit the services
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.proc.stdout.close()
        if not line.strip().isdigit():
            self.proc.wait(10)
            raise ServiceError(f"Reaper failed to start {command[0]} (exit {self.proc.returncode}).\n{_tail(output)}")
        self.child_pid = int(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> bool:
        """Wait until every process of the service is gone; False on timeout."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill_all(self, timeout: float = 10.0) -> None:
        """SIGKILL every process the reaper holds until the reaper exits.

        Repeated, because the children of a killed process are re-parented to the
        reaper a moment later.
        """

        def gone() -> bool:
            if not self.alive():
                return True
            for pid in children(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return False

        try:
            wait_for(gone, timeout, 0.05, "the service's processes to exit after SIGKILL")
        except AssertionError:
            self.proc.kill()
            self.proc.wait(timeout)


_LIVE: set[PostgresCluster | Mosquitto] = set()
_LIVE_LOCK = threading.Lock()


def _track(service: PostgresCluster | Mosquitto, live: bool) -> None:
    with _LIVE_LOCK:
        (_LIVE.add if live else _LIVE.discard)(service)


@atexit.register
def _stop_all() -> None:
    """Stop every service still running when the interpreter exits."""
    with _LIVE_LOCK:
        services = list(_LIVE)
    for service in services:
        try:
            service.stop(timeout=15)
        except Exception:  # last resort at exit: make sure nothing survives
            service.kill()


# --------------------------------------------------------------------------- PostgreSQL


_DB_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


class PostgresCluster:
    """A throwaway PostgreSQL 15 cluster with TimescaleDB preloaded, run as the postgres user.

    ``base_dir`` belongs to the cluster (created if missing, owned by postgres, removed by
    ``cleanup()``): ``data/`` (PGDATA), ``sock/`` (unix socket), ``postgresql.log``.
    Durability is traded for speed (``fsync`` and ``full_page_writes`` off) but not
    ``synchronous_commit``: committed data survives a killed server, not a power cut.
    Auth is ``trust`` for local and 127.0.0.1 connections; the superuser is ``postgres``.

    Args:
        base_dir: Directory for everything the cluster writes.
        settings: Extra or overriding ``postgresql.conf`` settings (the bench can turn
            ``fsync`` back on, for example). Values are written as given; strings are
            quoted.
    """

    # postmaster.pid status lines that mean "accepting connections"; a hot standby says "standby"
    _READY_STATES: tuple[str, ...] = ("ready",)

    def __init__(self, base_dir: Path, *, settings: Mapping[str, str | int | float | bool] | None = None) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "sock"
        self.log_path = self.base_dir / "postgresql.log"
        self._settings = dict(settings or {})
        self._port: int | None = None
        self._reaped: _Reaped | None = None

    # -- properties

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        """The TCP port, fixed at the first ``start()`` and kept across restarts."""
        if self._port is None:
            raise ServiceError("PostgresCluster has no port before start().")
        return self._port

    def dsn(self, dbname: str = "postgres") -> str:
        """``postgresql://postgres@127.0.0.1:PORT/dbname``."""
        return f"postgresql://postgres@{HOST}:{self.port}/{dbname}"

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    # -- lifecycle

    def start(self, timeout: float = 60.0) -> None:
        """Create the cluster on first use, start it and wait until it accepts connections.

        After ``kill()`` this runs crash recovery first; the wait covers it.
        """
        if self.is_running():
            return
        self._prepare()
        self._reaped = _Reaped(
            self._as_postgres(
                str(PG_BINDIR / "pg_ctl"), "start", "-W", "-s",
                "-D", str(self.data_dir), "-l", str(self.log_path),
            ),
            workdir=self.base_dir,
            output=self.base_dir / "pg_ctl.out",
            stop_signal=signal.SIGINT,  # fast shutdown if the test process dies
            pidfile=self.data_dir / "postmaster.pid",
        )  # fmt: skip
        _track(self, True)
        reaped = self._reaped

        def ready() -> bool:
            if not reaped.alive():
                raise ServiceError(
                    f"PostgreSQL exited during startup.\n{_tail(self.base_dir / 'pg_ctl.out')}\n{self.log_tail()}"
                )
            pid = self._postmaster_pid()
            return (pid is not None and pid_alive(pid) and self._pm_status() in self._READY_STATES
                    and _port_accepts(self.port))

        try:
            wait_for(ready, timeout, 0.05, lambda: f"PostgreSQL ready on port {self._port}\n{self.log_tail()}")
        except BaseException:
            self.kill()
            raise

    def stop(self, mode: str = "fast", timeout: float = 60.0) -> None:
        """Shut down (``smart``, ``fast`` or ``immediate``) and wait until every process is gone."""
        sig = _STOP_SIGNALS[mode]
        reaped = self._reaped
        if reaped is None:
            return
        pid = self._postmaster_pid()
        if pid is not None and reaped.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        elif reaped.alive():
            reaped.proc.terminate()  # no postmaster.pid yet: the reaper stops whatever is there
        if not reaped.wait(timeout):
            reaped.kill_all()
            self._reaped = None
            _track(self, False)
            raise ServiceError(f"PostgreSQL did not stop within {timeout:g}s ({mode}); killed.\n{self.log_tail()}")
        self._reaped = None
        _track(self, False)

    def kill(self, timeout: float = 30.0) -> None:
        """SIGKILL the postmaster (a crash) and wait until all its processes are gone.

        Its children notice the postmaster's death and exit on their own; any still
        there after ``timeout`` are SIGKILLed too. ``start()``/``restart()`` recovers.
        """
        reaped = self._reaped
        if reaped is None:
            return
        pid = self._postmaster_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not reaped.wait(timeout):
            reaped.kill_all()
        self._reaped = None
        _track(self, False)

    def restart(self, timeout: float = 60.0) -> None:
        """Stop if running (fast), then start again on the same port and data directory."""
        if self.is_running():
            self.stop(timeout=timeout)
        elif self._reaped is not None:
            self.kill()
        self.start(timeout)

    def is_running(self) -> bool:
        if self._reaped is None or not self._reaped.alive():
            return False
        pid = self._postmaster_pid()
        return pid is not None and pid_alive(pid)

    def cleanup(self) -> None:
        """Stop (killing if a fast shutdown fails) and remove ``base_dir``.

        Set ``VITALGATE_KEEP_SERVICES=1`` to keep the directory (logs) for a post-mortem.
        """
        try:
            self.stop(timeout=30)
        except ServiceError:
            pass  # already killed by stop()
        finally:
            if self._reaped is not None:
                self.kill()
            if not os.environ.get("VITALGATE_KEEP_SERVICES"):
                shutil.rmtree(self.base_dir, ignore_errors=True)

    # -- SQL helpers

    def psql(self, sql: str, dbname: str = "postgres", timeout: float = 60.0) -> str:
        """Run SQL with ``psql`` (stop at the first error) and return its unaligned output."""
        result = subprocess.run(
            [
                str(PG_BINDIR / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                "-h", HOST, "-p", str(self.port), "-U", "postgres", "-d", dbname, "-c", sql,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
        )  # fmt: skip
        if result.returncode != 0:
            raise ServiceError(f"psql failed on {dbname}: {sql!r}\n{result.stderr.strip()}")
        return result.stdout.strip()

    def create_database(self, name: str) -> str:
        """``CREATE DATABASE name`` and return its DSN. TimescaleDB is not created in it."""
        self.psql(f'CREATE DATABASE "{self._check_name(name)}"')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """``DROP DATABASE IF EXISTS name WITH (FORCE)``: also ends open connections."""
        self.psql(f'DROP DATABASE IF EXISTS "{self._check_name(name)}" WITH (FORCE)')

    # -- internals

    @staticmethod
    def _check_name(name: str) -> str:
        if not _DB_NAME.fullmatch(name):
            raise ValueError(f"Database name {name!r} must match {_DB_NAME.pattern}.")
        return name

    def _as_postgres(self, *command: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *command] if _is_root() else list(command)

    def _run_as_postgres(self, *command: str, timeout: float = 120.0) -> None:
        result = subprocess.run(
            self._as_postgres(*command), cwd=self.base_dir, capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise ServiceError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}")

    def _prepare(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        sock = self.socket_dir / ".s.PGSQL.65535"
        if len(str(sock)) > _MAX_SOCKET_PATH:
            raise ServiceError(f"{self.base_dir} is too deep for a unix socket path; use a shorter base_dir.")
        owner = pwd.getpwnam("postgres") if _is_root() else None
        if owner is not None:
            _make_traversable(self.base_dir)
            os.chown(self.base_dir, owner.pw_uid, owner.pw_gid)
        if not (self.data_dir / "PG_VERSION").exists():
            self._init_data_dir()
        if not self.socket_dir.exists():
            self.socket_dir.mkdir()
            if owner is not None:
                os.chown(self.socket_dir, owner.pw_uid, owner.pw_gid)
        if self._port is None:
            self._port = free_port()
        self._write_config()

    def _init_data_dir(self) -> None:
        """Create PGDATA (``initdb``); a standby copies its primary's instead (``tests/harness/replication.py``)."""
        self._run_as_postgres(
            str(PG_BINDIR / "initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
            "-E", "UTF8", "--locale=C.UTF-8", "--no-sync",
        )  # fmt: skip

    def _write_config(self) -> None:
        settings: dict[str, str | int | float | bool] = {
            "listen_addresses": HOST,
            "port": self.port,
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": 100,
            "shared_preload_libraries": "timescaledb",
            "timescaledb.telemetry_level": "off",
            "max_worker_processes": 16,  # TimescaleDB: launcher + one scheduler per database
            "fsync": False,
            # On, unlike fsync: with fsync off a synchronous commit is one write() into the
            # page cache (no measurable cost here), and it is what makes a commit survive
            # kill(). With it off, commits from the last ~0.6 s live only in shared memory
            # and a killed server loses them, acknowledged or not.
            "synchronous_commit": True,
            "full_page_writes": False,
            "logging_collector": False,
            "log_line_prefix": "%m [%p] %q%u@%d ",
            "log_min_messages": "warning",
            **self._settings,
        }
        lines = ["# Written by tests/harness/services.py; rewritten at every start."]
        for key, value in settings.items():
            if isinstance(value, bool):
                text = "on" if value else "off"
            elif isinstance(value, int | float):
                text = str(value)
            else:
                text = "'" + str(value).replace("'", "''") + "'"
            lines.append(f"{key} = {text}")
        conf = self.data_dir / "vitalgate.conf"
        conf.write_text("\n".join(lines) + "\n")
        main_conf = self.data_dir / "postgresql.conf"
        include = "include = 'vitalgate.conf'"
        if include not in main_conf.read_text():
            with main_conf.open("a") as f:
                f.write(f"\n{include}\n")
        (self.data_dir / "pg_hba.conf").write_text(
            "# Written by tests/harness/services.py: throwaway cluster, trust on loopback only.\n"
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "host all all ::1/128 trust\n"
            "host replication all 127.0.0.1/32 trust\n"  # a standby streams from 127.0.0.1
        )

    def _pidfile_lines(self) -> list[str]:
        try:
            return (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return []

    def _postmaster_pid(self) -> int | None:
        lines = self._pidfile_lines()
        try:
            return int(lines[0])
        except (IndexError, ValueError):
            return None

    def _pm_status(self) -> str:
        """Line 8 of postmaster.pid: starting, stopping, ready or standby (what pg_ctl -w checks)."""
        lines = self._pidfile_lines()
        return lines[7].strip() if len(lines) > 7 else ""

    def __repr__(self) -> str:
        return f"PostgresCluster({str(self.base_dir)!r}, port={self._port})"


# --------------------------------------------------------------------------- mosquitto


@dataclass(frozen=True)
class MqttTls:
    """A TLS listener: PEM files of the CA clients verify, and of the broker's certificate and key.

    ``require_certificate`` asks every client for a certificate signed by ``ca_file``;
    ``use_identity_as_username`` then makes its CN the MQTT username (the ACL's ``%u``),
    so a device authenticates by certificate alone.
    """

    ca_file: Path
    cert_file: Path
    key_file: Path
    require_certificate: bool = False
    use_identity_as_username: bool = False


def write_password_file(path: Path, users: Mapping[str, str]) -> Path:
    """A mosquitto password file for ``users`` (name -> password), hashed by ``mosquitto_passwd -U``.

    One ``-U`` run hashes the whole file, however many users (``-b`` runs once per user).
    """
    for name, password in users.items():
        if not name or ":" in name or "\n" in name or "\n" in password:
            raise ValueError(f"user {name!r}: names and passwords cannot contain ':' or newlines")
    path = Path(path)
    path.write_text("".join(f"{name}:{password}\n" for name, password in users.items()))
    path.chmod(0o600)
    result = subprocess.run([MOSQUITTO_PASSWD_BIN, "-U", str(path)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise ServiceError(f"mosquitto_passwd -U {path} failed ({result.returncode}): {result.stderr.strip()}")
    return path


def device_acl(gateway_user: str, *, telemetry: str = "devices/%u/telemetry") -> list[str]:
    """ACL lines: each device (username = device id) may only publish its own telemetry topic;
    the gateway user may read every device's telemetry and publish alerts."""
    return [
        f"user {gateway_user}",
        "topic read devices/+/telemetry",
        "topic write alerts/#",
        "",
        "# every other user is a device whose username is its device id",
        f"pattern write {telemetry}",
    ]


class Mosquitto:
    """A throwaway mosquitto 2.0 broker on a free 127.0.0.1 port, configured for tests' backlogs.

    ``base_dir`` holds ``mosquitto.conf``, the persistence file ``mosquitto.db`` and
    ``mosquitto.log``. Anonymous clients are allowed. The broker keeps persistent
    sessions and their queued QoS 1/2 messages across ``stop()``/``restart()`` (saved on
    exit) and across ``kill()`` (saved every ``autosave_interval`` seconds).

    Queue limits are off (``max_queued_messages 0``, ``max_queued_bytes 0``): mosquitto
    otherwise *silently drops* QoS 1 messages beyond 1,000 per offline or slow
    subscriber while still acknowledging the publisher (see limits.md).
    ``max_inflight_messages`` (default 20,000) is how many unacknowledged QoS 1/2
    messages the broker sends one MQTT 3.1.1 subscriber before waiting for PUBACKs (MQTT
    5 clients set it with Receive Maximum); mosquitto's default of 20 would starve a
    gateway that acknowledges only after a database commit. It stays well under the
    65,535 packet identifiers, so identifiers never repeat within one window.

    Args:
        base_dir: Directory for everything the broker writes.
        max_inflight_messages: Per-client in-flight window, 1..65534 (0 = no limit).
        autosave_interval: Seconds between persistence saves (what survives ``kill()``).
            Each save writes the whole queue, so a bench with huge backlogs may raise it.
        extra_config: More ``mosquitto.conf`` lines, appended last.
        tls: Also listen with TLS on a second free port (``tls_port``, ``tls_url``).
        password_file: Authenticate clients against this file (see ``write_password_file``).
        acl_file: Authorize publishing and subscribing by this ACL file (see ``device_acl``).
        allow_anonymous: Accept clients without credentials; default: only when neither
            ``password_file`` nor ``acl_file`` is given.
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        max_inflight_messages: int = 20_000,
        autosave_interval: int = 1,
        extra_config: tuple[str, ...] = (),
        tls: MqttTls | None = None,
        password_file: Path | None = None,
        acl_file: Path | None = None,
        allow_anonymous: bool | None = None,
    ) -> None:
        if not 0 <= max_inflight_messages < 65535:
            raise ValueError("max_inflight_messages must be in 0..65534 (0 = no limit)")
        self.base_dir = Path(base_dir).absolute()
        self.conf_path = self.base_dir / "mosquitto.conf"
        self.log_path = self.base_dir / "mosquitto.log"
        self.db_path = self.base_dir / "mosquitto.db"
        self.max_inflight_messages = max_inflight_messages
        self.autosave_interval = autosave_interval
        self.extra_config = tuple(extra_config)
        self.tls = tls
        self.password_file = Path(password_file).absolute() if password_file else None
        self.acl_file = Path(acl_file).absolute() if acl_file else None
        self.allow_anonymous = (password_file is None and acl_file is None) if allow_anonymous is None else allow_anonymous
        self._port: int | None = None
        self._tls_port: int | None = None
        self._reaped: _Reaped | None = None

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        """The TCP port, fixed at the first ``start()`` and kept across restarts."""
        if self._port is None:
            raise ServiceError("Mosquitto has no port before start().")
        return self._port

    @property
    def tls_port(self) -> int:
        """The TLS listener's port (with ``tls``), fixed at the first ``start()``."""
        if self._tls_port is None:
            raise ServiceError("Mosquitto has no TLS port (no tls= given, or before start()).")
        return self._tls_port

    @property
    def tls_url(self) -> str:
        """``mqtts://127.0.0.1:TLS_PORT``."""
        return f"mqtts://{HOST}:{self.tls_port}"

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT``."""
        return f"mqtt://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._reaped.child_pid if self._reaped is not None and self.is_running() else None

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def start(self, timeout: float = 15.0) -> None:
        """Start the broker (loading its persistence file) and wait until it accepts TCP connections."""
        if self.is_running():
            return
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self._port is None:
            self._port = free_port()
        if self.tls is not None and self._tls_port is None:
            self._tls_port = free_port()
        self._write_config()
        self._reaped = _Reaped(
            [MOSQUITTO_BIN, "-c", str(self.conf_path)],
            workdir=self.base_dir,
            output=self.base_dir / "mosquitto.out",
            stop_signal=signal.SIGTERM,
        )
        _track(self, True)
        reaped = self._reaped

        def ready() -> bool:
            if not reaped.alive():
                raise ServiceError(
                    f"mosquitto exited during startup.\n{_tail(self.base_dir / 'mosquitto.out')}\n{self.log_tail()}"
                )
            return _port_accepts(self.port) and (self._tls_port is None or _port_accepts(self._tls_port))

        try:
            wait_for(ready, timeout, 0.02, lambda: f"mosquitto listening on port {self._port}\n{self.log_tail()}")
        except BaseException:
            self.kill()
            raise

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (mosquitto saves its persistence file on exit) and wait until it is gone."""
        reaped = self._reaped
        if reaped is None:
            return
        if reaped.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(reaped.child_pid, signal.SIGTERM)
        if not reaped.wait(timeout):
            reaped.kill_all()
            self._reaped = None
            _track(self, False)
            raise ServiceError(f"mosquitto did not stop within {timeout:g}s; killed.\n{self.log_tail()}")
        self._reaped = None
        _track(self, False)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the broker (a crash: only the last autosave survives) and wait until it is gone."""
        reaped = self._reaped
        if reaped is None:
            return
        if reaped.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(reaped.child_pid, signal.SIGKILL)
        if not reaped.wait(timeout):
            reaped.kill_all()
        self._reaped = None
        _track(self, False)

    def restart(self, timeout: float = 30.0) -> None:
        """Stop if running, then start again on the same port with the same persistence file."""
        if self.is_running():
            self.stop(timeout)
        elif self._reaped is not None:
            self.kill()
        self.start(timeout)

    def is_running(self) -> bool:
        return self._reaped is not None and self._reaped.alive() and pid_alive(self._reaped.child_pid)

    def cleanup(self) -> None:
        """Stop (or kill) and remove ``base_dir`` (kept if ``VITALGATE_KEEP_SERVICES=1``)."""
        try:
            self.stop(timeout=15)
        except ServiceError:
            pass  # already killed by stop()
        finally:
            if self._reaped is not None:
                self.kill()
            if not os.environ.get("VITALGATE_KEEP_SERVICES"):
                shutil.rmtree(self.base_dir, ignore_errors=True)

    def _write_config(self) -> None:
        lines = [
            "# Written by tests/harness/services.py; rewritten at every start.",
            f"listener {self.port} {HOST}",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            *([f"password_file {self.password_file}"] if self.password_file else []),
            *([f"acl_file {self.acl_file}"] if self.acl_file else []),
            *(["user root"] if _is_root() else []),  # else mosquitto drops to user mosquitto
            "persistence true",
            f"persistence_location {self.base_dir}",
            "persistence_file mosquitto.db",
            f"autosave_interval {self.autosave_interval}",
            "autosave_on_changes false",
            "max_queued_messages 0",
            "max_queued_bytes 0",
            f"max_inflight_messages {self.max_inflight_messages}",
            "max_inflight_bytes 0",
            "set_tcp_nodelay true",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            *self._tls_lines(),
            *self.extra_config,
        ]
        self.conf_path.write_text("\n".join(lines) + "\n")

    def _tls_lines(self) -> list[str]:
        tls = self.tls
        if tls is None:
            return []
        return [
            "",
            "# TLS listener; the options below apply to it",
            f"listener {self.tls_port} {HOST}",
            f"cafile {Path(tls.ca_file).absolute()}",
            f"certfile {Path(tls.cert_file).absolute()}",
            f"keyfile {Path(tls.key_file).absolute()}",
            f"require_certificate {'true' if tls.require_certificate else 'false'}",
            *(["use_identity_as_username true"] if tls.use_identity_as_username else []),
        ]

    def __repr__(self) -> str:
        return f"Mosquitto({str(self.base_dir)!r}, port={self._port})"
