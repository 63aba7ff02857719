"""Connections lent by the sink's pool, given back only in a state asyncpg still trusts.

asyncpg's pool checks a connection's socket, not its protocol state, before lending it.
When PostgreSQL shuts down (``pg_ctl restart -m fast``, a failover) every backend sends
a FATAL "terminating connection" and then closes its socket. An idle pooled connection
reads the FATAL with no operation waiting for it, and its protocol parks in "consume
until sync", a sync that never comes; until the end-of-stream is read too, the socket
still looks open. A connection lent in that window fails its first statement with
``InternalClientError('cannot switch to state 12; another operation (2) is in
progress')``, and the pool's reset on release fails the same way. ``connection()``
terminates such a connection instead of handing it back (so it is never lent again) and
lets the error propagate as a lost connection, which the write policy retries
(``gateway.retry``); a release that fails after the work is done is not the caller's
failure: the pool has already discarded that connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

__all__ = ["connection", "untrusted"]


def untrusted(exc: BaseException) -> bool:
    """The connection that raised ``exc`` must not be reused: its client-side state is unknown.

    An argument asyncpg could not encode (``DataError``, a ``ValueError``) leaves the
    connection sound; every other client-side error does not.
    """
    if isinstance(exc, asyncpg.InternalClientError):
        return True
    return isinstance(exc, asyncpg.InterfaceError) and not isinstance(exc, ValueError)


@asynccontextmanager
async def connection(pool: asyncpg.Pool, *, timeout: float | None = None) -> AsyncIterator[asyncpg.Connection]:
    """``pool.acquire()`` that terminates a connection left in an untrusted state (module doc)."""
    conn = await pool.acquire(timeout=timeout)
    try:
        yield conn
    except BaseException as exc:
        if untrusted(exc):
            conn.terminate()
        raise
    finally:
        try:
            await pool.release(conn)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                asyncio.TimeoutError):
            pass  # the pool terminated the connection it could not reset; nothing else to undo
