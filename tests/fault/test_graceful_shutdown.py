"""SIGTERM: stop accepting, end streams so clients resume, flush, close cleanly."""

from __future__ import annotations

import asyncio
import sqlite3

import grpc
from grpc import aio

from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.support import SidecarProcess, acquire, open_watch

TIMEOUT_S = 10.0


async def test_sigterm_ends_streams_with_unavailable_and_keeps_held_guards_for_a_resume(
    sidecar: SidecarProcess, key: str
) -> None:
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        hold = stub.Hold()
        await hold.write(pb.HoldRequest(acquire=pb.AcquireRequest(task_key=key)))
        held = await asyncio.wait_for(hold.read(), TIMEOUT_S)
        watch = await open_watch(stub, key_prefix=key)
        await acquire(stub, key + "/other")
        seen = await asyncio.wait_for(watch.read(), TIMEOUT_S)
        for _ in range(3):
            await acquire(stub, key, run_id="duplicate")  # refusals waiting in memory for a batch
        code = await asyncio.to_thread(sidecar.terminate)
        assert code == 0
        for call in (hold, watch):
            assert await asyncio.wait_for(call.code(), TIMEOUT_S) == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in (await call.details() or "")
    assert "shutting down" in sidecar.log()
    # Closed cleanly: the WAL was checkpointed into the main file.
    assert not sidecar.db.with_name(sidecar.db.name + "-wal").exists() or (
        sidecar.db.with_name(sidecar.db.name + "-wal").stat().st_size == 0
    )
    with sqlite3.connect(sidecar.db) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    sidecar.start()
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        guard = await stub.GetGuard(pb.GetGuardRequest(task_key=key))
        assert guard.state == pb.GUARD_STATE_RUNNING and guard.duplicate_count == 3
        resumed_call = stub.Hold()
        await resumed_call.write(pb.HoldRequest(resume=pb.ResumeRequest(lease_id=held.lease_id)))
        resumed = await asyncio.wait_for(resumed_call.read(), TIMEOUT_S)
        assert resumed.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
        assert resumed.guard.fencing_token == held.guard.fencing_token
        events = stub.WatchGuards(pb.WatchGuardsRequest(key_prefix=key, start_revision=seen.revision + 1))
        replayed = await asyncio.wait_for(events.read(), TIMEOUT_S)
        assert replayed.type == pb.GUARD_EVENT_TYPE_DUPLICATE_REFUSED
        events.cancel()
        resumed_call.cancel()
