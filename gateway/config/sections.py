"""The sections of the gateway's configuration, one frozen Struct each (``gateway.config``
assembles them into ``GatewayConfig`` and loads them)."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

PosFloat = Annotated[float, Meta(gt=0)]
PosInt = Annotated[int, Meta(gt=0)]
Port = Annotated[int, Meta(ge=0, le=65535)]


class _Section(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class SourceSection(_Section):
    """The config section of a source (``gateway.sources.SOURCES`` is keyed by its name)."""

    enabled: bool = False


class DatabaseConfig(_Section):
    url: str = "postgresql://postgres@127.0.0.1:5432/vitalgate"
    connect_timeout_s: PosFloat = 10.0
    command_timeout_s: PosFloat = 60.0
    migrate: bool = True
    require_sync_standby: bool = False  # see gateway.sinks.replication


class MqttConfig(SourceSection):
    enabled: bool = True
    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    client_id: str = ""  # default: vitalgate-{gateway id}
    topic: str = "devices/+/telemetry"
    protocol: Literal["5", "3.1.1"] = "5"
    session_expiry_s: Annotated[int, Meta(ge=0)] = 7 * 24 * 3600
    receive_maximum: Annotated[int, Meta(ge=1, le=65535)] = 20000
    keepalive_s: Annotated[int, Meta(ge=5)] = 30
    alerts_topic: str = "alerts/{device_id}"
    alerts_max_queued: Annotated[int, Meta(ge=1)] = 10000
    share_group: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{1,64}$")] = "vitalgate"  # $share/<group>/ with workers > 1
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def client_id_for(self, gateway_id: str) -> str:
        """``client_id``, or ``vitalgate-<gateway id>`` when unset."""
        return self.client_id or f"vitalgate-{gateway_id}"


class HttpConfig(SourceSection):
    host: str = "127.0.0.1"
    port: Port = 8443
    tls_cert: str | None = None  # PEM certificate chain of the server
    tls_key: str | None = None
    tls_client_ca: str | None = None  # PEM CA bundle: turns on client certificates (mutual TLS)
    allow_plaintext: bool = False  # serve HTTP without TLS (only behind a TLS-terminating proxy)
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 8 * 1024 * 1024
    max_envelopes_per_request: PosInt = 1000
    rate_limit_per_s: PosFloat = 20.0  # requests per device per second, sustained
    rate_limit_burst: PosInt = 40
    commit_timeout_s: PosFloat = 30.0  # longest a request waits for its commit before 503
    body_timeout_s: PosFloat = 30.0  # longest a client may take to send its body before 408
    retry_after_s: PosInt = 1  # Retry-After of 503 responses while the writer is backed up


class NatsConfig(SourceSection):
    """Cluster mode: devices publish to NATS JetStream; gateways share its partitions (``gateway.sources.nats``)."""

    servers: str = "nats://127.0.0.1:4222"  # comma-separated: every node, so any one reached will do
    user: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    # topic devices/{id}/telemetry is subject devices.{id}.telemetry, + .n<partitions>.<p> (``cluster init``)
    subject: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.\*(\.[A-Za-z0-9_-]+)*$")] = "devices.*.telemetry"
    partitions: Annotated[int, Meta(ge=1, le=1024)] = 8
    replicas: Annotated[int, Meta(ge=1, le=5)] = 3  # of the consumers and the membership bucket
    consumer_prefix: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,32}$")] = "vg"
    ack_wait_s: PosFloat = 2.0  # ack_wait + pull_expires_s must stay below priority_timeout_s (order on failover)
    pull_expires_s: PosFloat = 1.0
    priority_timeout_s: PosFloat = 5.0
    max_ack_pending: Annotated[int, Meta(ge=1)] = 2000  # per partition, held by the server
    pull_batch: Annotated[int, Meta(ge=1, le=10000)] = 500
    max_in_flight: Annotated[int, Meta(ge=1)] = 10000  # messages this process holds unacknowledged
    members_bucket: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "vg_members"
    member_ttl_s: Annotated[float, Meta(ge=1)] = 3.0  # a member silent this long is gone
    alerts_subject: str = "alerts.{device_id}"  # alert events published here after commit (MQTT: alerts/{id})
    ingest_subject: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.\*$")] = "vgingest.*"

    def __post_init__(self) -> None:
        if self.ack_wait_s + self.pull_expires_s >= self.priority_timeout_s:
            raise ValueError(f"nats.ack_wait_s + nats.pull_expires_s ({self.ack_wait_s + self.pull_expires_s:g}) must be below "
                             f"nats.priority_timeout_s ({self.priority_timeout_s:g}): a partition taken over sees its "
                             "predecessor's unacknowledged messages again before new ones")
        if not self.server_list:
            raise ValueError("nats.servers: at least one server URL")

    @property
    def server_list(self) -> list[str]:
        """``servers`` as a list of URLs."""
        return [u.strip() for u in self.servers.split(",") if u.strip()]


class AuthConfig(_Section):
    require_registration: bool = True  # refuse envelopes of devices missing from the registry
    refresh_s: PosFloat = 5.0  # how often the registry cache is refreshed (NOTIFY also refreshes it)


class BatchConfig(_Section):
    max_rows: PosInt = 20_000
    max_bytes: PosInt = 8 * 1024 * 1024
    max_age_s: PosFloat = 0.2


class RetryConfig(_Section):
    initial_s: PosFloat = 0.2
    max_s: PosFloat = 10.0


class ChecksConfig(_Section):
    max_clock_skew_s: PosFloat = 60.0
    max_staleness_s: PosFloat = 86_400.0
    # At start, devices with a stored reading this recent get their ``silent`` rules armed
    # (``gateway.restore``); 0 turns it off. At most the 7 days the restore looks back.
    silent_restore_horizon_s: Annotated[float, Meta(ge=0, le=7 * 86_400)] = 86_400.0


class ProfilesConfig(_Section):
    dir: str = "device_profiles"
    default: str | None = None  # profile for envelopes without one (until devices are registered)


Days = Annotated[float, Meta(ge=0)]  # 0: kept forever


class RetentionConfig(_Section):
    enabled: bool = False  # the gateway runs the job every interval_s (one process at a time)
    interval_s: PosFloat = 3600.0
    readings_days: Days = 90.0
    waveform_blocks_days: Days = 30.0
    ingests_days: Days = 90.0
    rejected_days: Days = 30.0
    audit_log_days: Days = 0.0
    audit_floor_days: Annotated[float, Meta(ge=1)] = 2190.0
    delete_batch_rows: PosInt = 10_000

    def __post_init__(self) -> None:
        # ingests are the provenance of readings and waveform blocks: never shorter-lived
        for key in ("readings_days", "waveform_blocks_days"):
            if _shorter(self.ingests_days, getattr(self, key)):
                raise ValueError(f"ingests_days ({self.ingests_days:g}) must not be shorter than {key}: "
                                 "every stored reading keeps its ingest")
        if self.audit_log_days:
            if self.audit_log_days < self.audit_floor_days:
                raise ValueError(f"audit_log_days ({self.audit_log_days:g}) is below audit_floor_days "
                                 f"({self.audit_floor_days:g})")
            for key in ("readings_days", "waveform_blocks_days", "ingests_days", "rejected_days"):
                if _shorter(self.audit_log_days, getattr(self, key)):
                    raise ValueError(f"audit_log_days ({self.audit_log_days:g}) must not be shorter than {key}: "
                                     "the audit log is kept longest")


class HealthConfig(_Section):
    """``/healthz`` and ``/readyz`` on the metrics port (``gateway.health``)."""

    max_loop_lag_s: PosFloat = 1.0  # /healthz fails when the event loop takes longer to run a callback
    database_timeout_s: PosFloat = 2.0  # deadline of the readiness SELECT 1 (pool connection included)
    database_cache_s: Annotated[float, Meta(ge=0)] = 1.0  # a SELECT 1 result answers probes this long
    max_paused_s: PosFloat = 60.0  # /readyz fails when intake has been paused longer than this


class Hl7Config(_Section):
    enabled: bool = False  # the HL7 v2 feed of associated devices to the EHR (one process at a time sends)
    host: str = "127.0.0.1"  # the interface engine's MLLP listener
    port: Port = 2575
    tls: bool = False  # MLLP inside TLS (the engine's certificate verified against tls_ca, else the system CAs)
    tls_ca: str | None = None
    tls_cert: str | None = None  # client certificate, when the engine asks for one
    tls_key: str | None = None
    tls_server_name: str | None = None  # name checked in the engine's certificate (default: host)
    sending_application: str = "VITALGATE"  # MSH-3
    sending_facility: str = ""  # MSH-4
    receiving_application: str = ""  # MSH-5
    receiving_facility: str = ""  # MSH-6
    processing_id: Literal["P", "T", "D"] = "P"  # MSH-11: production, training, debugging
    patient_id_authority: str = ""  # PID-3.4, the assigning authority of associations.patient_ref
    numerics: Literal["latest", "rollup", "off"] = "latest"  # per period: the latest reading, or the mean of readings_1m
    cadence_s: Annotated[int, Meta(ge=1)] = 60  # numerics period; rollup: a multiple of 60
    delay_s: Annotated[float, Meta(ge=0)] = 5.0  # a period is reported this long after its end (late readings)
    catch_up_periods: PosInt = 60  # after a stop, report at most this many missed periods
    on_error: Literal["retry", "park"] = "retry"  # ACK AE/CE: send again later, or park with the reason
    on_reject: Literal["retry", "park"] = "park"  # ACK AR/CR
    ack_timeout_s: PosFloat = 30.0  # no ACK by then: the connection is dropped and the message resent
    connect_timeout_s: PosFloat = 10.0
    retry_initial_s: PosFloat = 1.0  # backoff after a failed connection or an AE/AR to retry
    retry_max_s: PosFloat = 60.0
    batch: PosInt = 200  # rows taken from the outbox at a time
    poll_s: PosFloat = 0.5  # outbox polled this often while empty
    standby_s: PosFloat = 5.0  # another process sends: try to take over this often

    def __post_init__(self) -> None:
        if self.numerics == "rollup" and self.cadence_s % 60:
            raise ValueError(f"hl7.cadence_s ({self.cadence_s}) must be a multiple of 60 with numerics = \"rollup\" "
                             "(readings_1m holds minutes)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("hl7.tls_cert and hl7.tls_key go together")


def _shorter(days: float, other: float) -> bool:
    """``days`` keeps data for less time than ``other`` (0 means forever)."""
    return days != 0 and (other == 0 or days < other)
class LogConfig(_Section):
    format: Literal["auto", "json", "text"] = "auto"  # auto: JSON lines unless stderr is a terminal
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    repeat_window_s: PosFloat = 10.0  # identical warnings within it: the first, then one line with repeated: N
