"""Bad input is INVALID_ARGUMENT naming the field and the rule, and changes nothing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.support import InProcess, acquire, seconds

pytestmark = pytest.mark.backends("sqlite", "etcd")

KEY_RULE = "task_key: must be 1..512 bytes of printable UTF-8"
TTL_RULE = "ttl: must be > 0s and <= 86400s"
STATUS_RULE = "status: must be one of RUN_STATUS_SUCCEEDED, RUN_STATUS_FAILED, RUN_STATUS_CANCELLED"

Call = Callable[[pb_grpc.TaskGuardStub, str], Awaitable[Any]]


def _acquire(**fields: Any) -> Call:
    def call(stub: pb_grpc.TaskGuardStub, lease_id: str) -> Awaitable[Any]:
        return stub.Acquire(pb.AcquireRequest(**fields))

    return call


def _release(**fields: Any) -> Call:
    def call(stub: pb_grpc.TaskGuardStub, lease_id: str) -> Awaitable[Any]:
        return stub.Release(pb.ReleaseRequest(**{"lease_id": lease_id, **fields}))

    return call


CASES: dict[str, tuple[Call, str]] = {
    "empty task_key": (_acquire(task_key=""), KEY_RULE),
    "task_key over 512 bytes": (_acquire(task_key="é" * 257), KEY_RULE),
    "newline in task_key": (_acquire(task_key="a\nb"), KEY_RULE),
    "NUL in task_key": (_acquire(task_key="a\x00b"), KEY_RULE),
    "DEL in task_key": (_acquire(task_key="a\x7fb"), KEY_RULE),
    "zero ttl": (_acquire(task_key="k::t", ttl=Duration(seconds=0)), TTL_RULE),
    "negative ttl": (_acquire(task_key="k::t", ttl=Duration(seconds=-5)), TTL_RULE),
    "ttl over the maximum": (_acquire(task_key="k::t", ttl=Duration(seconds=86401)), TTL_RULE),
    "unknown on_conflict": (
        _acquire(task_key="k::t", on_conflict=7),
        "on_conflict: must be one of ON_CONFLICT_UNSPECIFIED, ON_CONFLICT_REJECT, ON_CONFLICT_JOIN, ON_CONFLICT_QUEUE,"
        " ON_CONFLICT_KEEP_NEWEST (got 7)",
    ),
    "join on a unary acquire": (
        _acquire(task_key="k::t", on_conflict=pb.ON_CONFLICT_JOIN),
        "on_conflict: ON_CONFLICT_JOIN needs a Hold stream",
    ),
    "release with no status": (_release(), f"{STATUS_RULE} (got 0)"),
    "release with an unknown status": (_release(status=42), f"{STATUS_RULE} (got 42)"),
    "release with no lease_id": (
        lambda stub, _: stub.Release(pb.ReleaseRequest(status=pb.RUN_STATUS_SUCCEEDED)),
        "lease_id: is required",
    ),
    "renew with a zero ttl": (
        lambda stub, lease_id: stub.Renew(pb.RenewRequest(lease_id=lease_id, ttl=seconds(0))),
        TTL_RULE,
    ),
    "list with an unknown state": (
        lambda stub, _: stub.ListGuards(pb.ListGuardsRequest(states=[99])),
        "states: must be one of",
    ),
    "list with a forged page token": (
        lambda stub, _: stub.ListGuards(pb.ListGuardsRequest(page_token="%%%")),
        "page_token: is not a token this server issued",
    ),
    "approve-retry with an empty key": (
        lambda stub, _: stub.ApproveRetry(pb.ApproveRetryRequest(task_key="")),
        KEY_RULE,
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
async def test_bad_input_is_invalid_argument_and_changes_nothing(in_process: InProcess, key: str, case: str) -> None:
    stub = in_process.stub
    held = await acquire(stub, key)
    before = await stub.ListGuards(pb.ListGuardsRequest())
    revision = in_process.sidecar.store.revision
    call, message = CASES[case]
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call(stub, held.lease_id)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.value.details() or "").startswith(message)
    assert await stub.ListGuards(pb.ListGuardsRequest()) == before
    assert in_process.sidecar.store.revision == revision


async def test_bytes_that_are_not_the_request_message_are_invalid_argument(in_process: InProcess) -> None:
    call = in_process.channel.unary_unary("/taskguard.v1.TaskGuard/Acquire")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call(b"\xff\xff\xff")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == "request: is not a valid taskguard.v1.AcquireRequest message"
