"""A sidecar cut off from etcd (issue 14): it never vouches for what it cannot know.

Three etcd members; sidecar A reaches them only through TCP proxies the test cuts, sidecar B directly.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.etcd_cluster import EtcdCluster
from tests.support import SidecarProcess, acquire, open_watch, watch_until
from tests.tcp_proxy import Proxy

LEASE_TTL_S = 3.0
TIMEOUT_S = 1.5  # plus the keep-alive interval (1 s), below the TTL
SLACK_S = 3.0  # a loaded machine

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    etcd = EtcdCluster(tmp_path / "etcd", size=3)
    etcd.start()
    yield etcd
    etcd.stop()


@pytest.fixture
async def proxies(cluster: EtcdCluster) -> AsyncIterator[list[Proxy]]:
    started = [Proxy(member.endpoint) for member in cluster.members]
    for proxy in started:
        await proxy.start()
    yield started
    for proxy in started:
        await proxy.close()


def _sidecar(tmp_path: Path, name: str, endpoints: list[str], prefix: str) -> SidecarProcess:
    workdir = tmp_path / name
    workdir.mkdir()
    flags = (
        "--store", "etcd://" + ",".join(endpoints),
        "--etcd-prefix", prefix,
        "--etcd-lease-ttl", f"{LEASE_TTL_S:g}s",
        "--etcd-timeout", f"{TIMEOUT_S:g}s",
    )  # fmt: skip
    return SidecarProcess(workdir, flags)


@pytest.fixture
async def sides(
    cluster: EtcdCluster, proxies: list[Proxy], tmp_path: Path
) -> AsyncIterator[tuple[SidecarProcess, SidecarProcess]]:
    prefix = f"/partition-{uuid.uuid4().hex}/"
    a = _sidecar(tmp_path, "a", [proxy.endpoint for proxy in proxies], prefix)
    b = _sidecar(tmp_path, "b", [member.endpoint for member in cluster.members], prefix)
    await asyncio.to_thread(a.start)
    await asyncio.to_thread(b.start)
    yield a, b
    a.close()
    b.close()


async def _unavailable(call: object, limit_s: float) -> float:
    """Await ``call``; it must fail UNAVAILABLE within ``limit_s``. How long it took."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(aio.AioRpcError) as failed:
        await asyncio.wait_for(call, limit_s)  # type: ignore[arg-type]
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
    return loop.time() - began


async def test_a_cut_off_sidecar_tells_its_holder_first_and_never_vouches_for_a_fence_it_cannot_check(
    sides: tuple[SidecarProcess, SidecarProcess], proxies: list[Proxy], key: str
) -> None:
    a, b = sides
    loop = asyncio.get_running_loop()
    unary_key = key + "/unary"
    async with aio.insecure_channel(a.address) as a_channel, aio.insecure_channel(b.address) as b_channel:
        on_a, on_b = pb_grpc.TaskGuardStub(a_channel), pb_grpc.TaskGuardStub(b_channel)
        hold = on_a.Hold()
        await hold.write(pb.HoldRequest(acquire=pb.AcquireRequest(task_key=key, holder="on-a")))
        held = await asyncio.wait_for(hold.read(), 10)
        assert held.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
        unary = await acquire(on_a, unary_key, ttl_s=120, holder="on-a")
        assert unary.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
        fence = pb.CheckFenceRequest(task_key=key, fencing_token=held.guard.fencing_token)
        assert (await on_a.CheckFence(fence, timeout=10)).valid
        watch = await open_watch(on_b, key_prefix=key, start_revision=held.guard.revision + 1)

        for proxy in proxies:
            proxy.cut()
        cut_at = loop.time()

        # A tells its holder first...
        lost = await asyncio.wait_for(hold.read(), LEASE_TTL_S + TIMEOUT_S + SLACK_S)
        lost_at = loop.time()
        assert lost.event == pb.HOLD_EVENT_LOST
        # ...and from then on vouches for no fence, and answers no read from a copy it cannot vouch for.
        for request in (fence, pb.CheckFenceRequest(task_key=unary_key, fencing_token=1)):
            took = await _unavailable(on_a.CheckFence(request, timeout=30), TIMEOUT_S + SLACK_S)
            assert took <= TIMEOUT_S + SLACK_S
        await _unavailable(on_a.GetGuard(pb.GetGuardRequest(task_key=key), timeout=30), 5)
        await _unavailable(on_a.ListGuards(pb.ListGuardsRequest(key_prefix=key), timeout=30), 5)

        # Only after that can B take the guard: etcd expires A's lease and B abandons the run.
        abandoned = None
        while abandoned is None:
            event = await asyncio.wait_for(watch.read(), 3 * LEASE_TTL_S + SLACK_S)
            if event.type == pb.GUARD_EVENT_TYPE_ABANDONED:
                abandoned = event
        abandoned_at = loop.time()
        watch.cancel()
        taken = await acquire(on_b, key, holder="on-b")
        assert taken.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
        assert taken.guard.fencing_token == held.guard.fencing_token + 1
        margin_s = abandoned_at - lost_at
        print(
            f"\nlease TTL {LEASE_TTL_S:g}s, etcd_timeout {TIMEOUT_S:g}s: A told its holder {lost_at - cut_at:.2f}s "
            f"after the cut; B could take the guard {abandoned_at - cut_at:.2f}s after it: margin {margin_s:.2f}s"
        )
        assert margin_s > 0

        # While A is cut off its fence checks keep failing; B answers from etcd.
        await _unavailable(on_a.CheckFence(fence, timeout=30), TIMEOUT_S + SLACK_S)
        assert not (await on_b.CheckFence(fence, timeout=10)).valid
        new_fence = pb.CheckFenceRequest(task_key=key, fencing_token=taken.guard.fencing_token)
        assert (await on_b.CheckFence(new_fence, timeout=10)).valid
        # A's unary guard is A's to expire (its TTL is far off): B, whose copy says A is gone, waits it out.
        still = await on_b.GetGuard(pb.GetGuardRequest(task_key=unary_key), timeout=10)
        assert still.state == pb.GUARD_STATE_RUNNING

        for proxy in proxies:
            proxy.heal()
        # Back in touch: A's fence check reads etcd, and its copy catches up with what B did.
        assert not (await on_a.CheckFence(fence, timeout=30, wait_for_ready=True)).valid
        assert (await on_a.CheckFence(new_fence, timeout=30)).valid
        await watch_until(
            on_a,
            lambda seen: any(e.guard.fencing_token == taken.guard.fencing_token for e in seen),
            key_prefix=key,
            start_revision=taken.guard.revision,
            timeout_s=30,
        )
