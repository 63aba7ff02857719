"""Disk full: the readings' tablespace lives on a small filesystem that fills under load.

A 16 MiB tmpfs is mounted and almost filled by a filler file; ``readings`` and
``waveform_blocks`` get their new chunks there (``attach_tablespace``). Once it is full,
every COPY fails with SQLSTATE 53100 (disk_full): the batch is held and retried, nothing
is acknowledged, and ``/readyz`` names the code. Deleting the filler gives the space back
and everything held is stored once.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import PostgresCluster, wait_for
from tests.integration.faults import Load, Readyz, report
from tests.integration.support import expected_readings, fetch_readings
from tests.integration.test_ingest import count, wait_ingests

pytestmark = pytest.mark.integration

IMAGE_MIB = 16
ROOM_KIB = 768  # what the filler leaves for readings: full within seconds of load


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{' '.join(cmd)}: {r.stderr.strip()}"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of IMAGE_MIB owned by postgres, unmounted even on failure."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    _make_traversable(tmp_path)
    pg = pwd.getpwnam("postgres")
    _run("mount", "-t", "tmpfs", "-o", f"size={IMAGE_MIB}m,mode=0755,uid={pg.pw_uid},gid={pg.pw_gid}", "vgfull", str(mnt))
    try:
        ts = mnt / "ts"
        ts.mkdir()
        os.chown(ts, pg.pw_uid, pg.pw_gid)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=60)


def _make_traversable(path: Path) -> None:
    for p in [path, *path.parents]:
        os.chmod(p, os.stat(p).st_mode | 0o001)


def _fill(mnt: Path, leave_kib: int) -> Path:
    """A filler file taking all the space but ``leave_kib``."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    filler = mnt / "filler"
    with filler.open("wb") as f:
        f.write(b"\0" * max(0, free - (leave_kib << 10)))
        f.flush()
        os.fsync(f.fileno())
    return filler


def test_readings_tablespace_full_is_retried_unacknowledged_then_stored_once(tmp_path: Path, small_disk: Path,
                                                                             broker, gateway_factory):
    cluster = PostgresCluster(tmp_path / "pg")
    try:
        cluster.start()
        dsn = cluster.create_database("diskfull")
        gw = gateway_factory(dsn, env={"VITALGATE_RETRY_MAX_S": "1"})
        gw.start()  # migrations ran: the hypertables exist, no chunk yet
        cluster.psql(f"CREATE TABLESPACE small LOCATION '{small_disk / 'ts'}'")
        cluster.psql("SELECT attach_tablespace('small', 'readings'); SELECT attach_tablespace('small', 'waveform_blocks')",
                     dbname="diskfull")
        filler = _fill(small_disk, ROOM_KIB)
        readyz = Readyz(gw.metrics_port)
        readyz.wait(True, 30)
        load = Load(broker.port, devices=20, per_device=300, per_second=300)  # 20 s of load
        full_after = readyz.wait(False, 60, failing="writer")
        detail = readyz.check("writer")["detail"]
        assert "SQLSTATE 53100" in detail, readyz.seen[-1]
        assert "Database unavailable; holding the batch and retrying." in gw.log_text() or "53100" in gw.log_text()
        # held, not acknowledged: what is stored stays put while the disk is full
        stored = count(dsn, "SELECT count(*) FROM ingests")
        acked_before = gw.metric("gateway_envelopes_total", 0)
        wait_for(lambda: gw.metric("gateway_write_errors_total", 0) >= 3, timeout=30, message="retries of the full disk")
        assert count(dsn, "SELECT count(*) FROM ingests") == stored
        assert gw.metric("gateway_envelopes_total", 0) == acked_before
        assert stored < len(load.envelopes)
        filler.unlink()
        freed_at = time.monotonic()
        wait_for(lambda: count(dsn, "SELECT count(*) FROM ingests") > stored, timeout=60, interval=0.1,
                 message=lambda: f"no commit once space returned\n{gw.log_tail()}")
        commit_s = time.monotonic() - freed_at
        ready_s = readyz.wait(True, 60) + commit_s
        load.join(120)
        wait_ingests(dsn, len(load.envelopes), timeout=120, gw=gw)
        assert asyncio.run(fetch_readings(dsn)) == expected_readings(load.envelopes), "a reading lost or duplicated"
        assert count(dsn, "SELECT count(*) FROM ingests") == len(load.envelopes)
        report(f"readings tablespace on a {IMAGE_MIB} MiB filesystem filled under load (SQLSTATE 53100), "
               f"then space freed", not_ready_after_load_start=full_after, first_commit_after_space_freed=commit_s,
               ready_after_space_freed=ready_s)
        assert gw.terminate() == 0
    finally:
        cluster.cleanup()
