"""Hosts whose wall clocks disagree by a minute share guards safely (issue 14).

Sidecar A is a real process on this machine's clock; sidecar B runs in this test's process with a clock
whose UTC reading is off by ±60 s (its monotonic clock is the machine's, as on any host). TTLs must lapse
when the granting sidecar's own clock says so, never early because of another host's wall clock, and a
dead granting sidecar's TTL leases must still lapse.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from grpc import aio

from taskguard import config, server
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.etcd_cluster import EtcdCluster
from tests.support import SidecarProcess, acquire, open_watch

LEASE_TTL_S = 3.0
TIMEOUT_S = 1.5
TTL_S = 4.0
SLACK_S = 5.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


class SkewedClock:
    """This machine's clocks, with the wall clock ``offset_s`` off."""

    def __init__(self, offset_s: float) -> None:
        self._offset = timedelta(seconds=offset_s)

    def monotonic(self) -> float:
        return time.monotonic()

    def now_utc(self) -> datetime:
        return datetime.now(UTC) + self._offset


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    etcd = EtcdCluster(tmp_path_factory.mktemp("etcd"), size=3)
    etcd.start()
    yield etcd
    etcd.stop()


async def _stop_telling_where_it_hangs(sidecar: server.Sidecar) -> None:
    """``sidecar.stop(0)``; if it is not done within a minute, every task's stack goes to stderr first.

    (Once, on a heavily loaded machine, this teardown waited past the test's timeout with the loop idle:
    pytest-timeout shows only the main thread, which says nothing of the task that waited.)"""
    stopping = asyncio.ensure_future(sidecar.stop(0))
    done, _ = await asyncio.wait({stopping}, timeout=60)
    if not done:
        for task in asyncio.all_tasks():
            print(f"--- {task!r}", file=sys.stderr)
            task.print_stack(file=sys.stderr)
    await stopping


@pytest.fixture(params=[60.0, -60.0], ids=["B-60s-ahead", "B-60s-behind"])
def skew_s(request: pytest.FixtureRequest) -> float:
    return float(request.param)


@pytest.fixture
async def pair(cluster: EtcdCluster, skew_s: float) -> AsyncIterator[tuple[SidecarProcess, pb_grpc.TaskGuardStub]]:
    """A (a process) and a stub of B (in this process, skewed), on one prefix."""
    prefix = f"/skew-{uuid.uuid4().hex}/"
    workdir = Path(tempfile.mkdtemp(prefix="tg-", dir="/tmp"))
    (workdir / "a").mkdir()
    timing = ("--etcd-lease-ttl", f"{LEASE_TTL_S:g}s", "--etcd-timeout", f"{TIMEOUT_S:g}s")
    a = SidecarProcess(workdir / "a", ("--store", cluster.url, "--etcd-prefix", prefix, *timing, "--allow-supersede"))
    await asyncio.to_thread(a.start)
    settings = config.default_settings(
        listen=f"unix:{workdir / 'b.sock'}",
        db=workdir / "b.db",
        store=cluster.url,
        etcd_prefix=prefix,
        etcd_lease_ttl_s=LEASE_TTL_S,
        etcd_timeout_s=TIMEOUT_S,
        allow_supersede=True,
    )
    b = await server.start(settings, SkewedClock(skew_s))
    channel = aio.insecure_channel(b.address)
    try:
        yield a, pb_grpc.TaskGuardStub(channel)
    finally:
        await channel.close()
        await _stop_telling_where_it_hangs(b)
        a.close()
        shutil.rmtree(workdir, ignore_errors=True)


async def _expired_after(watch: object, since: float) -> float:
    """Read ``watch`` until EXPIRED; seconds from ``since`` (the test's monotonic clock)."""
    deadline = TTL_S + LEASE_TTL_S + 2 * SLACK_S
    while True:
        event = await asyncio.wait_for(watch.read(), deadline)  # type: ignore[attr-defined]
        assert event.guard.fencing_token == 1, event  # nobody took it before it lapsed
        if event.type == pb.GUARD_EVENT_TYPE_EXPIRED:
            return time.monotonic() - since


async def test_a_guard_granted_on_a_lapses_by_a_s_clock_not_early_on_a_skewed_host(
    pair: tuple[SidecarProcess, pb_grpc.TaskGuardStub], key: str, skew_s: float
) -> None:
    a, on_b = pair
    watch = await open_watch(on_b, key_prefix=key)
    async with aio.insecure_channel(a.address) as channel:
        on_a = pb_grpc.TaskGuardStub(channel)
        began = time.monotonic()
        granted = await acquire(on_a, key, ttl_s=TTL_S)
        assert granted.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
        # B's copy has it, RUNNING, and B refuses it to others while it runs.
        refused = await acquire(on_b, key, run_id="on-b")
        assert refused.outcome == pb.ACQUIRE_OUTCOME_ALREADY_RUNNING
        lapsed_after = await _expired_after(watch, began)
        watch.cancel()
    assert lapsed_after >= TTL_S, f"expired {lapsed_after:.2f}s after the acquisition, before its {TTL_S:g}s TTL"
    assert (await acquire(on_b, key, run_id="after")).outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
    print(f"\nB {skew_s:+g}s: A's {TTL_S:g}s lease lapsed {lapsed_after:.2f}s after it was granted")


async def test_a_guard_granted_on_the_skewed_host_lapses_by_its_clock_not_early_on_a(
    pair: tuple[SidecarProcess, pb_grpc.TaskGuardStub], key: str, skew_s: float
) -> None:
    a, on_b = pair
    async with aio.insecure_channel(a.address) as channel:
        on_a = pb_grpc.TaskGuardStub(channel)
        watch = await open_watch(on_a, key_prefix=key)
        began = time.monotonic()
        granted = await acquire(on_b, key, ttl_s=TTL_S)
        assert granted.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
        # A renewal half way moves the deadline, on B's clock.
        await asyncio.sleep(TTL_S / 2)  # the point of the test is time passing
        renewed_at = time.monotonic()
        await on_b.Renew(pb.RenewRequest(lease_id=granted.lease_id), timeout=10)
        assert (await acquire(on_a, key, run_id="on-a")).outcome == pb.ACQUIRE_OUTCOME_ALREADY_RUNNING
        lapsed_after = await _expired_after(watch, renewed_at)
        watch.cancel()
    assert lapsed_after >= TTL_S, f"expired {lapsed_after:.2f}s after the renewal, before its {TTL_S:g}s TTL"
    print(f"\nB {skew_s:+g}s: B's {TTL_S:g}s lease lapsed {lapsed_after:.2f}s after its renewal (seen on A)")
    assert began < renewed_at


async def test_a_dead_granting_sidecars_lease_still_lapses_on_the_skewed_host_and_not_early(
    pair: tuple[SidecarProcess, pb_grpc.TaskGuardStub], key: str, skew_s: float
) -> None:
    a, on_b = pair
    watch = await open_watch(on_b, key_prefix=key)
    async with aio.insecure_channel(a.address) as channel:
        began = time.monotonic()
        granted = await acquire(pb_grpc.TaskGuardStub(channel), key, ttl_s=TTL_S)
        assert granted.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
    a.kill()
    lapsed_after = await _expired_after(watch, began)
    watch.cancel()
    assert lapsed_after >= TTL_S, f"expired {lapsed_after:.2f}s after the acquisition, before its {TTL_S:g}s TTL"
    # At most: A's etcd lease running out, then the TTL from when B learnt of the grant.
    assert lapsed_after <= LEASE_TTL_S + TTL_S + SLACK_S
    print(f"\nB {skew_s:+g}s, A killed: A's {TTL_S:g}s lease lapsed on B {lapsed_after:.2f}s after it was granted")
    taken = await acquire(on_b, key, run_id="after")
    assert taken.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED and taken.guard.fencing_token == 2


async def test_a_waiters_max_wait_and_a_supersede_grace_are_not_cut_short_on_a_skewed_host(
    pair: tuple[SidecarProcess, pb_grpc.TaskGuardStub], key: str, skew_s: float
) -> None:
    """Both are set on A's clock; B, whose wall clock is a minute off, must not end them early (a command on B
    heals what B thinks is due)."""
    a, on_b = pair
    async with aio.insecure_channel(a.address) as channel:
        on_a = pb_grpc.TaskGuardStub(channel)
        held = await acquire(on_a, key, ttl_s=600)
        request = pb.AcquireRequest(task_key=key, run_id="waiter", on_conflict=pb.ON_CONFLICT_QUEUE)
        request.max_wait.FromSeconds(30)
        waiter = on_a.Hold()
        await waiter.write(pb.HoldRequest(acquire=request))
        queued = await asyncio.wait_for(waiter.read(), 10)
        assert queued.outcome == pb.ACQUIRE_OUTCOME_QUEUED
        # B learns of the waiter, then decides something about the key: the waiter's place must hold.
        watch = await open_watch(on_b, key_prefix=key, start_revision=queued.guard.revision)
        while (await asyncio.wait_for(watch.read(), 10)).type != pb.GUARD_EVENT_TYPE_QUEUED:
            pass
        watch.cancel()
        assert (await acquire(on_b, key, run_id="refused")).outcome == pb.ACQUIRE_OUTCOME_ALREADY_RUNNING
        on_bs_copy = await on_b.GetGuard(pb.GetGuardRequest(task_key=key), timeout=10)
        assert [w.run_id for w in on_bs_copy.waiters] == ["waiter"], "B cut the waiter's max_wait short"
        waiter.cancel()

        # A newer trigger supersedes the run (30 s grace, by the default rule): B must not force-release it early.
        superseding = on_a.Hold()
        await superseding.write(
            pb.HoldRequest(
                acquire=pb.AcquireRequest(task_key=key, run_id="newer", on_conflict=pb.ON_CONFLICT_SUPERSEDE)
            )
        )
        asked = await asyncio.wait_for(superseding.read(), 10)
        assert asked.outcome == pb.ACQUIRE_OUTCOME_QUEUED
        # (The stop request and the queueing are one commit: its last event, the QUEUED, has the guard's revision.)
        watch = await open_watch(on_b, key_prefix=key, start_revision=asked.guard.revision)
        while (await asyncio.wait_for(watch.read(), 10)).waiter_run_id != "newer":
            pass
        watch.cancel()
        assert (await acquire(on_b, key, run_id="refused-again")).outcome == pb.ACQUIRE_OUTCOME_ALREADY_RUNNING
        on_bs_copy = await on_b.GetGuard(pb.GetGuardRequest(task_key=key), timeout=10)
        assert (on_bs_copy.state, on_bs_copy.run_id) == (pb.GUARD_STATE_RUNNING, held.guard.run_id), (
            "B force-released the superseded run before its grace"
        )
        assert (await on_a.CheckFence(pb.CheckFenceRequest(task_key=key, fencing_token=1), timeout=10)).valid
        superseding.cancel()
