"""Logging set-up: one line per event, as JSON for machines or key=value text for people.

Owns how a log record leaves the process; the code that logs only names the event and
passes context as ``extra={...}`` key=values (``error`` for an exception's text).

- **Format.** ``json``: one JSON object per line with the stable fields ``ts`` (RFC 3339
  UTC, milliseconds), ``level``, ``logger``, ``event`` (the message), then the context
  (``device_id``, ``ingest_id``, ``correlation_id``, ``error``, ... where known). ``text``:
  ``<time> <LEVEL> <logger>: <event> key=value ...``. ``auto`` (the default) writes JSON
  unless stderr is a terminal, so a container's or journald's log is machine-readable and
  a person at a terminal reads text.
- **Redaction** (``Redactor``): a context field named like a secret or a payload
  (``token``, ``key``, ``secret``, ``password``, ``payload``, ``authorization``, alone or as
  the last ``_`` part, e.g. ``api_key``) is replaced by ``[redacted]``; credentials in any
  text (``vgd_``/``vgk_`` tokens and keys, the password of a URL) are masked, tracebacks
  included. A log line can therefore never carry a device token, an API key or a
  payload's content, whatever a caller passes.
- **Summaries** (``Summarizer``): a storm of identical warnings (an alert storm, a
  flapping device, a broker refusing every reconnect) would drown everything else. The
  first record of a kind passes; identical ones within ``repeat_window_s`` are counted,
  and when the window closes one line with the same event and ``repeated: N`` says how
  many were held back. Identical means same logger, level (WARNING and above only),
  message and the fields in ``SUMMARY_FIELDS``; a field outside that set (a retry delay,
  an attempt number) does not make two records different. At most ``max_keys`` kinds are
  tracked per window; beyond that records pass unsummarised, so memory stays bounded and
  nothing is hidden.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Literal, TextIO

import orjson

__all__ = [
    "setup_logging",
    "JsonFormatter",
    "TextFormatter",
    "Redactor",
    "Summarizer",
    "SummarizingHandler",
    "mask_secrets",
    "SUMMARY_FIELDS",
]

Format = Literal["auto", "json", "text"]

# attributes every LogRecord has; everything else on a record came from ``extra``
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# JSON lines: these names are the record's own; a context field of the same name is renamed
_STABLE = ("ts", "level", "logger", "event")

_SECRET_WORDS = frozenset({"token", "key", "secret", "password", "passwd", "payload", "authorization"})
REDACTED = "[redacted]"
# vgd_<16 hex>_<secret> (device token), vgk_<16 hex>_<secret> (API key): keep the id, which
# names the credential without granting anything; anything else after the prefix goes whole
_CREDENTIAL = re.compile(r"(?<![A-Za-z0-9])(vg[dk]_)([0-9a-f]{16}_)?[A-Za-z0-9_\-]+")
_URL_PASSWORD = re.compile(r"(://[^:/@\s]+):[^@\s]*@")

SUMMARY_FIELDS = ("source", "device_id", "reason", "rule", "priority", "action", "actor", "target", "operation",
                  "sqlstate", "error", "worker")


def mask_secrets(text: str) -> str:
    """``text`` with device tokens, API keys and URL passwords masked."""
    if "vg" in text:
        text = _CREDENTIAL.sub(r"\1\2***", text)
    if "://" in text:
        text = _URL_PASSWORD.sub(r"\1:***@", text)
    return text


def _secret_name(name: str) -> bool:
    lowered = name.lower()
    return lowered in _SECRET_WORDS or lowered.rsplit("_", 1)[-1] in _SECRET_WORDS


def _context(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class Redactor(logging.Filter):
    """Rewrites every record in place so that no secret or payload content leaves the process."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - bad format arguments: logging reports them when it formats
            message = None
        if message is not None:
            masked = mask_secrets(message)
            if masked != message or record.args:
                record.msg, record.args = masked, None
        for name, value in _context(record).items():
            setattr(record, name, REDACTED if _secret_name(name) else _scrub(value))
        return True


def _scrub(value: object, depth: int = 0) -> object:
    """``value`` with credentials masked, secret-named keys redacted and raw bytes replaced by their size."""
    if isinstance(value, str):
        return mask_secrets(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"  # raw bytes are a payload: never shown
    if depth > 4:  # context is flat by convention; deeper structures are shown as masked text
        return mask_secrets(str(value))
    if isinstance(value, dict):
        return {k: REDACTED if _secret_name(str(k)) else _scrub(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_scrub(v, depth + 1) for v in value]
    return value


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str | None:
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    text = record.exc_text
    if record.stack_info:
        text = f"{text}\n{formatter.formatStack(record.stack_info)}" if text else formatter.formatStack(record.stack_info)
    return mask_secrets(text) if text else None


def _ts(created: float) -> str:
    return datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _jsonable(value: object) -> object:
    return mask_secrets(str(value))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``event``, then the context."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _ts(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for name, value in _context(record).items():
            out[f"{name}_" if name in _STABLE else name] = value
        if record.exc_info:
            exc = record.exc_info[1]
            out.setdefault("error", mask_secrets(f"{type(exc).__name__}: {exc}") if exc is not None else "unknown")
        traceback = _exception_text(self, record)
        if traceback:
            out["traceback"] = traceback
        # default=: a context value orjson cannot encode (a Path, an enum) becomes its text, masked
        return orjson.dumps(out, default=_jsonable, option=orjson.OPT_NON_STR_KEYS).decode()


def _kv(value: object) -> str:
    s = str(value)
    return f'"{s}"' if (not s or any(c.isspace() or c == '"' for c in s)) else s


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger>: <event> key=value ...``, then the traceback if any."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        line = self.formatMessage(record)
        context = _context(record)
        if context:
            line += " " + " ".join(f"{k}={_kv(v)}" for k, v in context.items())
        traceback = _exception_text(self, record)
        return f"{line}\n{traceback}" if traceback else line


class _Kind:
    __slots__ = ("first", "until", "held")

    def __init__(self, first: logging.LogRecord, until: float) -> None:
        self.first = first
        self.until = until
        self.held = 0


class Summarizer:
    """Decides which records pass and when a ``repeated: N`` summary is due.

    Pure bookkeeping with an injected clock (``now`` arguments): ``admit`` for each record,
    ``due`` periodically; both return the records to write, in order.
    """

    def __init__(self, window_s: float = 10.0, *, max_keys: int = 1024, min_level: int = logging.WARNING) -> None:
        self.window_s = window_s
        self.max_keys = max_keys
        self.min_level = min_level
        self._kinds: dict[tuple[Any, ...], _Kind] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._kinds)

    @staticmethod
    def key(record: logging.LogRecord) -> tuple[Any, ...]:
        fields = tuple(str(getattr(record, f, "")) for f in SUMMARY_FIELDS)
        return (record.name, record.levelno, str(record.msg), fields)

    def admit(self, record: logging.LogRecord, now: float) -> list[logging.LogRecord]:
        """The records to write for ``record``: none (held back), itself, or a summary then itself."""
        if record.levelno < self.min_level:
            return [record]
        key = self.key(record)
        with self._lock:
            kind = self._kinds.get(key)
            if kind is not None and now < kind.until:
                kind.held += 1
                return []
            out: list[logging.LogRecord] = []
            if kind is not None:  # its window closed before ``due`` ran: summary first, then a new window
                del self._kinds[key]
                if kind.held:
                    out.append(self._summary(kind))
            if len(self._kinds) < self.max_keys:
                self._kinds[key] = _Kind(record, now + self.window_s)
            out.append(record)
            return out

    def due(self, now: float, *, everything: bool = False) -> list[logging.LogRecord]:
        """Summaries of the windows closed by ``now`` (all of them with ``everything``); forgets those kinds."""
        with self._lock:
            closed = [k for k, kind in self._kinds.items() if everything or now >= kind.until]
            kinds = [self._kinds.pop(k) for k in closed]
        return [self._summary(kind) for kind in kinds if kind.held]

    @staticmethod
    def _summary(kind: _Kind) -> logging.LogRecord:
        fields = dict(kind.first.__dict__)
        wall = time.time()
        fields.update(created=wall, msecs=(wall % 1) * 1000, exc_info=None, exc_text=None, stack_info=None,
                      repeated=kind.held)
        return logging.makeLogRecord(fields)


class SummarizingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that redacts, then summarises repeated warnings (see ``Summarizer``).

    A daemon thread writes the summaries of closed windows even when nothing else is
    logged; ``close()`` stops it and writes what is still held back.
    """

    def __init__(self, stream: TextIO, *, window_s: float = 10.0, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic, timer: bool = True) -> None:
        super().__init__(stream)
        self.summarizer = Summarizer(window_s, max_keys=max_keys)
        self.clock = clock
        self.addFilter(Redactor())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if timer:
            self._thread = threading.Thread(target=self._tick, name="vitalgate-log-summaries", daemon=True)
            self._thread.start()

    def handle(self, record: logging.LogRecord) -> logging.LogRecord | bool:  # type: ignore[override]
        if not self.filter(record):
            return False
        for rec in self.summarizer.admit(record, self.clock()):
            with self.lock:  # type: ignore[union-attr]
                self.emit(rec)
        return record

    def flush_due(self, *, everything: bool = False) -> None:
        """Write the summaries of windows closed by now (every held-back count with ``everything``)."""
        for rec in self.summarizer.due(self.clock(), everything=everything):
            with self.lock:  # type: ignore[union-attr]
                self.emit(rec)

    def _tick(self) -> None:
        # a summary is at most a quarter window (and at most a second) late
        interval = min(1.0, self.summarizer.window_s / 4)
        while not self._stop.wait(interval):
            self.flush_due()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2)
        self.flush_due(everything=True)
        super().close()


def setup_logging(level: str = "INFO", fmt: Format = "auto", *, repeat_window_s: float = 10.0,
                  stream: TextIO | None = None) -> SummarizingHandler:
    """Send every log record to ``stream`` (default stderr) in ``fmt``; return the handler.

    ``auto`` means JSON lines unless the stream is a terminal. Replaces (and closes) any
    handler set up before, so calling it twice does not double the lines.
    """
    stream = stream if stream is not None else sys.stderr
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        fmt = "text" if isatty is not None and isatty() else "json"
    handler = SummarizingHandler(stream, window_s=repeat_window_s)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    return handler
