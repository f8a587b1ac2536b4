"""Keys several runs may hold at once (``max_holders``), over real gRPC, on SQLite.

In-process sidecars on a real socket with a manual clock for what depends on time; a real sidecar process,
killed with SIGKILL, for what must survive a restart.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable

import pytest
from grpc import aio

from taskguard.cli.common import EXIT_ALREADY_RUNNING
from taskguard.clock import ManualClock
from taskguard.guard.model import KeyRule
from taskguard_client import AlreadyRunning, AsyncClient, GuardState, RetryRequiresApproval, RunStatus
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.support import ROOT, InProcess, SidecarProcess, watch_until

# The etcd store's semaphores, with more than one sidecar on one etcd, are in test_semaphores_etcd.py.
pytestmark = pytest.mark.backends("sqlite")

RULES = (KeyRule(name="pool", match="pool:*", max_holders=3),)


@pytest.fixture
async def pool(in_process_factory: object) -> InProcess:
    harness: InProcess = await in_process_factory(ManualClock(), rules=RULES)  # type: ignore[operator]
    return harness


async def test_three_runs_hold_the_key_a_fourth_is_told_all_three_and_each_keeps_its_own_lease(
    pool: InProcess, key: str
) -> None:
    task_key = f"pool:{key}"
    async with AsyncClient(pool.address) as client:
        leases = [await client.acquire(task_key, run_id=f"run-{i}", ttl=60) for i in range(3)]
        assert [lease.fencing_token for lease in leases] == [1, 2, 3]
        assert len({lease.lease_id for lease in leases}) == 3

        with pytest.raises(AlreadyRunning) as refused:
            await client.acquire(task_key, run_id="run-3", ttl=60)
        assert [run.run_id for run in refused.value.guard.runs] == ["run-0", "run-1", "run-2"]
        assert "run run-0 (fencing token 1), run run-1 (fencing token 2), run run-2" in str(refused.value)

        guard = await client.get(task_key)
        assert guard.policy is not None and (guard.policy.rule, guard.policy.max_holders) == ("pool", 3)
        assert [holder.run_id for holder in guard.holders] == ["run-0", "run-1"] and guard.run_id == "run-2"
        for lease in leases:
            assert await client.check_fence(task_key, lease.fencing_token)

        # Each run renews and releases by its own lease; the others go on.
        renewed = await client.renew(leases[0].lease_id, ttl=120)
        assert renewed.run_id == "run-0"
        released = await client.release(leases[1].lease_id, RunStatus.SUCCEEDED)
        assert (released.run_id, released.state) == ("run-1", GuardState.SUCCEEDED)
        assert not await client.check_fence(task_key, leases[1].fencing_token)
        assert await client.check_fence(task_key, leases[0].fencing_token)
        # Releasing it again is answered as before (the run's snapshot, not the guard's other runs).
        again = await client.release(leases[1].lease_id, RunStatus.SUCCEEDED)
        assert (again.run_id, again.state) == ("run-1", GuardState.SUCCEEDED)

        # The freed place takes a new run, with a token no run of the key ever had.
        fourth = await client.acquire(task_key, run_id="run-3", ttl=60)
        assert fourth.fencing_token == 4
        assert sorted(run.run_id for run in (await client.get(task_key)).runs) == ["run-0", "run-2", "run-3"]


async def test_a_run_whose_ttl_lapses_expires_alone(pool: InProcess, key: str) -> None:
    task_key = f"pool:{key}"
    async with AsyncClient(pool.address) as client:
        short = await client.acquire(task_key, run_id="short", ttl=10)
        long = await client.acquire(task_key, run_id="long", ttl=100)
        await pool.advance(10)
        events = await watch_until(
            pool.stub,
            lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_EXPIRED for e in seen),
            key_prefix=task_key,
            start_revision=1,
        )
        expired = next(e for e in events if e.type == pb.GUARD_EVENT_TYPE_EXPIRED)
        assert expired.guard.run_id == "short"
        assert not await client.check_fence(task_key, short.fencing_token)
        assert await client.check_fence(task_key, long.fencing_token)
        guard = await client.get(task_key)
        assert [run.run_id for run in guard.runs] == ["long"]


async def test_a_dropped_hold_stream_abandons_only_its_own_run(pool: InProcess, key: str) -> None:
    task_key = f"pool:{key}"
    dropped = pool.stub.Hold()
    await dropped.write(pb.HoldRequest(acquire=pb.AcquireRequest(task_key=task_key, run_id="dropped")))
    first = await dropped.read()
    assert first.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
    async with AsyncClient(pool.address) as client, client.hold(task_key, run_id="kept") as kept:
        dropped.cancel()  # the holder's process died
        events = await watch_until(
            pool.stub,
            lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_ABANDONED for e in seen),
            key_prefix=task_key,
            start_revision=first.guard.revision,
        )
        abandoned = next(e for e in events if e.type == pb.GUARD_EVENT_TYPE_ABANDONED)
        assert abandoned.guard.run_id == "dropped"
        assert not kept.lost
        assert await client.check_fence(task_key, kept.lease.fencing_token)
        assert not await client.check_fence(task_key, first.guard.fencing_token)
    async with AsyncClient(pool.address) as client:
        guard = await client.get(task_key)
    assert guard.state is GuardState.SUCCEEDED and not guard.runs


async def test_a_failed_run_closes_the_key_until_approved_and_the_others_go_on(pool: InProcess, key: str) -> None:
    task_key = f"pool:{key}"
    async with AsyncClient(pool.address) as client:
        going = await client.acquire(task_key, run_id="going", ttl=60)
        failing = await client.acquire(task_key, run_id="failing", ttl=60)
        await client.release(failing.lease_id, RunStatus.FAILED, "exit 1")

        with pytest.raises(RetryRequiresApproval):
            await client.acquire(task_key, run_id="next", ttl=60)
        guard = await client.get(task_key)
        assert (guard.state, guard.run_id) == (GuardState.FAILED, "failing")
        assert [holder.run_id for holder in guard.holders] == ["going"]
        await client.renew(going.lease_id)  # its lease is untouched

        await client.approve_retry(task_key, "ops", "fixed")
        retried = await client.acquire(task_key, run_id="next", ttl=60)
        assert retried.fencing_token == 3
        assert sorted(run.run_id for run in (await client.get(task_key)).runs) == ["going", "next"]


async def test_waiters_take_each_place_that_opens(pool: InProcess, key: str) -> None:
    task_key = f"pool:{key}"
    async with AsyncClient(pool.address) as client:
        held = [await client.acquire(task_key, run_id=f"held-{i}", ttl=600) for i in range(3)]
        waiting = [
            asyncio.create_task(client.acquire(task_key, run_id=f"waiter-{i}", ttl=600, on_conflict="queue"))
            for i in range(2)
        ]
        await watch_until(
            pool.stub,
            lambda seen: sum(e.type == pb.GUARD_EVENT_TYPE_QUEUED for e in seen) == 2,
            key_prefix=task_key,
            start_revision=1,
        )
        await client.force_release(task_key, "ops", "make room")

        admitted = await asyncio.gather(*waiting)
        assert [lease.run_id for lease in admitted] == ["waiter-0", "waiter-1"]
        assert [lease.fencing_token for lease in admitted] == [4, 5]
        for lease in held:
            assert not await client.check_fence(task_key, lease.fencing_token)
        guard = await client.get(task_key)
        assert [run.run_id for run in guard.runs] == ["waiter-0", "waiter-1"] and not guard.waiters


async def test_the_runs_of_a_semaphore_survive_a_kill_and_restart(
    sidecar_factory: Callable[..., SidecarProcess], key: str
) -> None:
    sidecar = sidecar_factory("--max-holders", "2")
    async with AsyncClient(sidecar.address) as client:
        leases = [await client.acquire(key, run_id=f"run-{i}", ttl=600) for i in range(2)]

    sidecar.restart_after_kill()

    async with AsyncClient(sidecar.address) as client:
        with pytest.raises(AlreadyRunning):
            await client.acquire(key, run_id="third", ttl=600)
        for lease in leases:
            assert await client.check_fence(key, lease.fencing_token)
            assert (await client.renew(lease.lease_id)).fencing_token == lease.fencing_token
        await client.release(leases[0].lease_id, RunStatus.SUCCEEDED)
        third = await client.acquire(key, run_id="third", ttl=600)
        assert third.fencing_token == 3
    async with aio.insecure_channel(sidecar.address) as channel:
        guard = await pb_grpc.TaskGuardStub(channel).GetGuard(pb.GetGuardRequest(task_key=key))
        assert guard.policy.max_holders == 2
        assert [holder.run_id for holder in guard.holders] == ["run-1"] and guard.run_id == "third"


async def test_the_cli_runs_beside_the_holders_while_a_place_is_free_and_shows_them(
    sidecar_factory: Callable[..., SidecarProcess], key: str
) -> None:
    sidecar = sidecar_factory("--max-holders", "2")

    def taskguard(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "taskguard", "--addr", sidecar.address, *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )

    async with AsyncClient(sidecar.address) as client:
        first = await client.acquire(key, run_id="first", ttl=600)
        # One place is free: a command runs beside the first run (its own run, its own token).
        ran = await asyncio.to_thread(taskguard, "run", key, "--", "sh", "-c", "echo $TASKGUARD_FENCING_TOKEN")
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.split() == ["2"]
        second = await client.acquire(key, run_id="second", ttl=600)

        refused = await asyncio.to_thread(taskguard, "run", key, "--", "true")
        assert refused.returncode == EXIT_ALREADY_RUNNING
        assert "run first (fencing token 1), run second (fencing token 3)" in refused.stderr

        listed = await asyncio.to_thread(taskguard, "ls", "--wide", "--prefix", key)
        header, row = listed.stdout.splitlines()
        column = header.index("RUNS")
        assert row[column:].split()[0] == "2"

        shown = await asyncio.to_thread(taskguard, "get", key)
        assert "max_holders=2" in shown.stdout
        holders = next(line for line in shown.stdout.splitlines() if line.startswith("holders"))
        assert "first (" in holders and "second" not in holders  # the guard's own run is the newest
        await client.release(first.lease_id, RunStatus.SUCCEEDED)
        await client.release(second.lease_id, RunStatus.SUCCEEDED)


async def test_the_sweeper_expires_a_run_whose_newer_neighbour_just_ended(pool: InProcess, key: str) -> None:
    """The older run's deadline was last moved by a heartbeat (no event), armed while the newer run spoke for
    the key; then the newer run ended: the timer left names a run that no longer holds the key."""
    task_key = f"pool:{key}"
    request = pb.AcquireRequest(task_key=task_key, run_id="older")
    request.ttl.FromSeconds(10)
    older = pool.stub.Hold()
    await older.write(pb.HoldRequest(acquire=request))
    held = await older.read()
    async with AsyncClient(pool.address) as client:
        newer = await client.acquire(task_key, run_id="newer", ttl=100)
        await pool.advance(5)
        await older.write(pb.HoldRequest(heartbeat=pb.Heartbeat()))
        assert (await older.read()).event == pb.HOLD_EVENT_HEARTBEAT_ACK
        # The timer set for its first deadline finds it renewed, and sets one for its new deadline.
        await pool.advance(5)
        released = await client.release(newer.lease_id, RunStatus.SUCCEEDED)
        await pool.advance(5)
        events = await watch_until(
            pool.stub,
            lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_EXPIRED for e in seen),
            key_prefix=task_key,
            start_revision=released.revision,
        )
        assert [e.guard.run_id for e in events if e.type == pb.GUARD_EVENT_TYPE_EXPIRED] == ["older"]
        assert not await client.check_fence(task_key, held.guard.fencing_token)
    older.cancel()


async def test_after_a_kill_each_stream_holder_resumes_its_own_run_and_one_that_does_not_is_abandoned_alone(
    sidecar_factory: Callable[..., SidecarProcess], key: str
) -> None:
    sidecar = sidecar_factory("--max-holders", "2", "--resume-grace", "3s")
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        held = {}
        # The older run is the one whose holder does not come back: it is not the one the record speaks for.
        for run_id in ("gone", "comes-back"):
            call = stub.Hold()
            await call.write(pb.HoldRequest(acquire=pb.AcquireRequest(task_key=key, run_id=run_id)))
            held[run_id] = await call.read()
            assert held[run_id].outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
        sidecar.kill()
    sidecar.start()
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        resumed_call = stub.Hold()
        await resumed_call.write(pb.HoldRequest(resume=pb.ResumeRequest(lease_id=held["comes-back"].lease_id)))
        resumed = await resumed_call.read()
        assert resumed.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
        assert (resumed.guard.run_id, resumed.guard.fencing_token) == ("comes-back", 2)

        events = await watch_until(
            stub,
            lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_ABANDONED for e in seen),
            key_prefix=key,
            start_revision=held["gone"].guard.revision,
        )
        abandoned = next(e for e in events if e.type == pb.GUARD_EVENT_TYPE_ABANDONED)
        assert abandoned.guard.run_id == "gone" and "did not resume within 3s" in abandoned.guard.last_detail
        fences = [
            (await stub.CheckFence(pb.CheckFenceRequest(task_key=key, fencing_token=token))).valid for token in (1, 2)
        ]
        assert fences == [False, True]
        await resumed_call.write(pb.HoldRequest(release=pb.HoldRelease(status=pb.RUN_STATUS_SUCCEEDED)))
        assert (await resumed_call.read()).guard.state == pb.GUARD_STATE_SUCCEEDED


async def test_listing_running_keys_finds_a_semaphore_whose_failed_run_speaks_for_it(pool: InProcess, key: str) -> None:
    task_key = f"pool:{key}"
    async with AsyncClient(pool.address) as client:
        await client.acquire(task_key, run_id="going", ttl=60)
        failing = await client.acquire(task_key, run_id="failing", ttl=60)
        await client.release(failing.lease_id, RunStatus.FAILED)
        running = [guard.task_key async for guard in client.list(prefix=task_key, states=["RUNNING"])]
        failed = [guard.task_key async for guard in client.list(prefix=task_key, states=["FAILED"])]
    assert running == [task_key] and failed == [task_key]
