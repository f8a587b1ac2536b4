"""The streaming lease: Hold over real gRPC."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc import aio

from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.support import InProcess, SidecarProcess, acquire, seconds, watch_until

pytestmark = pytest.mark.backends("sqlite", "etcd")

TIMEOUT_S = 10.0


def _acquire_message(task_key: str, ttl_s: float | None = None, **fields: Any) -> pb.HoldRequest:
    request = pb.AcquireRequest(task_key=task_key, **fields)
    if ttl_s is not None:
        request.ttl.CopyFrom(seconds(ttl_s))
    return pb.HoldRequest(acquire=request)


async def _open(stub: pb_grpc.TaskGuardStub, first: pb.HoldRequest) -> tuple[Any, pb.HoldResponse]:
    call = stub.Hold()
    await call.write(first)
    response = await asyncio.wait_for(call.read(), TIMEOUT_S)
    assert response.event == pb.HOLD_EVENT_ACQUIRE_RESULT
    return call, response


def _saw(event_type: int) -> Any:
    return lambda events: any(e.type == event_type for e in events)


async def test_hold_acquires_heartbeats_and_releases(in_process: InProcess, key: str) -> None:
    call, first = await _open(in_process.stub, _acquire_message(key, holder="worker"))
    assert first.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
    assert first.guard.stream_bound and not first.guard.HasField("expires_at")
    await call.write(pb.HoldRequest(heartbeat=pb.Heartbeat()))
    ack = await asyncio.wait_for(call.read(), TIMEOUT_S)
    assert ack.event == pb.HOLD_EVENT_HEARTBEAT_ACK and ack.guard.state == pb.GUARD_STATE_RUNNING
    await call.write(pb.HoldRequest(release=pb.HoldRelease(status=pb.RUN_STATUS_SUCCEEDED, detail="ok")))
    released = await asyncio.wait_for(call.read(), TIMEOUT_S)
    assert released.event == pb.HOLD_EVENT_RELEASED and released.guard.state == pb.GUARD_STATE_SUCCEEDED
    assert await asyncio.wait_for(call.read(), TIMEOUT_S) == aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_a_refused_hold_is_answered_and_the_stream_ends(in_process: InProcess, key: str) -> None:
    winner = await acquire(in_process.stub, key, run_id="winner")
    call, refused = await _open(in_process.stub, _acquire_message(key, run_id="late"))
    assert refused.outcome == pb.ACQUIRE_OUTCOME_ALREADY_RUNNING
    assert refused.guard.run_id == winner.guard.run_id and refused.lease_id == ""
    assert await asyncio.wait_for(call.read(), TIMEOUT_S) == aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_a_cancelled_hold_stream_abandons_its_guard(in_process: InProcess, key: str) -> None:
    call, held = await _open(in_process.stub, _acquire_message(key))
    call.cancel()
    events = await watch_until(
        in_process.stub, _saw(pb.GUARD_EVENT_TYPE_ABANDONED), key_prefix=key, start_revision=held.guard.revision
    )
    abandoned = events[-1].guard
    assert abandoned.state == pb.GUARD_STATE_ABANDONED
    assert "Hold stream ended without a release" in abandoned.last_detail
    assert (await acquire(in_process.stub, key)).outcome == pb.ACQUIRE_OUTCOME_ACQUIRED


async def test_a_hold_half_closed_without_release_abandons_its_guard(in_process: InProcess, key: str) -> None:
    call, held = await _open(in_process.stub, _acquire_message(key))
    await call.done_writing()
    assert await asyncio.wait_for(call.read(), TIMEOUT_S) == aio.EOF
    guard = await in_process.stub.GetGuard(pb.GetGuardRequest(task_key=key))
    if guard.state != pb.GUARD_STATE_ABANDONED:
        await watch_until(
            in_process.stub, _saw(pb.GUARD_EVENT_TYPE_ABANDONED), key_prefix=key, start_revision=held.guard.revision
        )


async def test_a_hold_with_a_ttl_needs_heartbeats(manual: InProcess, key: str) -> None:
    call, held = await _open(manual.stub, _acquire_message(key, ttl_s=10))
    assert held.guard.HasField("expires_at")
    for _ in range(3):
        await manual.advance(7)
        await call.write(pb.HoldRequest(heartbeat=pb.Heartbeat()))
        ack = await asyncio.wait_for(call.read(), TIMEOUT_S)
        assert ack.event == pb.HOLD_EVENT_HEARTBEAT_ACK
    await manual.advance(11)
    lost = await asyncio.wait_for(call.read(), TIMEOUT_S)
    assert lost.event == pb.HOLD_EVENT_LOST and lost.guard.state == pb.GUARD_STATE_EXPIRED
    assert await call.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "lease lost: the guard expired" in (await call.details() or "")


async def test_force_release_tells_the_holding_stream_it_lost_the_guard(in_process: InProcess, key: str) -> None:
    call, _ = await _open(in_process.stub, _acquire_message(key))
    await in_process.stub.ForceRelease(pb.ForceReleaseRequest(task_key=key, operator="ops", reason="stuck"))
    lost = await asyncio.wait_for(call.read(), TIMEOUT_S)
    assert lost.event == pb.HOLD_EVENT_LOST and lost.guard.state == pb.GUARD_STATE_CANCELLED
    assert await call.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "force-released by ops: stuck" in (await call.details() or "")


async def test_a_joined_hold_receives_the_winners_final_guard(in_process: InProcess, key: str) -> None:
    winner_call, winner = await _open(in_process.stub, _acquire_message(key, run_id="winner"))
    join_call, joined = await _open(
        in_process.stub, _acquire_message(key, run_id="dup", on_conflict=pb.ON_CONFLICT_JOIN)
    )
    assert joined.outcome == pb.ACQUIRE_OUTCOME_ALREADY_RUNNING and joined.guard.run_id == "winner"
    await winner_call.write(pb.HoldRequest(release=pb.HoldRelease(status=pb.RUN_STATUS_FAILED, detail="exit 2")))
    assert (await asyncio.wait_for(winner_call.read(), TIMEOUT_S)).event == pb.HOLD_EVENT_RELEASED
    final = await asyncio.wait_for(join_call.read(), TIMEOUT_S)
    assert final.event == pb.HOLD_EVENT_WINNER_FINISHED
    assert (final.guard.run_id, final.guard.state, final.guard.last_detail) == (
        "winner",
        pb.GUARD_STATE_FAILED,
        "exit 2",
    )
    assert await join_call.code() == grpc.StatusCode.OK
    assert winner.guard.fencing_token == final.guard.fencing_token


async def test_a_hold_with_the_run_id_of_a_unary_lease_takes_it_over(in_process: InProcess, key: str) -> None:
    unary = await acquire(in_process.stub, key, run_id="plugin-run", ttl_s=30)
    call, taken = await _open(in_process.stub, _acquire_message(key, run_id="plugin-run"))
    assert taken.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
    assert taken.lease_id == unary.lease_id
    assert taken.guard.fencing_token == unary.guard.fencing_token
    assert taken.guard.stream_bound and not taken.guard.HasField("expires_at")
    call.cancel()
    await watch_until(
        in_process.stub, _saw(pb.GUARD_EVENT_TYPE_ABANDONED), key_prefix=key, start_revision=taken.guard.revision
    )


@pytest.mark.parametrize(
    "first",
    [pb.HoldRequest(heartbeat=pb.Heartbeat()), pb.HoldRequest(release=pb.HoldRelease(status=1)), pb.HoldRequest()],
    ids=["heartbeat", "release", "empty"],
)
async def test_a_hold_must_start_with_acquire_or_resume(in_process: InProcess, first: pb.HoldRequest) -> None:
    call = in_process.stub.Hold()
    await call.write(first)
    assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await call.details() == "request: the first Hold message must be acquire or resume"


async def test_hold_resumes_after_a_sidecar_restart_and_keeps_its_token(sidecar: SidecarProcess, key: str) -> None:
    async with aio.insecure_channel(sidecar.address) as channel:
        call, held = await _open(pb_grpc.TaskGuardStub(channel), _acquire_message(key))
        sidecar.kill()
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(call.read(), TIMEOUT_S)
    sidecar.start()
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        guard = await stub.GetGuard(pb.GetGuardRequest(task_key=key))
        assert guard.state == pb.GUARD_STATE_RUNNING
        call, resumed = await _open(stub, pb.HoldRequest(resume=pb.ResumeRequest(lease_id=held.lease_id)))
        assert resumed.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
        assert resumed.guard.fencing_token == held.guard.fencing_token
        assert resumed.lease_id == held.lease_id
        await call.write(pb.HoldRequest(release=pb.HoldRelease(status=pb.RUN_STATUS_SUCCEEDED)))
        assert (await asyncio.wait_for(call.read(), TIMEOUT_S)).guard.state == pb.GUARD_STATE_SUCCEEDED


async def test_a_holder_that_does_not_resume_after_a_restart_is_abandoned_after_the_grace(
    sidecar_factory: Any, key: str, store_backend: str
) -> None:
    sidecar: SidecarProcess = sidecar_factory("--resume-grace", "0.5s")
    async with aio.insecure_channel(sidecar.address) as channel:
        _, held = await _open(pb_grpc.TaskGuardStub(channel), _acquire_message(key))
        sidecar.kill()
    sidecar.start()
    async with aio.insecure_channel(sidecar.address) as channel:
        events = await watch_until(
            pb_grpc.TaskGuardStub(channel),
            _saw(pb.GUARD_EVENT_TYPE_ABANDONED),
            key_prefix=key,
            start_revision=held.guard.revision,
        )
    assert events[-1].guard.state == pb.GUARD_STATE_ABANDONED
    if store_backend == "etcd":
        # Shared by many sidecars, the store cannot tell a dead sidecar's streams from a live one's by a
        # restart here: the dead one's etcd lease (2 s in these tests) runs out, and that abandons them.
        assert "the sidecar that held its Hold stream is gone" in events[-1].guard.last_detail
    else:
        assert "did not resume within 0.5s" in events[-1].guard.last_detail
