"""Sources: transports that hand payloads to the pipeline.

A source calls ``submit(RawMessage)`` for each payload and acknowledges it to the
device only through ``RawMessage.ack``, which the pipeline calls after commit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from gateway.model import RawMessage

__all__ = ["Submit", "Source"]

Submit = Callable[[RawMessage], None]


class Source(Protocol):
    """Lifecycle: ``run()`` until ``stop_intake()``; then the pipeline drains; then ``close()``."""

    async def run(self) -> None:
        """Take payloads (reconnecting as needed) until ``close()``."""

    def stop_intake(self) -> None:
        """Stop handing new payloads to the pipeline; unacknowledged ones stay with the transport."""

    async def close(self) -> None:
        """Send outstanding acknowledgements and disconnect."""
