"""The /proc sampler and the /metrics parser of tests.harness, on real processes."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.harness import (
    children, cpu_seconds, descendants, metric_sum, parent, pid_alive, rss_bytes, rss_mib, tree_cpu_seconds, wait_for,
)

EXPOSITION = """\
# HELP gateway_rejected_total Rejected payloads.
# TYPE gateway_rejected_total counter
gateway_rejected_total{reason="decode"} 3.0
gateway_rejected_total{reason="schema"} 4.0
gateway_rejected_total_created{reason="decode"} 1.7e9
gateway_in_flight_messages 12.0
"""


def test_metric_sum_adds_every_label_set_and_only_that_metric():
    assert metric_sum(EXPOSITION, "gateway_rejected_total") == 7.0
    assert metric_sum(EXPOSITION, "gateway_in_flight_messages") == 12.0
    assert metric_sum(EXPOSITION, "gateway_in_flight") is None  # a prefix is not the metric
    assert metric_sum(EXPOSITION, "gateway_absent_total") is None


def test_this_process_has_cpu_memory_and_a_parent():
    sum(i * i for i in range(200_000))  # some CPU of our own
    assert cpu_seconds(os.getpid()) > 0
    assert rss_bytes(os.getpid()) > 1 << 20
    assert rss_mib(os.getpid(), "VmHWM") >= rss_mib(os.getpid())  # type: ignore[operator]
    assert parent(os.getpid()) == os.getppid()
    assert pid_alive(os.getpid())


def test_a_process_tree_is_found_and_counted_and_reads_as_gone_after_exit():
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(60)"
    # the middle process waits for (and so reaps) its child: no zombie is left behind
    code = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {busy!r}]).wait()"
    top = subprocess.Popen([sys.executable, "-c", code])
    try:
        kids = wait_for(lambda: children(top.pid), timeout=10, message="the grandchild's parent to start it")
        grandchild = kids[0]
        assert descendants(top.pid) == [grandchild]
        assert parent(grandchild) == top.pid
        wait_for(lambda: cpu_seconds(grandchild) >= 0.25, timeout=20, message="the grandchild to burn 0.3 s of CPU")
        assert tree_cpu_seconds(top.pid) >= cpu_seconds(top.pid) + cpu_seconds(grandchild) - 0.01
    finally:
        for pid in descendants(top.pid):
            os.kill(pid, 9)
        try:
            top.wait(10)  # exits once its child is gone
        finally:
            top.kill()
            top.wait(10)
    assert not pid_alive(grandchild)
    gone = top.pid
    assert cpu_seconds(gone) == 0.0 and rss_bytes(gone) is None and parent(gone) is None
