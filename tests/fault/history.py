"""Record what clients were told, then check it against the sidecar's event log.

A small checker in the spirit of etcd's robustness tests: clients log every
acknowledged answer; after each crash and restart, the store's event log must
explain all of them.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import grpc
from grpc import aio

from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.support import SidecarProcess, acquire, watch_until

_STATE_CHANGES = {
    pb.GUARD_EVENT_TYPE_ACQUIRED,
    pb.GUARD_EVENT_TYPE_RELEASED,
    pb.GUARD_EVENT_TYPE_EXPIRED,
    pb.GUARD_EVENT_TYPE_ABANDONED,
    pb.GUARD_EVENT_TYPE_FORCE_RELEASED,
    pb.GUARD_EVENT_TYPE_RETRY_APPROVED,
}


@dataclass(frozen=True)
class Ack:
    """One answer a client received."""

    task_key: str
    kind: str  # "acquired" | "refused" | "released" | "renewed" | "approved"
    run_id: str
    fencing_token: int
    status: int = 0


@dataclass
class History:
    acks: list[Ack] = field(default_factory=list)
    # Every status a live sidecar answered with, OK included: INTERNAL or UNKNOWN is a bug whatever the load.
    codes: Counter[grpc.StatusCode] = field(default_factory=Counter)
    target: int = 0
    reached: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, ack: Ack) -> None:
        self.acks.append(ack)
        if len(self.acks) >= self.target:
            self.reached.set()

    def expect(self, more: int) -> asyncio.Event:
        self.target = len(self.acks) + more
        self.reached = asyncio.Event()
        return self.reached


async def client_loop(
    stub: pb_grpc.TaskGuardStub, task_key: str, history: History, seed: int, approvals: bool = False
) -> None:
    """Acquire, maybe renew, release, again, until the sidecar goes away.

    With ``approvals`` runs also fail, and a client refused for want of an
    approval approves the retry itself (racing the others to it).
    """
    rng = random.Random(seed)
    statuses = (pb.RUN_STATUS_SUCCEEDED, pb.RUN_STATUS_CANCELLED) + ((pb.RUN_STATUS_FAILED,) if approvals else ())
    try:
        while True:
            run_id = uuid.uuid4().hex
            response = await acquire(stub, task_key, ttl_s=600, run_id=run_id, holder=f"client-{seed}")
            history.codes[grpc.StatusCode.OK] += 1
            if response.outcome == pb.ACQUIRE_OUTCOME_RETRY_REQUIRES_APPROVAL:
                history.record(Ack(task_key, "refused", response.guard.run_id, response.guard.fencing_token))
                await _approve(stub, task_key, response.guard, history, seed)
                continue
            if response.outcome != pb.ACQUIRE_OUTCOME_ACQUIRED:
                history.record(Ack(task_key, "refused", response.guard.run_id, response.guard.fencing_token))
                continue
            history.record(Ack(task_key, "acquired", run_id, response.guard.fencing_token))
            if rng.random() < 0.3:
                await stub.Renew(pb.RenewRequest(lease_id=response.lease_id), timeout=10)
                history.codes[grpc.StatusCode.OK] += 1
                history.record(Ack(task_key, "renewed", run_id, response.guard.fencing_token))
            status = rng.choice(statuses)
            await stub.Release(pb.ReleaseRequest(lease_id=response.lease_id, status=status), timeout=10)
            history.codes[grpc.StatusCode.OK] += 1
            history.record(Ack(task_key, "released", run_id, response.guard.fencing_token, status))
    except grpc.aio.AioRpcError as error:
        history.codes[error.code()] += 1
        if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            raise


async def _approve(stub: pb_grpc.TaskGuardStub, task_key: str, failed: pb.Guard, history: History, seed: int) -> None:
    request = pb.ApproveRetryRequest(task_key=task_key, approver=f"client-{seed}", reason="crash loop")
    try:
        await stub.ApproveRetry(request, timeout=10)
    except grpc.aio.AioRpcError as error:
        if error.code() is not grpc.StatusCode.FAILED_PRECONDITION:
            raise
        history.codes[error.code()] += 1  # another client approved it first
        return
    history.codes[grpc.StatusCode.OK] += 1
    history.record(Ack(task_key, "approved", failed.run_id, failed.fencing_token))


async def event_log(stub: pb_grpc.TaskGuardStub, sentinel_key: str) -> list[pb.GuardEvent]:
    """Every retained event, from revision 1 to the head (found by committing a sentinel)."""
    head = (await acquire(stub, sentinel_key, run_id=uuid.uuid4().hex)).guard.revision
    return await watch_until(stub, lambda seen: bool(seen) and seen[-1].revision >= head, start_revision=1)


def check(history: History, events: list[pb.GuardEvent]) -> None:
    """Every acknowledged answer is explained by the log, and the log never shows two runs at once."""
    revisions = [event.revision for event in events]
    assert revisions == sorted(set(revisions)), "revisions must rise strictly"
    acquired: dict[str, dict[str, int]] = defaultdict(dict)
    released: dict[str, dict[str, int]] = defaultdict(dict)
    renewed: dict[str, set[str]] = defaultdict(set)
    approved: dict[str, set[str]] = defaultdict(set)
    running: dict[str, str | None] = {}
    last_token: dict[str, int] = defaultdict(int)
    for event in events:
        guard = event.guard
        if event.type not in _STATE_CHANGES:
            if event.type == pb.GUARD_EVENT_TYPE_RENEWED:
                renewed[guard.task_key].add(guard.run_id)
            continue
        key = guard.task_key
        if event.type == pb.GUARD_EVENT_TYPE_ACQUIRED:
            assert running.get(key) is None, f"{key}: run {guard.run_id} acquired while {running[key]} ran"
            assert guard.fencing_token > last_token[key], f"{key}: fencing token did not rise"
            last_token[key] = guard.fencing_token
            running[key] = guard.run_id
            acquired[key][guard.run_id] = guard.fencing_token
        else:
            if running.get(key) == guard.run_id:
                running[key] = None
            if event.type == pb.GUARD_EVENT_TYPE_RELEASED:
                released[key][guard.run_id] = guard.last_status
            if event.type == pb.GUARD_EVENT_TYPE_RETRY_APPROVED:
                approved[key].add(guard.run_id)
    for ack in history.acks:
        key = ack.task_key
        if ack.kind in ("acquired", "refused"):
            assert acquired[key].get(ack.run_id) == ack.fencing_token, f"lost acknowledged acquisition: {ack}"
        elif ack.kind == "renewed":
            assert ack.run_id in renewed[key], f"lost acknowledged renewal: {ack}"
        elif ack.kind == "released":
            assert released[key].get(ack.run_id) == ack.status, f"lost acknowledged release: {ack}"
        elif ack.kind == "approved":
            assert ack.run_id in approved[key], f"lost acknowledged approval: {ack}"


async def crash_cycle(
    sidecar: SidecarProcess,
    keys: list[str],
    history: History,
    *,
    acks: int,
    clients_per_key: int,
    seed: int,
    approvals: bool = False,
) -> None:
    """Load the sidecar until ``acks`` more answers came back, SIGKILL it, restart it, check the log."""
    reached = history.expect(acks)
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        clients = [
            asyncio.ensure_future(client_loop(stub, key, history, seed=seed * 1000 + i, approvals=approvals))
            for i, key in enumerate(keys * clients_per_key)
        ]
        await asyncio.wait_for(reached.wait(), 30)
        sidecar.kill()
        await asyncio.wait_for(asyncio.gather(*clients), 30)
    sidecar.start()
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        check(history, await event_log(stub, f"{keys[0]}-sentinel-{seed}"))
        # Runs cut off by the kill hold their keys until their TTL; an operator frees them.
        for key in keys:
            guard = await stub.GetGuard(pb.GetGuardRequest(task_key=key))
            if guard.state == pb.GUARD_STATE_RUNNING:
                await stub.ForceRelease(pb.ForceReleaseRequest(task_key=key, operator="crash-loop"))
