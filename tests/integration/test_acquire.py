"""Acquire and Release over real gRPC against a real sidecar process and SQLite file."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc import aio

from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.support import SidecarProcess, acquire

pytestmark = pytest.mark.backends("sqlite", "etcd")

STORM = 500
CHANNELS = 25


async def test_acquire_storm_on_one_key_has_exactly_one_winner(sidecar: SidecarProcess, key: str) -> None:
    channels = [aio.insecure_channel(sidecar.address) for _ in range(CHANNELS)]
    try:
        stubs = [pb_grpc.TaskGuardStub(channel) for channel in channels]
        responses = await asyncio.gather(
            *(acquire(stubs[i % CHANNELS], key, run_id=f"run-{i}", holder=f"holder-{i}") for i in range(STORM))
        )
        winners = [r for r in responses if r.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED]
        assert len(winners) == 1
        winner = winners[0].guard
        losers = [r for r in responses if r.outcome == pb.ACQUIRE_OUTCOME_ALREADY_RUNNING]
        assert len(losers) == STORM - 1
        for loser in losers:
            assert loser.lease_id == ""
            assert loser.guard.run_id == winner.run_id
            assert loser.guard.started_at == winner.started_at
            assert loser.guard.holder == winner.holder
            assert loser.guard.fencing_token == winner.fencing_token
        guard = await stubs[0].GetGuard(pb.GetGuardRequest(task_key=key))
        assert guard.duplicate_count == STORM - 1
        assert guard.attempt == 1
    finally:
        for channel in channels:
            await channel.close()


async def test_different_keys_do_not_block_each_other(stub: pb_grpc.TaskGuardStub, key: str) -> None:
    responses = await asyncio.gather(*(acquire(stub, f"{key}-{i}") for i in range(50)))
    assert {r.outcome for r in responses} == {pb.ACQUIRE_OUTCOME_ACQUIRED}


async def test_acquire_names_the_key_parts_and_defaults_the_ttl(stub: pb_grpc.TaskGuardStub) -> None:
    response = await acquire(stub, "agent:main:discord::nightly-report", holder="gw-1", labels={"channel": "discord"})
    guard = response.guard
    assert (guard.session_key, guard.task_name) == ("agent:main:discord", "nightly-report")
    assert guard.state == pb.GUARD_STATE_RUNNING
    assert guard.holder == "gw-1"
    assert dict(guard.labels) == {"channel": "discord"}
    assert guard.ttl.seconds == 60  # the server default: unary leases always have one
    assert guard.HasField("expires_at")
    assert len(response.lease_id) >= 32
    assert not guard.stream_bound


async def test_acquire_with_the_holding_run_id_returns_the_same_lease(stub: pb_grpc.TaskGuardStub, key: str) -> None:
    first = await acquire(stub, key, run_id="run-a")
    again = await acquire(stub, key, run_id="run-a")
    assert again.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
    assert again.lease_id == first.lease_id
    assert again.guard.fencing_token == first.guard.fencing_token
    assert again.guard.attempt == 1
    assert again.guard.duplicate_count == 0


async def test_release_is_idempotent_for_the_same_status(stub: pb_grpc.TaskGuardStub, key: str) -> None:
    lease = (await acquire(stub, key)).lease_id
    request = pb.ReleaseRequest(lease_id=lease, status=pb.RUN_STATUS_SUCCEEDED, detail="done")
    first = await stub.Release(request)
    second = await stub.Release(request)
    assert first.guard == second.guard
    assert first.guard.state == pb.GUARD_STATE_SUCCEEDED
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Release(pb.ReleaseRequest(lease_id=lease, status=pb.RUN_STATUS_FAILED))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "status: lease already released with SUCCEEDED" in (error.value.details() or "")


async def test_release_of_a_superseded_lease_with_its_status_still_answers_its_run(
    stub: pb_grpc.TaskGuardStub, key: str
) -> None:
    old = await acquire(stub, key)
    released = await stub.Release(pb.ReleaseRequest(lease_id=old.lease_id, status=pb.RUN_STATUS_SUCCEEDED))
    new = await acquire(stub, key)
    assert new.guard.fencing_token == old.guard.fencing_token + 1
    again = await stub.Release(pb.ReleaseRequest(lease_id=old.lease_id, status=pb.RUN_STATUS_SUCCEEDED))
    assert again.guard.run_id == released.guard.run_id
    assert again.guard.state == pb.GUARD_STATE_SUCCEEDED
    current = await stub.GetGuard(pb.GetGuardRequest(task_key=key))
    assert current.state == pb.GUARD_STATE_RUNNING and current.run_id == new.guard.run_id


async def test_succeeded_and_cancelled_keys_are_free_and_tokens_rise(stub: pb_grpc.TaskGuardStub, key: str) -> None:
    tokens = []
    for status in (pb.RUN_STATUS_SUCCEEDED, pb.RUN_STATUS_CANCELLED, pb.RUN_STATUS_SUCCEEDED):
        response = await acquire(stub, key)
        assert response.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
        tokens.append(response.guard.fencing_token)
        await stub.Release(pb.ReleaseRequest(lease_id=response.lease_id, status=status))
    assert tokens == sorted(set(tokens)) and len(tokens) == 3


async def test_an_unknown_lease_is_not_found(stub: pb_grpc.TaskGuardStub) -> None:
    for call in (
        stub.Renew(pb.RenewRequest(lease_id="no-such-lease")),
        stub.Release(pb.ReleaseRequest(lease_id="no-such-lease", status=pb.RUN_STATUS_SUCCEEDED)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert error.value.details() == "lease_id: no such lease"


async def test_get_guard_of_a_key_never_seen_is_not_found(stub: pb_grpc.TaskGuardStub, key: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.GetGuard(pb.GetGuardRequest(task_key=key))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
