"""Random bytes, mutated messages and random field values at every RPC of a real sidecar.

The sidecar must never crash or hang, must answer every call with a response
or a status (never INTERNAL or UNKNOWN: those mean an unexpected exception),
and a rejected call must leave the stored guards as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.support import SidecarProcess

SERVICE = "/taskguard.v1.TaskGuard/"
UNARY = ["Acquire", "Renew", "Release", "ApproveRetry", "ForceRelease", "GetGuard", "ListGuards", "CheckFence"]
CALL_TIMEOUT_S = 5.0
# A valid watch, or a Hold that joins a running winner, rightly waits: give
# streams less time, and check the sidecar still answers everything else.
STREAM_TIMEOUT_S = 1.0
EXAMPLES = 150
UNEXPECTED = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture
def target(sidecar_factory: Callable[..., SidecarProcess]) -> Iterator[tuple[SidecarProcess, grpc.Channel]]:
    sidecar = sidecar_factory("--max-ttl", "24h", "--stale-after", "24h")
    channel = grpc.insecure_channel(sidecar.address)
    stub = pb_grpc.TaskGuardStub(channel)
    for i in range(5):  # something for rejected calls to leave alone
        held = stub.Acquire(pb.AcquireRequest(task_key=f"fuzz::seed-{i}", run_id=f"seed-{i}"))
        if i % 2:
            stub.Release(pb.ReleaseRequest(lease_id=held.lease_id, status=pb.RUN_STATUS_FAILED))
    yield sidecar, channel
    channel.close()


def _guards(channel: grpc.Channel) -> dict[str, pb.Guard]:
    stub = pb_grpc.TaskGuardStub(channel)
    found: dict[str, pb.Guard] = {}
    token = ""
    while True:
        page = stub.ListGuards(pb.ListGuardsRequest(page_size=1000, page_token=token), timeout=CALL_TIMEOUT_S)
        for guard in page.guards:
            found[guard.task_key] = guard
        token = page.next_page_token
        if not token:
            return found


def _unchanged_except_time(before: dict[str, pb.Guard], after: dict[str, pb.Guard]) -> None:
    """Equal, but for runs that ended meanwhile on their own: a lease that a fuzzed short TTL let expire, or an
    earlier example's Hold run, abandoned once its stream ended (the sidecar abandons it just after the stream's
    end, so that may land while the next example runs)."""
    assert before.keys() == after.keys()
    for key, old in before.items():
        new = after[key]
        if new != old:
            ended_by_itself = new.state == pb.GUARD_STATE_EXPIRED or (
                old.stream_bound and new.state == pb.GUARD_STATE_ABANDONED
            )
            assert old.state == pb.GUARD_STATE_RUNNING and ended_by_itself, (old, new)
            assert new.run_id == old.run_id


def _call_raw(channel: grpc.Channel, method: str, payload: bytes) -> grpc.StatusCode:
    """One call with ``payload`` as the serialized request; its status code."""
    if method == "Hold":
        call = channel.stream_stream(SERVICE + method)
        responses = call(iter([payload]), timeout=STREAM_TIMEOUT_S)
    elif method == "WatchGuards":
        responses = channel.unary_stream(SERVICE + method)(payload, timeout=STREAM_TIMEOUT_S)
    else:
        try:
            channel.unary_unary(SERVICE + method)(payload, timeout=CALL_TIMEOUT_S)
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            return error.code()  # type: ignore[no-any-return]
    try:
        for _ in responses:
            if method == "WatchGuards":
                responses.cancel()  # a valid watch would run forever
                return grpc.StatusCode.OK
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        return grpc.StatusCode.OK if code == grpc.StatusCode.CANCELLED else code


def _may_wait(method: str, payload: bytes) -> bool:
    """A watch, or a Hold that joins the winner, may rightly outlive the call's deadline."""
    try:
        if method == "WatchGuards":
            pb.WatchGuardsRequest.FromString(payload)
            return True
        if method == "Hold":
            request = pb.HoldRequest.FromString(payload)
            return request.WhichOneof("request") == "acquire" and request.acquire.on_conflict == pb.ON_CONFLICT_JOIN
    except DecodeError:
        return False
    return False


def _check(target: tuple[SidecarProcess, grpc.Channel], method: str, payload: bytes) -> None:
    sidecar, channel = target
    before = _guards(channel)
    code = _call_raw(channel, method, payload)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and _may_wait(method, payload):
        code = grpc.StatusCode.OK  # still streaming a request it accepted
    assert code not in UNEXPECTED, f"{method} answered {code} to {payload!r}"
    assert sidecar.process is not None and sidecar.process.poll() is None, "the sidecar died"
    if code != grpc.StatusCode.OK:
        _unchanged_except_time(before, _guards(channel))


@FUZZ_SETTINGS
@given(method=st.sampled_from([*UNARY, "Hold", "WatchGuards"]), payload=st.binary(max_size=600))
def test_random_bytes_get_a_status_and_change_nothing(
    target: tuple[SidecarProcess, grpc.Channel], method: str, payload: bytes
) -> None:
    _check(target, method, payload)


_VALID: dict[str, Message] = {
    "Acquire": pb.AcquireRequest(task_key="fuzz::seed-0", run_id="r", holder="h", labels={"a": "b"}),
    "Renew": pb.RenewRequest(lease_id="x" * 32),
    "Release": pb.ReleaseRequest(lease_id="x" * 32, status=pb.RUN_STATUS_SUCCEEDED, detail="d"),
    "ApproveRetry": pb.ApproveRetryRequest(task_key="fuzz::seed-1", approver="a", reason="r"),
    "ForceRelease": pb.ForceReleaseRequest(task_key="fuzz::seed-0", operator="o", reason="r"),
    "GetGuard": pb.GetGuardRequest(task_key="fuzz::seed-2"),
    "ListGuards": pb.ListGuardsRequest(key_prefix="fuzz", states=[1, 3], page_size=5),
    "CheckFence": pb.CheckFenceRequest(task_key="fuzz::seed-2", fencing_token=1),
    "Hold": pb.HoldRequest(acquire=pb.AcquireRequest(task_key="fuzz::seed-4", ttl={"seconds": 5})),
    "WatchGuards": pb.WatchGuardsRequest(key_prefix="fuzz", start_revision=1),
}


@st.composite
def _mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    method = draw(st.sampled_from(sorted(_VALID)))
    data = bytearray(_VALID[method].SerializeToString())
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete" and data:
            del data[position]
        elif action == "truncate":
            del data[position:]
    return method, bytes(data)


@FUZZ_SETTINGS
@given(case=_mutated())
def test_mutated_messages_get_a_status_and_change_nothing(
    target: tuple[SidecarProcess, grpc.Channel], case: tuple[str, bytes]
) -> None:
    _check(target, *case)


_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=600)
_ints = st.integers(-(2**31), 2**31 - 1)
_u64 = st.integers(0, 2**64 - 1)
_duration = st.builds(dict, seconds=st.integers(-(10**11), 10**11), nanos=_ints)


def _fields() -> st.SearchStrategy[tuple[str, Message]]:
    acquire = st.builds(
        pb.AcquireRequest,
        task_key=_text,
        run_id=_text,
        holder=_text,
        ttl=_duration,
        labels=st.dictionaries(_text, _text, max_size=4),
        on_conflict=_ints,
    )
    return st.one_of(
        acquire.map(lambda r: ("Acquire", r)),
        st.builds(pb.RenewRequest, lease_id=_text, ttl=_duration).map(lambda r: ("Renew", r)),
        st.builds(pb.ReleaseRequest, lease_id=_text, status=_ints, detail=_text).map(lambda r: ("Release", r)),
        st.builds(pb.ApproveRetryRequest, task_key=_text, approver=_text, reason=_text).map(
            lambda r: ("ApproveRetry", r)
        ),
        st.builds(pb.ForceReleaseRequest, task_key=_text, operator=_text, reason=_text).map(
            lambda r: ("ForceRelease", r)
        ),
        st.builds(pb.GetGuardRequest, task_key=_text).map(lambda r: ("GetGuard", r)),
        st.builds(
            pb.ListGuardsRequest,
            key_prefix=_text,
            states=st.lists(_ints, max_size=4),
            stale_only=st.booleans(),
            page_size=st.integers(0, 2**32 - 1),
            page_token=_text,
        ).map(lambda r: ("ListGuards", r)),
        st.builds(pb.CheckFenceRequest, task_key=_text, fencing_token=_u64).map(lambda r: ("CheckFence", r)),
        acquire.map(lambda r: ("Hold", pb.HoldRequest(acquire=r))),
        st.builds(pb.ResumeRequest, lease_id=_text).map(lambda r: ("Hold", pb.HoldRequest(resume=r))),
        st.builds(pb.WatchGuardsRequest, key_prefix=_text, start_revision=_u64, include_snapshot=st.booleans()).map(
            lambda r: ("WatchGuards", r)
        ),
    )


def _serialized(case: tuple[str, Message]) -> tuple[str, bytes] | None:
    method, message = case
    try:
        return method, message.SerializeToString()
    except Exception:  # a value protobuf itself refuses to encode never reaches the wire
        return None


@FUZZ_SETTINGS
@given(case=_fields())
def test_random_field_values_get_a_status_and_change_nothing(
    target: tuple[SidecarProcess, grpc.Channel], case: tuple[str, Any]
) -> None:
    serialized = _serialized(case)
    if serialized is not None:
        _check(target, *serialized)
