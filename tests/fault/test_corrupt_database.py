"""A corrupted or truncated database is reported at start, never silently replaced."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

import pytest
from grpc import aio

from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.support import SidecarProcess, acquire


async def _database_with_guards(sidecar: SidecarProcess) -> None:
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        for i in range(300):
            await acquire(stub, f"t-{uuid.uuid4().hex}::job-{i}", holder="h" * 100)
    assert sidecar.terminate() == 0


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
async def test_a_damaged_database_stops_the_start_with_a_clear_error(
    sidecar_factory: Callable[..., SidecarProcess], damage: str
) -> None:
    sidecar = sidecar_factory()
    await _database_with_guards(sidecar)
    data = sidecar.db.read_bytes()
    if damage == "garbage":
        damaged = os.urandom(len(data))
    else:
        damaged = data[: len(data) // 3]
    sidecar.db.write_bytes(damaged)
    with pytest.raises(RuntimeError, match="sidecar exited with 1"):
        sidecar.start()
    log = sidecar.log()
    assert "cannot start" in log and "Traceback" not in log
    assert "not a usable Task Guard database" in log or "integrity check failed" in log
    assert sidecar.db.read_bytes() == damaged, "the damaged file must be left for the operator"
