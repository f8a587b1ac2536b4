"""OpenTelemetry: spans per RPC, duplicate -> winner links, run spans and metrics.

The only module that imports opentelemetry. Off by default: a ``Telemetry`` without an exporter
hands out a no-op span and ignores events, so a sidecar without an exporter
pays for one attribute lookup per call and nothing else.

* Every RPC gets a SERVER span named ``taskguard.<method>`` whose parent is the
  caller's W3C ``traceparent`` (read with the globally configured propagator,
  the standard one unless OTEL_PROPAGATORS says otherwise), with the RPC
  semantic-convention attributes and the guard's ``taskguard.*`` attributes.
* The winning acquisition's span context is stored with the guard (as a
  traceparent string in ``GuardRecord.trace_context``, so it survives a
  restart). A refused trigger's span carries a Link to it, with
  ``taskguard.winner_run_id`` and ``taskguard.winner_fencing_token``; its
  own ``taskguard.run_id`` is the run it asked for, as on every acquisition.
* A ``taskguard.run`` span covers each run, from its start to its end. It is
  emitted when the run ends (release, expiry, abandonment, force-release),
  with the run's real start time and the winning acquisition as parent, so
  it needs no in-memory span across a restart.
* Metrics come from committed events: they count what was stored, not what
  was attempted. The gauges (running, stale, awaiting approval, the store's
  size) are counted on the event loop every ``_GAUGE_REFRESH_S`` and right
  before each Prometheus scrape (``refresh``); guards awaiting approval are
  kept from committed events, after one scan of the store at start.
* ``prometheus`` adds the OTel Prometheus reader, on a registry of its own
  (``prometheus_registry``, never prometheus_client's global one) that
  ``metrics.py`` serves as ``/metrics``: the same instruments OTLP exports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.metrics import CallbackOptions, Histogram, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import NoOpTracer, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry

from taskguard import __version__
from taskguard.guard.model import RUN_ENDS, Acquire, Event, EventType, GuardRecord, KeyRule, Outcome, RunStatus

log = logging.getLogger(__name__)

RPC_SERVICE = "taskguard.v1.TaskGuard"
# Stored span contexts are always W3C traceparents, whatever propagator callers use.
_W3C = TraceContextTextMapPropagator()
_GAUGE_REFRESH_S = 10.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_COUNTED = {
    EventType.ACQUIRED: "taskguard.acquisitions",
    EventType.DUPLICATE_REFUSED: "taskguard.duplicates_refused",
    EventType.RETRY_REFUSED: "taskguard.retries_refused",
    EventType.RETRY_APPROVED: "taskguard.retry_approvals",
    EventType.EXPIRED: "taskguard.expirations",
    EventType.ABANDONED: "taskguard.abandonments",
    EventType.LOCK_DELAY_REFUSED: "taskguard.lock_delays_refused",
    EventType.QUEUED: "taskguard.queued",
    EventType.SUPERSEDED: "taskguard.superseded",
}
# Every refusal of an acquisition, by the outcome its caller heard (one series each, from the start).
_REFUSALS = {
    EventType.DUPLICATE_REFUSED: Outcome.ALREADY_RUNNING,
    EventType.RETRY_REFUSED: Outcome.RETRY_REQUIRES_APPROVAL,
    EventType.LOCK_DELAY_REFUSED: Outcome.LOCK_DELAYED,
    EventType.QUEUE_FULL_REFUSED: Outcome.QUEUE_FULL,
}
# Events that leave the guard's state as it was (a refusal storm costs no rule lookups).
_SAME_STATE = frozenset({*_REFUSALS, EventType.RENEWED})
# Seconds, not the SDK's default bounds (0 to 10000, meant for milliseconds): an acquisition takes about
# a commit (a millisecond or so, seconds when the store struggles), a run seconds to a day.
ACQUIRE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RUN_BUCKETS_S = (0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)
_SCAN_PAGE = 1000


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    otlp_endpoint: str = ""
    console: bool = False
    # Tests hand in their own (in-memory) span exporter or metric reader.
    span_processor: SpanProcessor | None = None
    metric_reader: MetricReader | None = None
    # The Prometheus reader, for /metrics (metrics_listen).
    prometheus: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.otlp_endpoint or self.console or self.span_processor or self.metric_reader or self.prometheus)


class RpcSpan:
    """What an RPC handler tells its span; the base class is the no-op one."""

    def guard(self, record: GuardRecord | None) -> None:
        pass

    def outcome(self, outcome: Outcome, record: GuardRecord, run_id: str) -> None:
        """An acquisition's answer; ``run_id`` is the run the caller asked for (its own, or the one made for it)."""

    def status(self, code_name: str, code_value: int, message: str) -> None:
        pass


_NO_SPAN = RpcSpan()
_NO_SPAN_CONTEXT = contextlib.nullcontext(_NO_SPAN)


class _RecordingRpcSpan(RpcSpan):
    def __init__(self, span: trace.Span, acquire_duration: Histogram) -> None:
        self._span = span
        self._acquire_duration = acquire_duration
        self._started = time.perf_counter()

    def guard(self, record: GuardRecord | None) -> None:
        if record is not None:
            self._span.set_attributes(_guard_attributes(record))

    def outcome(self, outcome: Outcome, record: GuardRecord, run_id: str) -> None:
        self._acquire_duration.record(time.perf_counter() - self._started, {"taskguard.outcome": outcome.name})
        # The caller's own run, refused or not: what an operator searches a trace viewer for. The guard's
        # run (the winner, when refused) is taskguard.winner_run_id and the link.
        self._span.set_attributes({"taskguard.outcome": outcome.name, "taskguard.run_id": run_id})
        if outcome is Outcome.ACQUIRED:
            return
        winner = _span_context(record.trace_context)
        attributes: dict[str, str | int] = {
            "taskguard.winner_run_id": record.run_id,
            "taskguard.winner_fencing_token": record.fencing_token,
        }
        self._span.set_attributes(attributes)
        if winner is not None:
            self._span.add_link(winner, attributes)

    def status(self, code_name: str, code_value: int, message: str) -> None:
        self._span.set_attribute("rpc.grpc.status_code", code_value)
        if code_name != "OK":
            self._span.set_status(Status(StatusCode.ERROR, f"{code_name}: {message}"))


class Guards(Protocol):
    """What telemetry hears and reads (the engine): committed batches, the guards, each key's rule."""

    def subscribe(self, listener: Callable[[Sequence[Event]], None]) -> None: ...

    async def running(self) -> list[GuardRecord]: ...

    async def scan(self, prefix: str, after: str, limit: int) -> list[GuardRecord]: ...

    def is_stale(self, record: GuardRecord) -> bool: ...

    def rule_for(self, task_key: str) -> KeyRule: ...


class Telemetry:
    def __init__(self, settings: TelemetrySettings) -> None:
        self.enabled = settings.enabled
        self._tracer_provider: TracerProvider | None = None
        self._meter_provider: MeterProvider | None = None
        self._gauges = {"running": 0, "stale": 0}
        self._store_bytes: Callable[[], int | None] = lambda: None
        self._store_size: int | None = None
        # Keys whose guard waits for an approve-retry, kept from committed events (see _load_awaiting).
        self._awaiting: set[str] = set()
        # Waiters per key with a queue, from committed events.
        self._waiters: dict[str, int] = {}
        self._rule_for: Callable[[str], KeyRule] | None = None
        self._scanning: set[str] | None = None
        self._engine: Guards | None = None
        self._loading: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self.prometheus_registry: CollectorRegistry | None = None
        if not self.enabled:
            return
        resource = Resource.create({"service.name": "taskguard", "service.version": __version__})
        span_processors = _span_processors(settings)
        self._tracer_provider = TracerProvider(resource=resource)
        for processor in span_processors:
            self._tracer_provider.add_span_processor(processor)
        readers = _metric_readers(settings)
        if settings.prometheus:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader

            self.prometheus_registry = CollectorRegistry()
            # No otel_scope_* labels: one scope, and three labels more on every series would only cost.
            readers.append(PrometheusMetricReader(registry=self.prometheus_registry, scope_info_enabled=False))
        self._meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        # Metrics alone (Prometheus without OTLP) need no spans: a no-op tracer costs nothing per RPC.
        self._tracer: Tracer = (
            self._tracer_provider.get_tracer("taskguard", __version__) if span_processors else NoOpTracer()
        )
        meter = self._meter_provider.get_meter("taskguard", __version__)
        self._counters = {
            kind: meter.create_counter(name, unit="{event}", description=f"{kind.name.lower()} events committed")
            for kind, name in _COUNTED.items()
        }
        self._refusals = meter.create_counter(
            "taskguard.refusals", unit="{event}", description="acquisitions refused, by the outcome the caller heard"
        )
        # Zero from the start, so that rate() and alerts see every series before its first event.
        for counter in self._counters.values():
            counter.add(0)
        for outcome in _REFUSALS.values():
            self._refusals.add(0, {"taskguard.outcome": outcome.name})
        self._acquire_duration = meter.create_histogram(
            "taskguard.acquire.duration",
            unit="s",
            description="time to answer an Acquire or Hold acquisition (the wait for the guard), by outcome",
            explicit_bucket_boundaries_advisory=ACQUIRE_BUCKETS_S,
        )
        self._join_wait = meter.create_histogram(
            "taskguard.join.wait.duration",
            unit="s",
            description="how long a joined Hold stream (on_conflict JOIN) waited for the winner's run to end, by how "
            "that run ended",
            explicit_bucket_boundaries_advisory=RUN_BUCKETS_S,
        )
        self._queue_wait = meter.create_histogram(
            "taskguard.queue.wait.duration",
            unit="s",
            description="how long a caller waited in a key's queue (on_conflict QUEUE, KEEP_NEWEST), by how the wait "
            "ended (ACQUIRED, SUPERSEDED, WAIT_TIMED_OUT, or LEFT when its call ended first)",
            explicit_bucket_boundaries_advisory=RUN_BUCKETS_S,
        )
        meter.create_observable_gauge(
            "taskguard.queue.waiters",
            [self._observe_waiters],
            unit="{caller}",
            description="callers waiting in the keys' queues",
        )
        self._run_duration = meter.create_histogram(
            "taskguard.run.duration",
            unit="s",
            description="how long a run held its guard: from acquisition to the end of the run, by how it ended",
            explicit_bucket_boundaries_advisory=RUN_BUCKETS_S,
        )
        meter.create_observable_gauge(
            "taskguard.guards.running", [self._observe("running")], unit="{guard}", description="RUNNING guards"
        )
        meter.create_observable_gauge(
            "taskguard.guards.stale", [self._observe("stale")], unit="{guard}", description="stale RUNNING guards"
        )
        meter.create_observable_gauge(
            "taskguard.guards.awaiting_approval",
            [self._observe_awaiting],
            unit="{guard}",
            description="guards whose next run needs an approve-retry",
        )
        meter.create_observable_gauge(
            "taskguard.store.size",
            [self._observe_store_size],
            unit="By",
            description="bytes the store's files take on this host (SQLite: the database and its WAL)",
        )

    # --- lifecycle ---------------------------------------------------------------------

    def attach(self, engine: Guards, store_bytes: Callable[[], int | None] | None = None) -> None:
        """Hear ``engine``'s commits and count its guards; ``store_bytes`` tells the store's size (None: none)."""
        if not self.enabled:
            return
        self._engine = engine
        self._rule_for = engine.rule_for
        if store_bytes is not None:
            self._store_bytes = store_bytes
        engine.subscribe(self._on_commit)
        self._loading = asyncio.create_task(self._load_awaiting(engine), name="taskguard-telemetry-approvals")
        self._refresher = asyncio.create_task(self._refresh_gauges(engine), name="taskguard-telemetry-gauges")

    async def stop(self) -> None:
        for task in (self._refresher, self._loading):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        # Exporters block on the network; keep the event loop free while they flush.
        if self._tracer_provider is not None:
            await asyncio.to_thread(self._tracer_provider.shutdown)
        if self._meter_provider is not None:
            await asyncio.to_thread(self._meter_provider.shutdown)

    # --- RPC spans --------------------------------------------------------------------

    def rpc(
        self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None
    ) -> contextlib.AbstractContextManager[RpcSpan]:
        """A SERVER span for one RPC, current for its duration, child of the caller's traceparent."""
        if not self.enabled:
            return _NO_SPAN_CONTEXT  # shared and stateless: an idle Hold stream keeps nothing of it
        return self._recording_rpc(method, metadata)

    @contextlib.contextmanager
    def _recording_rpc(self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> Iterator[RpcSpan]:
        carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
        parent = propagate.extract(carrier)
        with self._tracer.start_as_current_span(
            f"taskguard.{_snake(method)}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": RPC_SERVICE, "rpc.method": method},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            yield _RecordingRpcSpan(span, self._acquire_duration)

    def traceparent(self) -> str:
        """The current span's context as a W3C traceparent ("" when off or not recording)."""
        if not self.enabled:
            return ""
        carrier: dict[str, str] = {}
        _W3C.inject(carrier, context=otel_context.get_current())
        return carrier.get("traceparent", "")

    def joined(self, waited_s: float, final: GuardRecord) -> None:
        """A joined Hold stream heard the winner's run end after waiting ``waited_s``."""
        if self.enabled:
            self._join_wait.record(waited_s, {"taskguard.state": final.state.name})

    def queue_waited(self, waiter: Acquire, queued_at: datetime, ahead: GuardRecord, outcome: str) -> None:
        """A queued caller's wait is over (``outcome``): a span from its queuing, under its acquisition's span
        and linked to the run it waited behind, and the wait's duration."""
        if not self.enabled:
            return
        ended_at = datetime.now(UTC)
        self._queue_wait.record(max(0.0, (ended_at - queued_at).total_seconds()), {"taskguard.outcome": outcome})
        parent = _span_context(waiter.trace_context)
        ahead_context = _span_context(ahead.trace_context)
        attributes: dict[str, str | int] = {
            "taskguard.task_key": waiter.task_key,
            "taskguard.run_id": waiter.run_id,
            "taskguard.outcome": outcome,
            "taskguard.winner_run_id": ahead.run_id,
        }
        span = self._tracer.start_span(
            "taskguard.queue.wait",
            context=trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent else None,
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            links=[trace.Link(ahead_context, {"taskguard.winner_run_id": ahead.run_id})] if ahead_context else None,
            start_time=_nanos(queued_at),
        )
        span.end(end_time=_nanos(ended_at))

    # --- committed events -------------------------------------------------------------

    def _on_commit(self, events: Sequence[Event]) -> None:
        for event in events:
            counter = self._counters.get(event.type)
            if counter is not None:
                counter.add(1)
            refused = _REFUSALS.get(event.type)
            if refused is not None:
                self._refusals.add(1, {"taskguard.outcome": refused.name})
            if event.type in RUN_ENDS:
                self._end_run(event.guard)
            if event.guard.waiters:
                self._waiters[event.task_key] = len(event.guard.waiters)
            else:
                self._waiters.pop(event.task_key, None)
            if self._scanning is not None:
                self._scanning.add(event.task_key)
                self._note_approval(event.guard)
            elif event.type not in _SAME_STATE:
                self._note_approval(event.guard)

    def _note_approval(self, record: GuardRecord) -> None:
        assert self._rule_for is not None
        if self._rule_for(record.task_key).requires_approval(record.state):
            self._awaiting.add(record.task_key)
        else:
            self._awaiting.discard(record.task_key)

    async def _load_awaiting(self, engine: Guards) -> None:
        """The guards awaiting approval when the sidecar started: one scan of the store, page by page.

        Events committed meanwhile win over the scan: a key one of them touched is skipped, since the event's
        guard is at least as new as the page that showed it.
        """
        self._scanning = set()
        try:
            after = ""
            while True:
                page = await engine.scan("", after, _SCAN_PAGE)
                for record in page:
                    if record.task_key not in self._scanning:
                        self._note_approval(record)
                if len(page) < _SCAN_PAGE:
                    return
                after = page[-1].task_key
        except Exception as error:
            log.warning("reading the guards awaiting approval failed; the gauge counts only later changes: %s", error)
        finally:
            self._scanning = None

    def _end_run(self, record: GuardRecord) -> None:
        ended_at = record.released_at or record.heartbeat_at
        self._run_duration.record(
            max(0.0, (ended_at - record.started_at).total_seconds()), {"taskguard.state": record.state.name}
        )
        parent = _span_context(record.trace_context)
        span = self._tracer.start_span(
            "taskguard.run",
            context=trace.set_span_in_context(trace.NonRecordingSpan(parent)) if parent else None,
            kind=SpanKind.INTERNAL,
            attributes={
                **_guard_attributes(record),
                "taskguard.state": record.state.name,
                "taskguard.run_status": record.last_status.name,
            },
            start_time=_nanos(record.started_at),
        )
        if record.last_status is RunStatus.SUCCEEDED:
            span.set_status(Status(StatusCode.OK))
        elif record.last_status is RunStatus.FAILED or record.state.name in ("EXPIRED", "ABANDONED"):
            span.set_status(Status(StatusCode.ERROR, record.last_detail or record.state.name))
        span.end(end_time=_nanos(ended_at))

    # --- gauges -------------------------------------------------------------------------

    def _observe(self, name: str) -> Any:
        def observe(options: CallbackOptions) -> list[Observation]:
            return [Observation(self._gauges[name])]

        return observe

    def _observe_awaiting(self, options: CallbackOptions) -> list[Observation]:
        return [Observation(len(self._awaiting))]

    def _observe_waiters(self, options: CallbackOptions) -> list[Observation]:
        return [Observation(sum(self._waiters.values()))]

    def _observe_store_size(self, options: CallbackOptions) -> list[Observation]:
        return [] if self._store_size is None else [Observation(self._store_size)]

    async def refresh_gauges(self, engine: Guards) -> None:
        """Count running and stale guards, and the store's size, for the gauges.

        Observable callbacks run on the exporter's thread; they only read the
        numbers computed here, on the loop that owns the store.
        """
        running = await engine.running()
        self._gauges["running"] = len(running)
        self._gauges["stale"] = sum(1 for record in running if engine.is_stale(record))
        self._store_size = self._store_bytes()

    async def refresh(self) -> None:
        """Bring every gauge up to date, for a scrape about to read them (the start's scan included).

        A store that cannot be read now (etcd out of reach) leaves the gauges as last counted, and says so in
        the log: the counters are true all the same, and a scrape that failed would look like a dead sidecar.
        """
        if self._loading is not None:
            await asyncio.shield(self._loading)
        if self._engine is not None:
            await self._refresh_or_log(self._engine)

    async def _refresh_or_log(self, engine: Guards) -> None:
        try:
            await self.refresh_gauges(engine)
        except Exception as error:
            log.warning("counting guards for the gauges failed; they keep their last values: %s", error)

    async def _refresh_gauges(self, engine: Guards) -> None:
        while True:
            await self._refresh_or_log(engine)
            await asyncio.sleep(_GAUGE_REFRESH_S)


def _span_processors(settings: TelemetrySettings) -> list[SpanProcessor]:
    processors: list[SpanProcessor] = []
    if settings.span_processor is not None:
        processors.append(settings.span_processor)
    exporters: list[SpanExporter] = []
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporters.append(OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=_insecure(settings.otlp_endpoint)))
    if settings.console:
        exporters.append(ConsoleSpanExporter(out=sys.stdout))  # the stdout of now, not of import time
    processors.extend(BatchSpanProcessor(exporter) for exporter in exporters)
    return processors


def _metric_readers(settings: TelemetrySettings) -> list[MetricReader]:
    readers: list[MetricReader] = []
    if settings.metric_reader is not None:
        readers.append(settings.metric_reader)
    exporters: list[MetricExporter] = []
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        exporters.append(
            OTLPMetricExporter(endpoint=settings.otlp_endpoint, insecure=_insecure(settings.otlp_endpoint))
        )
    if settings.console:
        exporters.append(ConsoleMetricExporter(out=sys.stdout))
    readers.extend(PeriodicExportingMetricReader(exporter) for exporter in exporters)
    return readers


def _insecure(endpoint: str) -> bool:
    return not endpoint.startswith("https://")


def _guard_attributes(record: GuardRecord) -> dict[str, str | int]:
    return {
        "taskguard.task_key": record.task_key,
        "taskguard.session_key": record.session_key,
        "taskguard.task_name": record.task_name,
        "taskguard.run_id": record.run_id,
        "taskguard.fencing_token": record.fencing_token,
    }


def _span_context(traceparent: str) -> trace.SpanContext | None:
    if not traceparent:
        return None
    context = _W3C.extract({"traceparent": traceparent})
    span_context = trace.get_current_span(context).get_span_context()
    return span_context if span_context.is_valid else None


def _nanos(at: datetime) -> int:
    # Integer arithmetic: a float timestamp loses the last digits of nanoseconds.
    return (at - _EPOCH) // timedelta(microseconds=1) * 1000


def _snake(method: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(method))
