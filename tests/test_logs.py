"""gateway.logs: JSON lines and text, redaction of secrets and payloads, summaries of repeated warnings."""

from __future__ import annotations

import io
import logging
from datetime import datetime
from pathlib import Path

import orjson
import pytest

from gateway.config import load
from gateway.errors import ConfigError
from gateway.logs import (
    REDACTED,
    SUMMARY_FIELDS,
    JsonFormatter,
    Redactor,
    Summarizer,
    SummarizingHandler,
    TextFormatter,
    mask_secrets,
    setup_logging,
)
from tests.harness import wait_for

TOKEN = "vgd_0123456789abcdef_" + "S" * 20 + "-_x" * 8
API_KEY = "vgk_fedcba9876543210_" + "K" * 43
SECRETS = ("S" * 20, "K" * 43, "hunter2", "pay-load-content")


def record(msg: str = "Payload rejected.", level: int = logging.WARNING, name: str = "gateway.pipeline",
           args: tuple = (), exc_info: object = None, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)  # type: ignore[arg-type]
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def handler(fmt: logging.Formatter | None = None, window_s: float = 10.0, max_keys: int = 1024
            ) -> tuple[SummarizingHandler, io.StringIO, Clock, logging.Logger]:
    stream, clock = io.StringIO(), Clock()
    h = SummarizingHandler(stream, window_s=window_s, max_keys=max_keys, clock=clock, timer=False)
    h.setFormatter(fmt or JsonFormatter())
    logger = logging.getLogger(f"gateway.test_logs.{id(h)}")
    logger.propagate = False
    logger.handlers[:] = [h]
    logger.setLevel(logging.DEBUG)
    return h, stream, clock, logger


def lines(stream: io.StringIO) -> list[dict]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


# ------------------------------------------------------------------ formats


def test_json_line_has_the_stable_fields_then_the_context():
    out = orjson.loads(JsonFormatter().format(record(device_id="po-1", ingest_id=7, correlation_id="ab12",
                                                     error="boom", reason="numerics[0].t: invalid")))
    assert list(out)[:4] == ["ts", "level", "logger", "event"]
    assert out["level"] == "warning" and out["logger"] == "gateway.pipeline" and out["event"] == "Payload rejected."
    assert datetime.fromisoformat(out["ts"].replace("Z", "+00:00")).utcoffset().total_seconds() == 0
    assert out["ts"].endswith("Z") and len(out["ts"]) == len("2026-01-01T00:00:00.000Z")
    assert {k: out[k] for k in ("device_id", "ingest_id", "correlation_id", "error")} == {
        "device_id": "po-1", "ingest_id": 7, "correlation_id": "ab12", "error": "boom"}


def test_json_context_never_overwrites_a_stable_field_and_odd_values_become_text():
    out = orjson.loads(JsonFormatter().format(record(event="opened", level_="x", path=Path("/a b"), n={1: 2})))
    assert out["event"] == "Payload rejected." and out["event_"] == "opened"
    assert out["path"] == "/a b" and out["n"] == {"1": 2}


def test_json_exception_gives_error_and_traceback():
    try:
        raise ValueError("bad value")
    except ValueError:
        import sys

        out = orjson.loads(JsonFormatter().format(record("Request failed unexpectedly.", logging.ERROR,
                                                         exc_info=sys.exc_info())))
    assert out["error"] == "ValueError: bad value"
    assert "Traceback (most recent call last)" in out["traceback"] and "\n" not in JsonFormatter().format(record())


def test_text_line_is_message_first_then_key_values_then_the_traceback():
    try:
        raise KeyError("k")
    except KeyError:
        import sys

        text = TextFormatter().format(record("Worker exited.", logging.INFO, name="gateway.workers",
                                             exc_info=sys.exc_info(), worker=1, error="two words", empty=""))
    first, *rest = text.splitlines()
    assert first.split(" ", 2)[2] == 'INFO gateway.workers: Worker exited. worker=1 error="two words" empty=""'
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "KeyError: 'k'"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def bare_root():
    """The root logger without pytest's capture handlers for the test; restored afterwards."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers[:] = []
    yield root
    for h in root.handlers[:]:
        root.removeHandler(h)
        h.close()
    root.handlers[:] = saved
    root.setLevel(level)


@pytest.mark.parametrize(("fmt", "stream", "json"), [
    ("auto", io.StringIO(), True),  # a file, a pipe, a container's log: machines read it
    ("auto", _Terminal(), False),  # a person at a terminal
    ("json", _Terminal(), True),
    ("text", io.StringIO(), False),
])
def test_setup_logging_chooses_json_unless_on_a_terminal(bare_root, fmt, stream, json):
    h = setup_logging("INFO", fmt, stream=stream)
    setup_logging("INFO", fmt, stream=stream)  # a second call replaces, never doubles
    assert len(bare_root.handlers) == 1 and h not in bare_root.handlers
    logging.getLogger("gateway.x").info("Gateway running.", extra={"gateway_id": "gw-1"})
    logging.getLogger("gateway.x").debug("Not shown.")
    out = stream.getvalue().splitlines()
    assert len(out) == 1
    if json:
        assert orjson.loads(out[0])["event"] == "Gateway running."
    else:
        assert out[0].endswith("INFO gateway.x: Gateway running. gateway_id=gw-1")


def test_log_section_of_the_configuration():
    cfg = load(None, environ={"VITALGATE_LOG_FORMAT": "json", "VITALGATE_LOG_LEVEL": "WARNING",
                              "VITALGATE_LOG_REPEAT_WINDOW_S": "2.5"})
    assert (cfg.log.format, cfg.log.level, cfg.log.repeat_window_s) == ("json", "WARNING", 2.5)
    assert load(None, environ={}).log.format == "auto"
    with pytest.raises(ConfigError, match=r"VITALGATE_LOG_FORMAT \(log.format\): Invalid enum value 'xml'"):
        load(None, environ={"VITALGATE_LOG_FORMAT": "xml"})


# ------------------------------------------------------------------ redaction


@pytest.mark.parametrize("name", ["token", "key", "secret", "password", "payload", "authorization", "Authorization",
                                  "api_key", "device_token", "db_password", "raw_payload", "client_secret"])
def test_secret_named_fields_never_pass(name):
    h, stream, _, log = handler()
    log.warning("Request refused.", extra={name: "hunter2", "key_id": "0123", "payload_sha256": "ab"})
    out = lines(stream)[0]
    assert out[name] == REDACTED and "hunter2" not in stream.getvalue()
    assert out["key_id"] == "0123" and out["payload_sha256"] == "ab"  # names, not secrets: kept


def test_credentials_are_masked_in_messages_values_nested_context_and_tracebacks():
    h, stream, _, log = handler()
    log.warning("Auth failed for %s.", TOKEN, extra={"detail": {"header": f"Bearer {API_KEY}", "list": [TOKEN]},
                                                     "url": "postgresql://vitalgate:hunter2@db:5432/vg",
                                                     "body": b"pay-load-content"})
    try:
        raise RuntimeError(f"cannot use {API_KEY}")
    except RuntimeError:
        log.exception("Request failed unexpectedly.")
    text = stream.getvalue()
    for secret in SECRETS:
        assert secret not in text
    first, second = lines(stream)
    assert first["event"] == "Auth failed for vgd_0123456789abcdef_***."  # the id stays: it names the token
    assert first["detail"] == {"header": "Bearer vgk_fedcba9876543210_***", "list": ["vgd_0123456789abcdef_***"]}
    assert first["url"] == "postgresql://vitalgate:***@db:5432/vg" and first["body"] == "<16 bytes>"
    assert "vgk_fedcba9876543210_***" in second["error"] and "vgk_fedcba9876543210_***" in second["traceback"]


def test_mask_secrets_leaves_ordinary_text_alone():
    plain = "numerics[0].values.spo2: expected number, got string (vgdx_1 devices/po-1/telemetry)"
    assert mask_secrets(plain) == plain
    assert mask_secrets("vgd_short") == "vgd_***"
    assert mask_secrets("mqtts://broker:8883") == "mqtts://broker:8883"


def test_redactor_survives_bad_format_arguments():
    rec = record("%d devices", args=("x",), token="t")
    assert Redactor().filter(rec) and rec.token == REDACTED


# ------------------------------------------------------------------ summaries


def test_a_storm_of_identical_warnings_is_one_line_then_one_summary_per_window():
    h, stream, clock, log = handler(window_s=10)
    for i in range(500):
        log.warning("Payload rejected.", extra={"device_id": "po-1", "reason": "seq: gap", "origin": f"o{i}"})
    assert len(lines(stream)) == 1
    clock.now += 9.9
    h.flush_due()
    assert len(lines(stream)) == 1  # the window is still open
    clock.now += 0.1
    h.flush_due()
    first, summary = lines(stream)
    assert "repeated" not in first and summary["repeated"] == 499
    assert (summary["event"], summary["device_id"], summary["reason"], summary["level"]) == (
        "Payload rejected.", "po-1", "seq: gap", "warning")
    assert len(h.summarizer) == 0  # forgotten once summarised
    log.warning("Payload rejected.", extra={"device_id": "po-1", "reason": "seq: gap"})
    assert len(lines(stream)) == 3 and "repeated" not in lines(stream)[2]  # a new window starts with a real line


def test_summary_comes_before_the_next_record_when_the_window_closed_unnoticed():
    h, stream, clock, log = handler(window_s=1)
    for _ in range(3):
        log.warning("MQTT connection lost; reconnecting.", extra={"error": "refused"})
    clock.now += 5
    log.warning("MQTT connection lost; reconnecting.", extra={"error": "refused"})
    assert [x.get("repeated") for x in lines(stream)] == [None, 2, None]


def test_different_fields_levels_loggers_or_messages_are_different_kinds():
    h, stream, clock, log = handler()
    other = logging.getLogger(log.name + ".other")
    for _ in range(2):
        log.warning("Payload rejected.", extra={"device_id": "po-1"})
        log.warning("Payload rejected.", extra={"device_id": "po-2"})
        log.error("Payload rejected.", extra={"device_id": "po-1"})
        log.warning("Alert opened.", extra={"device_id": "po-1"})
        other.warning("Payload rejected.", extra={"device_id": "po-1"})
        log.info("Batch written.", extra={"device_id": "po-1"})  # below WARNING: never summarised
    assert len(lines(stream)) == 5 + 2
    clock.now += 10
    h.flush_due()
    assert [x["repeated"] for x in lines(stream)[7:]] == [1, 1, 1, 1, 1]


def test_fields_outside_the_selected_set_do_not_split_a_kind():
    assert "retry_in_s" not in SUMMARY_FIELDS and "attempt" not in SUMMARY_FIELDS and "device_id" in SUMMARY_FIELDS
    h, stream, clock, log = handler()
    for attempt in range(4):
        log.warning("Database unavailable; holding the batch and retrying.",
                    extra={"operation": "write", "attempt": attempt, "retry_in_s": 0.1 * attempt, "error": "down"})
    clock.now += 10
    h.flush_due()
    assert [x.get("repeated") for x in lines(stream)] == [None, 3]


def test_memory_is_bounded_and_nothing_is_hidden_beyond_the_bound():
    s = Summarizer(10, max_keys=100)
    passed = 0
    for round_ in range(3):
        for d in range(1000):
            passed += len(s.admit(record(device_id=f"po-{d}"), now=1.0 + round_))
    assert len(s) == 100
    # 1000 first occurrences, then in rounds 2 and 3 only the 100 tracked kinds are held back
    assert passed == 1000 + 2 * 900
    summaries = s.due(11.0)
    assert len(summaries) == 100 and all(r.repeated == 2 for r in summaries) and len(s) == 0


def test_close_writes_what_is_still_held_back():
    h, stream, clock, log = handler()
    for _ in range(4):
        log.warning("Alerts not published: MQTT is disconnected (they are stored).", extra={"count": 3})
    h.close()
    assert [x.get("repeated") for x in lines(stream)] == [None, 3]


def test_the_summary_thread_writes_a_closed_window_without_further_logging():
    stream = io.StringIO()
    h = SummarizingHandler(stream, window_s=0.2)
    h.setFormatter(JsonFormatter())
    try:
        for _ in range(3):
            h.handle(record(device_id="po-9"))
        wait_for(lambda: len(stream.getvalue().splitlines()) == 2, timeout=10,
                 message=lambda: f"no summary line: {stream.getvalue()!r}")
        assert orjson.loads(stream.getvalue().splitlines()[1])["repeated"] == 2
    finally:
        h.close()
    assert len(stream.getvalue().splitlines()) == 2
