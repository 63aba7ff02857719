"""The supervisor of ``vitalgate run --workers N``: start N workers, restart the ones that die, drain all.

Each worker is ``python -m gateway run`` (same interpreter, same ``--config``) with
``VITALGATE_WORKERS=N``, ``VITALGATE_WORKER_INDEX=i`` and ``VITALGATE_WORKER_DIR`` (the
runtime directory of the workers' sockets, created here and removed at exit). Workers
run in their own process group, so a terminal's Ctrl-C reaches them once, through the
supervisor, and each gets SIGTERM if the supervisor itself dies.

SIGTERM or SIGINT is forwarded to every worker, which drains and exits; a second one is
forwarded too (the workers force their exit). A worker that exits while no stop was
asked is restarted after a backoff (0.5 s doubling to 30 s, back to 0.5 s once a worker
has run for a minute). A worker failing at start-up (exit code 2: configuration,
profiles) stops them all. Worker 0 starts first; the others start once it listens on
its socket, which it does after migrating the schema (two migrations at once collide). The exit code is 0 only if every worker drained and exited 0.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from gateway.config import GatewayConfig
from gateway.workers import ENV_DIR, ENV_INDEX
from gateway.workers.frames import socket_path

__all__ = ["supervise"]

log = logging.getLogger("gateway.workers")

_PR_SET_PDEATHSIG = 1
_POLL_S = 0.05
_STABLE_S = 60.0
# exit codes of a worker killed by the forwarded signal itself, or interrupted by it (130),
# before its event loop took over the signals, that is before it took any payload
_STOPPED_EARLY = {-signal.SIGTERM, -signal.SIGINT, 130}


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the workers then outlive a killed supervisor
        pass


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.restart_at: float | None = None
        self.delay = 0.5
        self.exit_code: int | None = None


def supervise(cfg: GatewayConfig, config_path: str | None) -> int:
    """Run ``cfg.workers`` workers until a signal; return the exit code."""
    count = cfg.workers
    runtime = tempfile.mkdtemp(prefix="vitalgate-workers-")
    os.chmod(runtime, 0o700)
    argv = [sys.executable, "-m", "gateway", "run", *(["--config", config_path] if config_path else [])]
    base_env = {**os.environ, "VITALGATE_WORKERS": str(count), ENV_DIR: runtime}
    signals: list[int] = []

    def on_signal(sig: int, _frame: object) -> None:
        signals.append(sig)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    workers = [_Worker(i) for i in range(count)]

    def start(w: _Worker) -> None:
        w.proc = subprocess.Popen(argv, env={**base_env, ENV_INDEX: str(w.index)}, preexec_fn=_die_with_parent,
                                  process_group=0)
        w.started = time.monotonic()
        w.restart_at = None
        log.info("Worker started.", extra={"worker": w.index, "pid": w.proc.pid})

    log.info("Supervisor starting workers.", extra={"workers": count, "runtime_dir": runtime})
    forwarded = 0
    failed_start = False
    first_up = socket_path(runtime, 0)
    try:
        start(workers[0])  # the others once it is up: it migrates the schema, alone
        later = workers[1:]
        while True:
            if later and first_up.exists() and not signals and not failed_start:
                for w in later:
                    start(w)
                later = []
            while forwarded < len(signals):
                sig = signals[forwarded]
                forwarded += 1
                log.info("Stopping workers." if forwarded == 1 else "Second signal: forcing the workers to exit.",
                         extra={"signal": signal.Signals(sig).name})
                for w in workers:
                    if w.proc is not None and w.proc.poll() is None:
                        w.proc.send_signal(sig)
                    w.restart_at = None
            stopping = bool(signals) or failed_start
            now = time.monotonic()
            for w in workers:
                if w.proc is not None:
                    rc = w.proc.poll()
                    if rc is None:
                        continue
                    w.proc = None
                    w.exit_code = rc
                    if stopping:
                        if rc in _STOPPED_EARLY:
                            # the signal came before the worker installed its handlers: it held nothing
                            log.info("Worker stopped before taking payloads.", extra={"worker": w.index})
                            w.exit_code = 0
                        else:
                            log.info("Worker exited.", extra={"worker": w.index, "exit_code": rc})
                        continue
                    if rc == 2:
                        log.error("Worker failed to start; stopping all workers.", extra={"worker": w.index})
                        failed_start = True
                        for other in workers:
                            if other.proc is not None and other.proc.poll() is None:
                                other.proc.send_signal(signal.SIGTERM)
                        continue
                    if now - w.started >= _STABLE_S:
                        w.delay = 0.5
                    w.restart_at = now + w.delay
                    log.error("Worker exited unexpectedly; restarting it.",
                              extra={"worker": w.index, "exit_code": rc, "restart_in_s": w.delay})
                    w.delay = min(w.delay * 2, 30.0)
                elif w.restart_at is not None and now >= w.restart_at and not stopping:
                    start(w)
            if (signals or failed_start) and all(w.proc is None for w in workers):
                break
            time.sleep(_POLL_S)
    finally:
        for w in workers:  # only on an error of the supervisor itself
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
                try:
                    w.proc.wait(60)
                except subprocess.TimeoutExpired:
                    w.proc.kill()
        for s, h in previous.items():
            signal.signal(s, h)
        shutil.rmtree(runtime, ignore_errors=True)
    if failed_start:
        return 2
    ok = all(w.exit_code == 0 for w in workers)
    log.info("Supervisor stopped.", extra={"drained": ok, "exit_codes": ",".join(str(w.exit_code) for w in workers)})
    return 0 if ok else 1
