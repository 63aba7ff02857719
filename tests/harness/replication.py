"""A throwaway streaming-replication standby of a ``PostgresCluster``, for failover tests.

``StandbyCluster`` is a ``PostgresCluster`` whose data directory is a ``pg_basebackup -R``
copy of a running primary (TimescaleDB preloaded like the primary, run as the postgres
user, its own free 127.0.0.1 port). It streams from the primary under its
``application_name``, so the primary can name it in ``synchronous_standby_names``
(``make_synchronous``), and ``promote()`` turns it into a primary (``pg_ctl promote``).

Typical use::

    primary = PostgresCluster(tmp / "pg1"); primary.start()
    dsn = primary.create_database("t1")
    standby = StandbyCluster(tmp / "pg2", primary); standby.start()
    standby.make_synchronous()  # COMMIT on the primary now waits for this standby's flush
    primary.kill()              # kill -9 of the postmaster
    standby.promote()           # read-write from here on
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .services import HOST, PG_BINDIR, PostgresCluster, ServiceError
from .waits import wait_for

__all__ = ["StandbyCluster"]


class StandbyCluster(PostgresCluster):
    """A hot standby of ``primary``, created on the first ``start()`` by ``pg_basebackup -R``.

    Args:
        base_dir: Directory for everything the standby writes (as for ``PostgresCluster``).
        primary: The running cluster to copy and stream from.
        name: The standby's ``application_name`` on the primary (``pg_stat_replication``,
            ``synchronous_standby_names``).
        settings: Extra ``postgresql.conf`` settings, as for ``PostgresCluster``.
    """

    _READY_STATES = ("ready", "standby")

    def __init__(
        self,
        base_dir: Path,
        primary: PostgresCluster,
        *,
        name: str = "standby1",
        settings: Mapping[str, str | int | float | bool] | None = None,
    ) -> None:
        if not name.isidentifier():
            raise ValueError(f"standby name {name!r} must be an identifier (it is quoted nowhere)")
        super().__init__(base_dir, settings=settings)
        self.primary = primary
        self.name = name

    def _init_data_dir(self) -> None:
        # -R writes standby.signal and primary_conninfo (with this application_name) into
        # postgresql.auto.conf; -X stream copies the WAL written during the backup too.
        conninfo = f"host={HOST} port={self.primary.port} user=postgres application_name={self.name}"
        self._run_as_postgres(
            str(PG_BINDIR / "pg_basebackup"), "-D", str(self.data_dir), "-d", conninfo,
            "-R", "-X", "stream", "-c", "fast", "--no-sync",
        )  # fmt: skip

    def wait_streaming(self, timeout: float = 60.0) -> None:
        """Wait until the primary lists this standby as streaming."""
        sql = f"SELECT state FROM pg_stat_replication WHERE application_name = '{self.name}'"
        wait_for(lambda: self.primary.psql(sql) == "streaming", timeout, 0.1,
                 lambda: f"{self.name} streaming from {self.primary}\n{self.log_tail()}")

    def make_synchronous(self, timeout: float = 60.0) -> None:
        """Name this standby in the primary's ``synchronous_standby_names`` and wait until it is ``sync``.

        From then on a COMMIT on the primary (``synchronous_commit = on``) returns only once
        this standby has flushed it. ``ALTER SYSTEM`` on the primary, after the base backup,
        so the standby does not inherit it: once promoted it has no standby to wait for.
        """
        self.wait_streaming(timeout)
        self.primary.psql(f"ALTER SYSTEM SET synchronous_standby_names = '{self.name}'")
        self.primary.psql("SELECT pg_reload_conf()")
        sql = f"SELECT sync_state FROM pg_stat_replication WHERE application_name = '{self.name}'"
        wait_for(lambda: self.primary.psql(sql) == "sync", timeout, 0.1,
                 lambda: f"{self.name} synchronous on {self.primary}\n{self.primary.log_tail()}")

    def promote(self, timeout: float = 60.0) -> None:
        """``pg_ctl promote`` and wait until the server accepts writes."""
        self._run_as_postgres(str(PG_BINDIR / "pg_ctl"), "promote", "-w", "-t", str(int(timeout)),
                              "-D", str(self.data_dir), timeout=timeout + 10)
        wait_for(lambda: self.psql("SELECT pg_is_in_recovery()") == "f", timeout, 0.05,
                 lambda: f"{self.name} out of recovery\n{self.log_tail()}")
        if self._pm_status() != "ready":
            raise ServiceError(f"{self.name} promoted but its postmaster says {self._pm_status()!r}.\n{self.log_tail()}")

    def __repr__(self) -> str:
        return f"StandbyCluster({str(self.base_dir)!r}, port={self._port}, primary port={self.primary._port})"
