"""Logging set-up: one line per event, message first, then key=value context."""

from __future__ import annotations

import logging
import sys

__all__ = ["setup_logging"]

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = [f"{k}={_fmt(v)}" for k, v in record.__dict__.items() if k not in _STANDARD]
        return f"{base} {' '.join(extras)}" if extras else base


def _fmt(v: object) -> str:
    s = str(v)
    return f'"{s}"' if (" " in s or not s) else s


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
