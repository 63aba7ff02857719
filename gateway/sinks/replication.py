"""What the database says about its replication, read once at start, and the check on it.

A gateway acknowledges a payload after its transaction committed. Whether "committed"
includes "flushed by a synchronous standby" is the server's choice: ``COMMIT`` waits for
the standbys named in ``synchronous_standby_names`` only while the session's
``synchronous_commit`` is ``on``, ``remote_write`` or ``remote_apply``. With
``database.require_sync_standby`` the gateway refuses to start on a session that would
acknowledge commits the standby has not confirmed, rather than find out at the failover.

The standbys themselves are listed from ``pg_stat_replication``; a role without
``pg_monitor`` sees their names but not their state, which is logged as unknown.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import asyncpg

from gateway.errors import ConfigError
from gateway.retry import DATABASE_ERRORS

__all__ = ["ReplicationState", "check", "inspect"]

_STATE = """
SELECT inet_server_addr()::text, inet_server_port(), pg_is_in_recovery(),
       current_setting('synchronous_commit'), current_setting('synchronous_standby_names')
"""
_STANDBYS = """
SELECT application_name, coalesce(state, 'unknown'), coalesce(sync_state, 'unknown')
  FROM pg_stat_replication ORDER BY application_name
"""

# synchronous_commit values that return before a synchronous standby has the commit.
_NOT_REPLICATED = frozenset({"off", "local"})


@dataclass(frozen=True)
class ReplicationState:
    """The server a session reached and what its commits wait for."""

    server: str
    in_recovery: bool
    synchronous_commit: str
    synchronous_standby_names: str
    standbys: tuple[tuple[str, str, str], ...]  # (application_name, state, sync_state)

    def log_fields(self) -> dict[str, object]:
        return {
            "server": self.server, "in_recovery": self.in_recovery,
            "synchronous_commit": self.synchronous_commit,
            "synchronous_standby_names": self.synchronous_standby_names or "(none)",
            "standbys": ",".join(f"{n}:{s}:{y}" for n, s, y in self.standbys) or "(none)",
        }  # fmt: skip


async def inspect(dsn: str, *, timeout_s: float) -> ReplicationState:
    """Connect to ``dsn`` as the sink does (same URL, so the same host choice and role settings)."""
    conn = await asyncpg.connect(dsn, timeout=timeout_s)
    try:
        addr, port, recovery, sync_commit, names = await conn.fetchrow(_STATE)
        standbys = tuple(tuple(r) for r in await conn.fetch(_STANDBYS))
    finally:
        try:
            await asyncio.wait_for(conn.close(), timeout_s)
        except DATABASE_ERRORS:
            conn.terminate()
    server = f"{addr.split('/')[0]}:{port}" if addr else "unix-socket"
    return ReplicationState(server, bool(recovery), str(sync_commit), str(names), standbys)  # type: ignore[arg-type]


def check(state: ReplicationState, *, require_sync_standby: bool) -> None:
    """Raise ``ConfigError`` when commits on this session would not wait for a synchronous standby."""
    if not require_sync_standby:
        return
    if state.synchronous_commit in _NOT_REPLICATED:
        raise ConfigError(
            f"database.require_sync_standby: the session's synchronous_commit is '{state.synchronous_commit}' "
            f"on {state.server}, so a commit would be acknowledged before a standby has it; "
            "set synchronous_commit = on (or remote_apply) for the gateway's role or database"
        )
    if not state.synchronous_standby_names.strip():
        raise ConfigError(
            f"database.require_sync_standby: synchronous_standby_names is empty on {state.server}, "
            "so commits wait for no standby; name the synchronous standby on the primary"
        )
