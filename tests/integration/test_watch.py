"""WatchGuards: live events, snapshots, resume by revision, retention, slow watchers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc import aio

from taskguard.store.etcd import etcd_revision_of
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.etcd_cluster import EtcdCluster
from tests.support import InProcess, SidecarProcess, acquire, open_watch, watch_until

pytestmark = pytest.mark.backends("sqlite", "etcd")

TIMEOUT_S = 10.0


def _types(events: list[pb.GuardEvent]) -> list[str]:
    return [pb.GuardEventType.Name(e.type).removeprefix("GUARD_EVENT_TYPE_") for e in events]


async def _next(call: Any) -> pb.GuardEvent:
    event: pb.GuardEvent = await asyncio.wait_for(call.read(), TIMEOUT_S)
    return event


async def test_a_watcher_sees_every_kind_of_change_in_order(manual: InProcess, key: str) -> None:
    stub = manual.stub
    call = await open_watch(stub, key_prefix=key)
    first = await acquire(stub, key + "/a", ttl_s=5, run_id="a1", holder="gw-1")
    assert (await _next(call)).type == pb.GUARD_EVENT_TYPE_ACQUIRED
    await acquire(stub, key + "/a", run_id="a2", holder="cron")
    await manual.sidecar.store.flush()
    duplicate = await _next(call)
    assert duplicate.type == pb.GUARD_EVENT_TYPE_DUPLICATE_REFUSED
    assert (duplicate.trigger_run_id, duplicate.trigger_holder) == ("a2", "cron")
    assert duplicate.guard.run_id == "a1" and duplicate.guard.duplicate_count == 1
    await manual.advance(6)
    assert (await _next(call)).type == pb.GUARD_EVENT_TYPE_EXPIRED

    failing = await acquire(stub, key + "/b")
    assert (await _next(call)).type == pb.GUARD_EVENT_TYPE_ACQUIRED
    await stub.Release(pb.ReleaseRequest(lease_id=failing.lease_id, status=pb.RUN_STATUS_FAILED, detail="exit 1"))
    released = await _next(call)
    assert released.type == pb.GUARD_EVENT_TYPE_RELEASED and released.guard.state == pb.GUARD_STATE_FAILED
    await stub.ApproveRetry(pb.ApproveRetryRequest(task_key=key + "/b", approver="ops", reason="fixed"))
    approved = await _next(call)
    assert approved.type == pb.GUARD_EVENT_TYPE_RETRY_APPROVED
    assert (approved.actor, approved.reason) == ("ops", "fixed")

    hold = stub.Hold()
    await hold.write(pb.HoldRequest(acquire=pb.AcquireRequest(task_key=key + "/c")))
    await asyncio.wait_for(hold.read(), TIMEOUT_S)
    assert (await _next(call)).type == pb.GUARD_EVENT_TYPE_ACQUIRED
    hold.cancel()
    assert (await _next(call)).type == pb.GUARD_EVENT_TYPE_ABANDONED
    call.cancel()
    assert first.guard.revision > 0


async def test_snapshot_first_then_live_events(in_process: InProcess, key: str) -> None:
    stub = in_process.stub
    for name in ("a", "b", "c"):
        await acquire(stub, f"{key}/{name}")
    await acquire(stub, "other::job")
    call = stub.WatchGuards(pb.WatchGuardsRequest(key_prefix=key, include_snapshot=True))
    snapshot = [await _next(call) for _ in range(3)]
    assert _types(snapshot) == ["SNAPSHOT"] * 3
    assert [e.guard.task_key for e in snapshot] == [f"{key}/{name}" for name in ("a", "b", "c")]
    head = snapshot[0].revision
    live = await acquire(stub, f"{key}/d")
    event = await _next(call)
    assert event.type == pb.GUARD_EVENT_TYPE_ACQUIRED and event.revision == live.guard.revision > head
    call.cancel()


async def test_a_watcher_resumes_after_a_disconnect_without_gaps_or_repeats(in_process: InProcess, key: str) -> None:
    stub = in_process.stub
    start = (await acquire(stub, f"{key}/0")).guard.revision
    seen = await watch_until(stub, lambda events: len(events) == 1, key_prefix=key, start_revision=start)
    last = seen[-1].revision
    expected = [last]
    for i in range(1, 20):
        expected.append((await acquire(stub, f"{key}/{i}")).guard.revision)
    resumed = await watch_until(stub, lambda events: len(events) == 19, key_prefix=key, start_revision=last + 1)
    assert [e.revision for e in seen + resumed] == expected


async def test_a_watcher_resumes_across_a_sidecar_sigkill(sidecar: SidecarProcess, key: str) -> None:
    revisions: list[int] = []
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        start = (await acquire(stub, f"{key}/0")).guard.revision
        seen = await watch_until(stub, lambda events: len(events) == 1, key_prefix=key, start_revision=start)
        revisions.extend(e.revision for e in seen)
        for i in range(1, 10):
            await acquire(stub, f"{key}/{i}")
    sidecar.restart_after_kill()
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        for i in range(10, 15):
            await acquire(stub, f"{key}/{i}")
        rest = await watch_until(
            stub, lambda events: len(events) == 14, key_prefix=key, start_revision=revisions[-1] + 1
        )
    revisions.extend(e.revision for e in rest)
    assert revisions == sorted(set(revisions))
    assert [e.guard.task_key for e in rest] == [f"{key}/{i}" for i in range(1, 15)]


async def test_a_start_revision_beyond_the_head_is_out_of_range_naming_the_head(
    in_process: InProcess, key: str
) -> None:
    head = (await acquire(in_process.stub, key)).guard.revision
    # The next revision is a fine place to start: it is where a watcher that saw the head resumes.
    following = await open_watch(in_process.stub, key_prefix=key, start_revision=head + 1)
    following.cancel()
    ahead = head + (1 << 40)
    call = in_process.stub.WatchGuards(pb.WatchGuardsRequest(key_prefix=key, start_revision=ahead))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _next(call)
    assert error.value.code() == grpc.StatusCode.OUT_OF_RANGE
    details = error.value.details() or ""
    prefix = f"start_revision: revision {ahead} is ahead of the store, whose last revision is "
    assert details.startswith(prefix), details
    # The head it names is the store's (on etcd: past every slot of etcd's own revision), and one past it is fine.
    latest = int(details.removeprefix(prefix).split(";", 1)[0])
    assert latest >= head
    assert details.endswith(f"; start at {latest + 1} or earlier (0: from now)")
    (await open_watch(in_process.stub, key_prefix=key, start_revision=latest + 1)).cancel()


async def test_a_start_revision_older_than_retention_is_out_of_range(
    in_process_factory: Callable[..., Any], key: str, store_backend: str, request: pytest.FixtureRequest
) -> None:
    harness: InProcess = await in_process_factory(event_retention_count=10)
    stub = harness.stub
    for i in range(1200):
        await acquire(stub, f"{key}/{i}")
    if store_backend == "etcd":
        # etcd keeps history until it is compacted (its own auto-compaction, or an operator): compact now.
        cluster: EtcdCluster = request.getfixturevalue("etcd_server")
        await asyncio.to_thread(cluster.compact, etcd_revision_of(harness.sidecar.store.revision))
    call = stub.WatchGuards(pb.WatchGuardsRequest(start_revision=1))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _next(call)
    assert error.value.code() == grpc.StatusCode.OUT_OF_RANGE
    details = error.value.details() or ""
    assert details.startswith("start_revision: revision 1 is no longer retained; the oldest available is ")
    oldest = int(details.rsplit(" ", 1)[1])
    again = await watch_until(stub, lambda events: bool(events), start_revision=oldest)
    assert again[0].revision == oldest


async def test_a_watcher_that_never_reads_is_cut_off_and_acquires_still_complete(
    in_process_factory: Callable[..., Any], key: str
) -> None:
    harness: InProcess = await in_process_factory(watch_buffer=64)
    stub = harness.stub
    # Without BDP probing the stream's window stays small, so the transport cannot absorb the backlog.
    stalled_channel = aio.insecure_channel(harness.address, options=[("grpc.http2.bdp_probe", 0)])
    stalled = await open_watch(pb_grpc.TaskGuardStub(stalled_channel), key_prefix=key)
    await acquire(stub, f"{key}/first")
    responses = await asyncio.wait_for(asyncio.gather(*(acquire(stub, f"{key}/{i}") for i in range(1000))), 60)
    assert {r.outcome for r in responses} == {pb.ACQUIRE_OUTCOME_ACQUIRED}
    # A shared store (etcd) publishes what it committed when its own watch brings it back: wait for that.
    last = max(r.guard.revision for r in responses)
    published = asyncio.Event()
    harness.sidecar.store.subscribe(lambda events: published.set() if events[-1].revision >= last else None)
    if harness.sidecar.store.revision < last:
        await asyncio.wait_for(published.wait(), TIMEOUT_S)
    # The client reads only now: what was in flight, then the status that cut it off.
    received: list[pb.GuardEvent] = []
    with pytest.raises(grpc.aio.AioRpcError) as error:
        while True:
            received.append(await _next(stalled))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = error.value.details() or ""
    # The hint never skips what the client got (a write cut off mid-way may have arrived: a client
    # resumes from its own last revision + 1 anyway).
    hinted = int(details.rsplit("start_revision=", 1)[1])
    assert received[-2].revision + 1 <= hinted <= received[-1].revision + 1
    assert len(received) < 1001
    assert harness.sidecar.hub.watcher_count == 0
    await stalled_channel.close()


async def test_a_watch_is_acknowledged_before_any_event(in_process: InProcess, key: str) -> None:
    call = await open_watch(in_process.stub, key_prefix=key)
    assert in_process.sidecar.hub.watcher_count == 1
    call.cancel()


async def test_batched_watch_carries_exactly_the_events_of_the_plain_one(in_process: InProcess, key: str) -> None:
    stub = in_process.stub
    start = (await acquire(stub, f"{key}/0")).guard.revision
    await asyncio.gather(*(acquire(stub, f"{key}/{i}") for i in range(1, 300)))
    plain = await watch_until(stub, lambda seen: len(seen) == 300, key_prefix=key, start_revision=start)
    batches: list[pb.GuardEventBatch] = []
    call = stub.WatchGuardBatches(pb.WatchGuardsRequest(key_prefix=key, start_revision=start, include_snapshot=True))
    while sum(len(batch.events) for batch in batches) < 600:
        batches.append(await _next(call))
    call.cancel()
    flattened = [event for batch in batches for event in batch.events]
    assert [e.type for e in flattened[:300]] == [pb.GUARD_EVENT_TYPE_SNAPSHOT] * 300
    assert flattened[300:] == plain
    assert len(batches) < 20, "300 ready events should come in a few messages, not one each"
