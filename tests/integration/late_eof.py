"""A TCP relay that passes every byte at once but the server's end of stream late.

When PostgreSQL ends a session (``pg_terminate_backend``, ``pg_ctl restart -m fast``) the
backend sends its FATAL "terminating connection" and then closes the socket. On one
machine the two arrive microseconds apart; through a network or a busy host they can
arrive further apart. The relay stretches that gap to ``eof_delay_s``, so a race that
needs a client to act between the FATAL and the end of stream is hit every time instead
of once in many restarts. Nothing is altered or dropped: it is the timing of a real
server's real messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

__all__ = ["LateEofRelay"]


class LateEofRelay:
    """``127.0.0.1:<port>`` relaying to ``upstream``; run in a thread of its own (``start``/``close``)."""

    def __init__(self, upstream_host: str, upstream_port: int, *, eof_delay_s: float = 0.5) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.eof_delay_s = eof_delay_s
        self.port = 0
        self.holding = 0  # connections whose server side ended, their end of stream not yet passed on
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="late-eof-relay", daemon=True)
        self._server: asyncio.Server | None = None

    def start(self) -> LateEofRelay:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._relay, "127.0.0.1", 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for t in asyncio.all_tasks():
                if t is not asyncio.current_task():
                    t.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.close()
            return

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, delay_eof: float) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            if delay_eof:
                self.holding += 1
                try:
                    await asyncio.sleep(delay_eof)
                finally:
                    self.holding -= 1
            w.close()

        await asyncio.gather(pump(client_r, server_w, 0.0), pump(server_r, client_w, self.eof_delay_s),
                             return_exceptions=True)
