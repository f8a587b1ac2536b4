"""taskguard_client against real sidecars: AsyncClient on an in-process one, Client on a process."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from taskguard.telemetry import TelemetrySettings
from taskguard_client import (
    AlreadyRunning,
    AsyncClient,
    AsyncHold,
    Client,
    Conflict,
    EventType,
    FailedPreconditionError,
    GuardEvent,
    GuardState,
    Hold,
    InvalidArgumentError,
    LeaseLost,
    LeaseNotFoundError,
    NotFoundError,
    Outcome,
    OutOfRangeError,
    RetryPolicy,
    RetryRequiresApproval,
    RunStatus,
    UnavailableError,
)
from taskguard_client.v1 import taskguard_pb2 as pb
from tests.support import InProcess, SidecarProcess

TIMEOUT_S = 10.0
# Quick retries, so that tests which restart a sidecar do not wait out the default backoff.
FAST = RetryPolicy(max_attempts=100, initial_backoff_s=0.02, max_backoff_s=0.2)


@pytest.fixture
async def aclient(in_process: InProcess) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(in_process.address, holder="tests") as client:
        yield client


@pytest.fixture
def client(module_sidecar: SidecarProcess) -> Iterator[Client]:
    with Client(module_sidecar.address, holder="tests") as blocking:
        yield blocking


async def _next(events: Any) -> GuardEvent:
    event: GuardEvent = await asyncio.wait_for(anext(events), TIMEOUT_S)
    return event


async def _until(events: Any, done: Callable[[GuardEvent], bool]) -> list[GuardEvent]:
    """Events up to and including the first that satisfies ``done``."""
    seen: list[GuardEvent] = []
    while not seen or not done(seen[-1]):
        seen.append(await _next(events))
    return seen


# --- holds: how the block's end releases ------------------------------------------------------


async def test_a_hold_releases_succeeded_when_its_block_ends(aclient: AsyncClient, key: str) -> None:
    async with aclient.hold(key, labels={"team": "ops"}) as held:
        assert isinstance(held, AsyncHold)
        assert (held.task_key, held.fencing_token) == (key, 1)
        assert held.started_at.tzinfo is not None and held.started_at.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
        guard = await aclient.get(key)
        assert (guard.state, guard.run_id, guard.holder, guard.stream_bound) == (
            GuardState.RUNNING,
            held.run_id,
            "tests",
            True,
        )
        assert guard.labels == {"team": "ops"} and guard.session_key == key.split("::")[0]
    assert held.released is not None and held.released.state is GuardState.SUCCEEDED
    assert (await aclient.get(key)).last_status is RunStatus.SUCCEEDED


async def test_a_hold_releases_failed_with_the_exceptions_text(aclient: AsyncClient, key: str) -> None:
    with pytest.raises(ValueError, match="disk full"):
        async with aclient.hold(key):
            raise ValueError("disk full")
    guard = await aclient.get(key)
    assert (guard.state, guard.last_status, guard.last_detail) == (GuardState.FAILED, RunStatus.FAILED, "disk full")


async def test_a_hold_releases_cancelled_when_its_task_is_cancelled(aclient: AsyncClient, key: str) -> None:
    entered = asyncio.Event()

    async def work() -> None:
        async with aclient.hold(key):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(work())
    await asyncio.wait_for(entered.wait(), TIMEOUT_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    guard = await aclient.get(key)
    assert (guard.state, guard.last_status) == (GuardState.CANCELLED, RunStatus.CANCELLED)


async def test_an_explicit_release_inside_the_block_is_final(aclient: AsyncClient, key: str) -> None:
    async with aclient.hold(key) as held:
        released = await held.release("failed", "exit code 2")
    assert released.state is GuardState.FAILED
    assert (await aclient.get(key)).last_detail == "exit code 2"


# --- conflicts ----------------------------------------------------------------------------


async def test_a_conflict_raises_already_running_naming_the_winner(aclient: AsyncClient, key: str) -> None:
    async with aclient.hold(key, run_id="winner", holder="gateway-1") as winner:
        with pytest.raises(AlreadyRunning) as refused:
            async with aclient.hold(key, run_id="late"):
                raise AssertionError("a second run entered")
        error = refused.value
        assert (error.task_key, error.run_id, error.holder, error.fencing_token) == (key, "winner", "gateway-1", 1)
        assert error.started_at == winner.started_at and error.guard.state is GuardState.RUNNING
        assert "winner" in str(error) and "gateway-1" in str(error)
        with pytest.raises(AlreadyRunning):
            await aclient.acquire(key)


async def test_a_failed_key_raises_retry_requires_approval_until_approved(aclient: AsyncClient, key: str) -> None:
    with pytest.raises(RuntimeError):
        async with aclient.hold(key, run_id="first"):
            raise RuntimeError("exit code 3")
    with pytest.raises(RetryRequiresApproval) as refused:
        async with aclient.hold(key):
            pass
    error = refused.value
    assert (error.task_key, error.run_id, error.detail) == (key, "first", "exit code 3")
    assert error.released_at is not None and error.guard.state is GuardState.FAILED
    approved = await aclient.approve_retry(key, "ops", "fixed the disk")
    assert (approved.state, approved.approved_by, approved.approval_reason) == (
        GuardState.RETRY_APPROVED,
        "ops",
        "fixed the disk",
    )
    async with aclient.hold(key) as again:
        assert again.fencing_token == 2
    with pytest.raises(FailedPreconditionError):
        await aclient.approve_retry(key, "ops", "not failed")


async def test_on_conflict_return_enters_with_the_conflict(aclient: AsyncClient, key: str) -> None:
    async with aclient.hold(key, run_id="winner"):
        async with aclient.hold(key, on_conflict="return") as refused:
            assert isinstance(refused, Conflict)
            assert (refused.outcome, refused.run_id, refused.joined) == (Outcome.ALREADY_RUNNING, "winner", False)
            assert isinstance(refused.error(), AlreadyRunning)
        answer = await aclient.acquire(key, on_conflict="return")
        assert isinstance(answer, Conflict) and answer.run_id == "winner"


async def test_on_conflict_join_waits_for_the_winner_and_enters_with_its_final_guard(
    aclient: AsyncClient, key: str
) -> None:
    async with aclient.hold(key, run_id="winner") as winner:
        async with aclient.watch(key, start_revision=winner.guard.revision + 1) as events:

            async def join() -> Any:
                async with aclient.hold(key, run_id="joiner", on_conflict="join") as joined:
                    return joined

            joining = asyncio.create_task(join())
            refusal = await _until(events, lambda e: e.type is EventType.DUPLICATE_REFUSED)
            assert refusal[-1].trigger_run_id == "joiner"
            assert not joining.done()
            await winner.release(RunStatus.FAILED, "exit code 4")
    joined = await asyncio.wait_for(joining, TIMEOUT_S)
    assert isinstance(joined, Conflict) and joined.joined
    assert (joined.guard.run_id, joined.guard.state, joined.guard.last_detail) == (
        "winner",
        GuardState.FAILED,
        "exit code 4",
    )


async def test_a_join_outlives_a_sidecar_restart_and_still_gets_the_winners_final_guard(
    sidecar: SidecarProcess, key: str
) -> None:
    async with AsyncClient(sidecar.address, retry=FAST) as client:
        async with client.hold(key, run_id="winner") as winner:
            async with client.watch(key, start_revision=winner.guard.revision + 1) as events:

                async def join() -> Any:
                    async with client.hold(key, run_id="joiner", on_conflict="join") as joined:
                        return joined

                joining = asyncio.create_task(join())
                await _until(events, lambda e: e.type is EventType.DUPLICATE_REFUSED)
            # Both streams break; the winner resumes its lease, the joiner follows the winner in the event log.
            await asyncio.to_thread(sidecar.restart_after_kill)
            assert not joining.done()
            await winner.release(RunStatus.SUCCEEDED, "done")
        joined = await asyncio.wait_for(joining, TIMEOUT_S)
    assert isinstance(joined, Conflict) and joined.joined
    assert (joined.guard.run_id, joined.guard.state, joined.guard.fencing_token) == (
        "winner",
        GuardState.SUCCEEDED,
        winner.fencing_token,
    )


# --- leases that live on ----------------------------------------------------------------------


async def test_heartbeats_keep_a_short_ttl_hold_running(aclient: AsyncClient, key: str) -> None:
    ttl_s = 0.6
    async with aclient.hold(key, ttl=ttl_s) as held:
        async with aclient.watch(key, start_revision=held.guard.revision) as events:
            # Nothing may take the guard away for more than three TTLs: no LOST arrives in that window.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(held.wait_lost(), 4 * ttl_s)
            guard = await aclient.get(key)
            assert guard.state is GuardState.RUNNING and guard.ttl is not None
            assert held.guard.heartbeat_at is not None and held.guard.heartbeat_at > held.started_at
            await held.release()
            seen = await _until(events, lambda e: e.type is EventType.RELEASED)
    assert [e.type for e in seen] == [EventType.ACQUIRED, EventType.RELEASED]


async def test_an_expired_hold_is_lost_and_leaving_raises_lease_lost(manual: InProcess, key: str) -> None:
    async with AsyncClient(manual.address) as client:
        with pytest.raises(LeaseLost) as lost:
            async with client.hold(key, ttl=10) as held:
                await manual.advance(11)
                error = await asyncio.wait_for(held.wait_lost(), TIMEOUT_S)
                assert held.lost and "expired" in (held.lost_reason or "")
                assert error.guard is not None and error.guard.state is GuardState.EXPIRED
        assert lost.value.guard is not None and lost.value.guard.state is GuardState.EXPIRED


async def test_force_release_is_surfaced_as_lease_lost(aclient: AsyncClient, key: str) -> None:
    with pytest.raises(LeaseLost, match="force-released by ops: stuck") as lost:
        async with aclient.hold(key) as held:
            forced = await aclient.force_release(key, "ops", "stuck")
            assert (forced.state, forced.released_by) == (GuardState.CANCELLED, "ops")
            await asyncio.wait_for(held.wait_lost(), TIMEOUT_S)
            assert held.lost
    assert lost.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert lost.value.guard is not None and lost.value.guard.state is GuardState.CANCELLED
    # The block's own exception wins over the loss.
    with pytest.raises(KeyError):
        async with aclient.hold(key) as held:
            await aclient.force_release(key, "ops", "again")
            await asyncio.wait_for(held.wait_lost(), TIMEOUT_S)
            raise KeyError("mine")


async def test_a_hold_resumes_its_lease_after_the_sidecar_restarts(sidecar: SidecarProcess, key: str) -> None:
    async with AsyncClient(sidecar.address, retry=FAST) as client:
        async with client.hold(key) as held:
            await asyncio.to_thread(sidecar.restart_after_kill)
            released = await held.release()
        assert (released.state, released.fencing_token, released.run_id) == (
            GuardState.SUCCEEDED,
            held.fencing_token,
            held.run_id,
        )
        assert not held.lost
        async with client.watch(key, start_revision=held.guard.revision) as events:
            seen = await _until(events, lambda e: e.type is EventType.RELEASED)
    assert EventType.ABANDONED not in [e.type for e in seen]


# --- unary calls --------------------------------------------------------------------------


async def test_unary_acquire_renew_and_release(aclient: AsyncClient, key: str) -> None:
    lease = await aclient.acquire(key, ttl=30, holder="plugin")
    assert lease.lease_id and lease.fencing_token == 1 and lease.expires_at is not None
    assert lease.guard.ttl is not None and lease.guard.ttl.total_seconds() == 30
    renewed = await aclient.renew(lease.lease_id, ttl=60)
    assert renewed.expires_at is not None and renewed.expires_at > lease.expires_at
    # The same run_id again is the same lease (what makes retrying acquire safe).
    again = await aclient.acquire(key, run_id=lease.run_id)
    assert again.lease_id == lease.lease_id
    released = await aclient.release(lease.lease_id, RunStatus.SUCCEEDED, "done")
    assert (released.state, released.last_detail) == (GuardState.SUCCEEDED, "done")
    assert (await aclient.release(lease.lease_id, "succeeded")).state is GuardState.SUCCEEDED
    with pytest.raises(FailedPreconditionError, match="already released with SUCCEEDED"):
        await aclient.release(lease.lease_id, RunStatus.FAILED)
    with pytest.raises(LeaseLost):
        await aclient.renew(lease.lease_id)
    with pytest.raises(LeaseNotFoundError):
        await aclient.renew("no-such-lease")


async def test_bad_input_and_unknown_keys_raise_typed_errors(aclient: AsyncClient, key: str) -> None:
    with pytest.raises(InvalidArgumentError, match="task_key") as bad:
        await aclient.acquire("bad\tkey")
    assert bad.value.code is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidArgumentError):
        async with aclient.hold(""):
            pass
    with pytest.raises(NotFoundError, match="no guard has this key"):
        await aclient.get(key)


async def test_an_unreachable_sidecar_raises_unavailable(workdir: Path, key: str) -> None:
    async with AsyncClient(f"unix:{workdir / 'nobody.sock'}", retry=RetryPolicy(max_attempts=2)) as client:
        with pytest.raises(UnavailableError):
            await client.get(key)
        with pytest.raises(UnavailableError):
            async with client.hold(key):
                pass


class _AcquireRecorder(aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Sees every Acquire attempt the client makes and how it ended."""

    def __init__(self) -> None:
        self.run_ids: list[str] = []
        self.codes: list[grpc.StatusCode] = []
        self.refused = asyncio.Event()

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        call = await continuation(details, request)
        if isinstance(request, pb.AcquireRequest):
            self.run_ids.append(request.run_id)
            try:
                await call
                self.codes.append(grpc.StatusCode.OK)
            except aio.AioRpcError as error:
                self.codes.append(error.code())
                self.refused.set()
        return call


async def test_acquire_retries_unavailable_with_the_same_run_id(
    sidecar_factory: Callable[..., SidecarProcess], key: str
) -> None:
    sidecar = sidecar_factory(start=False)
    recorder = _AcquireRecorder()
    async with AsyncClient(sidecar.address, retry=FAST, interceptors=[recorder]) as client:
        acquiring = asyncio.create_task(client.acquire(key))
        await asyncio.wait_for(recorder.refused.wait(), TIMEOUT_S)  # the first attempt found no sidecar
        await asyncio.to_thread(sidecar.start)
        lease = await asyncio.wait_for(acquiring, 30)
    assert recorder.codes[0] is grpc.StatusCode.UNAVAILABLE and recorder.codes[-1] is grpc.StatusCode.OK
    assert len(recorder.run_ids) >= 2 and set(recorder.run_ids) == {lease.run_id}


def test_the_first_call_after_a_sidecar_restart_finds_it(sidecar: SidecarProcess, key: str) -> None:
    """While gRPC waits out a reconnect backoff it fails calls at once; the client's retries must outlast it.

    With the backoff capped at 2 s, 6 of 8 first calls after a restart failed (at 250 ms, 0 of 20)."""
    with Client(sidecar.address) as client:
        client.acquire(key)
        sidecar.terminate()
        # Calls into the outage grow the channel's reconnect backoff to its cap.
        outage_ends = time.monotonic() + 6
        while time.monotonic() < outage_ends:
            with pytest.raises(UnavailableError):
                client.get(key)
        sidecar.start()
        assert client.get(key).task_key == key


# --- reads --------------------------------------------------------------------------------


async def test_list_iterates_every_page(aclient: AsyncClient, key: str) -> None:
    keys = [f"{key}/{i:02d}" for i in range(7)]
    for task_key in keys:
        await aclient.acquire(task_key)
    await aclient.acquire("elsewhere::job")
    listed = [guard.task_key async for guard in aclient.list(prefix=key + "/", page_size=2)]
    assert listed == keys
    failed = await aclient.acquire(key + "/zz")
    await aclient.release(failed.lease_id, RunStatus.FAILED)
    assert [g.task_key async for g in aclient.list(prefix=key, states=["failed"])] == [key + "/zz"]
    assert [g async for g in aclient.list(prefix=key, stale_only=True)] == []


async def test_check_fence_is_true_only_while_the_token_holds_the_guard(aclient: AsyncClient, key: str) -> None:
    assert not await aclient.check_fence(key, 1)
    async with aclient.hold(key) as held:
        assert await aclient.check_fence(key, held.fencing_token)
        assert not await aclient.check_fence(key, held.fencing_token + 1)
    assert not await aclient.check_fence(key, held.fencing_token)


async def test_watch_gives_a_snapshot_then_live_events(aclient: AsyncClient, key: str) -> None:
    await aclient.acquire(key + "/a")
    async with aclient.watch(key, include_snapshot=True) as events:
        snapshot = await _next(events)
        assert (snapshot.type, snapshot.guard.task_key) == (EventType.SNAPSHOT, key + "/a")
        lease = await aclient.acquire(key + "/b", holder="cron")
        live = await _next(events)
    assert (live.type, live.guard.task_key, live.guard.holder) == (EventType.ACQUIRED, key + "/b", "cron")
    assert live.revision == lease.guard.revision > snapshot.revision


async def test_watch_resumes_across_a_sidecar_sigkill_without_repeats_or_gaps(
    sidecar: SidecarProcess, key: str
) -> None:
    async with AsyncClient(sidecar.address, retry=FAST) as client:
        first = await client.acquire(f"{key}/0")
        async with client.watch(key + "/", start_revision=first.guard.revision) as events:
            seen = [await _next(events)]
            for i in range(1, 5):
                await client.acquire(f"{key}/{i}")
            seen.append(await _next(events))  # three more are committed but not read yet
            await asyncio.to_thread(sidecar.restart_after_kill)
            for i in range(5, 8):
                await client.acquire(f"{key}/{i}")
            while len(seen) < 8:
                seen.append(await _next(events))
            assert events.last_revision == seen[-1].revision
    revisions = [event.revision for event in seen]
    assert revisions == sorted(set(revisions))
    assert [event.guard.task_key for event in seen] == [f"{key}/{i}" for i in range(8)]


class _WatchCounter(aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
        self.starts: list[int] = []

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        if isinstance(request, pb.WatchGuardsRequest):
            self.starts.append(request.start_revision)
        return await continuation(details, request)


async def test_a_watch_cut_off_for_falling_behind_resumes_where_it_was(
    in_process_factory: Callable[..., Any], key: str
) -> None:
    harness: InProcess = await in_process_factory(watch_buffer=1)
    counter = _WatchCounter()
    async with AsyncClient(harness.address, interceptors=[counter]) as client:
        first = await client.acquire(f"{key}/first")
        async with client.watch(key + "/", start_revision=first.guard.revision) as events:
            seen = [await _next(events)]  # live now: a batch of more than one event overflows its buffer
            await asyncio.gather(*(client.acquire(f"{key}/{i:02d}") for i in range(30)))
            while len(seen) < 31:
                seen.append(await _next(events))
    revisions = [event.revision for event in seen]
    assert revisions == sorted(set(revisions))
    assert sorted(event.guard.task_key for event in seen[1:]) == [f"{key}/{i:02d}" for i in range(30)]
    assert len(counter.starts) >= 2, "the sidecar never cut the watcher off; nothing was resumed"
    assert counter.starts[1] > first.guard.revision


async def test_a_watch_older_than_retention_raises_out_of_range(
    in_process_factory: Callable[..., Any], key: str
) -> None:
    harness: InProcess = await in_process_factory(store="memory", event_retention_count=5)
    async with AsyncClient(harness.address) as client:
        for i in range(10):
            await client.acquire(f"{key}/{i}")
        async with client.watch(start_revision=1) as events:
            with pytest.raises(OutOfRangeError) as error:
                await _next(events)
    assert error.value.oldest_revision is not None and error.value.oldest_revision > 1
    assert "re-list" in str(error.value)


# --- trace context ------------------------------------------------------------------------


async def test_the_callers_trace_context_becomes_the_parent_of_the_sidecars_span(
    in_process_factory: Callable[..., Any], key: str
) -> None:
    spans = InMemorySpanExporter()
    traced: InProcess = await in_process_factory(
        telemetry_overrides=TelemetrySettings(span_processor=SimpleSpanProcessor(spans))
    )
    tracer = TracerProvider().get_tracer("tests")
    async with AsyncClient(traced.address) as client:
        with tracer.start_as_current_span("caller") as caller:
            await client.acquire(key)
            async with client.hold(key + "/held"):
                pass
        await client.get(key)  # no current span: no parent
    context = caller.get_span_context()
    by_name = {span.name: span for span in spans.get_finished_spans()}
    for name in ("taskguard.acquire", "taskguard.hold"):
        parent = by_name[name].parent
        assert parent is not None, name
        assert (parent.span_id, parent.trace_id) == (context.span_id, context.trace_id)
    assert by_name["taskguard.get_guard"].parent is None


# --- the blocking client --------------------------------------------------------------------


def test_blocking_hold_releases_succeeded_failed_and_cancelled(client: Client, key: str) -> None:
    with client.hold(key + "/ok") as held:
        assert isinstance(held, Hold) and client.get(key + "/ok").state is GuardState.RUNNING
    assert client.get(key + "/ok").state is GuardState.SUCCEEDED
    with pytest.raises(OSError, match="no space"), client.hold(key + "/failed"):
        raise OSError("no space")
    assert (client.get(key + "/failed").state, client.get(key + "/failed").last_detail) == (
        GuardState.FAILED,
        "no space",
    )
    with pytest.raises(KeyboardInterrupt), client.hold(key + "/interrupted"):
        raise KeyboardInterrupt
    assert client.get(key + "/interrupted").state is GuardState.CANCELLED


def test_blocking_conflicts_raise_return_and_join(client: Client, key: str) -> None:
    with client.hold(key, run_id="winner", holder="host-a") as winner:
        with pytest.raises(AlreadyRunning) as refused, client.hold(key):
            pass
        assert (refused.value.run_id, refused.value.holder) == ("winner", "host-a")
        with client.hold(key, on_conflict="return") as conflict:
            assert isinstance(conflict, Conflict) and conflict.run_id == "winner"
        joined: list[Any] = []

        def join() -> None:
            with client.hold(key, run_id="joiner", on_conflict="join") as answer:
                joined.append(answer)

        with client.watch(key, start_revision=winner.guard.revision + 1) as events:
            joiner = threading.Thread(target=join)
            joiner.start()
            # The raise and return attempts above were refused too; wait for the joiner's refusal.
            refusal = next(e for e in events if e.type is EventType.DUPLICATE_REFUSED and e.trigger_run_id == "joiner")
            assert refusal.guard.run_id == "winner"
        assert not joined
        winner.release()
    joiner.join(TIMEOUT_S)
    (answer,) = joined
    assert isinstance(answer, Conflict) and answer.joined and answer.guard.state is GuardState.SUCCEEDED


def test_blocking_hold_heartbeats_and_sees_a_force_release(client: Client, key: str) -> None:
    with pytest.raises(LeaseLost, match="force-released by ops"), client.hold(key, ttl=0.6) as held:
        assert held.wait_lost(timeout=2.0) is None  # three TTLs with heartbeats only
        assert client.get(key).state is GuardState.RUNNING
        client.force_release(key, "ops", "stuck")
        lost = held.wait_lost(timeout=TIMEOUT_S)
        assert lost is not None and held.lost and lost.guard is not None
        assert lost.guard.state is GuardState.CANCELLED


def test_blocking_unary_calls_list_check_fence_and_watch(client: Client, key: str) -> None:
    lease = client.acquire(key + "/1", ttl=30)
    client.acquire(key + "/2")
    assert client.renew(lease.lease_id).state is GuardState.RUNNING
    assert client.check_fence(key + "/1", lease.fencing_token)
    assert [g.task_key for g in client.list(prefix=key, page_size=1)] == [key + "/1", key + "/2"]
    with client.watch(key, start_revision=lease.guard.revision) as events:
        client.release(lease.lease_id, "cancelled", "not needed")
        kinds = [next(events).type for _ in range(4)]
    assert kinds == [EventType.ACQUIRED, EventType.ACQUIRED, EventType.RENEWED, EventType.RELEASED]
    assert not client.check_fence(key + "/1", lease.fencing_token)
    with pytest.raises(NotFoundError):
        client.get(key + "/3")
    with pytest.raises(InvalidArgumentError):
        client.acquire("")
