"""The gateway as a real subprocess: ``python -m gateway run`` and the ``vitalgate`` commands.

Configured by environment only (every inherited ``VITALGATE_*`` variable is dropped, so
the caller's shell cannot change a run), its log appended to one file. Ready is a
condition, never a delay: the log has said ``ready_line`` once per worker since this
start ("Subscribed." for MQTT, "HTTPS listening." for HTTPS) and, when a metrics port is
set, ``/metrics`` answers. Stopping is SIGTERM with a deadline, then SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .sampler import metric_sum, rss_bytes, scrape_metrics
from .services import free_port

__all__ = ["PROFILES", "REPO", "CliError", "GatewayExited", "GatewayProcess", "vitalgate"]

REPO = Path(__file__).resolve().parents[2]
PROFILES = REPO / "device_profiles"

_MISSING = object()


class GatewayExited(RuntimeError):
    """The gateway process exited while it was expected to start or to keep running."""


class CliError(RuntimeError):
    """A ``vitalgate`` command exited with a non-zero code; the message ends with its stderr."""


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("VITALGATE_")}


def vitalgate(database_url: str, *args: str, stdin: str | None = None, timeout: float = 300.0,
              profiles_dir: Path = PROFILES, env: Mapping[str, str] | None = None) -> str:
    """Run ``vitalgate ARGS`` (``db migrate``, ``devices import``, ``keys add`` ...); return stdout.

    Raises:
        CliError: The command exited with a non-zero code.
    """
    env = {**_clean_env(), "VITALGATE_DATABASE_URL": database_url, "VITALGATE_PROFILES_DIR": str(profiles_dir),
           **(env or {})}
    r = subprocess.run([sys.executable, "-m", "gateway", *args], cwd=REPO, env=env, capture_output=True, text=True,
                       input=stdin, timeout=timeout)
    if r.returncode != 0:
        raise CliError(f"vitalgate {' '.join(args)} exited {r.returncode}:\n{r.stderr.strip()}")
    return r.stdout


class GatewayProcess:
    """One ``python -m gateway run`` subprocess; ``start()`` may be called again after a stop or kill.

    Args:
        log_path: File the process's stdout and stderr are appended to (its directory is created).
        database_url, mqtt_url, client_id, gateway_id, profiles_dir: The matching
            ``VITALGATE_*`` settings.
        metrics_port: Port of ``/metrics``; None picks a free one, 0 turns the endpoint off.
        env: More ``VITALGATE_*`` settings, applied last. Devices are not required to be
            registered unless ``VITALGATE_AUTH_REQUIRE_REGISTRATION`` says so here.
        args: More ``vitalgate run`` arguments (``["--workers", "2"]``).
        python_args: Interpreter arguments before ``-m gateway`` (``["-m", "cProfile", "-o", FILE]``).
        ready_line: The log line that says the gateway accepts input.
        subscriptions: How many ``ready_line`` lines ``start()`` waits for: one per worker.
        command_prefix: Run the gateway under this command (``["ip", "netns", "exec", NAME]``:
            on a host of its own); it must exec the gateway, so the pid stays the gateway's.
    """

    def __init__(self, log_path: Path, *, database_url: str, mqtt_url: str = "mqtt://127.0.0.1:1",
                 client_id: str = "vitalgate-test", gateway_id: str = "test-gw", profiles_dir: Path | str = PROFILES,
                 metrics_port: int | None = None, env: Mapping[str, str] | None = None, args: Sequence[str] = (),
                 python_args: Sequence[str] = (), ready_line: str = "Subscribed.", subscriptions: int = 1,
                 command_prefix: Sequence[str] = ()) -> None:
        self.log_path = Path(log_path)
        self.metrics_port = free_port() if metrics_port is None else metrics_port
        self.env = {
            **_clean_env(),
            "VITALGATE_DATABASE_URL": database_url,
            "VITALGATE_MQTT_URL": mqtt_url,
            "VITALGATE_MQTT_CLIENT_ID": client_id,
            "VITALGATE_GATEWAY_ID": gateway_id,
            "VITALGATE_PROFILES_DIR": str(profiles_dir),
            "VITALGATE_METRICS_PORT": str(self.metrics_port),
            # simulated and test devices are not in the registry; identity tests and the demo turn this on
            "VITALGATE_AUTH_REQUIRE_REGISTRATION": "false",
            # readers of the log (ready lines, assertions) take its key=value form; JSON is tested on its own
            "VITALGATE_LOG_FORMAT": "text",
            **(env or {}),
        }
        self.args = list(args)
        self.python_args = list(python_args)
        self.command_prefix = list(command_prefix)
        self.ready_line = ready_line
        self.subscriptions = subscriptions
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._mark = 0

    # -- lifecycle

    def spawn(self) -> None:
        """Start the process without waiting for it to be ready (see ``wait_ready``)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._mark = log.tell()
            self.proc = subprocess.Popen([*self.command_prefix, sys.executable, *self.python_args, "-m", "gateway", "run", *self.args],
                                         cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        self.starts += 1

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Block until ready (see the module docstring); return the seconds waited.

        Raises:
            GatewayExited: The process exited first (the message ends with its log).
            TimeoutError: Not ready within ``timeout`` seconds.
        """
        t0 = time.monotonic()
        while True:
            if not self.alive():
                code = None if self.proc is None else self.proc.returncode
                raise GatewayExited(f"gateway exited with code {code} while starting:\n{self.log_tail()}")
            if (self.log_since_start().count(self.ready_line) >= self.subscriptions
                    and (not self.metrics_port or self.metrics_text() is not None)):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"gateway did not log {self.ready_line!r} x{self.subscriptions} within "
                                   f"{timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def start(self, timeout: float = 60.0) -> float:
        """``spawn()`` then ``wait_ready(timeout)``; return the seconds it took to be ready."""
        self.spawn()
        return self.wait_ready(timeout)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait for the exit code (the code at once if it already exited).

        Raises:
            TimeoutError: Still running after ``timeout`` seconds; it is SIGKILLed first.
        """
        proc = self._proc()
        if proc.poll() is not None:
            return proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"gateway did not exit within {timeout:g} s of SIGTERM (killed):\n{self.log_tail()}"
                               ) from None

    def kill(self) -> None:
        """SIGKILL (a crash) and wait until the process is gone."""
        if self.alive():
            proc = self._proc()
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)

    def stop(self, timeout: float = 30.0) -> int | None:
        """Teardown: ``terminate()`` if running, never raising; the exit code, None if it had to be killed."""
        if self.proc is None:
            return None
        try:
            return self.terminate(timeout)
        except TimeoutError:
            return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        return self._proc().pid

    # -- observing it

    def rss_bytes(self) -> int:
        """Resident memory now; 0 once the process is gone."""
        return rss_bytes(self.pid) or 0

    def metrics_text(self) -> str | None:
        """The ``/metrics`` exposition; None if the endpoint is off or does not answer."""
        return scrape_metrics(self.metrics_port) if self.metrics_port else None

    def metric(self, name: str, default: object = _MISSING) -> float:
        """Sum of every sample of metric ``name`` now.

        Raises:
            KeyError: The metric is not served (or nothing answers), unless ``default`` is given.
        """
        text = self.metrics_text()
        value = None if text is None else metric_sum(text, name)
        if value is None:
            if default is _MISSING:
                raise KeyError(f"{name} is not served on port {self.metrics_port}"
                               + (" (no answer)" if text is None else ""))
            return default  # type: ignore[return-value]
        return value

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_since_start(self) -> str:
        """The log written since the latest ``spawn()``."""
        with open(self.log_path, "rb") as f:
            f.seek(self._mark)
            return f.read().decode(errors="replace")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def _proc(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise GatewayExited("the gateway was never started")
        return self.proc
