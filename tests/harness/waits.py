"""Waiting on a condition with a deadline, for tests and the benches.

Tests wait on conditions, never on fixed sleeps: ``wait_for`` (sync) and
``await_for`` (async) poll a predicate until it returns a truthy value or the
deadline passes, then fail with an ``AssertionError`` that says what was awaited.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["await_for", "wait_for"]

T = TypeVar("T")

Message = str | Callable[[], str] | None


def _describe(message: Message, default: str) -> str:
    if message is None:
        return default
    if callable(message):
        try:
            return message()
        except Exception as exc:  # the message must never hide the timeout
            return f"{default} (building the failure message raised {exc!r})"
    return message


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: Message = None,
    *,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``predicate`` until it returns a truthy value; return that value.

    Args:
        predicate: Called with no arguments, at least once (even with ``timeout=0``).
        timeout: Seconds until giving up.
        interval: Seconds between two calls.
        message: What was awaited, for the failure message; a callable is called
            only on timeout, so it can describe the state at that moment.
        ignore: Exception types that count as "not yet" instead of propagating
            (for example ``ConnectionRefusedError`` while a server starts). The
            last one is chained to the ``AssertionError``.

    Raises:
        AssertionError: The deadline passed and the predicate was never truthy.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
        except ignore as exc:
            last_error = exc
        else:
            if result:
                return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            text = _describe(message, f"condition {getattr(predicate, '__name__', predicate)!r}")
            raise AssertionError(f"Timed out after {timeout:g}s waiting for: {text}") from last_error
        time.sleep(min(interval, remaining))


async def await_for(
    predicate: Callable[[], Awaitable[T] | T],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: Message = None,
    *,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Async twin of :func:`wait_for`; ``predicate`` may be sync or async.

    An async predicate that is still running at the deadline is cancelled and
    counts as a timeout. Between calls the event loop keeps running.

    Raises:
        AssertionError: The deadline passed and the predicate was never truthy.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_error: BaseException | None = None
    still_running = False
    while True:
        try:
            result: Any = predicate()
            if inspect.isawaitable(result):
                try:
                    result = await asyncio.wait_for(result, max(deadline - loop.time(), 0.001))
                except TimeoutError:
                    if loop.time() < deadline:
                        raise  # the predicate's own timeout, not ours
                    still_running = True
                    result = None
        except ignore as exc:
            last_error = exc
        else:
            if result:
                return result  # type: ignore[no-any-return]
        remaining = deadline - loop.time()
        if remaining <= 0:
            text = _describe(message, f"condition {getattr(predicate, '__name__', predicate)!r}")
            if still_running:
                text += " (the last check was still running)"
            raise AssertionError(f"Timed out after {timeout:g}s waiting for: {text}") from last_error
        await asyncio.sleep(min(interval, remaining))

