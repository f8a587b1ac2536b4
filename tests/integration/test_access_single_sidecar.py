"""One database and one socket have one sidecar: a second `taskguard serve` stops before it touches either."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from grpc import aio

from taskguard import config, server
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.other_user import serve_or_exit
from tests.support import SidecarProcess, acquire

pytestmark = pytest.mark.slow


async def _still_serving(sidecar: SidecarProcess, key: str) -> None:
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        held = await acquire(stub, key)
        assert held.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
        await stub.Release(pb.ReleaseRequest(lease_id=held.lease_id, status=pb.RUN_STATUS_SUCCEEDED), timeout=10)


async def test_a_second_sidecar_on_the_same_database_or_socket_exits_naming_the_first_and_leaves_it_serving(
    sidecar: SidecarProcess, workdir: Path, key: str
) -> None:
    assert sidecar.process is not None
    pid = sidecar.process.pid
    socket_inode = sidecar.socket.stat().st_ino
    attempts = {
        "same database": ("--listen", f"unix:{workdir / 'other.sock'}", "--db", str(sidecar.db)),
        "same socket": ("--listen", sidecar.address, "--db", str(workdir / "other.db")),
        "same both": ("--listen", sidecar.address, "--db", str(sidecar.db)),
    }
    for what, args in attempts.items():
        code, stderr = await asyncio.to_thread(serve_or_exit, list(args), dict(os.environ))
        assert code == 1, (what, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, (what, stderr)
        assert f"in use by another taskguard serve (pid {pid}" in lines[0], (what, stderr)
        assert ("database" if what != "same socket" else "socket") in lines[0]
        # The first one's socket was never touched, and it still writes.
        assert sidecar.socket.is_socket() and sidecar.socket.stat().st_ino == socket_inode, what
        await _still_serving(sidecar, f"{key}/{what}")
    assert sidecar.terminate() == 0
    assert "UNIQUE constraint" not in sidecar.log()


async def test_a_stale_socket_left_by_a_killed_sidecar_is_replaced_on_restart(
    sidecar: SidecarProcess, key: str
) -> None:
    async with aio.insecure_channel(sidecar.address) as channel:
        held = await acquire(pb_grpc.TaskGuardStub(channel), key)
    sidecar.kill()
    assert sidecar.socket.is_socket()  # SIGKILL: nobody removed it
    sidecar.start()
    async with aio.insecure_channel(sidecar.address) as channel:
        guard = await pb_grpc.TaskGuardStub(channel).GetGuard(pb.GetGuardRequest(task_key=key), timeout=10)
    assert guard.run_id == held.guard.run_id


async def test_a_socket_that_another_program_serves_is_never_removed(
    sidecar_factory: Callable[..., SidecarProcess], workdir: Path
) -> None:
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = workdir / "tg.sock"
    other.bind(str(path))
    other.listen(8)
    try:
        sidecar = sidecar_factory(start=False)
        with pytest.raises(RuntimeError, match="sidecar exited with 1"):
            sidecar.start()
        assert f"is served by another process (pid {os.getpid()})" in sidecar.log()
        assert path.is_socket()
        other.setblocking(False)
        accepted, _ = other.accept()  # the probe that found it live
        accepted.close()
    finally:
        other.close()


async def test_two_sidecars_in_one_process_cannot_share_a_database(
    settings_for: Callable[..., config.Settings], workdir: Path
) -> None:
    first = await server.start(settings_for())
    try:
        try:
            second = await server.start(settings_for(listen=f"unix:{workdir / 'second.sock'}"))
        except Exception as error:
            assert f"in use by another taskguard serve (pid {os.getpid()}" in str(error)
        else:
            await second.stop(0)
            raise AssertionError("a second sidecar started on the same database")
        # The refused start left the first one's files alone and closed what it opened.
        assert await asyncio.to_thread(Path(first.address.removeprefix("unix:")).is_socket)
    finally:
        await first.stop(0)
    again = await server.start(settings_for())  # released at stop
    await again.stop(0)
