"""Guards across hosts: several sidecar processes on one three-member etcd cluster."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from taskguard.store.etcdpb import etcdv3_pb2 as etcd_pb
from taskguard.store.etcdpb import etcdv3_pb2_grpc as etcd_grpc
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.etcd_cluster import EtcdCluster
from tests.fault.history import History, crash_cycle
from tests.support import SidecarProcess, acquire, open_watch, watch_until

LEASE_TTL_S = 4.0
# Long enough for a call to fail over to another member, and below the lease's TTL less the keep-alive
# interval, as the sidecar insists.
TIMEOUT = ("--etcd-timeout", "2.5s")
STORM = 500

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    etcd = EtcdCluster(tmp_path / "etcd", size=3)
    etcd.start()
    yield etcd
    etcd.stop()


@pytest.fixture
def hosts(cluster: EtcdCluster, tmp_path: Path) -> Iterator[list[SidecarProcess]]:
    """Three sidecars, each in a folder of its own (as if on its own host), sharing one guard prefix."""
    prefix = f"/hosts-{uuid.uuid4().hex}/"
    started = []
    for index in range(3):
        workdir = tmp_path / f"host{index}"
        workdir.mkdir()
        sidecar = SidecarProcess(
            workdir,
            ("--store", cluster.url, "--etcd-prefix", prefix, "--etcd-lease-ttl", f"{LEASE_TTL_S:g}s", *TIMEOUT),
        )
        sidecar.start()
        started.append(sidecar)
    yield started
    for sidecar in started:
        sidecar.close()


async def test_a_storm_spread_over_three_sidecars_has_one_winner_and_watchers_see_other_hosts(
    hosts: list[SidecarProcess], key: str
) -> None:
    channels = [aio.insecure_channel(host.address) for host in hosts]
    try:
        stubs = [pb_grpc.TaskGuardStub(channel) for channel in channels]
        watch = await open_watch(stubs[0], key_prefix=key)  # registered on host 0 before the storm
        responses = await asyncio.gather(
            *(acquire(stubs[i % 3], key, run_id=f"run-{i}", holder=f"host{i % 3}") for i in range(STORM))
        )
        winners = [r for r in responses if r.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED]
        assert len(winners) == 1
        winner = winners[0].guard
        assert all(r.guard.run_id == winner.run_id for r in responses)
        first = await asyncio.wait_for(watch.read(), 20)
        watch.cancel()
        assert first.type == pb.GUARD_EVENT_TYPE_ACQUIRED and first.guard.run_id == winner.run_id
        # Host 0's watcher saw it whichever host won; and every host answers reads with it.
        for stub in stubs:
            guard = await stub.GetGuard(pb.GetGuardRequest(task_key=key))
            assert guard.run_id == winner.run_id and guard.fencing_token == winner.fencing_token
    finally:
        for channel in channels:
            await channel.close()


async def test_a_killed_sidecars_guards_are_abandoned_and_taken_elsewhere(
    hosts: list[SidecarProcess], key: str
) -> None:
    doomed, survivor = hosts[0], hosts[1]
    async with aio.insecure_channel(doomed.address) as channel:
        call = pb_grpc.TaskGuardStub(channel).Hold()
        await call.write(pb.HoldRequest(acquire=pb.AcquireRequest(task_key=key, holder="doomed")))
        held = await asyncio.wait_for(call.read(), 10)
        assert held.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
        doomed.kill()
    async with aio.insecure_channel(survivor.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        assert (await acquire(stub, key)).outcome == pb.ACQUIRE_OUTCOME_ALREADY_RUNNING
        events = await watch_until(
            stub,
            lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_ABANDONED for e in seen),
            key_prefix=key,
            start_revision=held.guard.revision + 1,
            # The lease's TTL, plus etcd's lease checkpoint and the watch: well within three TTLs.
            timeout_s=3 * LEASE_TTL_S + 2,
        )
        assert events[-1].guard.fencing_token == held.guard.fencing_token
        taken = await acquire(stub, key)
        assert taken.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
        assert taken.guard.fencing_token == held.guard.fencing_token + 1


async def test_losing_one_etcd_member_keeps_service_and_losing_two_is_unavailable_never_wrong(
    cluster: EtcdCluster, hosts: list[SidecarProcess], key: str
) -> None:
    async with aio.insecure_channel(hosts[2].address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        first = await acquire(stub, key + "/a")
        await asyncio.to_thread(cluster.kill, cluster.members[0])
        assert (await acquire(stub, key + "/b")).outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
        await asyncio.to_thread(cluster.kill, cluster.members[1])
        answers: list[str] = []
        for i in range(5):
            try:
                request = pb.AcquireRequest(task_key=f"{key}/quorumless-{i}", run_id=f"quorumless-{i}")
                response = await stub.Acquire(request, timeout=15)
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                answers.append("UNAVAILABLE")
            else:
                answers.append(pb.AcquireOutcome.Name(response.outcome))
        assert answers == ["UNAVAILABLE"] * 5, answers
        for member in cluster.members[:2]:
            await asyncio.to_thread(cluster.restart, member)
        await asyncio.to_thread(cluster.wait_ready, cluster.members[:2])
        back = await stub.Acquire(pb.AcquireRequest(task_key=key + "/after"), timeout=30, wait_for_ready=True)
        assert back.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
        # An answer of UNAVAILABLE is not a "no": etcd may still commit a proposal it timed out on once
        # its quorum is back. The client's retry with the same run_id settles it either way: it gets
        # that run's lease, and the key was acquired once (fencing token 1), never twice.
        for i in range(5):
            request = pb.AcquireRequest(task_key=f"{key}/quorumless-{i}", run_id=f"quorumless-{i}")
            retried = await stub.Acquire(request, timeout=30)
            assert retried.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
            assert (retried.guard.run_id, retried.guard.fencing_token) == (f"quorumless-{i}", 1)
        # Reads wait for a new lease of the sidecar's own: until then it cannot say its copy is current.
        guard = await _read_once_current(stub, pb.GetGuardRequest(task_key=key + "/a"))
        assert guard.run_id == first.guard.run_id


async def _read_once_current(stub: pb_grpc.TaskGuardStub, request: pb.GetGuardRequest) -> pb.Guard:
    """GetGuard, through the UNAVAILABLE a sidecar answers while it has no etcd lease (bounded)."""
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        try:
            guard: pb.Guard = await stub.GetGuard(request, timeout=10)
            return guard
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_the_crash_loop_history_checks_out_on_etcd(hosts: list[SidecarProcess]) -> None:
    keys = [f"t-{uuid.uuid4().hex}::crash-{i}" for i in range(6)]
    history = History()
    for cycle in range(10):
        await crash_cycle(hosts[cycle % 3], keys, history, acks=40 + cycle * 7, clients_per_key=2, seed=cycle)
    assert {"acquired", "released", "refused"} <= {ack.kind for ack in history.acks}


async def test_a_join_on_one_host_hears_the_end_of_a_run_held_on_another(hosts: list[SidecarProcess], key: str) -> None:
    async with aio.insecure_channel(hosts[0].address) as a, aio.insecure_channel(hosts[1].address) as b:
        winner = pb_grpc.TaskGuardStub(a).Hold()
        await winner.write(pb.HoldRequest(acquire=pb.AcquireRequest(task_key=key, run_id="winner")))
        assert (await asyncio.wait_for(winner.read(), 10)).outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
        joiner = pb_grpc.TaskGuardStub(b).Hold()
        await joiner.write(
            pb.HoldRequest(acquire=pb.AcquireRequest(task_key=key, run_id="late", on_conflict=pb.ON_CONFLICT_JOIN))
        )
        joined = await asyncio.wait_for(joiner.read(), 10)
        assert joined.outcome == pb.ACQUIRE_OUTCOME_ALREADY_RUNNING and joined.guard.run_id == "winner"
        await winner.write(pb.HoldRequest(release=pb.HoldRelease(status=pb.RUN_STATUS_SUCCEEDED, detail="done")))
        assert (await asyncio.wait_for(winner.read(), 10)).event == pb.HOLD_EVENT_RELEASED
        final = await asyncio.wait_for(joiner.read(), 10)
        assert final.event == pb.HOLD_EVENT_WINNER_FINISHED
        assert (final.guard.run_id, final.guard.state) == ("winner", pb.GUARD_STATE_SUCCEEDED)


async def test_a_sidecar_cut_off_from_etcd_stops_saying_its_streams_hold_guards(
    cluster: EtcdCluster, hosts: list[SidecarProcess], key: str
) -> None:
    async with aio.insecure_channel(hosts[0].address) as channel:
        call = pb_grpc.TaskGuardStub(channel).Hold()
        await call.write(pb.HoldRequest(acquire=pb.AcquireRequest(task_key=key)))
        assert (await asyncio.wait_for(call.read(), 10)).outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
        for member in cluster.members:
            await asyncio.to_thread(cluster.kill, member)
        # The lease keep-alive fails, and the stream is told it lost the guard rather than left believing it.
        lost = await asyncio.wait_for(call.read(), 3 * LEASE_TTL_S + 10)
        assert lost.event == pb.HOLD_EVENT_LOST
        assert await call.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "lost its lease on the shared store" in (await call.details() or "")


async def test_a_sidecar_talks_to_etcd_over_tls_with_a_client_certificate(
    tmp_path: Path, pki: dict[str, Path], key: str
) -> None:
    etcd = EtcdCluster(tmp_path / "etcd-tls", tls=pki)
    await asyncio.to_thread(etcd.start)
    workdir = tmp_path / "tls-host"
    workdir.mkdir()
    tls = ("--etcd-ca", str(pki["ca"]), "--etcd-cert", str(pki["client_cert"]), "--etcd-key", str(pki["client_key"]))
    sidecar = SidecarProcess(workdir, ("--store", etcd.url, *tls))
    try:
        await asyncio.to_thread(sidecar.start)
        async with aio.insecure_channel(sidecar.address) as channel:
            held = await acquire(pb_grpc.TaskGuardStub(channel), key)
            assert held.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
        # Without the client certificate etcd refuses the connection: the sidecar does not start.
        plain_dir = tmp_path / "no-cert"
        plain_dir.mkdir()
        plain = SidecarProcess(plain_dir, ("--store", etcd.url, "--etcd-ca", str(pki["ca"])))
        with pytest.raises(RuntimeError, match="sidecar exited with 1"):
            await asyncio.to_thread(plain.start)
        assert "cannot start" in plain.log()
    finally:
        sidecar.close()
        etcd.stop()


def _enable_etcd_auth(etcd: EtcdCluster, password: str) -> None:
    with grpc.insecure_channel(etcd.members[0].endpoint) as channel:
        auth = etcd_grpc.AuthStub(channel)
        auth.UserAdd(etcd_pb.AuthUserAddRequest(name="root", password=password), timeout=10)
        with contextlib.suppress(grpc.RpcError):  # etcd may have the root role already
            auth.RoleAdd(etcd_pb.AuthRoleAddRequest(name="root"), timeout=10)
        auth.UserGrantRole(etcd_pb.AuthUserGrantRoleRequest(user="root", role="root"), timeout=10)
        auth.AuthEnable(etcd_pb.AuthEnableRequest(), timeout=10)


async def test_a_sidecar_authenticates_to_etcd_and_a_wrong_password_stops_it(tmp_path: Path, key: str) -> None:
    etcd = EtcdCluster(tmp_path / "etcd-auth")
    await asyncio.to_thread(etcd.start)
    try:
        await asyncio.to_thread(_enable_etcd_auth, etcd, "s3cret-etcd")
        for name, password in (("right", "s3cret-etcd"), ("wrong", "not-it")):
            (tmp_path / name).mkdir()
            (tmp_path / f"{name}.password").write_text(password)
        auth = ("--etcd-user", "root", "--etcd-password-file")
        good = SidecarProcess(tmp_path / "right", ("--store", etcd.url, *auth, str(tmp_path / "right.password")))
        bad = SidecarProcess(tmp_path / "wrong", ("--store", etcd.url, *auth, str(tmp_path / "wrong.password")))
        try:
            await asyncio.to_thread(good.start)
            async with aio.insecure_channel(good.address) as channel:
                assert (await acquire(pb_grpc.TaskGuardStub(channel), key)).outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
            with pytest.raises(RuntimeError, match="sidecar exited with 1"):
                await asyncio.to_thread(bad.start)
            assert "authentication failed" in bad.log() and "not-it" not in bad.log()
        finally:
            good.close()
            bad.close()
    finally:
        etcd.stop()
