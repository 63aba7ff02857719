"""Samples of a running process from /proc, and of a gateway's Prometheus endpoint.

One file read per figure, cheap enough to call every 50 ms while a load runs, and no
third-party library: the benches and the tests read the same counters the same way.
CPU seconds are user + system time of every thread of a process; a process that is
gone reads as 0.0 (CPU) or None (memory), so a sampler never raises because a process
exited between two samples.
"""

from __future__ import annotations

import os
import urllib.request

__all__ = [
    "children", "cpu_seconds", "descendants", "machine_busy_seconds", "metric_sum", "parent", "pid_alive",
    "rss_bytes", "rss_mib", "scrape_metrics", "tree_cpu_seconds",
]

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[bytes] | None:
    """Fields of /proc/PID/stat after the command name (field 3, the state, is index 0)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in (b"Z", b"X")


def parent(pid: int) -> int | None:
    """The parent pid of ``pid``; None if it is gone."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[1])


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (one pass over /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry))
    return found


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (one pass over /proc, then a walk of the tree)."""
    by_parent: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                by_parent.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = by_parent.get(todo.pop(), [])
        out.extend(kids)
        todo.extend(kids)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads); 0.0 if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its live descendants (a PostgreSQL cluster from its postmaster)."""
    return cpu_seconds(pid) + sum(cpu_seconds(p) for p in descendants(pid))


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores, everything but idle and iowait)."""
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / _CLK_TCK


def rss_bytes(pid: int, field: str = "VmRSS") -> int | None:
    """Resident memory of a live process (``VmRSS``, or ``VmHWM`` for its peak), bytes; None if gone."""
    key = field.encode() + b":"
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_mib(pid: int, field: str = "VmRSS") -> float | None:
    """:func:`rss_bytes` in MiB."""
    b = rss_bytes(pid, field)
    return None if b is None else b / (1024 * 1024)


def scrape_metrics(port: int, *, host: str = "127.0.0.1", timeout: float = 5.0, attempts: int = 3) -> str | None:
    """The Prometheus exposition text served on ``port``; None if nothing answers.

    A connection dropped mid-answer while the server is under load is retried
    (``attempts`` times in all), so one hiccup does not read as "no metrics".
    """
    for _ in range(attempts):
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as r:
                return str(r.read().decode())
        except ConnectionError:
            continue
        except OSError:
            return None
    return None


def metric_sum(text: str, name: str) -> float | None:
    """Sum of every sample of metric ``name`` (all label sets) in exposition ``text``; None if absent."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and len(line) > len(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else None
