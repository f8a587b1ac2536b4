"""The sidecar killed with SIGKILL under load loses nothing it acknowledged."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from grpc import aio

from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.fault.history import History, crash_cycle
from tests.support import SidecarProcess, acquire

KEYS = 6
CLIENTS_PER_KEY = 3
CYCLES = 4
ACKS_PER_CYCLE = 150


async def test_a_sigkilled_sidecar_keeps_every_acknowledged_transition(
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    sidecar = sidecar_factory()
    keys = [f"t-{uuid.uuid4().hex}::job-{i}" for i in range(KEYS)]
    history = History()
    for cycle in range(CYCLES):
        await crash_cycle(sidecar, keys, history, acks=ACKS_PER_CYCLE, clients_per_key=CLIENTS_PER_KEY, seed=cycle)
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        highest = max(ack.fencing_token for ack in history.acks if ack.task_key == keys[0])
        assert (await acquire(stub, keys[0])).guard.fencing_token > highest


async def test_a_ttl_lease_keeps_its_deadline_across_a_sigkill(sidecar: SidecarProcess, key: str) -> None:
    async with aio.insecure_channel(sidecar.address) as channel:
        held = await acquire(pb_grpc.TaskGuardStub(channel), key, ttl_s=300)
    sidecar.restart_after_kill()
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        guard = await stub.GetGuard(pb.GetGuardRequest(task_key=key))
        assert guard.state == pb.GUARD_STATE_RUNNING
        assert guard.expires_at == held.guard.expires_at
        assert guard.fencing_token == held.guard.fencing_token
        renewed = await stub.Renew(pb.RenewRequest(lease_id=held.lease_id))
        assert renewed.guard.run_id == held.guard.run_id
