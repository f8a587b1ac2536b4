"""Clients that race each other on a few keys: every answer is one the state gives, never INTERNAL.

The lease calls (Renew, Release, a Hold's heartbeat) find their guard by lease
id before they queue on the key, so the guard can change while they wait
(tests/unit/test_engine_races.py makes that happen in one order every time;
here many clients make it happen at random, with expiries, abandoned streams,
force-releases and approvals in between).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc import aio

from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.fault.history import Ack, History, check, event_log
from tests.support import SidecarProcess, acquire, seconds

pytestmark = pytest.mark.backends("sqlite", "etcd")

# What a racing call may be told: the answer, or a refusal the state explains.
ANSWERS_THE_STATE_GIVES = {grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND}
STATUSES = (pb.RUN_STATUS_SUCCEEDED, pb.RUN_STATUS_FAILED, pb.RUN_STATUS_CANCELLED)


async def _code(call: Awaitable[Any]) -> tuple[grpc.StatusCode, Any]:
    try:
        return grpc.StatusCode.OK, await call
    except aio.AioRpcError as error:
        return error.code(), error


async def _send(call: Any, message: pb.HoldRequest) -> bool:
    """Write to a Hold stream; False when the stream ended first.

    A write that loses that race fails inside grpc's client, which then
    reports a status of its own (INTERNAL "Internal error from Core"), not
    the sidecar's answer: such a call has nothing to say about the sidecar.
    """
    try:
        await call.write(message)
    except (aio.AioRpcError, aio.UsageError, asyncio.InvalidStateError):
        return False
    return True


class Racer:
    """One client doing random things to a few keys, recording what it was told."""

    def __init__(self, stub: pb_grpc.TaskGuardStub, keys: list[str], history: History, seed: int) -> None:
        self.stub = stub
        self.keys = keys
        self.history = history
        self.rng = random.Random(seed)
        self.name = f"racer-{seed}"
        # Leases this racer was given, current or long gone: it uses them at random, like a confused client.
        self.leases: list[tuple[str, str, str, int]] = []
        self.answers: list[tuple[str, grpc.StatusCode, str]] = []

    def _note(self, operation: str, code: grpc.StatusCode, result: Any) -> None:
        details = result.details() if isinstance(result, aio.AioRpcError) else ""
        self.answers.append((operation, code, details))

    async def run(self, operations: int) -> None:
        actions: list[Callable[[], Awaitable[None]]] = [
            self.acquire,
            self.acquire,
            self.renew,
            self.release,
            self.release,
            self.hold,
            self.force_release,
            self.approve_retry,
        ]
        for _ in range(operations):
            await self.rng.choice(actions)()

    async def acquire(self) -> None:
        key = self.rng.choice(self.keys)
        run_id = uuid.uuid4().hex
        # Short TTLs expire while others renew them: healing races too.
        ttl = self.rng.choice((0.05, 0.3, 600.0))
        code, response = await _code(acquire(self.stub, key, ttl_s=ttl, run_id=run_id, holder=self.name))
        self._note("Acquire", code, response)
        if code is not grpc.StatusCode.OK:
            return
        if response.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED:
            self.history.record(Ack(key, "acquired", run_id, response.guard.fencing_token))
            self.leases.append((key, response.lease_id, run_id, response.guard.fencing_token))
        else:
            self.history.record(Ack(key, "refused", response.guard.run_id, response.guard.fencing_token))

    def _some_lease(self) -> tuple[str, str, str, int] | None:
        return self.rng.choice(self.leases) if self.leases else None

    async def renew(self) -> None:
        lease = self._some_lease()
        if lease is None:
            return
        key, lease_id, run_id, token = lease
        request = pb.RenewRequest(lease_id=lease_id)
        if self.rng.random() < 0.5:
            request.ttl.CopyFrom(seconds(self.rng.choice((0.3, 600.0))))
        code, response = await _code(self.stub.Renew(request, timeout=10))
        self._note("Renew", code, response)
        if code is grpc.StatusCode.OK:
            self.history.record(Ack(key, "renewed", run_id, token))

    async def release(self) -> None:
        lease = self._some_lease()
        if lease is None:
            return
        key, lease_id, run_id, token = lease
        status = self.rng.choice(STATUSES)
        request = pb.ReleaseRequest(lease_id=lease_id, status=status, detail="raced")
        code, response = await _code(self.stub.Release(request, timeout=10))
        self._note("Release", code, response)
        if code is grpc.StatusCode.OK:
            self.history.record(Ack(key, "released", run_id, token, status))

    async def hold(self) -> None:
        try:
            await self._hold()
        except aio.AioRpcError as error:  # a read found the stream ended with the sidecar's status
            self.answers.append(("Hold", error.code(), error.details() or ""))

    async def _hold(self) -> None:
        key = self.rng.choice(self.keys)
        run_id = uuid.uuid4().hex
        call = self.stub.Hold(timeout=10)
        request = pb.HoldRequest(acquire=pb.AcquireRequest(task_key=key, run_id=run_id, holder=self.name))
        if not await _send(call, request):
            return
        first = await call.read()
        if first is aio.EOF or first.outcome != pb.ACQUIRE_OUTCOME_ACQUIRED:
            if first is not aio.EOF:
                self.history.record(Ack(key, "refused", first.guard.run_id, first.guard.fencing_token))
            self.answers.append(("Hold", await call.code(), await call.details()))
            return
        token = first.guard.fencing_token
        self.history.record(Ack(key, "acquired", run_id, token))
        self.leases.append((key, first.lease_id, run_id, token))
        for _ in range(self.rng.randint(0, 3)):
            if not await _send(call, pb.HoldRequest(heartbeat=pb.Heartbeat())):
                return
            answer = await call.read()
            if answer is aio.EOF or answer.event != pb.HOLD_EVENT_HEARTBEAT_ACK:
                # Lost (force-released, expired): the stream ends with the sidecar's reason.
                self.answers.append(("Hold", await call.code(), await call.details()))
                return
        if self.rng.random() < 0.3:
            call.cancel()  # the holder vanishes: ABANDONED
            return
        status = self.rng.choice(STATUSES)
        if not await _send(call, pb.HoldRequest(release=pb.HoldRelease(status=status))):
            return
        answer = await call.read()
        if answer is not aio.EOF and answer.event == pb.HOLD_EVENT_RELEASED:
            self.history.record(Ack(key, "released", run_id, token, status))
        self.answers.append(("Hold", await call.code(), await call.details()))

    async def force_release(self) -> None:
        request = pb.ForceReleaseRequest(task_key=self.rng.choice(self.keys), operator=self.name, reason="race")
        code, response = await _code(self.stub.ForceRelease(request, timeout=10))
        self._note("ForceRelease", code, response)

    async def approve_retry(self) -> None:
        request = pb.ApproveRetryRequest(task_key=self.rng.choice(self.keys), approver=self.name, reason="race")
        code, response = await _code(self.stub.ApproveRetry(request, timeout=10))
        self._note("ApproveRetry", code, response)


@pytest.mark.slow
@pytest.mark.parametrize("approvals", [False, True], ids=["approvals-off", "abandoned-and-expired-need-approval"])
async def test_random_interleavings_on_few_keys_never_answer_internal_and_the_history_checks_out(
    sidecar_factory: Callable[..., SidecarProcess], approvals: bool
) -> None:
    flags = ("--abandoned-requires-approval", "--expired-requires-approval") if approvals else ()
    sidecar = sidecar_factory(*flags)
    keys = [f"t-{uuid.uuid4().hex}::hot-{i}" for i in range(3)]
    history = History()
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        racers = [Racer(stub, keys, history, seed) for seed in range(16)]
        await asyncio.wait_for(asyncio.gather(*(racer.run(60) for racer in racers)), 120)
        check(history, await event_log(stub, f"{keys[0]}-sentinel"))
    answers = [answer for racer in racers for answer in racer.answers]
    wrong = [answer for answer in answers if answer[1] not in ANSWERS_THE_STATE_GIVES]
    assert not wrong, f"{len(wrong)} of {len(answers)} answers were not the state's: {wrong[:5]}"
    # Every kind of call was made (whether a renewal finds its lease still held is up to the race).
    assert {"Acquire", "Renew", "Release", "Hold", "ForceRelease", "ApproveRetry"} <= {op for op, _, _ in answers}
    assert {"acquired", "released", "refused"} <= {ack.kind for ack in history.acks}
    assert "Traceback" not in sidecar.log()
