"""Keys several runs may hold at once (``max_holders``) on the etcd store, over real gRPC and a real etcd.

What a shared store adds to a semaphore: each run's lease, deadline and Hold stream belong to the sidecar that
holds it, so sidecars sharing one etcd may hold different runs of one key, and a sidecar that dies takes its
own runs with it and no other's. In-process sidecars for what one sidecar (or a manual clock) shows; real
sidecar processes, killed with SIGKILL, for what must survive a death.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from grpc import aio

from taskguard.clock import ManualClock
from taskguard.guard.model import KeyRule
from taskguard.store import etcd_docs
from taskguard.store.etcd_client import range_end
from taskguard.store.etcdpb import etcdv3_pb2 as etcd
from taskguard.store.etcdpb import etcdv3_pb2_grpc as etcd_grpc
from taskguard_client import AlreadyRunning, AsyncClient, GuardState, RunStatus
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.support import InProcess, SidecarProcess, acquire, sidecars_on_one_store, watch_until

pytestmark = pytest.mark.backends("etcd")

RULES = (
    KeyRule(name="pool", match="pool:*", max_holders=3),
    KeyRule(name="wide", match="wide:*", max_holders=64),
)
TIMEOUT_S = 10.0
# The tests' sidecar leases are 2 s (tests/conftest.py): a death is noticed within a few of them.
DEATH_S = 15.0


def _etcd_of(store_args: tuple[str, ...]) -> tuple[str, bytes]:
    """The etcd endpoint and the guard prefix this test's sidecars use."""
    flags = dict(zip(store_args[::2], store_args[1::2], strict=True))
    return flags["--store"].removeprefix("etcd://"), flags["--etcd-prefix"].encode()


async def _owner_keys(endpoint: str, prefix: bytes) -> list[Any]:
    """The owner keys (o/) under ``prefix``: one per stream-bound run, on its sidecar's etcd lease."""
    owners = prefix + b"o/"
    async with aio.insecure_channel(endpoint) as channel:
        reply = await etcd_grpc.KVStub(channel).Range(
            etcd.RangeRequest(key=owners, range_end=range_end(owners)), timeout=TIMEOUT_S
        )
    return list(reply.kvs)


async def _etcd_revision(endpoint: str) -> int:
    async with aio.insecure_channel(endpoint) as channel:
        reply = await etcd_grpc.KVStub(channel).Range(etcd.RangeRequest(key=b"/", count_only=True), timeout=TIMEOUT_S)
    return int(reply.header.revision)


async def _owner_keys_deleted(endpoint: str, prefix: bytes, count: int, after: int) -> None:
    """Until etcd has deleted ``count`` owner keys under ``prefix`` since revision ``after`` (a lease ran out)."""
    owners = prefix + b"o/"
    create = etcd.WatchCreateRequest(key=owners, range_end=range_end(owners), start_revision=after + 1)
    async with aio.insecure_channel(endpoint) as channel:
        call = etcd_grpc.WatchStub(channel).Watch()
        await call.write(etcd.WatchRequest(create_request=create))
        deleted = 0

        async def follow() -> None:
            nonlocal deleted
            async for response in call:
                deleted += sum(change.type == etcd.Event.DELETE for change in response.events)
                if deleted >= count:
                    return

        try:
            await asyncio.wait_for(follow(), DEATH_S)
        finally:
            call.cancel()


async def _hold(stub: pb_grpc.TaskGuardStub, task_key: str, run_id: str, ttl_s: float | None = None) -> Any:
    """A Hold stream that acquired a run of ``task_key``; the call and its first answer."""
    request = pb.AcquireRequest(task_key=task_key, run_id=run_id, holder=run_id)
    if ttl_s is not None:
        request.ttl.FromSeconds(int(ttl_s))
    call = stub.Hold()
    await call.write(pb.HoldRequest(acquire=request))
    held = await asyncio.wait_for(call.read(), TIMEOUT_S)
    assert held.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED, held
    return call, held


async def _resume(stub: pb_grpc.TaskGuardStub, lease_id: str) -> Any:
    call = stub.Hold()
    await call.write(pb.HoldRequest(resume=pb.ResumeRequest(lease_id=lease_id)))
    resumed = await asyncio.wait_for(call.read(), TIMEOUT_S)
    return call, resumed


async def _fence(stub: pb_grpc.TaskGuardStub, task_key: str, token: int) -> bool:
    reply = await stub.CheckFence(pb.CheckFenceRequest(task_key=task_key, fencing_token=token), timeout=TIMEOUT_S)
    return bool(reply.valid)


@pytest.fixture
async def pool(in_process_factory: Any) -> InProcess:
    harness: InProcess = await in_process_factory(rules=RULES)
    return harness


@pytest.fixture
def two_hosts(workdir: Path, store_args: tuple[str, ...]) -> Iterator[list[SidecarProcess]]:
    """Two sidecar processes, each in a folder of its own (as if on its own host), on one etcd prefix."""
    with sidecars_on_one_store(workdir, store_args, 2, "--max-holders", "2") as started:
        yield started


# --- one sidecar ------------------------------------------------------------------------------------------


async def test_three_runs_hold_a_key_a_fourth_is_told_all_three_and_each_lease_is_its_own(
    pool: InProcess, key: str
) -> None:
    task_key = f"pool:{key}"
    async with AsyncClient(pool.address) as client:
        leases = [await client.acquire(task_key, run_id=f"run-{i}", ttl=60) for i in range(3)]
        assert [lease.fencing_token for lease in leases] == [1, 2, 3]

        with pytest.raises(AlreadyRunning) as refused:
            await client.acquire(task_key, run_id="run-3", ttl=60)
        assert [run.run_id for run in refused.value.guard.runs] == ["run-0", "run-1", "run-2"]
        assert "run run-0 (fencing token 1), run run-1 (fencing token 2), run run-2" in str(refused.value)
        for lease in leases:
            assert await client.check_fence(task_key, lease.fencing_token)

        # Each run renews and releases by its own lease, found by its lease id whichever run the record speaks for.
        renewed = await client.renew(leases[0].lease_id, ttl=120)
        assert (renewed.run_id, renewed.fencing_token) == ("run-0", 1)
        released = await client.release(leases[1].lease_id, RunStatus.SUCCEEDED)
        assert (released.run_id, released.state) == ("run-1", GuardState.SUCCEEDED)
        assert not await client.check_fence(task_key, leases[1].fencing_token)
        assert await client.check_fence(task_key, leases[0].fencing_token)
        # A late release again is answered from the run's own snapshot (written when it left the record).
        again = await client.release(leases[1].lease_id, RunStatus.SUCCEEDED)
        assert (again.run_id, again.state) == ("run-1", GuardState.SUCCEEDED)

        fourth = await client.acquire(task_key, run_id="run-3", ttl=60)
        assert fourth.fencing_token == 4
        guard = await client.get(task_key)
        assert sorted(run.run_id for run in guard.runs) == ["run-0", "run-2", "run-3"]
        # The renewal of run-0 is still its own (the changes since were about other runs).
        run_0 = next(run for run in guard.runs if run.run_id == "run-0")
        assert run_0.expires_at is not None and renewed.expires_at is not None
        assert run_0.expires_at == renewed.expires_at


async def test_sixty_four_stream_bound_runs_end_in_one_force_release_and_take_their_owner_keys_along(
    pool: InProcess, key: str, store_args: tuple[str, ...]
) -> None:
    """A change that ends every run of a wide semaphore stays one etcd transaction (etcd takes 128 writes at
    most, and 1.5 MiB): each run's snapshot, each owner key's delete, events that share their runs' records."""
    task_key = f"wide:{key}"
    endpoint, prefix = _etcd_of(store_args)
    calls = []
    for i in range(64):
        call, held = await _hold(pool.stub, task_key, f"run-{i}")
        assert held.guard.fencing_token == i + 1
        calls.append(call)
    assert len(await _owner_keys(endpoint, prefix)) == 64

    ended = await pool.stub.ForceRelease(
        pb.ForceReleaseRequest(task_key=task_key, operator="ops", reason="make room"), timeout=TIMEOUT_S
    )
    assert ended.guard.state == pb.GUARD_STATE_CANCELLED and not ended.guard.holders
    for call in calls:
        lost = await asyncio.wait_for(call.read(), TIMEOUT_S)
        assert lost.event == pb.HOLD_EVENT_LOST
    events = await watch_until(
        pool.stub,
        lambda seen: sum(e.type == pb.GUARD_EVENT_TYPE_FORCE_RELEASED for e in seen) == 64,
        key_prefix=task_key,
        start_revision=1,
    )
    released = [e.guard.run_id for e in events if e.type == pb.GUARD_EVENT_TYPE_FORCE_RELEASED]
    assert sorted(released) == sorted(f"run-{i}" for i in range(64))
    assert await _owner_keys(endpoint, prefix) == []
    async with AsyncClient(pool.address) as client:
        taken = await client.acquire(task_key, run_id="after", ttl=60)
        assert taken.fencing_token == 65


# --- two sidecars, one key -----------------------------------------------------------------------------------


@pytest.mark.parametrize("doomed_first", [True, False], ids=["doomed-holds-first", "doomed-holds-last"])
async def test_a_killed_sidecar_abandons_its_own_run_of_a_semaphore_and_the_other_sidecars_run_goes_on(
    two_hosts: list[SidecarProcess], key: str, store_args: tuple[str, ...], doomed_first: bool
) -> None:
    doomed, survivor = two_hosts
    endpoint, prefix = _etcd_of(store_args)
    async with aio.insecure_channel(doomed.address) as d, aio.insecure_channel(survivor.address) as s:
        stubs = {"doomed": pb_grpc.TaskGuardStub(d), "survivor": pb_grpc.TaskGuardStub(s)}
        calls, held = {}, {}
        # Whichever sidecar changes the key last must not take the other's run (its owner key) along.
        for name in ("doomed", "survivor") if doomed_first else ("survivor", "doomed"):
            calls[name], held[name] = await _hold(stubs[name], key, name)
        assert sorted(held[name].guard.fencing_token for name in held) == [1, 2]
        owners = await _owner_keys(endpoint, prefix)
        assert sorted(etcd_docs.owner_token(kv.value) for kv in owners) == [1, 2]
        assert len({kv.lease for kv in owners}) == 2  # each on its own sidecar's etcd lease

        start = max(held[name].guard.revision for name in held) + 1
        doomed.kill()
        stub = stubs["survivor"]
        events = await watch_until(
            stub,
            lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_ABANDONED for e in seen),
            key_prefix=key,
            start_revision=start,
            timeout_s=DEATH_S,
        )
        abandoned = [e.guard for e in events if e.type == pb.GUARD_EVENT_TYPE_ABANDONED]
        assert [(guard.run_id, guard.fencing_token) for guard in abandoned] == [
            ("doomed", held["doomed"].guard.fencing_token)
        ]
        assert "the sidecar that held its Hold stream is gone" in abandoned[0].last_detail

        # The survivor's run goes on: its stream still holds it, its fence is valid, the dead one's is not.
        token = held["survivor"].guard.fencing_token
        await calls["survivor"].write(pb.HoldRequest(heartbeat=pb.Heartbeat()))
        assert (await asyncio.wait_for(calls["survivor"].read(), TIMEOUT_S)).event == pb.HOLD_EVENT_HEARTBEAT_ACK
        assert await _fence(stub, key, token)
        assert not await _fence(stub, key, held["doomed"].guard.fencing_token)
        assert [etcd_docs.owner_token(kv.value) for kv in await _owner_keys(endpoint, prefix)] == [token]

        # The freed place takes a new run, with a token no run of the key had.
        taken = await acquire(stub, key, ttl_s=60, run_id="next")
        assert taken.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED and taken.guard.fencing_token == 3
        guard = await stub.GetGuard(pb.GetGuardRequest(task_key=key), timeout=TIMEOUT_S)
        assert sorted([guard.run_id, *(holder.run_id for holder in guard.holders)]) == ["next", "survivor"]
        await calls["survivor"].write(pb.HoldRequest(release=pb.HoldRelease(status=pb.RUN_STATUS_SUCCEEDED)))
        released = await asyncio.wait_for(calls["survivor"].read(), TIMEOUT_S)
        assert (released.guard.run_id, released.guard.state) == ("survivor", pb.GUARD_STATE_SUCCEEDED)
        assert await _owner_keys(endpoint, prefix) == []


async def test_a_place_a_killed_sidecars_run_freed_goes_to_a_waiter_on_the_other_sidecar_which_keeps_it(
    two_hosts: list[SidecarProcess], key: str, store_args: tuple[str, ...]
) -> None:
    doomed, survivor = two_hosts
    endpoint, prefix = _etcd_of(store_args)
    async with aio.insecure_channel(doomed.address) as d, aio.insecure_channel(survivor.address) as s:
        doomed_stub, stub = pb_grpc.TaskGuardStub(d), pb_grpc.TaskGuardStub(s)
        first, _ = await _hold(doomed_stub, key, "first")
        _, second = await _hold(doomed_stub, key, "second")
        waiter = stub.Hold()
        await waiter.write(
            pb.HoldRequest(acquire=pb.AcquireRequest(task_key=key, run_id="waiter", on_conflict=pb.ON_CONFLICT_QUEUE))
        )
        assert (await asyncio.wait_for(waiter.read(), TIMEOUT_S)).outcome == pb.ACQUIRE_OUTCOME_QUEUED

        # The doomed sidecar frees a place (and serves the queue): the waiter's run is claimed on the survivor.
        await first.write(pb.HoldRequest(release=pb.HoldRelease(status=pb.RUN_STATUS_SUCCEEDED)))
        while (answer := await asyncio.wait_for(waiter.read(), TIMEOUT_S)).outcome == pb.ACQUIRE_OUTCOME_QUEUED:
            pass
        assert (answer.outcome, answer.guard.run_id, answer.guard.fencing_token) == (
            pb.ACQUIRE_OUTCOME_ACQUIRED,
            "waiter",
            3,
        )
        owners = {etcd_docs.owner_token(kv.value): kv.lease for kv in await _owner_keys(endpoint, prefix)}
        assert sorted(owners) == [2, 3] and owners[2] != owners[3]

        doomed.kill()
        events = await watch_until(
            stub,
            lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_ABANDONED for e in seen),
            key_prefix=key,
            start_revision=answer.guard.revision + 1,
            timeout_s=DEATH_S,
        )
        assert [e.guard.run_id for e in events if e.type == pb.GUARD_EVENT_TYPE_ABANDONED] == ["second"]
        await waiter.write(pb.HoldRequest(heartbeat=pb.Heartbeat()))
        assert (await asyncio.wait_for(waiter.read(), TIMEOUT_S)).event == pb.HOLD_EVENT_HEARTBEAT_ACK
        assert await _fence(stub, key, 3)
        assert not await _fence(stub, key, second.guard.fencing_token)
        assert (await acquire(stub, key, ttl_s=60, run_id="next")).guard.fencing_token == 4
        waiter.cancel()


async def test_a_killed_sidecars_ttl_run_of_a_semaphore_is_expired_by_the_other_and_its_own_run_goes_on(
    two_hosts: list[SidecarProcess], key: str
) -> None:
    """Each run's TTL is kept by the sidecar that granted it; once that one is gone, another takes it over."""
    doomed, survivor = two_hosts
    async with aio.insecure_channel(doomed.address) as d, aio.insecure_channel(survivor.address) as s:
        stub = pb_grpc.TaskGuardStub(s)
        short = await acquire(pb_grpc.TaskGuardStub(d), key, ttl_s=2, run_id="short")
        long = await acquire(stub, key, ttl_s=600, run_id="long")
        assert (short.guard.fencing_token, long.guard.fencing_token) == (1, 2)
        doomed.kill()
        events = await watch_until(
            stub,
            lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_EXPIRED for e in seen),
            key_prefix=key,
            start_revision=long.guard.revision + 1,
            timeout_s=DEATH_S,
        )
        assert [e.guard.run_id for e in events if e.type == pb.GUARD_EVENT_TYPE_EXPIRED] == ["short"]
        assert await _fence(stub, key, 2)
        renewed = await stub.Renew(pb.RenewRequest(lease_id=long.lease_id), timeout=TIMEOUT_S)
        assert renewed.guard.run_id == "long"
        assert (await acquire(stub, key, ttl_s=60, run_id="next")).guard.fencing_token == 3


async def test_a_heartbeat_of_one_run_is_not_undone_by_another_sidecars_change_to_another_run(
    in_process_factory: Any, workdir: Path, key: str
) -> None:
    """Sidecar A keeps the deadline of the run its Hold stream heartbeats; sidecar B then starts another run of
    the key, writing the guard with what it knew of A's run (maybe not that heartbeat yet). A's run lasts its
    heartbeat's TTL, not its first."""
    hosts = [
        await in_process_factory(
            ManualClock(), rules=RULES, listen=f"unix:{workdir / f'{name}.sock'}", db=workdir / f"{name}.db"
        )
        for name in ("a", "b")
    ]
    a, b = hosts
    task_key = f"pool:{key}"
    call, held = await _hold(a.stub, task_key, "beating", ttl_s=10)
    await a.advance(6)
    await call.write(pb.HoldRequest(heartbeat=pb.Heartbeat()))
    assert (await asyncio.wait_for(call.read(), TIMEOUT_S)).event == pb.HOLD_EVENT_HEARTBEAT_ACK

    other = await acquire(b.stub, task_key, ttl_s=100, run_id="other")
    assert other.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED and other.guard.fencing_token == 2
    await watch_until(
        a.stub,
        lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_ACQUIRED and e.guard.run_id == "other" for e in seen),
        key_prefix=task_key,
        start_revision=held.guard.revision + 1,
    )

    await a.advance(6)  # past the first deadline, before the heartbeat's
    assert await _fence(a.stub, task_key, 1)
    assert await _fence(b.stub, task_key, 1)
    await a.advance(5)  # past the heartbeat's
    events = await watch_until(
        b.stub,
        lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_EXPIRED for e in seen),
        key_prefix=task_key,
        start_revision=other.guard.revision + 1,
    )
    assert [e.guard.run_id for e in events if e.type == pb.GUARD_EVENT_TYPE_EXPIRED] == ["beating"]
    assert not await _fence(b.stub, task_key, 1)
    assert await _fence(b.stub, task_key, 2)
    call.cancel()


# --- a sidecar restarted ----------------------------------------------------------------------------------------


async def _two_runs_then_kill(
    sidecar: SidecarProcess, key: str, store_args: tuple[str, ...]
) -> dict[str, pb.HoldResponse]:
    """Two stream-bound runs of ``key`` held through ``sidecar``, which is then killed, and its etcd lease left
    to run out with no other sidecar watching: etcd deletes both owner keys, and nobody abandons anything."""
    endpoint, prefix = _etcd_of(store_args)
    held = {}
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        for run_id in ("older", "newer"):
            _, held[run_id] = await _hold(stub, key, run_id)
        revision = await _etcd_revision(endpoint)
        sidecar.kill()
    await _owner_keys_deleted(endpoint, prefix, 2, revision)
    return held


async def test_a_restarted_sidecar_gives_each_of_its_two_stream_bound_runs_the_resume_grace_and_both_resume(
    sidecar_factory: Callable[..., SidecarProcess], key: str, store_args: tuple[str, ...]
) -> None:
    sidecar = sidecar_factory("--max-holders", "2", "--resume-grace", "30s")
    held = await _two_runs_then_kill(sidecar, key, store_args)
    sidecar.start()
    endpoint, prefix = _etcd_of(store_args)
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        guard = await stub.GetGuard(pb.GetGuardRequest(task_key=key), timeout=TIMEOUT_S)
        assert (guard.run_id, [holder.run_id for holder in guard.holders]) == ("newer", ["older"])
        assert guard.state == pb.GUARD_STATE_RUNNING
        assert (await acquire(stub, key, run_id="third")).outcome == pb.ACQUIRE_OUTCOME_ALREADY_RUNNING

        calls = {}
        for run_id in ("older", "newer"):
            calls[run_id], resumed = await _resume(stub, held[run_id].lease_id)
            assert resumed.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
            assert (resumed.guard.run_id, resumed.guard.fencing_token, resumed.lease_id) == (
                run_id,
                held[run_id].guard.fencing_token,
                held[run_id].lease_id,
            )
        for run_id in ("older", "newer"):
            assert await _fence(stub, key, held[run_id].guard.fencing_token)
        owners = await _owner_keys(endpoint, prefix)
        assert sorted(etcd_docs.owner_token(kv.value) for kv in owners) == [1, 2]
        assert len({kv.lease for kv in owners}) == 1  # both on the new incarnation's lease

        for run_id in ("older", "newer"):
            await calls[run_id].write(pb.HoldRequest(release=pb.HoldRelease(status=pb.RUN_STATUS_SUCCEEDED)))
            released = await asyncio.wait_for(calls[run_id].read(), TIMEOUT_S)
            assert (released.guard.run_id, released.guard.state) == (run_id, pb.GUARD_STATE_SUCCEEDED)
        events = await watch_until(
            stub,
            lambda seen: sum(e.type == pb.GUARD_EVENT_TYPE_RELEASED for e in seen) == 2,
            key_prefix=key,
            start_revision=held["older"].guard.revision,
        )
        assert not [e for e in events if e.type == pb.GUARD_EVENT_TYPE_ABANDONED]
        assert (await acquire(stub, key, run_id="third")).guard.fencing_token == 3


async def test_a_restarted_sidecar_abandons_each_stream_bound_run_not_resumed_within_the_grace(
    sidecar_factory: Callable[..., SidecarProcess], key: str, store_args: tuple[str, ...]
) -> None:
    sidecar = sidecar_factory("--max-holders", "2", "--resume-grace", "1s")
    held = await _two_runs_then_kill(sidecar, key, store_args)
    sidecar.start()
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        events = await watch_until(
            stub,
            lambda seen: sum(e.type == pb.GUARD_EVENT_TYPE_ABANDONED for e in seen) == 2,
            key_prefix=key,
            start_revision=held["older"].guard.revision,
        )
        abandoned = [e.guard for e in events if e.type == pb.GUARD_EVENT_TYPE_ABANDONED]
        assert sorted((guard.run_id, guard.fencing_token) for guard in abandoned) == [("newer", 2), ("older", 1)]
        assert all("did not resume within 1s" in guard.last_detail for guard in abandoned)
        taken = await acquire(stub, key, run_id=f"after-{uuid.uuid4().hex[:6]}")
        assert taken.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED and taken.guard.fencing_token == 3
