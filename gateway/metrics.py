"""Every Prometheus metric the gateway exports, declared in one place.

Names carry the ``gateway_`` prefix; counters end in ``_total``; labels come from a
closed set (``source``, ``outcome``, ``reason``, ``flag``, ``event``, ``priority``, ``action``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["Metrics"]

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

        # cluster mode (gateway.sources.nats)
        self.partitions_owned = Gauge("gateway_partitions_owned", "Partitions of the device stream this process holds.",
                                      registry=r)
        self.partition_changes = Counter("gateway_partition_changes_total",
                                         "Partitions taken, handed over, and lost to a new owner.", ["event"], registry=r)
        self.fenced = Counter("gateway_fenced_envelopes_total",
                              "Envelopes left out of a commit: their partition had a new owner.", registry=r)
        self.nats_connected = Gauge("gateway_nats_connected", "1 while connected to a NATS server.", registry=r)

    def serve(self, host: str, port: int) -> None:
        """Expose the metrics over HTTP (``/metrics``) in a background thread."""
        start_http_server(port, addr=host, registry=self.registry)
