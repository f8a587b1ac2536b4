"""A guard prefix far past one gRPC message (issue 21): sidecars still start on it, and see all of it.

The guards and run snapshots are written straight into a real etcd, as the store lays them out, so the
test does not depend on thousands of acquisitions to get there.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from grpc import aio

from taskguard.guard.model import Event, EventType, GuardRecord, GuardState, RunStatus
from taskguard.store import codec
from taskguard.store.etcdpb import etcdv3_pb2 as etcd
from taskguard.store.etcdpb import etcdv3_pb2_grpc as etcd_grpc
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.etcd_cluster import EtcdCluster
from tests.support import SidecarProcess, acquire, watch_until

GUARDS = 10_000  # each with its run's snapshot: 20,000 keys
PUTS_PER_TXN = 100  # under etcd's default of 128 operations per transaction
GRPC_DEFAULT_MAX_BYTES = 4 << 20

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def big_etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "etcd")
    cluster.start()
    yield cluster
    cluster.stop()


def _guard(index: int, at: datetime) -> GuardRecord:
    key = f"big-{index:05d}::job"
    return GuardRecord(
        task_key=key,
        state=GuardState.SUCCEEDED if index % 3 else GuardState.FAILED,
        run_id=f"run-{index}",
        holder=f"worker-{index % 17}",
        lease_id=f"lease-{uuid.uuid4().hex}",
        fencing_token=1 + index % 5,
        attempt=1 + index % 5,
        started_at=at,
        heartbeat_at=at,
        last_seen=0.0,
        ttl_s=60.0,
        expires_at=at + timedelta(seconds=60),
        expires_deadline=None,
        stream_bound=False,
        labels=(("team", "payments"), ("job", f"nightly-{index}")),
        last_status=RunStatus.SUCCEEDED if index % 3 else RunStatus.FAILED,
        last_detail="finished: " + "x" * 200,
        released_at=at + timedelta(seconds=5),
        duplicate_count=index % 7,
    )


async def _fill(endpoint: str, prefix: str) -> tuple[dict[str, GuardRecord], int]:
    """GUARDS guards and as many run snapshots under ``prefix``; the guards and the bytes written."""
    at = datetime.now(UTC).replace(microsecond=0)
    guards = {record.task_key: record for record in (_guard(i, at) for i in range(GUARDS))}
    puts: list[tuple[bytes, bytes]] = []
    for record in guards.values():
        released = Event(EventType.RELEASED, record, record.released_at or at)
        document = {"record": codec.record_to_doc(record), "events": [codec.event_to_doc(released)]}
        puts.append((f"{prefix}g/{record.task_key}".encode(), codec.dumps(document).encode()))
        puts.append((f"{prefix}l/{record.lease_id}".encode(), codec.dumps(codec.record_to_doc(record)).encode()))
    async with aio.insecure_channel(endpoint) as channel:
        kv = etcd_grpc.KVStub(channel)
        for start in range(0, len(puts), PUTS_PER_TXN):
            ops = [
                etcd.RequestOp(request_put=etcd.PutRequest(key=key, value=value))
                for key, value in puts[start : start + PUTS_PER_TXN]
            ]
            await kv.Txn(etcd.TxnRequest(success=ops), timeout=30)
    return guards, sum(len(key) + len(value) for key, value in puts)


def _sidecar(tmp_path: Path, name: str, cluster: EtcdCluster, prefix: str) -> SidecarProcess:
    workdir = tmp_path / name
    workdir.mkdir()
    return SidecarProcess(workdir, ("--store", cluster.url, "--etcd-prefix", prefix))


def _same(guard: pb.Guard, record: GuardRecord) -> None:
    assert (guard.task_key, guard.run_id, guard.fencing_token, guard.duplicate_count) == (
        record.task_key,
        record.run_id,
        record.fencing_token,
        record.duplicate_count,
    )
    assert guard.state == int(record.state) and guard.labels == dict(record.labels)


async def _list_all(stub: pb_grpc.TaskGuardStub, prefix: str = "") -> list[pb.Guard]:
    found: list[pb.Guard] = []
    token = ""
    for _ in range(1000):
        page = await stub.ListGuards(
            pb.ListGuardsRequest(key_prefix=prefix, page_size=1000, page_token=token), timeout=30
        )
        found.extend(page.guards)
        token = page.next_page_token
        if not token:
            return found
    raise AssertionError("ListGuards never reached its last page")


async def test_sidecars_start_on_a_prefix_far_larger_than_one_message_and_serve_all_of_it(
    big_etcd: EtcdCluster, tmp_path: Path
) -> None:
    prefix = f"/big-{uuid.uuid4().hex}/"
    guards, size = await _fill(big_etcd.members[0].endpoint, prefix)
    assert size > 5 * GRPC_DEFAULT_MAX_BYTES, size  # about 20 MiB: one Range reply would be refused

    first = _sidecar(tmp_path, "one", big_etcd, prefix)
    began = time.monotonic()
    await asyncio.to_thread(first.start)
    first_start_s = time.monotonic() - began
    second = _sidecar(tmp_path, "two", big_etcd, prefix)
    try:
        async with aio.insecure_channel(first.address) as channel:
            stub = pb_grpc.TaskGuardStub(channel)
            sample = [*random.Random(21).sample(sorted(guards), 200), min(guards), max(guards)]
            for key in sample:
                _same(await stub.GetGuard(pb.GetGuardRequest(task_key=key), timeout=10), guards[key])
            listed = await _list_all(stub)
            assert [guard.task_key for guard in listed] == sorted(guards)
            for guard in listed:
                _same(guard, guards[guard.task_key])

            # A loaded guard is decided on with its real revision: the next run gets the next token.
            reused = sample[0]
            taken = await acquire(stub, reused, run_id="after-load")
            expected = guards[reused]
            if expected.state is GuardState.FAILED:
                assert taken.outcome == pb.ACQUIRE_OUTCOME_RETRY_REQUIRES_APPROVAL
            else:
                assert taken.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
                assert taken.guard.fencing_token == expected.fencing_token + 1

            # The second sidecar loads while the first keeps changing guards, old and new.
            writes: list[str] = []
            stop = asyncio.Event()

            async def write() -> None:
                for i in range(100_000):
                    if stop.is_set():
                        return
                    key = f"big-{i % GUARDS:05d}::job" if i % 2 else f"new-{i}::job"
                    await acquire(stub, key, run_id=f"during-{i}")
                    writes.append(key)

            writer = asyncio.create_task(write())
            began = time.monotonic()
            await asyncio.to_thread(second.start)
            second_start_s = time.monotonic() - began
            stop.set()
            await asyncio.wait_for(writer, 30)
            assert len(writes) > 10, "the first sidecar wrote next to nothing while the second loaded"
            last = await acquire(stub, f"last-{uuid.uuid4().hex}::job")

        async with aio.insecure_channel(second.address) as channel:
            other = pb_grpc.TaskGuardStub(channel)
            await watch_until(
                other,
                lambda seen: any(event.guard.revision >= last.guard.revision for event in seen),
                key_prefix=last.guard.task_key,
                include_snapshot=True,
                timeout_s=30,
            )
            async with aio.insecure_channel(first.address) as channel_one:
                one = pb_grpc.TaskGuardStub(channel_one)
                for key in {*writes, reused}:
                    here, there = await asyncio.gather(
                        one.GetGuard(pb.GetGuardRequest(task_key=key), timeout=10),
                        other.GetGuard(pb.GetGuardRequest(task_key=key), timeout=10),
                    )
                    if there.duplicate_count < here.duplicate_count:
                        # Refusals are put in batches after their answers (LAZY): the other copy hears them
                        # with the next batch, which no g/ put of another key waits for.
                        await watch_until(
                            other,
                            lambda seen, want=here.duplicate_count: any(e.guard.duplicate_count >= want for e in seen),
                            key_prefix=key,
                            include_snapshot=True,
                            timeout_s=30,
                        )
                        there = await other.GetGuard(pb.GetGuardRequest(task_key=key), timeout=10)
                    assert replace_stale(there) == replace_stale(here), key
            listed = await _list_all(other, "big-")
            assert len(listed) == GUARDS
        print(
            f"\n{2 * GUARDS} keys, {size / (1 << 20):.1f} MiB under the prefix: the first sidecar started in "
            f"{first_start_s:.2f} s, the second (while the first wrote {len(writes)} acquisitions) in "
            f"{second_start_s:.2f} s"
        )
    finally:
        first.close()
        second.close()


def replace_stale(guard: pb.Guard) -> pb.Guard:
    """The guard without the fields each sidecar works out for itself (staleness is on its own clock)."""
    copy = pb.Guard()
    copy.CopyFrom(guard)
    copy.stale = False
    return copy
