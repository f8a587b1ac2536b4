"""Bad input on a Hold stream changes nothing: a rejected message leaves the run held, a silent stream ends."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from grpc import aio

from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.support import InProcess, SidecarProcess, acquire

TIMEOUT_S = 10.0

BAD_SECOND_MESSAGES = {
    "a release with an unknown status": pb.HoldRequest(release=pb.HoldRelease(status=pb.RunStatus.ValueType(99))),
    "a release without a status": pb.HoldRequest(release=pb.HoldRelease()),
    "a second acquire": pb.HoldRequest(acquire=pb.AcquireRequest(task_key="other::job")),
    "a resume": pb.HoldRequest(resume=pb.ResumeRequest(lease_id="x")),
    "an empty message": pb.HoldRequest(),
}


async def _held(stub: pb_grpc.TaskGuardStub, key: str) -> tuple[Any, pb.HoldResponse]:
    call = stub.Hold()
    await call.write(pb.HoldRequest(acquire=pb.AcquireRequest(task_key=key, holder="worker")))
    first = await asyncio.wait_for(call.read(), TIMEOUT_S)
    assert first.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
    return call, first


async def _status(call: Any) -> tuple[grpc.StatusCode, str]:
    code = await asyncio.wait_for(call.code(), TIMEOUT_S)
    return code, await call.details()


@pytest.mark.parametrize("message", BAD_SECOND_MESSAGES.values(), ids=BAD_SECOND_MESSAGES.keys())
async def test_a_rejected_hold_message_leaves_the_run_held_for_its_holder_to_resume(
    sidecar_factory: Any, key: str, message: pb.HoldRequest
) -> None:
    # Operators must approve an abandoned run here: a rejected message must not cost the task one.
    sidecar: SidecarProcess = sidecar_factory("--abandoned-requires-approval")
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        call, held = await _held(stub, key)
        await call.write(message)
        code, details = await _status(call)
        assert code is grpc.StatusCode.INVALID_ARGUMENT, details
        guard = await stub.GetGuard(pb.GetGuardRequest(task_key=key))
        assert guard.state == pb.GUARD_STATE_RUNNING and guard.run_id == held.guard.run_id
        # Nobody else gets it meanwhile.
        refused = await acquire(stub, key)
        assert refused.outcome == pb.ACQUIRE_OUTCOME_ALREADY_RUNNING
        resumed = stub.Hold()
        await resumed.write(pb.HoldRequest(resume=pb.ResumeRequest(lease_id=held.lease_id)))
        again = await asyncio.wait_for(resumed.read(), TIMEOUT_S)
        assert again.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED and again.lease_id == held.lease_id
        await resumed.write(pb.HoldRequest(release=pb.HoldRelease(status=pb.RUN_STATUS_SUCCEEDED)))
        released = await asyncio.wait_for(resumed.read(), TIMEOUT_S)
        assert released.guard.state == pb.GUARD_STATE_SUCCEEDED


async def test_a_holder_that_never_resumes_after_a_rejected_message_is_abandoned_after_the_grace(
    in_process_factory: Any, key: str
) -> None:
    sidecar: InProcess = await in_process_factory(resume_grace_s=0.2)
    call, held = await _held(sidecar.stub, key)
    await call.write(BAD_SECOND_MESSAGES["a second acquire"])
    assert (await _status(call))[0] is grpc.StatusCode.INVALID_ARGUMENT
    events = sidecar.stub.WatchGuards(pb.WatchGuardsRequest(key_prefix=key, start_revision=held.guard.revision))
    try:
        async for event in events:
            if event.type == pb.GUARD_EVENT_TYPE_ABANDONED:
                assert "did not resume within 0.2s after its Hold stream was ended" in event.guard.last_detail
                break
    finally:
        events.cancel()


async def test_a_hold_stream_that_never_sends_its_first_message_is_ended(in_process_factory: Any) -> None:
    sidecar: InProcess = await in_process_factory(hold_first_message_timeout_s=0.3)
    silent = [sidecar.stub.Hold() for _ in range(20)]
    for call in silent:
        code, details = await _status(call)
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert details == "request: the first Hold message (acquire or resume) must arrive within 0.3s"
