"""Limits count who is calling, so a caller cannot dodge them by renaming itself or crowd others out."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc import aio

from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.other_user import python_as_nobody
from tests.support import ROOT, InProcess, SidecarProcess, acquire, open_watch, watch_until

TIMEOUT_S = 20.0
AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")


async def test_renaming_the_holder_does_not_dodge_the_guards_per_caller_limit(
    sidecar_factory: Callable[..., SidecarProcess], workdir: Any, key: str
) -> None:
    # A socket others may open, so that another OS user is another caller.
    sidecar = sidecar_factory("--socket-mode", "0666", "--max-guards-per-holder", "2")
    os.chmod(workdir, 0o755)
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        await acquire(stub, f"{key}-1", holder="first")
        await acquire(stub, f"{key}-2", holder="second")
        for holder in ("third", "first", ""):
            with pytest.raises(aio.AioRpcError) as refused:
                await acquire(stub, f"{key}-3", holder=holder)
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"uid:{os.getuid()} already holds 2 RUNNING guards" in (refused.value.details() or "")
    # Another user is another caller, with a count of its own.
    process = await asyncio.create_subprocess_exec(
        *AS_NOBODY,
        *(sys.executable, "-m", "taskguard", "--addr", sidecar.address, "run", f"{key}-3", "--", "true"),
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    _, err = await asyncio.wait_for(process.communicate(), TIMEOUT_S)
    assert process.returncode == 0, err.decode()


async def test_one_connection_cannot_take_every_watcher(in_process_factory: Callable[..., Any], key: str) -> None:
    harness: InProcess = await in_process_factory(listen="127.0.0.1:0", max_watchers=10, max_watchers_per_connection=3)
    watches = [await open_watch(harness.stub, key_prefix=key) for _ in range(3)]
    greedy = harness.stub.WatchGuards(pb.WatchGuardsRequest(key_prefix=key))
    with pytest.raises(aio.AioRpcError) as refused:
        await asyncio.wait_for(greedy.read(), TIMEOUT_S)
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "per connection" in (refused.value.details() or "")
    # The operator's dashboard, on a connection of its own, still gets in.
    async with aio.insecure_channel(harness.address) as channel:
        other = await open_watch(pb_grpc.TaskGuardStub(channel), key_prefix=key)
        other.cancel()
    for watch in watches:
        watch.cancel()


async def test_the_per_connection_watcher_limit_stays_below_the_global_one(
    in_process_factory: Callable[..., Any], key: str
) -> None:
    harness: InProcess = await in_process_factory(listen="127.0.0.1:0", max_watchers=4)
    watches = [await open_watch(harness.stub, key_prefix=key) for _ in range(3)]
    with pytest.raises(aio.AioRpcError) as refused:
        await asyncio.wait_for(harness.stub.WatchGuards(pb.WatchGuardsRequest(key_prefix=key)).read(), TIMEOUT_S)
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    async with aio.insecure_channel(harness.address) as channel:
        (await open_watch(pb_grpc.TaskGuardStub(channel), key_prefix=key)).cancel()
    for watch in watches:
        watch.cancel()


_HOLD_AS_ANOTHER_USER = """
import sys
from taskguard_client import Client
address, *keys = sys.argv[1:]
with Client(address, timeout=10) as client:
    for key in keys:
        print(client.acquire(key, ttl=600).lease_id)
"""


async def _queue(stub: pb_grpc.TaskGuardStub, task_key: str) -> Any:
    call = stub.Hold()
    await call.write(pb.HoldRequest(acquire=pb.AcquireRequest(task_key=task_key, on_conflict=pb.ON_CONFLICT_QUEUE)))
    return call


async def test_queueing_does_not_take_a_caller_past_its_guards_per_caller_limit(
    sidecar_factory: Callable[..., SidecarProcess], workdir: Any, key: str
) -> None:
    """Each place in a queue is a run its caller gets without asking again: the places count as its guards."""
    sidecar = sidecar_factory("--socket-mode", "0666", "--max-guards-per-holder", "3")
    os.chmod(workdir, 0o755)
    taken = [f"{key}/taken-{i}" for i in range(3)]
    # Another user holds the keys this caller will queue for.
    others = await asyncio.to_thread(python_as_nobody, _HOLD_AS_ANOTHER_USER, sidecar.address, *taken)
    assert others.returncode == 0, others.stderr
    async with aio.insecure_channel(sidecar.address) as channel:
        stub = pb_grpc.TaskGuardStub(channel)
        for mine in ("a", "b"):
            await acquire(stub, f"{key}/{mine}", ttl_s=600)
        first = await _queue(stub, taken[0])
        queued = await asyncio.wait_for(first.read(), TIMEOUT_S)
        assert queued.outcome == pb.ACQUIRE_OUTCOME_QUEUED
        second = await _queue(stub, taken[1])
        with pytest.raises(aio.AioRpcError) as refused:
            await asyncio.wait_for(second.read(), TIMEOUT_S)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"uid:{os.getuid()} already holds 2 RUNNING guards and waits in 1 queues" in (
            refused.value.details() or ""
        )
        # The place ends with its stream: room again. (Watched from the queueing on: the leave may come first.)
        first.cancel()
        await watch_until(
            stub,
            lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_DEQUEUED for e in seen),
            key_prefix=taken[0],
            start_revision=queued.guard.revision,
        )
        third = await _queue(stub, taken[2])
        assert (await asyncio.wait_for(third.read(), TIMEOUT_S)).outcome == pb.ACQUIRE_OUTCOME_QUEUED
        third.cancel()
