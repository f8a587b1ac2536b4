"""Keys under the etcd prefix stay bounded by the guards, however many runs they see (issue 14)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from taskguard.store.etcd import RUNS_KEPT
from taskguard.store.etcd_client import range_end
from taskguard.store.etcdpb import etcdv3_pb2 as etcd
from taskguard.store.etcdpb import etcdv3_pb2_grpc as etcd_grpc
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.etcd_cluster import EtcdCluster
from tests.support import SidecarProcess, acquire

RUNS = 10_000
KEYS = 20
# g/, r/, h/ and o/ of each guard, plus the kept snapshots of its past runs.
KEYS_PER_GUARD = 4 + RUNS_KEPT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    etcd_cluster = EtcdCluster(tmp_path / "etcd", size=3)
    etcd_cluster.start()
    yield etcd_cluster
    etcd_cluster.stop()


async def _count(endpoint: str, prefix: bytes) -> int:
    async with aio.insecure_channel(endpoint) as channel:
        reply = await etcd_grpc.KVStub(channel).Range(
            etcd.RangeRequest(key=prefix, range_end=range_end(prefix), count_only=True), timeout=10
        )
        return int(reply.count)


async def test_ten_thousand_runs_leave_a_bounded_number_of_keys_and_recent_leases_still_answer(
    cluster: EtcdCluster, tmp_path: Path
) -> None:
    prefix = f"/growth-{uuid.uuid4().hex}/"
    workdir = tmp_path / "host"
    workdir.mkdir()
    sidecar = SidecarProcess(workdir, ("--store", cluster.url, "--etcd-prefix", prefix))
    await asyncio.to_thread(sidecar.start)
    keys = [f"growth-{i}::job" for i in range(KEYS)]
    leases: dict[str, list[str]] = {key: [] for key in keys}
    try:
        async with aio.insecure_channel(sidecar.address) as channel:
            stub = pb_grpc.TaskGuardStub(channel)

            async def runs_of(key: str) -> None:
                for _ in range(RUNS // KEYS):
                    taken = await acquire(stub, key)
                    assert taken.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
                    await stub.Release(
                        pb.ReleaseRequest(lease_id=taken.lease_id, status=pb.RUN_STATUS_SUCCEEDED), timeout=10
                    )
                    leases[key].append(taken.lease_id)

            await asyncio.gather(*(runs_of(key) for key in keys))
            total = await _count(cluster.members[0].endpoint, prefix.encode())
            runs_kept = await _count(cluster.members[0].endpoint, f"{prefix}l/".encode())
            print(f"\n{RUNS} runs on {KEYS} keys: {total} keys under the prefix, {runs_kept} of them run snapshots")
            assert runs_kept <= KEYS * RUNS_KEPT
            assert total <= KEYS * KEYS_PER_GUARD + 1  # + the sidecar's presence key

            # A recent past run's late release is still answered as it was; a long-gone one is unknown.
            for key in keys[:3]:
                recent = pb.ReleaseRequest(lease_id=leases[key][-2], status=pb.RUN_STATUS_SUCCEEDED)
                assert (await stub.Release(recent, timeout=10)).guard.state == pb.GUARD_STATE_SUCCEEDED
                forgotten = pb.ReleaseRequest(lease_id=leases[key][0], status=pb.RUN_STATUS_SUCCEEDED)
                with pytest.raises(aio.AioRpcError) as unknown:
                    await stub.Release(forgotten, timeout=10)
                assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        sidecar.close()
