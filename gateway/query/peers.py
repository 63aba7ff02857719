"""Live events of the other workers (``--workers N``): one unix socket per worker, feeds over it.

Why this path: a device's commits happen in the worker that owns it, while a stream client
is served by whichever worker accepted its connection (``SO_REUSEPORT``). Each worker
listens on ``<runtime dir>/s<i>.sock``; a worker serving a client opens one link to every
other worker and subscribes the client's filter there (``["s", id, kind, value,
position]``). The owner's hub sends only the events of the devices the filter watches
(``["e", id, seq, events]``, already JSON), so with no client nothing crosses, and the
cost is one local socket write per commit and watching client. The broker would carry
every commit to every worker whether watched or not, and add its own hop.

A lost link is reconnected with backoff and every subscription sent again from the
client's current position, so the owner's window replays what was missed (or reports
a gap). An owner whose link backs up beyond ``MAX_LINK_BYTES`` (the other worker is not
reading) drops the link rather than buffer without bound; the subscriber resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from gateway.retry import Backoff

from .hub import Feed, Filter, Hub

__all__ = ["StreamPeers", "RemoteSub"]

log = logging.getLogger(__name__)

MAX_LINK_BYTES = 16 << 20
_HEADER = struct.Struct(">I")
_MAX_FRAME = 64 << 20
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


def _frame(msg: list[Any]) -> bytes:
    body = _enc.encode(msg)
    return _HEADER.pack(len(body)) + body


async def _read(reader: asyncio.StreamReader) -> list[Any]:
    (n,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if n > _MAX_FRAME:
        raise ConnectionError(f"stream frame of {n} bytes")
    return _dec.decode(await reader.readexactly(n))


def socket_path(runtime_dir: str | Path, index: int) -> Path:
    return Path(runtime_dir) / f"s{index}.sock"


class RemoteSub:
    """A client's feed at another worker."""

    def __init__(self, link: _Link, sid: int, flt: Filter, client: Any) -> None:
        self.link, self.id, self.filter, self.client = link, sid, flt, client
        self.ready = asyncio.Event()  # the worker answered with its position (or replayed)
        self.deliver = client.deliverer(link.index)

    def cancel(self) -> None:
        self.link.unsubscribe(self)


class _Link:
    """This worker's link to worker ``index``: its subscriptions, sent again after a reconnect."""

    def __init__(self, peers: StreamPeers, index: int) -> None:
        self.peers, self.index = peers, index
        self.subs: dict[int, RemoteSub] = {}
        self.writer: asyncio.StreamWriter | None = None
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"stream-link-w{index}")

    def subscribe(self, sub: RemoteSub, position: tuple[int, int] | None) -> None:
        self.subs[sub.id] = sub
        self._send(["s", sub.id, *sub.filter, list(position) if position else None])

    def unsubscribe(self, sub: RemoteSub) -> None:
        if self.subs.pop(sub.id, None) is not None:
            self._send(["u", sub.id])

    def _send(self, msg: list[Any]) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(_frame(msg))

    async def _run(self) -> None:
        backoff = Backoff(0.05, 2.0)
        path = str(socket_path(self.peers.runtime_dir, self.index))
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(path)
            except OSError:
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            self.writer = writer
            for sub in list(self.subs.values()):  # again, from where each client is now
                pos = sub.client.position[self.index]
                self._send(["s", sub.id, *sub.filter, list(pos) if pos else None])
            try:
                while True:
                    msg = await _read(reader)
                    sub = self.subs.get(msg[1])
                    if sub is None:
                        continue
                    if msg[0] == "p":
                        sub.client.start_at(self.index, msg[2])
                        sub.ready.set()
                    elif msg[0] == "e":
                        events = None if msg[3] is None else [(n, d) for n, d in msg[3]]
                        if not sub.deliver(msg[2], events):
                            self.unsubscribe(sub)
            except (OSError, asyncio.IncompleteReadError, ConnectionError, msgspec.DecodeError, IndexError) as exc:
                if self.subs:
                    log.warning("Stream link to a worker lost; resubscribing.", extra={"worker": self.index,
                                                                                       "error": repr(exc)})
            finally:
                self.writer = None
                writer.close()


class StreamPeers:
    """Both ends of the stream links of worker ``index`` among ``count``."""

    def __init__(self, hub: Hub, *, index: int, count: int, runtime_dir: str) -> None:
        self.hub, self.index, self.count, self.runtime_dir = hub, index, count, runtime_dir
        self._links: dict[int, _Link] = {}
        self._ids = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        path = socket_path(self.runtime_dir, self.index)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._server = await asyncio.start_unix_server(self._serve, str(path))

    async def close(self) -> None:
        for link in self._links.values():
            link.task.cancel()
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()

    def subscribe(self, index: int, flt: Filter, client: Any, position: tuple[int, int] | None) -> RemoteSub:
        link = self._links.get(index)
        if link is None:
            link = self._links[index] = _Link(self, index)
        sub = RemoteSub(link, next(self._ids), flt, client)
        link.subscribe(sub, position)
        return sub

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The owner's end: feeds of one other worker's clients."""
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        feeds: dict[int, Feed] = {}

        def sender(sid: int) -> Callable[[int, list[Any] | None], bool]:
            def deliver(seq: int, events: list[Any] | None) -> bool:
                if writer.is_closing():
                    return False
                writer.write(_frame(["e", sid, seq, events]))
                if writer.transport.get_write_buffer_size() > MAX_LINK_BYTES:
                    writer.close()  # the other worker is not reading: it resumes after reconnecting
                    return False
                return True
            return deliver

        try:
            while True:
                msg = await _read(reader)
                if msg[0] == "s":
                    _, sid, kind, value, pos = msg
                    old = feeds.pop(sid, None)
                    if old is not None:
                        self.hub.remove_feed(old)
                    with contextlib.suppress(Exception):  # this worker's view of the associations, now
                        await self.hub.refresh()
                    feed, seq = self.hub.add_feed((kind, value), sender(sid), tuple(pos) if pos else None)
                    feeds[sid] = feed
                    writer.write(_frame(["p", sid, seq]))
                elif msg[0] == "u":
                    feed = feeds.pop(msg[1], None)
                    if feed is not None:
                        self.hub.remove_feed(feed)
        except (OSError, asyncio.IncompleteReadError, ConnectionError, msgspec.DecodeError, ValueError):
            pass
        finally:
            for feed in feeds.values():
                self.hub.remove_feed(feed)
            writer.close()
            self._conns.discard(task)
