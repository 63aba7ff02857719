"""The MLLP connection to the receiver (the EHR's interface engine), optionally inside TLS.

One message at a time: write it, read the receiver's ACK, check that MSA-2 names it. HL7's
original acknowledgement mode is a conversation, not a stream, so a receiver that answers
late or never is handled by dropping the connection (``MllpError``), after which the
message is sent again with the same MSH-10.
"""

from __future__ import annotations

import asyncio
import ssl

import hl7
from hl7.mllp import InvalidBlockError, open_hl7_connection

from gateway.config import Hl7Config
from gateway.errors import GatewayError
from gateway.hl7.messages import Ack, read_ack

__all__ = ["MllpConnection", "MllpError"]


class MllpError(GatewayError):
    """An exchange failed at ``stage`` (connect, send, ack_timeout, bad_ack); the message was not settled."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage


def _tls_context(cfg: Hl7Config) -> ssl.SSLContext | None:
    if not cfg.tls:
        return None
    ctx = ssl.create_default_context(cafile=cfg.tls_ca)
    if cfg.tls_cert is not None:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    return ctx


class MllpConnection:
    """An open MLLP connection; ``exchange`` sends one message and returns its ACK."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, cfg: Hl7Config) -> MllpConnection:
        ctx = _tls_context(cfg)
        try:
            reader, writer = await asyncio.wait_for(
                open_hl7_connection(cfg.host, cfg.port, encoding="ascii", ssl=ctx,
                                    server_hostname=(cfg.tls_server_name or cfg.host) if ctx else None),
                cfg.connect_timeout_s)
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            raise MllpError("connect", f"{cfg.host}:{cfg.port}: {exc!r}") from None
        return cls(reader, writer)

    async def exchange(self, message: hl7.Message, control: str, timeout_s: float) -> Ack:
        try:
            self._writer.writemessage(message)  # type: ignore[attr-defined]
            await self._writer.drain()
        except (OSError, ConnectionError) as exc:
            raise MllpError("send", repr(exc)) from None
        try:
            block = await asyncio.wait_for(self._reader.readblock(), timeout_s)  # type: ignore[attr-defined]
        except asyncio.TimeoutError:
            raise MllpError("ack_timeout", f"no ACK for {control} within {timeout_s:g} s") from None
        except (OSError, ConnectionError, asyncio.IncompleteReadError, InvalidBlockError, ValueError) as exc:
            raise MllpError("send", f"connection lost waiting for the ACK of {control}: {exc!r}") from None
        try:
            ack = read_ack(block.decode("utf-8", "replace"))
        except ValueError as exc:
            raise MllpError("bad_ack", str(exc)) from None
        if ack.control_id != control:
            raise MllpError("bad_ack", f"ACK names {ack.control_id!r}, expected {control!r}")
        return ack

    async def close(self) -> None:
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), 2.0)
        except (OSError, ConnectionError, asyncio.TimeoutError, ssl.SSLError):
            pass
