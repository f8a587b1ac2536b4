"""TTL, renewal, approve-retry, force-release and fencing, over real gRPC."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.support import InProcess, acquire, seconds, watch_until

pytestmark = pytest.mark.backends("sqlite", "etcd")


async def _rpc_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call  # type: ignore[misc]
    return error.value


async def _guard(stub: pb_grpc.TaskGuardStub, key: str) -> pb.Guard:
    guard: pb.Guard = await stub.GetGuard(pb.GetGuardRequest(task_key=key))
    return guard


async def test_a_lease_not_renewed_expires_and_the_key_is_free_again(in_process: InProcess, key: str) -> None:
    stub = in_process.stub
    held = await acquire(stub, key, ttl_s=0.3)
    events = await watch_until(
        stub,
        lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_EXPIRED for e in seen),
        key_prefix=key,
        start_revision=held.guard.revision,
    )
    assert [e.type for e in events] == [pb.GUARD_EVENT_TYPE_ACQUIRED, pb.GUARD_EVENT_TYPE_EXPIRED]
    assert (await _guard(stub, key)).state == pb.GUARD_STATE_EXPIRED
    error = await _rpc_error(stub.Renew(pb.RenewRequest(lease_id=held.lease_id)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "lease_id: lease lost: the guard expired at" in (error.details() or "")
    error = await _rpc_error(stub.Release(pb.ReleaseRequest(lease_id=held.lease_id, status=pb.RUN_STATUS_SUCCEEDED)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    again = await acquire(stub, key)
    assert again.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
    assert again.guard.fencing_token == held.guard.fencing_token + 1


async def test_renewal_moves_the_deadline_and_keeps_the_guard(manual: InProcess, key: str) -> None:
    stub = manual.stub
    held = await acquire(stub, key, ttl_s=10)
    await manual.advance(8)
    renewed = (await stub.Renew(pb.RenewRequest(lease_id=held.lease_id))).guard
    assert renewed.expires_at.ToDatetime() > held.guard.expires_at.ToDatetime()
    assert renewed.revision > held.guard.revision
    await manual.advance(8)  # 16 s after acquiring, 8 s after renewing
    assert (await _guard(stub, key)).state == pb.GUARD_STATE_RUNNING
    assert (await acquire(stub, key)).outcome == pb.ACQUIRE_OUTCOME_ALREADY_RUNNING
    longer = (await stub.Renew(pb.RenewRequest(lease_id=held.lease_id, ttl=seconds(100)))).guard
    assert longer.ttl.seconds == 100
    await manual.advance(50)
    assert (await _guard(stub, key)).state == pb.GUARD_STATE_RUNNING


async def test_an_expired_lease_heals_on_the_next_acquire_even_before_the_sweeper(manual: InProcess, key: str) -> None:
    stub = manual.stub
    held = await acquire(stub, key, ttl_s=5)
    manual.manual_clock.advance(6)  # no poke: the sweeper has not looked yet
    taken = await acquire(stub, key)
    assert taken.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
    assert taken.guard.fencing_token == held.guard.fencing_token + 1


async def test_failed_task_needs_approval_and_one_approval_admits_exactly_one_run(
    in_process: InProcess, key: str
) -> None:
    stub = in_process.stub
    failed_run = await acquire(stub, key, run_id="run-1")
    await stub.Release(pb.ReleaseRequest(lease_id=failed_run.lease_id, status=pb.RUN_STATUS_FAILED, detail="exit 3"))
    for attempt in range(3):
        refused = await acquire(stub, key, run_id=f"retry-{attempt}")
        assert refused.outcome == pb.ACQUIRE_OUTCOME_RETRY_REQUIRES_APPROVAL
        assert refused.lease_id == ""
        assert (refused.guard.run_id, refused.guard.last_detail) == ("run-1", "exit 3")
        assert refused.guard.HasField("released_at")
    approved = (await stub.ApproveRetry(pb.ApproveRetryRequest(task_key=key, approver="ops", reason="fixed"))).guard
    assert approved.state == pb.GUARD_STATE_RETRY_APPROVED
    racers = await asyncio.gather(*(acquire(stub, key, run_id=f"racer-{i}") for i in range(2)))
    assert sorted(r.outcome for r in racers) == [pb.ACQUIRE_OUTCOME_ACQUIRED, pb.ACQUIRE_OUTCOME_ALREADY_RUNNING]
    winner = next(r for r in racers if r.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED)
    assert winner.guard.approved_by == "ops"
    await stub.Release(pb.ReleaseRequest(lease_id=winner.lease_id, status=pb.RUN_STATUS_FAILED))
    assert (await acquire(stub, key)).outcome == pb.ACQUIRE_OUTCOME_RETRY_REQUIRES_APPROVAL


async def test_approve_retry_of_a_guard_not_waiting_for_one_is_failed_precondition(
    in_process: InProcess, key: str
) -> None:
    stub = in_process.stub
    await acquire(stub, key)
    error = await _rpc_error(stub.ApproveRetry(pb.ApproveRetryRequest(task_key=key, approver="ops")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == "task_key: guard is RUNNING, not waiting for a retry approval"
    error = await _rpc_error(stub.ApproveRetry(pb.ApproveRetryRequest(task_key=key + "-never", approver="ops")))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_abandoned_and_expired_guards_need_approval_when_policy_says_so(
    in_process_factory: object, key: str
) -> None:
    harness: InProcess = await in_process_factory(expired_requires_approval=True)  # type: ignore[operator]
    stub = harness.stub
    held = await acquire(stub, key, ttl_s=0.2)
    await watch_until(
        stub,
        lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_EXPIRED for e in seen),
        key_prefix=key,
        start_revision=held.guard.revision,
    )
    assert (await acquire(stub, key)).outcome == pb.ACQUIRE_OUTCOME_RETRY_REQUIRES_APPROVAL
    await stub.ApproveRetry(pb.ApproveRetryRequest(task_key=key, approver="ops"))
    assert (await acquire(stub, key)).outcome == pb.ACQUIRE_OUTCOME_ACQUIRED


async def test_force_release_frees_a_stuck_guard_and_the_old_lease_stops_working(
    in_process: InProcess, key: str
) -> None:
    stub = in_process.stub
    stuck = await acquire(stub, key, ttl_s=3600)
    released = (
        await stub.ForceRelease(pb.ForceReleaseRequest(task_key=key, operator="alice", reason="hung on a pipe"))
    ).guard
    assert released.state == pb.GUARD_STATE_CANCELLED
    assert released.released_by == "alice"
    assert released.last_detail == "hung on a pipe"
    for call in (
        stub.Renew(pb.RenewRequest(lease_id=stuck.lease_id)),
        stub.Release(pb.ReleaseRequest(lease_id=stuck.lease_id, status=pb.RUN_STATUS_CANCELLED)),
    ):
        error = await _rpc_error(call)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "force-released by alice: hung on a pipe" in (error.details() or "")
    assert (await acquire(stub, key)).outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
    error = await _rpc_error(stub.ForceRelease(pb.ForceReleaseRequest(task_key=key + "-x", operator="alice")))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_check_fence_is_valid_only_while_the_token_holds_the_guard(in_process: InProcess, key: str) -> None:
    stub = in_process.stub
    first = await acquire(stub, key)
    token = first.guard.fencing_token

    async def valid(fencing_token: int) -> bool:
        response = await stub.CheckFence(pb.CheckFenceRequest(task_key=key, fencing_token=fencing_token))
        return bool(response.valid)

    assert await valid(token)
    assert not await valid(token + 1)
    await stub.ForceRelease(pb.ForceReleaseRequest(task_key=key, operator="ops"))
    assert not await valid(token)
    second = await acquire(stub, key)
    assert await valid(second.guard.fencing_token)
    assert not await valid(token)
    unknown = await stub.CheckFence(pb.CheckFenceRequest(task_key=key + "-never", fencing_token=1))
    assert not unknown.valid and not unknown.HasField("guard")
