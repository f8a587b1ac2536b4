"""A Hold stream whose caller closes it while the sidecar is writing to it.

grpc core fails such a write with ``ExecuteBatchError`` (an ``aio.InternalError``);
the window is the write itself, so a real client hits it only now and then (the
racing-clients test on etcd did, in CI). The servicer is driven here with a context
that closes at exactly that moment, on an in-process sidecar with its real store,
engine and lease keeper; the other side of the race (the force-release that ends
the run) goes through real gRPC.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from grpc import aio
from grpc._cython import cygrpc

from taskguard_client.v1 import taskguard_pb2 as pb
from tests.support import InProcess, watch_until


class ClosingContext:
    """The servicer's side of a stream whose caller is gone from the write numbered ``closed_at`` on."""

    def __init__(self, first: pb.HoldRequest, closed_at: int) -> None:
        self._first: pb.HoldRequest | None = first
        self._closed_at = closed_at
        self.written: list[pb.HoldResponse] = []
        self.first_answer_written = asyncio.Event()

    async def read(self) -> Any:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        await asyncio.Event().wait()  # the caller sends nothing more; the run's end interrupts this read

    async def write(self, message: pb.HoldResponse) -> None:
        if len(self.written) >= self._closed_at:
            raise cygrpc.ExecuteBatchError('Failed "execute_batch"')
        self.written.append(message)
        self.first_answer_written.set()

    async def abort(self, code: Any, details: str) -> None:
        raise AssertionError(f"the sidecar tried to answer {code.name}: {details} on a closed stream")

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:40000"

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


async def test_the_lost_answer_to_a_closed_stream_is_not_an_internal_error(
    in_process: InProcess, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    context = ClosingContext(pb.HoldRequest(acquire=pb.AcquireRequest(task_key=key, holder="h")), closed_at=1)
    holding = asyncio.ensure_future(in_process.sidecar.service.Hold(None, context))
    await asyncio.wait_for(context.first_answer_written.wait(), 10)
    assert context.written[0].outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
    await in_process.stub.ForceRelease(pb.ForceReleaseRequest(task_key=key, reason="the operator took it"))
    # The write of HOLD_EVENT_LOST fails: the failure goes back to grpc (which ignores it for a closed call),
    # not into an INTERNAL status and a traceback in the sidecar's log.
    with pytest.raises(aio.InternalError):
        await asyncio.wait_for(holding, 10)
    assert not _errors(caplog)
    guard = await in_process.stub.GetGuard(pb.GetGuardRequest(task_key=key))
    assert guard.state == pb.GUARD_STATE_CANCELLED


async def test_a_stream_closed_during_its_first_answer_abandons_the_run_it_won(
    in_process: InProcess, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    context = ClosingContext(pb.HoldRequest(acquire=pb.AcquireRequest(task_key=key, holder="h")), closed_at=0)
    with pytest.raises(aio.InternalError):
        await asyncio.wait_for(in_process.sidecar.service.Hold(None, context), 10)
    assert not _errors(caplog)
    # No one heard of the run, and its stream is gone: it ends as a dropped stream ends, not held forever.
    events = await watch_until(
        in_process.stub,
        lambda events: any(event.type == pb.GUARD_EVENT_TYPE_ABANDONED for event in events),
        key_prefix=key,
        start_revision=1,
    )
    assert events[-1].guard.state == pb.GUARD_STATE_ABANDONED
