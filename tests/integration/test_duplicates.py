"""Refused triggers are cheap: answered from memory, persisted in batches, still seen by watchers."""

from __future__ import annotations

import asyncio

import pytest
from grpc import aio

from taskguard.store.etcd import EtcdStore
from taskguard.store.sqlite import SqliteStore
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.support import InProcess, SidecarProcess, acquire, watch_until

pytestmark = pytest.mark.backends("sqlite", "etcd")

STORM = 1000


async def test_a_storm_of_duplicates_costs_a_few_transactions_not_one_each(in_process: InProcess, key: str) -> None:
    stub = in_process.stub
    store = in_process.sidecar.store
    assert isinstance(store, SqliteStore | EtcdStore)  # both count their writes
    winner = await acquire(stub, key, run_id="winner")
    before = store.transactions
    responses = await asyncio.gather(*(acquire(stub, key, run_id=f"dup-{i}", holder=f"h-{i}") for i in range(STORM)))
    assert {r.outcome for r in responses} == {pb.ACQUIRE_OUTCOME_ALREADY_RUNNING}
    await store.flush()
    print(f"{STORM} refusals took {store.transactions - before} transactions")
    assert store.transactions - before <= 20, f"{store.transactions - before} transactions for {STORM} refusals"
    guard = await stub.GetGuard(pb.GetGuardRequest(task_key=key))
    assert guard.duplicate_count == STORM
    assert guard.revision == winner.guard.revision  # refusals are events, not state changes
    events = await watch_until(
        stub, lambda seen: len(seen) == STORM + 1, key_prefix=key, start_revision=winner.guard.revision
    )
    refusals = events[1:]
    assert {e.type for e in refusals} == {pb.GUARD_EVENT_TYPE_DUPLICATE_REFUSED}
    assert {e.trigger_run_id for e in refusals} == {f"dup-{i}" for i in range(STORM)}
    assert all(e.guard.run_id == "winner" for e in refusals)


async def test_a_graceful_stop_flushes_refusal_counts(sidecar: SidecarProcess, key: str) -> None:
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        await acquire(stub, key, run_id="winner")
        for i in range(5):
            await acquire(stub, key, run_id=f"dup-{i}")
    assert sidecar.terminate() == 0
    sidecar.start()
    async with aio.insecure_channel(sidecar.address) as channel:
        guard = await pb_grpc.TaskGuardStub(channel).GetGuard(pb.GetGuardRequest(task_key=key))
    assert guard.duplicate_count == 5
