"""Queues over real gRPC: QUEUE and KEEP_NEWEST through the Python client, raw Hold streams and unary Acquire.

In-process sidecars on a real socket (SQLite and etcd); the manual clock moves only when a test says so.
Every wait synchronises on what the sidecar sends (a queued notice, a watch event), never on a sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest
from grpc import aio

from taskguard.clock import ManualClock
from taskguard.guard.model import KeyRule
from taskguard.store import StoreUnavailable
from taskguard_client import AsyncClient, Guard, QueueFull, RunStatus, Superseded, WaitTimedOut
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.support import InProcess, SidecarProcess, acquire, watch_until

pytestmark = pytest.mark.backends("sqlite", "etcd")

RULES = (KeyRule(name="short", match="short:*", max_queue=1),)


@pytest.fixture
async def queued(in_process_factory: object) -> InProcess:
    harness: InProcess = await in_process_factory(ManualClock(), rules=RULES)  # type: ignore[operator]
    return harness


class Places:
    """What ``on_queued`` heard, and a way to wait for a place."""

    def __init__(self) -> None:
        self.heard: list[int] = []
        self.guards: list[Guard] = []
        self._changed = asyncio.Event()

    def __call__(self, position: int, guard: Guard) -> None:
        self.heard.append(position)
        self.guards.append(guard)
        self._changed.set()

    async def reach(self, position: int) -> None:
        await self.until(lambda: bool(self.heard) and self.heard[-1] == position)

    async def until(self, done: Callable[[], bool]) -> None:
        while not done():
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), 10)


async def _hold_queue(stub: object, task_key: str, run_id: str, on_conflict: int = pb.ON_CONFLICT_QUEUE) -> object:
    call = stub.Hold()  # type: ignore[attr-defined]
    await call.write(
        pb.HoldRequest(acquire=pb.AcquireRequest(task_key=task_key, run_id=run_id, on_conflict=on_conflict))
    )
    return call


async def test_waiters_are_admitted_one_at_a_time_in_arrival_order(queued: InProcess, key: str) -> None:
    admitted: list[str] = []
    places = {name: Places() for name in ("b", "c", "d")}
    first_turn = asyncio.Event()

    async with AsyncClient(queued.address) as client:

        async def run(name: str) -> None:
            async with client.hold(key, run_id=name, on_conflict="queue", on_queued=places[name]) as lease:
                admitted.append(lease.run_id)
                assert (await client.get(key)).run_id == name

        async with client.hold(key, run_id="a"):
            tasks = []
            for name in ("b", "c", "d"):
                tasks.append(asyncio.create_task(run(name)))
                await places[name].reach(len(tasks))  # queued behind the ones before it
            guard = await client.get(key)
            assert [waiter.run_id for waiter in guard.waiters] == ["b", "c", "d"]
            first_turn.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)

    assert admitted == ["b", "c", "d"]
    # Each heard its place move up as the ones ahead of it took their turns (a place may be skipped: changes
    # are told at most every NOTICE_INTERVAL_S, the latest then).
    heard = places["d"].heard
    assert heard[0] == 3 and len(heard) >= 2 and heard == sorted(heard, reverse=True) and len(set(heard)) == len(heard)
    final = await queued.stub.GetGuard(pb.GetGuardRequest(task_key=key))
    assert final.state == pb.GUARD_STATE_SUCCEEDED and final.fencing_token == 4 and not final.waiters


async def test_keep_newest_admits_only_the_latest_trigger(queued: InProcess, key: str) -> None:
    async with AsyncClient(queued.address) as client:
        places = {name: Places() for name in ("old", "new")}

        async def wait(name: str) -> str:
            async with client.hold(key, run_id=name, on_conflict="keep-newest", on_queued=places[name]) as lease:
                return lease.run_id

        async with client.hold(key, run_id="running"):
            older = asyncio.create_task(wait("old"))
            await places["old"].reach(1)
            newer = asyncio.create_task(wait("new"))
            with pytest.raises(Superseded) as superseded:
                await asyncio.wait_for(older, 10)
            assert superseded.value.by == "new"
            await places["new"].reach(1)
        assert await asyncio.wait_for(newer, 10) == "new"

    events = await watch_until(
        queued.stub,
        lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_SUPERSEDED for e in seen),
        key_prefix=key,
        start_revision=1,
    )
    superseded_event = next(e for e in events if e.type == pb.GUARD_EVENT_TYPE_SUPERSEDED)
    assert (superseded_event.waiter_run_id, superseded_event.trigger_run_id) == ("old", "new")


async def test_a_full_queue_refuses_naming_it(queued: InProcess, key: str) -> None:
    task_key = f"short:{key}"
    async with AsyncClient(queued.address) as client:
        places = Places()
        async with client.hold(task_key, run_id="holder"):
            waiting = asyncio.create_task(_enter(client, task_key, "first", places))
            await places.reach(1)
            with pytest.raises(QueueFull) as full:
                async with client.hold(task_key, run_id="second", on_conflict="queue"):
                    pass
            assert "its queue is full (1 waiting behind run holder)" in str(full.value)
        assert await asyncio.wait_for(waiting, 10) == "first"


async def _enter(client: AsyncClient, task_key: str, run_id: str, places: Places, **options: object) -> str:
    async with client.hold(task_key, run_id=run_id, on_conflict="queue", on_queued=places, **options) as lease:  # type: ignore[call-overload]
        return str(lease.run_id)


async def test_a_waiter_leaves_with_wait_timed_out_when_its_max_wait_passes(queued: InProcess, key: str) -> None:
    async with AsyncClient(queued.address) as client:
        places = Places()
        async with client.hold(key, run_id="holder"):
            waiting = asyncio.create_task(_enter(client, key, "patient", places, max_wait=5))
            await places.reach(1)
            await queued.advance(4.9)
            assert [w.run_id for w in (await client.get(key)).waiters] == ["patient"]
            await queued.advance(0.1)
            with pytest.raises(WaitTimedOut):
                await asyncio.wait_for(waiting, 10)
            assert not (await client.get(key)).waiters


async def test_a_waiter_whose_stream_drops_leaves_the_queue_at_once(queued: InProcess, key: str) -> None:
    held = await acquire(queued.stub, key, ttl_s=60)
    call = await _hold_queue(queued.stub, key, "gone")
    answer = await call.read()  # type: ignore[attr-defined]
    assert (answer.outcome, answer.position) == (pb.ACQUIRE_OUTCOME_QUEUED, 1)

    call.cancel()  # type: ignore[attr-defined]
    events = await watch_until(
        queued.stub,
        lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_DEQUEUED for e in seen),
        key_prefix=key,
        start_revision=held.guard.revision,
    )

    dequeued = next(e for e in events if e.type == pb.GUARD_EVENT_TYPE_DEQUEUED)
    assert dequeued.waiter_run_id == "gone" and "Hold stream ended" in dequeued.reason
    await queued.stub.Release(pb.ReleaseRequest(lease_id=held.lease_id, status=pb.RUN_STATUS_SUCCEEDED))
    final = await queued.stub.GetGuard(pb.GetGuardRequest(task_key=key))
    assert final.state == pb.GUARD_STATE_SUCCEEDED and final.run_id == held.guard.run_id


async def test_a_failed_key_keeps_its_queue_until_a_retry_is_approved(queued: InProcess, key: str) -> None:
    async with AsyncClient(queued.address) as client:
        places = Places()

        async def wait() -> str:
            async with client.hold(key, run_id="next", on_conflict="queue", on_queued=places) as lease:
                return lease.run_id

        lease = await client.acquire(key, run_id="first", ttl=60)
        waiting = asyncio.create_task(wait())
        await places.reach(1)
        await client.release(lease.lease_id, RunStatus.FAILED, "boom")
        # The waiter hears why its turn does not come.
        await places.until(lambda: places.guards[-1].state.value == "FAILED")
        assert places.heard[-1] == 1 and places.guards[-1].last_detail == "boom"
        assert not waiting.done()

        await client.approve_retry(key, "ops", reason="fixed")
        assert await asyncio.wait_for(waiting, 10) == "next"
    final = await client_guard(queued, key)
    assert final.attempt == 2 and final.approved_by


async def client_guard(harness: InProcess, key: str) -> pb.Guard:
    return await harness.stub.GetGuard(pb.GetGuardRequest(task_key=key))


async def test_a_unary_acquire_waits_in_the_queue_up_to_its_deadline(queued: InProcess, key: str) -> None:
    held = await acquire(queued.stub, key, ttl_s=60)
    request = pb.AcquireRequest(task_key=key, run_id="unary", on_conflict=pb.ON_CONFLICT_QUEUE)
    waiting = asyncio.ensure_future(queued.stub.Acquire(request))
    await watch_until(
        queued.stub,
        lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_QUEUED for e in seen),
        key_prefix=key,
        start_revision=held.guard.revision,
    )
    await queued.stub.Release(pb.ReleaseRequest(lease_id=held.lease_id, status=pb.RUN_STATUS_SUCCEEDED))

    answer = await asyncio.wait_for(waiting, 10)

    assert answer.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED and answer.lease_id
    assert answer.guard.run_id == "unary" and answer.guard.fencing_token == held.guard.fencing_token + 1
    renewed = await queued.stub.Renew(pb.RenewRequest(lease_id=answer.lease_id))
    assert renewed.guard.run_id == "unary"


async def test_a_unary_waiter_whose_deadline_passes_leaves_the_queue(queued: InProcess, key: str) -> None:
    held = await acquire(queued.stub, key, ttl_s=60)
    request = pb.AcquireRequest(task_key=key, run_id="impatient", on_conflict=pb.ON_CONFLICT_QUEUE)
    with pytest.raises(aio.AioRpcError) as ended:
        await queued.stub.Acquire(request, timeout=0.5)
    assert ended.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await watch_until(
        queued.stub,
        lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_DEQUEUED for e in seen),
        key_prefix=key,
        start_revision=held.guard.revision,
    )
    # Its turn never comes: the next release leaves the key free.
    await queued.stub.Release(pb.ReleaseRequest(lease_id=held.lease_id, status=pb.RUN_STATUS_SUCCEEDED))
    assert (await client_guard(queued, key)).state == pb.GUARD_STATE_SUCCEEDED


async def test_a_retry_of_a_queued_caller_keeps_its_place(queued: InProcess, key: str) -> None:
    held = await acquire(queued.stub, key, ttl_s=60)
    first = await _hold_queue(queued.stub, key, "first")
    assert (await first.read()).position == 1  # type: ignore[attr-defined]
    second = await _hold_queue(queued.stub, key, "second")
    assert (await second.read()).position == 2  # type: ignore[attr-defined]

    # The same caller asks again with the same run id on a new stream (its library retried): still second,
    # and the old stream's end no longer takes it out of the queue.
    retried = await _hold_queue(queued.stub, key, "second")
    assert (await retried.read()).position == 2  # type: ignore[attr-defined]
    second.cancel()  # type: ignore[attr-defined]
    first.cancel()  # type: ignore[attr-defined]
    events = await watch_until(
        queued.stub,
        lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_DEQUEUED and e.waiter_run_id == "first" for e in seen),
        key_prefix=key,
        start_revision=held.guard.revision,
    )
    assert [w.run_id for w in events[-1].guard.waiters] == ["second"]

    await queued.stub.Release(pb.ReleaseRequest(lease_id=held.lease_id, status=pb.RUN_STATUS_SUCCEEDED))
    while (answer := await retried.read()).outcome == pb.ACQUIRE_OUTCOME_QUEUED:  # type: ignore[attr-defined]
        pass
    assert answer.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED and answer.guard.run_id == "second"
    retried.cancel()  # type: ignore[attr-defined]


@pytest.mark.parametrize("bad", [0.0, -1.0])
async def test_a_bad_max_wait_names_the_field(queued: InProcess, key: str, bad: float) -> None:
    request = pb.AcquireRequest(task_key=key, on_conflict=pb.ON_CONFLICT_QUEUE)
    request.max_wait.FromNanoseconds(int(bad * 1e9))
    with pytest.raises(aio.AioRpcError) as refused:
        await queued.stub.Acquire(request)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("max_wait: must be > 0s")


@pytest.mark.backends("sqlite")
async def test_waiters_are_told_to_ask_again_after_a_sidecar_restart_and_a_retry_queues_again(
    sidecar: SidecarProcess, key: str
) -> None:
    """Waiters do not survive a restart: their calls end UNAVAILABLE, the restarted sidecar dismisses them
    (the holder keeps its run, as Hold holders do), and a retry with the same run id queues again."""
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        held = await acquire(stub, key, ttl_s=600)
        waiter = await _hold_queue(stub, key, "waiting")
        assert (await waiter.read()).outcome == pb.ACQUIRE_OUTCOME_QUEUED  # type: ignore[attr-defined]

        sidecar.restart_after_kill()

        with pytest.raises(aio.AioRpcError) as ended:
            await waiter.read()  # type: ignore[attr-defined]
        assert ended.value.code() is grpc.StatusCode.UNAVAILABLE
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        guard = await stub.GetGuard(pb.GetGuardRequest(task_key=key))
        assert guard.state == pb.GUARD_STATE_RUNNING and guard.run_id == held.guard.run_id
        assert not guard.waiters
        events = await watch_until(
            stub,
            lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_DEQUEUED for e in seen),
            key_prefix=key,
            start_revision=held.guard.revision,
        )
        assert "the sidecar restarted" in next(e for e in events if e.type == pb.GUARD_EVENT_TYPE_DEQUEUED).reason

        retried = await _hold_queue(stub, key, "waiting")
        assert (await retried.read()).position == 1  # type: ignore[attr-defined]
        await stub.Release(pb.ReleaseRequest(lease_id=held.lease_id, status=pb.RUN_STATUS_SUCCEEDED))
        while (answer := await retried.read()).outcome == pb.ACQUIRE_OUTCOME_QUEUED:  # type: ignore[attr-defined]
            pass
        assert answer.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED and answer.guard.run_id == "waiting"
        retried.cancel()  # type: ignore[attr-defined]


SUPERSEDE_RULES = (KeyRule(name="redo", match="redo:*", allow_supersede=True, supersede_grace_s=30.0),)


@pytest.fixture
async def redo(in_process_factory: object) -> InProcess:
    harness: InProcess = await in_process_factory(ManualClock(), rules=SUPERSEDE_RULES)  # type: ignore[operator]
    return harness


async def test_supersede_tells_the_holder_to_stop_and_takes_the_key_when_it_releases(redo: InProcess, key: str) -> None:
    task_key = f"redo:{key}"
    async with AsyncClient(redo.address) as client:
        places = Places()

        async def newer() -> tuple[str, int]:
            async with client.hold(task_key, run_id="newer", on_conflict="supersede", on_queued=places) as lease:
                return lease.run_id, lease.fencing_token

        async with client.hold(task_key, run_id="older") as held:
            taking_over = asyncio.create_task(newer())
            stopping = await asyncio.wait_for(held.wait_stop_requested(), 10)
            assert held.stop_requested and held.stop_requested_by == "newer"
            assert stopping.stop_at is not None
            await places.reach(1)
            await held.release(RunStatus.CANCELLED, "stopping for the newer one")
        assert await asyncio.wait_for(taking_over, 10) == ("newer", 2)
    events = await watch_until(
        redo.stub,
        lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_RELEASED and e.guard.run_id == "older" for e in seen),
        key_prefix=task_key,
        start_revision=1,
    )
    released = next(e for e in events if e.type == pb.GUARD_EVENT_TYPE_RELEASED and e.guard.run_id == "older")
    assert released.guard.last_detail == "superseded by run newer: stopping for the newer one"


async def test_a_superseded_unary_holder_sees_it_on_renew_and_is_force_released_after_the_grace(
    redo: InProcess, key: str
) -> None:
    task_key = f"redo:{key}"
    held = await acquire(redo.stub, task_key, ttl_s=600)
    call = await _hold_queue(redo.stub, task_key, "newer", on_conflict=pb.ON_CONFLICT_SUPERSEDE)
    assert (await call.read()).position == 1  # type: ignore[attr-defined]

    renewed = await redo.stub.Renew(pb.RenewRequest(lease_id=held.lease_id))
    assert renewed.guard.stop_requested_by == "newer" and renewed.guard.HasField("stop_at")
    fence = pb.CheckFenceRequest(task_key=task_key, fencing_token=held.guard.fencing_token)
    assert (await redo.stub.CheckFence(fence)).valid

    await redo.advance(30)

    while (answer := await call.read()).outcome == pb.ACQUIRE_OUTCOME_QUEUED:  # type: ignore[attr-defined]
        pass
    assert answer.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED and answer.guard.run_id == "newer"
    assert not (await redo.stub.CheckFence(fence)).valid
    with pytest.raises(aio.AioRpcError) as lost:
        await redo.stub.Renew(pb.RenewRequest(lease_id=held.lease_id))
    assert lost.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    call.cancel()  # type: ignore[attr-defined]


async def test_supersede_where_the_rule_does_not_allow_it_is_permission_denied(redo: InProcess, key: str) -> None:
    await acquire(redo.stub, key, ttl_s=60)
    request = pb.AcquireRequest(task_key=key, on_conflict=pb.ON_CONFLICT_SUPERSEDE)
    with pytest.raises(aio.AioRpcError) as refused:
        await redo.stub.Acquire(request)
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details() == (
        "on_conflict: SUPERSEDE is not allowed for this key (its rule 'default' does not set allow_supersede)"
    )


async def test_the_python_clients_unary_acquire_can_wait_in_the_queue(queued: InProcess, key: str) -> None:
    async with AsyncClient(queued.address, timeout=2) as client:
        first = await client.acquire(key, run_id="first", ttl=60)
        waiting = asyncio.create_task(client.acquire(key, run_id="second", ttl=60, on_conflict="queue"))
        await watch_until(
            queued.stub,
            lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_QUEUED for e in seen),
            key_prefix=key,
            start_revision=first.guard.revision,
        )
        await client.release(first.lease_id, RunStatus.SUCCEEDED)
        second = await asyncio.wait_for(waiting, 10)
        assert (second.run_id, second.fencing_token) == ("second", 2)
        await client.release(second.lease_id, RunStatus.SUCCEEDED)

        third = await client.acquire(key, run_id="third", ttl=60)
        late = asyncio.create_task(client.acquire(key, run_id="late", on_conflict="queue", max_wait=5))
        await watch_until(
            queued.stub,
            lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_QUEUED and e.waiter_run_id == "late" for e in seen),
            key_prefix=key,
            start_revision=third.guard.revision,
        )
        await queued.advance(5)  # the sidecar's clock decides
        with pytest.raises(WaitTimedOut):
            await asyncio.wait_for(late, 10)


async def test_a_queueing_acquisition_that_fails_leaves_nothing_following_its_key(
    queued: InProcess, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A waiter's call follows its key from before its acquisition is decided; one whose decision fails
    (the store went away, say) must not stay on the key's board, or every failure would leak a listener."""
    engine = queued.sidecar.engine

    async def unavailable(command: object) -> object:
        raise StoreUnavailable("the store went away")

    await acquire(queued.stub, key, ttl_s=60)
    monkeypatch.setattr(engine, "execute", unavailable)
    for call in (queued.stub.Hold(), None):
        if call is None:
            with pytest.raises(aio.AioRpcError) as ended:
                await queued.stub.Acquire(pb.AcquireRequest(task_key=key, on_conflict=pb.ON_CONFLICT_QUEUE))
        else:
            await call.write(pb.HoldRequest(acquire=pb.AcquireRequest(task_key=key, on_conflict=pb.ON_CONFLICT_QUEUE)))
            with pytest.raises(aio.AioRpcError) as ended:
                await call.read()
        assert ended.value.code() is grpc.StatusCode.UNAVAILABLE
    monkeypatch.undo()
    assert key not in queued.sidecar.hub._followers  # the board let go of the key
