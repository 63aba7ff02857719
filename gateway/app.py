"""The gateway process: ``startup() -> run() -> shutdown()``.

Shutdown order: stop taking payloads, let the pipeline write and acknowledge what it
holds (up to ``shutdown_timeout_s``), disconnect the sources, close the database pool.
Payloads not acknowledged by then stay with the transport (MQTT redelivers them).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal

from gateway.api import ReadSide  # importing registers the read operations of the HTTPS source
import gateway.fhir  # noqa: F401 - importing registers the FHIR routes
from gateway.config import GatewayConfig, pending_budget
from gateway.errors import SinkError
from gateway.health import Health
from gateway.metrics import Metrics, MetricsServer
from gateway.pipeline import Pipeline, PipelineSettings
from gateway.profiles import load_profiles
from gateway.registry import Registry
from gateway.retry import DATABASE_ERRORS, Backoff
from gateway.sinks import replication
from gateway.sinks.alerts import AlertPublication
from gateway.sinks.timescale import TimescaleSink
from gateway.sources import SOURCES, Source, SourceContext
from gateway.workers import ENV_DIR, owner_of, worker_index
from gateway.workers.router import Router

__all__ = ["Gateway", "pending_budget"]

log = logging.getLogger(__name__)

class Gateway:
    """One gateway process: sources, pipeline and sink, with a graceful lifecycle."""

    def __init__(self, config: GatewayConfig, *, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.should_exit = asyncio.Event()
        self.force_exit = asyncio.Event()
        self.pipeline: Pipeline | None = None
        self.sink: TimescaleSink | None = None
        self.sources: dict[str, Source] = {}  # enabled sources by config section, in ``SOURCES`` order
        self.registry: Registry | None = None  # devices and API keys, when registration is required or HTTPS is on
        self.router: Router | None = None  # with workers > 1
        self.intake: Pipeline | Router | None = None  # what the sources hand payloads to
        self.drained = True
        self.read: ReadSide | None = None  # the query API and live stream, served with HTTPS
        self.health: Health | None = None  # /healthz and /readyz, on the metrics port
        self.metrics_server: MetricsServer | None = None

    def handle_exit(self, sig: int) -> None:
        """Signal handler: first signal asks for a graceful stop, the second forces it."""
        if self.should_exit.is_set():
            self.force_exit.set()
            log.warning("Second signal: forcing exit.", extra={"signal": signal.Signals(sig).name})
        else:
            log.info("Shutting down.", extra={"signal": signal.Signals(sig).name})
        self.should_exit.set()

    async def startup(self) -> None:
        cfg = self.config
        # Probes are answered from the start: alive while the database is awaited, not ready until all is up.
        self.health = health = Health(cfg.health, asyncio.get_running_loop())
        facts = health.facts
        if cfg.metrics_port:
            self.metrics_server = self.metrics.serve(cfg.metrics_host, cfg.metrics_port, health.routes())
            log.info("Metrics served.", extra={"address": f"http://{cfg.metrics_host}:{cfg.metrics_port}/metrics"})
        profiles = load_profiles(cfg.profiles.dir)
        log.info("Profiles loaded.", extra={"dir": cfg.profiles.dir, "profiles": ",".join(sorted(profiles))})
        self.sink = TimescaleSink(
            cfg.database.url,
            gateway_id=cfg.gateway_id,
            quarantine_payload_bytes=cfg.quarantine_payload_bytes,
            connect_timeout_s=cfg.database.connect_timeout_s,
            command_timeout_s=cfg.database.command_timeout_s,
            run_migrations=cfg.database.migrate,
            hl7_outbox=cfg.hl7.enabled,
        )
        backoff = Backoff(cfg.retry.initial_s, cfg.retry.max_s)
        while True:
            try:
                await self.sink.start()
                facts.database = self.sink
                break
            except SinkError as exc:
                if not exc.retriable or self.should_exit.is_set():
                    raise
                delay = backoff.next_delay()
                log.warning("Database not reachable yet; retrying.", extra={"error": str(exc), "retry_in_s": round(delay, 2)})
                try:
                    await asyncio.wait_for(self.should_exit.wait(), delay)
                except asyncio.TimeoutError:
                    pass
        await self._check_replication()
        enabled = [(name, kind, getattr(cfg, name)) for name, kind in SOURCES.items() if getattr(cfg, name).enabled]
        if cfg.auth.require_registration or any(kind.needs_registry for _, kind, _ in enabled):
            facts.registry_required = True
            self.registry = Registry(refresh_s=cfg.auth.refresh_s, connect_timeout_s=cfg.database.connect_timeout_s,
                                     command_timeout_s=cfg.database.command_timeout_s,
                                     retry_initial_s=cfg.retry.initial_s, retry_max_s=cfg.retry.max_s)
            await self.registry.start(cfg.database.url)
            facts.registry = self.registry
        # one object is both the write side and the state the checks read back
        self.pipeline = Pipeline(profiles=profiles, sink=self.sink, store=self.sink, metrics=self.metrics,
                                 registry=self.registry, settings=PipelineSettings.from_config(cfg))
        pipeline = self.pipeline
        await self._restore_recent(pipeline)
        intake: Pipeline | Router = pipeline
        held_fraction = lambda: pipeline.pending_bytes / pipeline.settings.max_pending_bytes  # noqa: E731
        if cfg.workers > 1:
            self.router = Router(pipeline, index=worker_index() or 0, count=cfg.workers,
                                 runtime_dir=os.environ[ENV_DIR], metrics=self.metrics,
                                 max_held=cfg.mqtt.receive_maximum)
            await self.router.start()
            intake = self.router
            held_fraction = self.router.held_fraction
        self.intake = intake
        facts.writer, facts.intake, facts.max_pending_bytes = pipeline, intake, pipeline.settings.max_pending_bytes
        self.metrics.pending_bytes.set_function(lambda: intake.pending_bytes)
        context = SourceContext(intake=intake, metrics=self.metrics, registry=self.registry, gateway_id=cfg.gateway_id,
                                workers=cfg.workers, held_fraction=held_fraction,
                                max_memory_bytes=cfg.max_memory_mib << 20)
        for name, kind, section in enabled:
            self.sources[name] = kind.build(section, context)
        mqtt = self.sources.get("mqtt")
        if mqtt is not None:  # alerts are published over the MQTT connection
            alerts = AlertPublication(mqtt, topic=cfg.mqtt.alerts_topic,  # type: ignore[arg-type]
                                      max_queued=cfg.mqtt.alerts_max_queued, metrics=self.metrics)
            self.pipeline.add_alert_publisher(alerts.publish)
        nats = self.sources.get("nats")
        if nats is not None:  # cluster mode: claims and the commit fence, alerts published on NATS
            self.sink.fence = nats.bind(cfg.database.url, self.pipeline.forget,  # type: ignore[attr-defined]
                                        self.pipeline.restore_recent, self.pipeline.ticker.silent_after_s)
            self.pipeline.ticker.scope_to(nats.clock_behind, nats.clock_events)  # type: ignore[attr-defined]
            alerts = AlertPublication(nats, topic=cfg.nats.alerts_subject,  # type: ignore[arg-type]
                                      max_queued=cfg.mqtt.alerts_max_queued, metrics=self.metrics)
            self.pipeline.add_alert_publisher(alerts.publish)
        http = self.sources.get("http")
        if http is not None:  # the query API and the live stream are served with HTTPS
            self.read = await ReadSide.open(cfg, profiles, self.pipeline)
            http.ctx.read = self.read  # type: ignore[attr-defined]
        for source in self.sources.values():
            await source.start()  # a taken port or a bad certificate stops start-up here
        facts.sources = self.sources
        # Long-lived start-up objects (profiles, modules) leave the collector's view, and the
        # young generation is collected less often: batches hold thousands of short-lived,
        # acyclic objects until their commit, which otherwise triggers needless full scans.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)

    async def _restore_recent(self, pipeline: Pipeline) -> None:
        """Arm the ``silent`` rules of the devices (this worker owns) that reported recently, so
        one that went quiet while the gateway was down still opens its alert."""
        horizon = self.config.checks.silent_restore_horizon_s
        if not horizon or self.config.nats.enabled:
            return  # cluster mode: no partition is held yet; each one takes its devices on when taken
        index, count = worker_index() or 0, self.config.workers
        taken = await pipeline.restore_recent(horizon, lambda d: count <= 1 or owner_of(d, count) == index)
        log.info("Recent devices restored; their silent rules are armed.",
                 extra={"devices": len(taken), "horizon_s": horizon})

    async def _check_replication(self) -> None:
        """Log which server the sink reached and what its commits wait for; refuse to start
        when ``database.require_sync_standby`` is on and they would not wait for a standby."""
        db = self.config.database
        try:
            state = await replication.inspect(db.url, timeout_s=db.connect_timeout_s)
        except DATABASE_ERRORS as exc:
            if db.require_sync_standby:
                raise SinkError(f"cannot read the replication settings: {exc}", retriable=False) from exc
            log.warning("Replication state unknown.", extra={"error": str(exc) or type(exc).__name__})
            return
        log.info("Database replication state.", extra=state.log_fields())
        replication.check(state, require_sync_standby=db.require_sync_standby)

    async def run(self) -> int:
        """Run until ``should_exit``; return the process exit code."""
        assert self.pipeline is not None
        pipeline = self.pipeline
        writer = asyncio.create_task(pipeline.run(), name="pipeline-writer")
        sources = [asyncio.create_task(source.run(), name=f"{name}-source") for name, source in self.sources.items()]
        if self.config.retention.enabled:  # every process tries; the one holding the advisory lock runs it
            from gateway.retention import schedule

            sources.append(asyncio.create_task(schedule(self.config, self.should_exit), name="retention"))
        if self.config.hl7.enabled:  # every process tries; the one holding the advisory lock sends
            from gateway.hl7.feed import run_feed

            sources.append(asyncio.create_task(run_feed(self.config, pipeline.profiles, self.metrics,
                                                        self.should_exit), name="hl7-feed"))
        log.info("Gateway running.", extra={"gateway_id": self.config.gateway_id})
        stop = asyncio.create_task(self.should_exit.wait(), name="exit-wait")
        done, _ = await asyncio.wait({stop, writer, *sources}, return_when=asyncio.FIRST_COMPLETED)
        failed = [t for t in done if t is not stop and not t.cancelled() and t.exception() is not None]
        for t in failed:
            log.error("Task failed; stopping.", extra={"task": t.get_name(), "error": repr(t.exception())})
        return await self.shutdown(writer, sources, stop, error=bool(failed))

    async def shutdown(
        self, writer: asyncio.Task[None], sources: list[asyncio.Task[None]], stop: asyncio.Task[bool], *, error: bool
    ) -> int:
        assert self.pipeline is not None and self.sink is not None
        stop.cancel()
        if self.health is not None:
            self.health.facts.stopping = True
        for source in self.sources.values():
            source.stop_intake()  # e.g. HTTPS answers 503 to new requests; those taken wait for their commit
        if self.router is not None:
            self.router.stop()
        self.pipeline.stop()
        timeout = self.config.shutdown_timeout_s
        pending = self.pipeline.in_flight
        log.info("Draining.", extra={"in_flight": pending, "timeout_s": timeout})
        self.drained = True
        if not writer.done():
            drain = asyncio.ensure_future(asyncio.wait_for(asyncio.shield(writer), timeout))
            force = asyncio.create_task(self.force_exit.wait())
            await asyncio.wait({drain, force}, return_when=asyncio.FIRST_COMPLETED)
            force.cancel()
            if not writer.done():
                self.drained = False
                writer.cancel("shutdown timeout exceeded")
                log.error(
                    "Drain timed out; unacknowledged payloads stay with the broker for redelivery.",
                    extra={"in_flight": self.pipeline.in_flight},
                )
            drain.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        if not writer.cancelled() and writer.exception() is not None:
            self.drained = False
            log.error("Writer failed while draining.", extra={"error": repr(writer.exception())})
        if self.router is not None:
            # payloads forwarded to their owners: acknowledged once the owners report them committed
            if not await self.router.drain(timeout):
                self.drained = False
            await self.router.close()
        for source in reversed(self.sources.values()):
            await source.close()
        if self.read is not None:
            await self.read.close()
        for t in sources:
            try:
                await asyncio.wait_for(t, 5.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                t.cancel()
            except Exception as exc:  # noqa: BLE001
                log.warning("Source ended with an error.", extra={"error": repr(exc)})
        if self.registry is not None:
            await self.registry.close()
        await self.sink.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        ok = self.drained and not error
        log.info("Stopped.", extra={"drained": self.drained, "batches": self.pipeline.committed_batches})
        return 0 if ok else 1
