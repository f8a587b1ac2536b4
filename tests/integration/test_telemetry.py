"""Spans, links from duplicate triggers to the winner, run spans and metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from grpc import aio
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from taskguard.telemetry import TelemetrySettings
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.support import InProcess, SidecarProcess, acquire

CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"
DUPLICATES = 50


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def metrics() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
async def traced(
    in_process_factory: Callable[..., Any], spans: InMemorySpanExporter, metrics: InMemoryMetricReader
) -> InProcess:
    harness: InProcess = await in_process_factory(
        telemetry_overrides=TelemetrySettings(span_processor=SimpleSpanProcessor(spans), metric_reader=metrics)
    )
    return harness


def _named(spans: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in spans.get_finished_spans() if span.name == name]


def _points(reader: InMemoryMetricReader, name: str) -> list[Any]:
    data = reader.get_metrics_data()
    assert data is not None
    return [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


def _counter(reader: InMemoryMetricReader, name: str) -> int:
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    return sum(int(point.value) for point in metric.data.data_points)  # type: ignore[union-attr]
    return 0


async def test_a_duplicate_storm_gives_one_winner_span_and_links_every_duplicate_to_it(
    traced: InProcess, spans: InMemorySpanExporter, metrics: InMemoryMetricReader, key: str
) -> None:
    stub = traced.stub
    first = await stub.Acquire(
        pb.AcquireRequest(task_key=key, run_id="winner"), metadata=(("traceparent", TRACEPARENT),)
    )
    duplicates = await asyncio.gather(*(acquire(stub, key, run_id=f"dup-{i}") for i in range(DUPLICATES)))
    assert {d.outcome for d in duplicates} == {pb.ACQUIRE_OUTCOME_ALREADY_RUNNING}
    await traced.sidecar.store.flush()

    acquire_spans = _named(spans, "taskguard.acquire")
    winners = [s for s in acquire_spans if s.attributes["taskguard.outcome"] == "ACQUIRED"]
    refused = [s for s in acquire_spans if s.attributes["taskguard.outcome"] == "ALREADY_RUNNING"]
    assert len(winners) == 1 and len(refused) == DUPLICATES
    winner_span = winners[0]
    assert winner_span.kind is SpanKind.SERVER
    assert winner_span.parent is not None
    assert format(winner_span.parent.span_id, "016x") == CLIENT_SPAN_ID
    assert format(winner_span.context.trace_id, "032x") == CLIENT_TRACE_ID
    assert winner_span.attributes["rpc.system"] == "grpc"
    assert winner_span.attributes["rpc.service"] == "taskguard.v1.TaskGuard"
    assert winner_span.attributes["rpc.method"] == "Acquire"
    assert winner_span.attributes["rpc.grpc.status_code"] == 0
    assert winner_span.attributes["taskguard.task_key"] == key
    assert winner_span.attributes["taskguard.session_key"] == key.split("::")[0]
    assert winner_span.attributes["taskguard.task_name"] == "job"
    assert winner_span.attributes["taskguard.run_id"] == "winner"
    assert winner_span.attributes["taskguard.fencing_token"] == first.guard.fencing_token
    for span in refused:
        assert len(span.links) == 1
        link = span.links[0]
        assert link.context.span_id == winner_span.context.span_id
        assert link.context.trace_id == winner_span.context.trace_id
        assert link.attributes is not None
        assert link.attributes["taskguard.winner_run_id"] == "winner"
        assert link.attributes["taskguard.winner_fencing_token"] == first.guard.fencing_token
        assert span.attributes["taskguard.winner_run_id"] == "winner"
    assert _counter(metrics, "taskguard.acquisitions") == 1
    assert _counter(metrics, "taskguard.duplicates_refused") == DUPLICATES


async def _hold_first_answer(stub: pb_grpc.TaskGuardStub, request: pb.AcquireRequest) -> pb.HoldResponse:
    """Open a Hold stream with ``request``, read its answer; the sidecar ends a refused, non-joining stream."""
    call = stub.Hold()
    await call.write(pb.HoldRequest(acquire=request))
    answer = await asyncio.wait_for(call.read(), 10)
    assert isinstance(answer, pb.HoldResponse)
    await call.done_writing()
    assert await asyncio.wait_for(call.code(), 10) is grpc.StatusCode.OK
    return answer


async def test_every_acquisition_span_carries_the_run_id_its_caller_asked_for_and_the_winner_apart(
    traced: InProcess, spans: InMemorySpanExporter, key: str
) -> None:
    stub = traced.stub
    winner = await acquire(stub, key, run_id="winner")
    refused = await acquire(stub, key, run_id="asked-for")
    anonymous = await acquire(stub, key)  # no run_id: the sidecar made one for it
    held_refused = await _hold_first_answer(stub, pb.AcquireRequest(task_key=key, run_id="asked-on-a-stream"))
    assert {refused.outcome, anonymous.outcome, held_refused.outcome} == {pb.ACQUIRE_OUTCOME_ALREADY_RUNNING}
    await stub.Release(pb.ReleaseRequest(lease_id=winner.lease_id, status=pb.RUN_STATUS_FAILED, detail="exit 1"))
    needs_approval = await acquire(stub, key, run_id="after-the-failure")
    assert needs_approval.outcome == pb.ACQUIRE_OUTCOME_RETRY_REQUIRES_APPROVAL

    # The run id made for the caller that sent none is in the event log: a refusal names the run it refused.
    refused_runs = await _trigger_run_ids(stub, key)
    assert len(refused_runs) == 3 and refused_runs[0] == "asked-for", refused_runs
    anonymous_run_id = refused_runs[1]
    assert anonymous_run_id not in ("", "winner")

    acquire_spans = _named(spans, "taskguard.acquire") + _named(spans, "taskguard.hold")
    by_run_id = {span.attributes["taskguard.run_id"]: span for span in acquire_spans}
    assert set(by_run_id) == {"winner", "asked-for", anonymous_run_id, "asked-on-a-stream", "after-the-failure"}
    assert by_run_id["winner"].attributes["taskguard.outcome"] == "ACQUIRED"
    assert "taskguard.winner_run_id" not in by_run_id["winner"].attributes
    winner_span_id = by_run_id["winner"].context.span_id
    for run_id in ("asked-for", anonymous_run_id, "asked-on-a-stream", "after-the-failure"):
        span = by_run_id[run_id]
        assert span.attributes["taskguard.winner_run_id"] == "winner", run_id
        assert [link.context.span_id for link in span.links] == [winner_span_id], run_id
    assert by_run_id["asked-on-a-stream"].name == "taskguard.hold"
    assert by_run_id["after-the-failure"].attributes["taskguard.outcome"] == "RETRY_REQUIRES_APPROVAL"


async def _trigger_run_ids(stub: pb_grpc.TaskGuardStub, key: str) -> list[str]:
    """The runs refused as duplicates of ``key``, from the event log, oldest first."""
    head = (await stub.GetGuard(pb.GetGuardRequest(task_key=key))).revision
    refused: list[str] = []
    call = stub.WatchGuards(pb.WatchGuardsRequest(key_prefix=key, start_revision=1))
    try:
        async with asyncio.timeout(10):
            async for event in call:
                if event.type == pb.GUARD_EVENT_TYPE_DUPLICATE_REFUSED:
                    refused.append(event.trigger_run_id)
                if event.revision >= head:
                    break
    finally:
        call.cancel()
    return refused


async def test_a_run_span_covers_the_run_and_reflects_its_status(
    traced: InProcess, spans: InMemorySpanExporter, metrics: InMemoryMetricReader, key: str
) -> None:
    stub = traced.stub
    for status, expected in ((pb.RUN_STATUS_SUCCEEDED, StatusCode.OK), (pb.RUN_STATUS_FAILED, StatusCode.ERROR)):
        held = await stub.Acquire(pb.AcquireRequest(task_key=key), metadata=(("traceparent", TRACEPARENT),))
        await stub.Release(pb.ReleaseRequest(lease_id=held.lease_id, status=status, detail="exit 1"))
        run = _named(spans, "taskguard.run")[-1]
        acquired = [
            s for s in _named(spans, "taskguard.acquire") if s.attributes["taskguard.run_id"] == held.guard.run_id
        ]
        assert run.parent is not None and run.parent.span_id == acquired[0].context.span_id
        assert run.status.status_code is expected
        assert run.start_time == held.guard.started_at.ToNanoseconds()
        assert run.end_time is not None and run.end_time >= run.start_time
        assert run.attributes["taskguard.run_status"] == pb.RunStatus.Name(status).removeprefix("RUN_STATUS_")
    await stub.ApproveRetry(pb.ApproveRetryRequest(task_key=key, approver="ops"))
    assert _counter(metrics, "taskguard.retry_approvals") == 1


async def test_gauges_count_running_and_stale_guards_and_histograms_fill(
    traced: InProcess, metrics: InMemoryMetricReader, key: str
) -> None:
    stub = traced.stub
    held = await acquire(stub, key + "/a")
    await acquire(stub, key + "/b")
    await stub.Release(pb.ReleaseRequest(lease_id=held.lease_id, status=pb.RUN_STATUS_SUCCEEDED))
    sidecar = traced.sidecar
    await sidecar.service.telemetry.refresh_gauges(sidecar.engine)
    assert [p.value for p in _points(metrics, "taskguard.guards.running")] == [1]
    assert [p.value for p in _points(metrics, "taskguard.guards.stale")] == [0]
    assert sum(p.count for p in _points(metrics, "taskguard.acquire.duration")) == 2
    assert sum(p.count for p in _points(metrics, "taskguard.run.duration")) == 1


async def test_the_winners_span_context_survives_a_restart(in_process_factory: Callable[..., Any], key: str) -> None:
    before, after = InMemorySpanExporter(), InMemorySpanExporter()
    first: InProcess = await in_process_factory(
        telemetry_overrides=TelemetrySettings(span_processor=SimpleSpanProcessor(before))
    )
    await first.stub.Acquire(pb.AcquireRequest(task_key=key, run_id="winner"), metadata=(("traceparent", TRACEPARENT),))
    await first.close()
    second: InProcess = await in_process_factory(
        telemetry_overrides=TelemetrySettings(span_processor=SimpleSpanProcessor(after))
    )
    refused = await acquire(second.stub, key, run_id="late")
    assert refused.outcome == pb.ACQUIRE_OUTCOME_ALREADY_RUNNING
    (winner_span,) = _named(before, "taskguard.acquire")
    (late_span,) = _named(after, "taskguard.acquire")
    assert [link.context.span_id for link in late_span.links] == [winner_span.context.span_id]


async def test_a_refused_call_records_its_grpc_status(traced: InProcess, spans: InMemorySpanExporter) -> None:
    with pytest.raises(grpc.aio.AioRpcError):
        await traced.stub.Acquire(pb.AcquireRequest(task_key=""))
    span = _named(spans, "taskguard.acquire")[-1]
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert span.status.status_code is StatusCode.ERROR


class _Collector(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    """A minimal OTLP/gRPC receiver speaking the collector protocol from opentelemetry-proto."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.metric_names: set[str] = set()

    async def Export(self, request: Any, context: Any) -> Any:
        if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    self.spans.extend(scope.spans)
            return trace_service_pb2.ExportTraceServiceResponse()
        for resource in request.resource_metrics:
            for scope in resource.scope_metrics:
                self.metric_names.update(metric.name for metric in scope.metrics)
        return metrics_service_pb2.ExportMetricsServiceResponse()


@pytest.fixture
async def collector() -> AsyncIterator[tuple[_Collector, int]]:
    server = aio.server()
    receiver = _Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield receiver, port
    await server.stop(0)


async def test_a_real_sidecar_exports_spans_and_links_over_otlp(
    sidecar_factory: Callable[..., SidecarProcess], collector: tuple[_Collector, int], key: str
) -> None:
    receiver, port = collector
    sidecar = sidecar_factory("--otlp-endpoint", f"http://127.0.0.1:{port}")
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        held = await stub.Acquire(
            pb.AcquireRequest(task_key=key, run_id="winner"), metadata=(("traceparent", TRACEPARENT),)
        )
        await stub.Acquire(pb.AcquireRequest(task_key=key, run_id="dup"))
        await stub.Release(pb.ReleaseRequest(lease_id=held.lease_id, status=pb.RUN_STATUS_SUCCEEDED))
    # SIGTERM: a graceful stop flushes the exporters before the process exits.
    assert await asyncio.to_thread(sidecar.terminate) == 0
    by_name: dict[str, list[Any]] = {}
    for span in receiver.spans:
        by_name.setdefault(span.name, []).append(span)
    winner = next(s for s in by_name["taskguard.acquire"] if s.parent_span_id.hex() == CLIENT_SPAN_ID)
    assert winner.trace_id.hex() == CLIENT_TRACE_ID
    duplicate = next(s for s in by_name["taskguard.acquire"] if s is not winner)
    assert [link.span_id for link in duplicate.links] == [winner.span_id]
    assert {a.key: a.value.string_value for a in duplicate.links[0].attributes}["taskguard.winner_run_id"] == "winner"
    (run,) = by_name["taskguard.run"]
    assert run.parent_span_id == winner.span_id and run.trace_id == winner.trace_id
    assert {"taskguard.acquisitions", "taskguard.duplicates_refused"} <= receiver.metric_names


async def test_console_export_prints_spans_for_debugging(
    in_process_factory: Callable[..., Any], key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    harness: InProcess = await in_process_factory(telemetry_console=True)
    await acquire(harness.stub, key)
    await harness.close()  # shutting down flushes the batch processor
    printed = capsys.readouterr().out
    assert '"name": "taskguard.acquire"' in printed
    assert key in printed


async def test_telemetry_is_off_by_default(in_process: InProcess) -> None:
    assert not in_process.sidecar.service.telemetry.enabled


async def test_a_wait_in_a_queue_is_a_span_linked_to_the_run_it_waited_for_and_a_histogram(
    traced: InProcess, spans: InMemorySpanExporter, metrics: InMemoryMetricReader, key: str
) -> None:
    winner = await acquire(traced.stub, key, ttl_s=60)
    call = traced.stub.Hold()
    await call.write(
        pb.HoldRequest(acquire=pb.AcquireRequest(task_key=key, run_id="waiter", on_conflict=pb.ON_CONFLICT_QUEUE))
    )
    assert (await asyncio.wait_for(call.read(), 10)).outcome == pb.ACQUIRE_OUTCOME_QUEUED
    await traced.stub.Release(pb.ReleaseRequest(lease_id=winner.lease_id, status=pb.RUN_STATUS_SUCCEEDED))
    turn = await asyncio.wait_for(call.read(), 10)
    assert turn.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
    call.cancel()

    (wait,) = _named(spans, "taskguard.queue.wait")
    assert wait.attributes is not None
    assert (wait.attributes["taskguard.run_id"], wait.attributes["taskguard.outcome"]) == ("waiter", "ACQUIRED")
    assert wait.attributes["taskguard.winner_run_id"] == winner.guard.run_id
    (winning,) = [
        s
        for s in _named(spans, "taskguard.acquire")
        if s.attributes and s.attributes.get("taskguard.run_id") == winner.guard.run_id
    ]
    assert winning.context is not None
    assert [link.context.span_id for link in wait.links] == [winning.context.span_id]
    (point,) = _points(metrics, "taskguard.queue.wait.duration")
    assert point.count == 1
    assert _counter(metrics, "taskguard.queued") == 1
