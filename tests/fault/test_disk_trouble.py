"""A full or read-only disk: callers get UNAVAILABLE, never a wrong ACQUIRED, and service recovers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.support import SidecarProcess, acquire

MAX_ATTEMPTS = 20_000


@pytest.fixture
def small_disk(workdir: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of our own, so the test can fill it or make it read-only."""
    mount_point = workdir / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


async def _remount(mount_point: Path, mode: str) -> None:
    await asyncio.to_thread(subprocess.run, ["mount", "-o", f"remount,{mode}", str(mount_point)], check=True)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with filler.open("wb") as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 65536)
            out.flush()
            os.fsync(out.fileno())
    return filler


async def _acquire_until_unavailable(stub: pb_grpc.TaskGuardStub, prefix: str) -> list[pb.AcquireResponse]:
    """Acquire new keys until the store refuses; return every ACQUIRED answer that came before."""
    acknowledged: list[pb.AcquireResponse] = []
    for i in range(MAX_ATTEMPTS):
        try:
            response = await acquire(stub, f"{prefix}/{i}", holder="h" * 200, labels={"pad": "p" * 200})
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            assert "store unavailable" in (error.details() or "")
            return acknowledged
        assert response.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
        acknowledged.append(response)
    raise AssertionError(f"the store accepted {MAX_ATTEMPTS} acquisitions on a full disk")


async def test_a_full_disk_gives_unavailable_and_service_recovers_when_space_returns(
    sidecar_factory: Callable[..., SidecarProcess], small_disk: Path
) -> None:
    sidecar = sidecar_factory("--db", str(small_disk / "tg.db"))
    prefix = f"t-{uuid.uuid4().hex}::full"
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        await acquire(stub, f"{prefix}/warm-up")
        filler = _fill(small_disk)
        acknowledged = await _acquire_until_unavailable(stub, prefix)
        refused_key = f"{prefix}/{len(acknowledged)}"
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetGuard(pb.GetGuardRequest(task_key=refused_key))
        filler.unlink()
        recovered = await acquire(stub, refused_key)
        assert recovered.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
    sidecar.restart_after_kill()
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        for response in [*acknowledged, recovered]:
            guard = await stub.GetGuard(pb.GetGuardRequest(task_key=response.guard.task_key))
            assert guard.run_id == response.guard.run_id and guard.state == pb.GUARD_STATE_RUNNING


async def test_a_read_only_disk_is_a_clear_start_error_and_a_later_start_works(
    sidecar_factory: Callable[..., SidecarProcess], small_disk: Path, key: str
) -> None:
    # A mount cannot turn read-only under files open for writing (EBUSY), so
    # the sidecar meets the read-only disk at start; at run time the full-disk
    # test above covers a store that cannot write.
    sidecar = sidecar_factory("--db", str(small_disk / "tg.db"))
    async with aio.insecure_channel(sidecar.address) as channel:
        held = await acquire(pb_grpc.TaskGuardStub(channel), key)
    assert sidecar.terminate() == 0
    await _remount(small_disk, "ro")
    try:
        with pytest.raises(RuntimeError, match="sidecar exited with 1"):
            sidecar.start()
        assert "cannot start" in sidecar.log() and "read-only file system" in sidecar.log()
        assert "Traceback" not in sidecar.log()
    finally:
        await _remount(small_disk, "rw")
    sidecar.start()
    async with aio.insecure_channel(sidecar.address) as channel:
        guard = await pb_grpc.TaskGuardStub(channel).GetGuard(pb.GetGuardRequest(task_key=key))
    assert guard.run_id == held.guard.run_id
