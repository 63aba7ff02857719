"""Every Prometheus metric the gateway exports, declared in one place, and the port serving them.

Names carry the ``gateway_`` prefix; counters end in ``_total``; labels come from a
closed set (``source``, ``outcome``, ``reason``, ``flag``, ``event``, ``priority``, ``action``,
``kind``, ``code``, ``stage``).

The metrics port also answers the health probes (``gateway.health`` gives their routes).
It is served by threads, not by the event loop, as prometheus_client's own server is: a
scrape or a probe then answers while the loop is busy or stuck, which is when an operator
needs them most, and ``/healthz`` can report the loop's lag instead of timing out.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

__all__ = ["Metrics", "MetricsServer", "Route"]

Route = Callable[[], "tuple[int, bytes]"]  # a GET answered with (HTTP status, JSON body)
_REASONS = {200: "200 OK", 404: "404 Not Found", 503: "503 Service Unavailable"}

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """A registry of the gateway's metrics; one per Gateway so tests can run several."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.received = Counter("gateway_messages_received_total", "Payloads received.", ["source"], registry=r)
        self.envelopes = Counter(
            "gateway_envelopes_total",
            "Envelopes by outcome: stored, duplicate (stored before), rejected.",
            ["source", "outcome"],
            registry=r,
        )
        self.rejected = Counter(
            "gateway_rejected_total", "Rejected payloads by the field or stage at fault.", ["source", "reason"], registry=r
        )
        self.readings = Counter("gateway_readings_written_total", "Numeric readings committed.", registry=r)
        self.samples = Counter("gateway_waveform_samples_written_total", "Waveform samples committed.", registry=r)
        self.flagged = Counter("gateway_flagged_total", "Readings and waveform blocks per quality flag.", ["flag"], registry=r)
        self.alerts = Counter("gateway_alert_events_total", "Alert episodes opened and closed.", ["event", "priority"], registry=r)
        self.audit = Counter(
            "gateway_audit_events_total", "Audit events committed to audit_log, by action.", ["action"], registry=r
        )
        self.batches = Counter("gateway_batches_written_total", "Batches committed.", registry=r)
        self.write_errors = Counter(
            "gateway_write_errors_total", "Failed database writes, by whether they will be retried.", ["retriable"], registry=r
        )
        self.seq_gaps = Counter(
            "gateway_seq_gap_messages_total", "Messages missing upstream, inferred from jumps in device seq.", registry=r
        )
        self.in_flight = Gauge("gateway_in_flight_messages", "Payloads received but not yet acknowledged.", registry=r)
        self.backlog_rows = Gauge("gateway_pending_rows", "Rows waiting to be written.", registry=r)
        self.batch_rows = Histogram(
            "gateway_batch_rows", "Rows per committed batch.", buckets=(10, 100, 1000, 5000, 10000, 50000), registry=r
        )
        self.commit_latency = Histogram(
            "gateway_commit_latency_seconds", "Receipt to commit, per envelope.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.alerts_unpublished = Counter(
            "gateway_alert_events_unpublished_total",
            "Alert events stored but not published on MQTT (disconnected, or the publication queue full).",
            registry=r,
        )
        self.mqtt_connected = Gauge("gateway_mqtt_connected", "1 while connected to the MQTT broker.", registry=r)
        self.http_requests = Counter(
            "gateway_http_requests_total", "HTTPS requests answered, by status code.", ["status"], registry=r
        )
        self.pending_bytes = Gauge(
            "gateway_pending_bytes", "Payload bytes received and not yet acknowledged (the memory budget's measure).",
            registry=r,
        )
        self.intake_paused = Gauge(
            "gateway_intake_paused", "1 while socket reads are paused (held payloads or resident memory at the bound).",
            registry=r,
        )
        self.forwarded = Counter(
            "gateway_forwarded_messages_total", "Payloads forwarded to the worker owning their device.", registry=r
        )
        self.forward_held = Gauge(
            "gateway_forward_held_messages", "Payloads forwarded to the worker owning their device, not yet committed.",
            registry=r,
        )

        # the HL7 feed (gateway/hl7): every outcome of every message, and of the connection
        self.hl7_messages = Counter(
            "gateway_hl7_messages_total",
            "HL7 messages settled, by kind (numerics, alarm) and outcome (accepted, retried, parked).",
            ["kind", "outcome"], registry=r,
        )
        self.hl7_acks = Counter("gateway_hl7_acks_total", "Acknowledgements received, by MSA-1 code.", ["code"], registry=r)
        self.hl7_errors = Counter(
            "gateway_hl7_transport_errors_total",
            "Failed MLLP exchanges, by stage (connect, send, ack_timeout, bad_ack); the message is sent again.",
            ["stage"], registry=r,
        )
        self.hl7_enqueued = Counter(
            "gateway_hl7_numerics_enqueued_total", "Numerics messages written to the outbox by the periodic job.",
            registry=r,
        )
        self.hl7_pending = Gauge("gateway_hl7_outbox_pending", "Outbox rows waiting to be sent (by the sending process).",
                                 registry=r)
        self.hl7_connected = Gauge("gateway_hl7_connected", "1 while connected to the HL7 receiver.", registry=r)
        self.hl7_active = Gauge("gateway_hl7_sender_active", "1 in the one process that sends the outbox.", registry=r)
        self.hl7_ack_latency = Histogram(
            "gateway_hl7_ack_latency_seconds", "Message written to its ACK read.", buckets=_LATENCY_BUCKETS, registry=r
        )

        # cluster mode (gateway.sources.nats)
        self.partitions_owned = Gauge("gateway_partitions_owned", "Partitions of the device stream this process holds.",
                                      registry=r)
        self.partition_changes = Counter("gateway_partition_changes_total",
                                         "Partitions taken, handed over, and lost to a new owner.", ["event"], registry=r)
        self.fenced = Counter("gateway_fenced_envelopes_total",
                              "Envelopes left out of a commit: their partition had a new owner.", registry=r)
        self.nats_connected = Gauge("gateway_nats_connected", "1 while connected to a NATS server.", registry=r)

    def serve(self, host: str, port: int, routes: Mapping[str, Route] | None = None) -> MetricsServer:
        """Serve ``/metrics`` and ``routes`` (path -> handler) over HTTP from background threads."""
        return MetricsServer(host, port, make_wsgi_app(self.registry), routes or {})


class _Threads(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a probe stuck on a stuck loop must not hold the process at exit


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # one line per scrape or probe is noise


class MetricsServer:
    """The metrics port: ``/metrics`` (any other path not in ``routes`` too, as before) and the routes."""

    def __init__(self, host: str, port: int, metrics_app: Callable[..., Iterable[bytes]],
                 routes: Mapping[str, Route]) -> None:
        self._metrics_app = metrics_app
        self._routes = dict(routes)
        server_class = type("_Server", (_Threads,), {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
        self._server = make_server(host, port, self._app, server_class=server_class, handler_class=_Quiet)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-server", daemon=True)
        self._thread.start()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        route = self._routes.get(environ.get("PATH_INFO", ""))
        if route is None:
            return self._metrics_app(environ, start_response)
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Length", "0")])
            return [b""]
        status, body = route()
        start_response(_REASONS.get(status, f"{status} Status"),
                       [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                        ("Cache-Control", "no-store")])
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else body]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
