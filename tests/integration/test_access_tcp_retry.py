"""Over TCP, a run's lease goes back by its run_id to the caller that made the run, never to another user.

Loopback callers are told apart by the uid the kernel keeps for their socket;
callers it cannot tell apart (from another host, without a client
certificate) by the retry_secret the client libraries send.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import Callable

import pytest

from taskguard_client import AsyncClient, Client
from tests.other_user import needs_root, python_as_nobody
from tests.support import ROOT, SidecarProcess

pytestmark = needs_root

# Another user who read the run_id off GetGuard (or `taskguard ls`) asks for the run's lease.
_THIEF = """
import sys, grpc
from taskguard_client.v1 import taskguard_pb2 as pb, taskguard_pb2_grpc as pb_grpc
from taskguard_client import Client, AlreadyRunning
address, key, run_id = sys.argv[1:4]
stub = pb_grpc.TaskGuardStub(grpc.insecure_channel(address))
taken = stub.Acquire(pb.AcquireRequest(task_key=key, run_id=run_id), timeout=10)
print(pb.AcquireOutcome.Name(taken.outcome), repr(taken.lease_id))
try:
    with Client(address, timeout=10) as client:
        lease = client.acquire(key, run_id=run_id)
        print("LEASE", lease.lease_id)
except AlreadyRunning as running:
    print("AlreadyRunning", running.run_id)
try:
    forged = stub.Acquire(pb.AcquireRequest(task_key=key, run_id=run_id, retry_secret="g" * 43), timeout=10)
    print(pb.AcquireOutcome.Name(forged.outcome), repr(forged.lease_id))
except ValueError as error:  # stubs without the field
    print(error)
"""


def _steal(address: str, key: str, run_id: str) -> list[str]:
    result = python_as_nobody(_THIEF, address, key, run_id)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def _refused(run_id: str) -> list[str]:
    return [
        "ACQUIRE_OUTCOME_ALREADY_RUNNING ''",
        f"AlreadyRunning {run_id}",
        "ACQUIRE_OUTCOME_ALREADY_RUNNING ''",
    ]


async def test_over_loopback_tcp_another_user_gets_already_running_and_the_owner_its_lease(
    sidecar_factory: Callable[..., SidecarProcess], key: str
) -> None:
    sidecar = sidecar_factory("--listen", "127.0.0.1:0")
    with Client(sidecar.address, timeout=10) as client:
        lease = client.acquire(key, run_id="root-run", ttl=60)
        assert await asyncio.to_thread(_steal, sidecar.address, key, "root-run") == _refused("root-run")
        # The owner's retries still get its lease: from the client library, and from a bare call.
        assert client.acquire(key, run_id="root-run", ttl=60).lease_id == lease.lease_id
        with Client(sidecar.address, timeout=10) as another_client_of_the_same_user:
            assert another_client_of_the_same_user.acquire(key, run_id="root-run").lease_id == lease.lease_id
        guard = client.get(key)
        assert guard.run_id == "root-run" and guard.fencing_token == lease.fencing_token
        assert guard.duplicate_count == 3  # the three refused attempts


def _local_address() -> str | None:
    """This host's own address on a network interface (not loopback), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent, the kernel only picks a route
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") else address


_SAME_USER_OTHER_PROCESS = """
import sys
from taskguard_client import Client, AlreadyRunning
try:
    with Client(sys.argv[1], timeout=10) as client:
        print("LEASE", client.acquire(sys.argv[2], run_id=sys.argv[3]).lease_id)
except AlreadyRunning:
    print("AlreadyRunning")
"""


async def test_where_callers_cannot_be_told_apart_only_the_retry_secret_gets_a_lease_back(
    sidecar_factory: Callable[..., SidecarProcess], key: str
) -> None:
    host = _local_address()
    if host is None:
        pytest.skip("this host has no non-loopback address to be called on")
    # Called on its network address, the sidecar sees a peer it cannot look up by uid: a shared principal.
    sidecar = sidecar_factory("--listen", f"{host}:0", "--allow-remote")
    async with AsyncClient(sidecar.address, timeout=10) as client:
        lease = await client.acquire(key, run_id="shared-run", ttl=60)
        assert await asyncio.to_thread(_steal, sidecar.address, key, "shared-run") == _refused("shared-run")
        again = await client.acquire(key, run_id="shared-run", ttl=60)
        assert again.lease_id == lease.lease_id
        async with AsyncClient(sidecar.address, timeout=10) as second_client:  # one process, one secret
            assert (await second_client.acquire(key, run_id="shared-run")).lease_id == lease.lease_id
        # A process that does not have the secret is refused too, even the same user's: it cannot prove it made it.
        other = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", _SAME_USER_OTHER_PROCESS, sidecar.address, key, "shared-run"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert other.stdout.strip() == "AlreadyRunning", other.stderr
        guard = await client.get(key)
        assert guard.run_id == "shared-run" and guard.fencing_token == lease.fencing_token
        # A Hold stream's acquisition carries the secret too.
        async with client.hold(f"{key}/held", run_id="held-run") as held:
            assert (await client.acquire(f"{key}/held", run_id="held-run")).lease_id == held.lease_id
