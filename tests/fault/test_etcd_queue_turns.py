"""A queue's turn on the etcd store when sidecars die: the turn's deadline outlives the sidecar that set it.

Real sidecar processes on one etcd, killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc import aio

from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.support import SidecarProcess, acquire, sidecars_on_one_store, watch_until

pytestmark = pytest.mark.backends("etcd")

TIMEOUT_S = 10.0
# The tests' sidecar leases are 2 s (tests/conftest.py): a death is noticed within a few of them.
DEATH_S = 15.0


@pytest.fixture
def three_hosts(workdir: Path, store_args: tuple[str, ...]) -> Iterator[list[SidecarProcess]]:
    """Three sidecar processes on one etcd prefix, with a short resume grace (what a queue's turn lasts until
    its waiter's call takes it up)."""
    with sidecars_on_one_store(workdir, store_args, 3, "--resume-grace", "2s") as started:
        yield started


async def test_a_turn_no_call_takes_up_ends_after_the_grace_when_both_the_waiters_and_the_granting_sidecar_died(
    three_hosts: list[SidecarProcess], key: str
) -> None:
    """A waiter without a TTL has no lease time of its own: its turn's deadline is the resume grace, and once
    the sidecar that granted the turn is gone, another must keep it (or the key stays taken by nobody)."""
    waiters_host, granting, survivor = three_hosts
    async with (
        aio.insecure_channel(waiters_host.address) as w,
        aio.insecure_channel(granting.address) as g,
        aio.insecure_channel(survivor.address) as s,
    ):
        stub = pb_grpc.TaskGuardStub(s)
        held = await acquire(pb_grpc.TaskGuardStub(g), key, ttl_s=600, run_id="held")
        waiter = pb_grpc.TaskGuardStub(w).Hold()
        await waiter.write(
            pb.HoldRequest(acquire=pb.AcquireRequest(task_key=key, run_id="waiter", on_conflict=pb.ON_CONFLICT_QUEUE))
        )
        assert (await asyncio.wait_for(waiter.read(), TIMEOUT_S)).outcome == pb.ACQUIRE_OUTCOME_QUEUED
        waiters_host.kill()  # the waiter's call ends with it; the queue on etcd still names the waiter

        released = await pb_grpc.TaskGuardStub(g).Release(
            pb.ReleaseRequest(lease_id=held.lease_id, status=pb.RUN_STATUS_SUCCEEDED), timeout=TIMEOUT_S
        )
        # The granting sidecar hands the key to the waiter, whose call is gone, and dies too.
        await watch_until(
            stub,
            lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_ACQUIRED and e.guard.run_id == "waiter" for e in seen),
            key_prefix=key,
            start_revision=released.guard.revision,
        )
        granting.kill()

        events = await watch_until(
            stub,
            lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_RELEASED and e.guard.run_id == "waiter" for e in seen),
            key_prefix=key,
            start_revision=released.guard.revision + 1,
            timeout_s=DEATH_S,
        )
        ended = next(e for e in events if e.type == pb.GUARD_EVENT_TYPE_RELEASED and e.guard.run_id == "waiter")
        assert ended.guard.state == pb.GUARD_STATE_CANCELLED
        assert "did not take up its turn" in ended.guard.last_detail
        assert (await acquire(stub, key, ttl_s=60, run_id="next")).outcome == pb.ACQUIRE_OUTCOME_ACQUIRED


async def test_waiters_whose_sidecar_died_leave_the_queue_and_do_not_cost_the_others_a_grace_each(
    workdir: Path, store_args: tuple[str, ...], key: str
) -> None:
    # A long resume grace: a dead waiter left in line would hold up the next one that long.
    with sidecars_on_one_store(workdir, store_args, 2, "--resume-grace", "60s") as (doomed, survivor):
        async with aio.insecure_channel(doomed.address) as d, aio.insecure_channel(survivor.address) as s:
            stub = pb_grpc.TaskGuardStub(s)
            held = await acquire(stub, key, ttl_s=600, run_id="held")
            calls = {}
            for run_id, channel in (("on-doomed", d), ("on-survivor", s)):
                call = pb_grpc.TaskGuardStub(channel).Hold()
                request = pb.AcquireRequest(task_key=key, run_id=run_id, on_conflict=pb.ON_CONFLICT_QUEUE)
                await call.write(pb.HoldRequest(acquire=request))
                assert (await asyncio.wait_for(call.read(), TIMEOUT_S)).outcome == pb.ACQUIRE_OUTCOME_QUEUED
                calls[run_id] = call
            doomed.kill()

            events = await watch_until(
                stub,
                lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_DEQUEUED for e in seen),
                key_prefix=key,
                start_revision=held.guard.revision,
                timeout_s=DEATH_S,
            )
            left = next(e for e in events if e.type == pb.GUARD_EVENT_TYPE_DEQUEUED)
            assert left.waiter_run_id == "on-doomed" and "the sidecar its call was on is gone" in left.reason
            assert [w.run_id for w in left.guard.waiters] == ["on-survivor"]

            await stub.Release(pb.ReleaseRequest(lease_id=held.lease_id, status=pb.RUN_STATUS_SUCCEEDED))
            waiting = calls["on-survivor"]
            while (answer := await asyncio.wait_for(waiting.read(), TIMEOUT_S)).outcome == pb.ACQUIRE_OUTCOME_QUEUED:
                pass
            assert (answer.outcome, answer.guard.run_id) == (pb.ACQUIRE_OUTCOME_ACQUIRED, "on-survivor")
            waiting.cancel()
