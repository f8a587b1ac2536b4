"""Every rule ``wire.py`` enforces on the way in, and what it fills in on the way out.

A rejected request must never reach the engine, so each rule is checked on the function the servicer
calls, and each message is checked whole: clients show it to people as it is.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf.duration_pb2 import Duration

from taskguard.front import wire
from taskguard.guard.core import decide
from taskguard.guard.model import (
    Acquire,
    ConflictPolicy,
    EventType,
    ForceRelease,
    GuardRecord,
    GuardState,
    Instant,
    Policy,
    RejectionKind,
    RunStatus,
)
from taskguard_client.v1 import taskguard_pb2 as pb

TASK_KEY_RULE = "task_key: must be 1..512 bytes of printable UTF-8"
T0 = Instant(1000.0, datetime(2026, 1, 1, 12, 0, tzinfo=UTC))


def bad_request(excinfo: pytest.ExceptionInfo[wire.BadRequest]) -> str:
    rejection = excinfo.value.rejection
    assert rejection.kind is RejectionKind.INVALID_ARGUMENT
    assert str(excinfo.value) == rejection.message
    return rejection.message


def acquire(request: pb.AcquireRequest, *, stream_bound: bool = False) -> tuple[Acquire, bool]:
    """The command, and whether it asks to JOIN the winner."""
    command = wire.acquire(request, stream_bound=stream_bound, new_lease_id="lease-1")
    return command, command.on_conflict is ConflictPolicy.JOIN


def enum_number(value: int) -> Any:
    """Any number for an enum field, known or not: a client built from a newer proto may send one."""
    return value


def duration(seconds: int, nanos: int) -> Duration:
    return Duration(seconds=seconds, nanos=nanos)


# --- task_key ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "",
        "a" * 513,
        "é" * 256 + "a",
        "😀" * 128 + "a",
        "line\nbreak",
        "nul\x00byte",
        "del\x7f",
        "tab\there",
        "lone\ud800surrogate",
    ],
    ids=[
        "empty",
        "513-ascii-bytes",
        "513-bytes-of-2-byte-chars",
        "513-bytes-of-4-byte-chars",
        "newline",
        "nul",
        "del",
        "tab",
        "lone-surrogate",
    ],
)
def test_task_key_outside_the_rule_is_rejected_with_the_rule_as_message(value: str) -> None:
    with pytest.raises(wire.BadRequest) as refused:
        wire.task_key(value)

    assert bad_request(refused) == TASK_KEY_RULE
    assert refused.value.rejection.field == "task_key"


@pytest.mark.parametrize(
    "value",
    ["a", "a" * 512, "é" * 256, "😀" * 128, "€" * 170 + "ab", "session key with spaces::task"],
    ids=[
        "one-byte",
        "512-ascii-bytes",
        "512-bytes-of-2-byte-chars",
        "512-bytes-of-4-byte-chars",
        "mixed-widths",
        "spaces",
    ],
)
def test_task_key_of_1_to_512_printable_bytes_is_accepted(value: str) -> None:
    assert len(value.encode()) <= 512
    assert wire.task_key(value) == value


@pytest.mark.parametrize(
    "parse",
    [
        lambda key: acquire(pb.AcquireRequest(task_key=key)),
        lambda key: wire.approve_retry(pb.ApproveRetryRequest(task_key=key)),
        lambda key: wire.force_release(pb.ForceReleaseRequest(task_key=key)),
    ],
    ids=["acquire", "approve_retry", "force_release"],
)
@pytest.mark.parametrize("value", ["", "a" * 513, "a\nb"], ids=["empty", "too-long", "control"])
def test_every_request_naming_a_task_key_checks_it(parse: Callable[[str], object], value: str) -> None:
    with pytest.raises(wire.BadRequest) as refused:
        parse(value)

    assert bad_request(refused) == TASK_KEY_RULE


def test_key_prefix_may_be_empty_but_not_longer_than_a_task_key() -> None:
    assert wire.key_prefix("") == ""
    assert wire.key_prefix("a" * 512) == "a" * 512
    for value in ("a" * 513, "a\x00"):
        with pytest.raises(wire.BadRequest) as refused:
            wire.key_prefix(value)
        assert bad_request(refused) == "key_prefix: must be at most 512 bytes of printable UTF-8"


# --- run_id, lease_id, holder, labels ----------------------------------------------------------------


def test_an_empty_run_id_gets_a_fresh_uuid() -> None:
    first, _ = acquire(pb.AcquireRequest(task_key="s::t"))
    second, _ = acquire(pb.AcquireRequest(task_key="s::t"))

    assert uuid.UUID(first.run_id).version == 4
    assert first.run_id != second.run_id


def test_a_run_id_of_128_bytes_is_kept() -> None:
    command, _ = acquire(pb.AcquireRequest(task_key="s::t", run_id="r" * 128))

    assert command.run_id == "r" * 128


@pytest.mark.parametrize("value", ["r" * 129, "é" * 65, "run\n1"], ids=["129-bytes", "130-bytes-multibyte", "control"])
def test_a_run_id_outside_the_rule_is_rejected(value: str) -> None:
    with pytest.raises(wire.BadRequest) as refused:
        acquire(pb.AcquireRequest(task_key="s::t", run_id=value))

    assert bad_request(refused) == "run_id: must be 1..128 bytes of printable UTF-8"


def test_a_lease_id_is_required_and_named_by_the_field_it_came_in() -> None:
    with pytest.raises(wire.BadRequest) as missing:
        wire.lease_id("")
    assert bad_request(missing) == "lease_id: is required"

    with pytest.raises(wire.BadRequest) as too_long:
        wire.lease_id("l" * 129, "resume.lease_id")
    assert bad_request(too_long) == "resume.lease_id: must be 1..128 bytes of printable UTF-8"

    assert wire.lease_id("l" * 128) == "l" * 128


def test_a_holder_may_have_256_bytes_and_no_more() -> None:
    command, _ = acquire(pb.AcquireRequest(task_key="s::t", holder="h" * 256))
    assert command.holder == "h" * 256

    for value in ("h" * 257, "é" * 129):
        with pytest.raises(wire.BadRequest) as refused:
            acquire(pb.AcquireRequest(task_key="s::t", holder=value))
        assert bad_request(refused) == "holder: must be at most 256 bytes"


def test_labels_are_kept_sorted_by_key() -> None:
    command, _ = acquire(
        pb.AcquireRequest(task_key="s::t", labels={"zone": "eu", "team": "infra", "k" * 63: "v" * 256})
    )

    assert command.labels == (("k" * 63, "v" * 256), ("team", "infra"), ("zone", "eu"))


def test_at_most_64_labels_are_accepted() -> None:
    command, _ = acquire(pb.AcquireRequest(task_key="s::t", labels={f"k{i}": "v" for i in range(64)}))
    assert len(command.labels) == 64

    with pytest.raises(wire.BadRequest) as refused:
        acquire(pb.AcquireRequest(task_key="s::t", labels={f"k{i}": "v" for i in range(65)}))
    assert bad_request(refused) == "labels: must have at most 64 entries"


@pytest.mark.parametrize("label_key", ["", "k" * 64, "new\nline"], ids=["empty", "64-bytes", "control"])
def test_a_label_key_outside_the_rule_is_rejected(label_key: str) -> None:
    with pytest.raises(wire.BadRequest) as refused:
        acquire(pb.AcquireRequest(task_key="s::t", labels={label_key: "v"}))

    assert bad_request(refused) == "labels: must be 1..63 bytes of printable UTF-8"


def test_a_label_value_over_256_bytes_is_rejected_naming_its_key() -> None:
    with pytest.raises(wire.BadRequest) as refused:
        acquire(pb.AcquireRequest(task_key="s::t", labels={"team": "v" * 257}))

    assert bad_request(refused) == "labels[team]: must be at most 256 bytes"


# --- detail, approver, operator, reason ------------------------------------------------------------


def test_a_release_detail_may_have_4096_bytes_and_no_more() -> None:
    assert wire.release_detail("d" * 4096) == "d" * 4096

    with pytest.raises(wire.BadRequest) as refused:
        wire.release_detail("d" * 4097)
    assert bad_request(refused) == "detail: must be at most 4096 bytes"


def test_approve_retry_limits_approver_to_256_and_reason_to_4096_bytes() -> None:
    command = wire.approve_retry(pb.ApproveRetryRequest(task_key="s::t", approver="a" * 256, reason="r" * 4096))
    assert (command.task_key, command.approver, command.reason) == ("s::t", "a" * 256, "r" * 4096)

    with pytest.raises(wire.BadRequest) as approver:
        wire.approve_retry(pb.ApproveRetryRequest(task_key="s::t", approver="a" * 257))
    assert bad_request(approver) == "approver: must be at most 256 bytes"

    with pytest.raises(wire.BadRequest) as reason:
        wire.approve_retry(pb.ApproveRetryRequest(task_key="s::t", reason="r" * 4097))
    assert bad_request(reason) == "reason: must be at most 4096 bytes"


def test_force_release_limits_operator_to_256_and_reason_to_4096_bytes() -> None:
    command = wire.force_release(pb.ForceReleaseRequest(task_key="s::t", operator="o" * 256, reason="r" * 4096))
    assert (command.task_key, command.operator, command.reason) == ("s::t", "o" * 256, "r" * 4096)

    with pytest.raises(wire.BadRequest) as operator:
        wire.force_release(pb.ForceReleaseRequest(task_key="s::t", operator="o" * 257))
    assert bad_request(operator) == "operator: must be at most 256 bytes"

    with pytest.raises(wire.BadRequest) as reason:
        wire.force_release(pb.ForceReleaseRequest(task_key="s::t", reason="r" * 4097))
    assert bad_request(reason) == "reason: must be at most 4096 bytes"


CONTROL_RULE = "must not contain control characters (C0, DEL or C1)"
FREE_TEXT: dict[str, Callable[[str], object]] = {
    "holder": lambda text: acquire(pb.AcquireRequest(task_key="s::t", holder=text)),
    "labels[team]": lambda text: acquire(pb.AcquireRequest(task_key="s::t", labels={"team": text})),
    "detail": wire.release_detail,
    "approver": lambda text: wire.approve_retry(pb.ApproveRetryRequest(task_key="s::t", approver=text)),
    "reason": lambda text: wire.force_release(pb.ForceReleaseRequest(task_key="s::t", reason=text)),
    "operator": lambda text: wire.force_release(pb.ForceReleaseRequest(task_key="s::t", operator=text)),
}


@pytest.mark.parametrize("field", FREE_TEXT)
@pytest.mark.parametrize("text", ["x\x1b[2J\nFAKE ROW", "\x00", "\x1f", "\x7f", "\x80", "\x9b", "tab\there"], ids=repr)
def test_free_text_with_a_control_character_is_rejected_naming_its_field(field: str, text: str) -> None:
    with pytest.raises(wire.BadRequest) as refused:
        FREE_TEXT[field](text)

    assert bad_request(refused) == f"{field}: {CONTROL_RULE}"


@pytest.mark.parametrize("field", FREE_TEXT)
def test_free_text_of_any_script_without_control_characters_is_accepted(field: str) -> None:
    FREE_TEXT[field]("nightly (host-1) é 日本語 😀 \\x1b \u00a0\u00ff")


# --- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "nanos", "expected"),
    [(30, 0, 30.0), (1, 500_000_000, 1.5), (0, 999_999_999, 0.999999999), (-1, -500_000_000, -1.5)],
)
def test_a_valid_duration_becomes_seconds(seconds: int, nanos: int, expected: float) -> None:
    command, _ = acquire(pb.AcquireRequest(task_key="s::t", ttl=duration(seconds, nanos)))

    assert command.ttl_s == pytest.approx(expected)


def test_an_unset_ttl_stays_unset_for_the_core_to_default() -> None:
    command, _ = acquire(pb.AcquireRequest(task_key="s::t"))

    assert command.ttl_s is None
    assert wire.renew_ttl_s(pb.RenewRequest(lease_id="l")) is None


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(0, 1_000_000_000), (0, -1_000_000_000), (1, -1), (-1, 1)],
    ids=["nanos-too-big", "nanos-too-small", "positive-seconds-negative-nanos", "negative-seconds-positive-nanos"],
)
def test_a_duration_with_out_of_range_or_mismatched_nanos_is_rejected(seconds: int, nanos: int) -> None:
    with pytest.raises(wire.BadRequest) as on_acquire:
        acquire(pb.AcquireRequest(task_key="s::t", ttl=duration(seconds, nanos)))
    assert bad_request(on_acquire) == "ttl: is not a valid google.protobuf.Duration"

    with pytest.raises(wire.BadRequest) as on_renew:
        wire.renew_ttl_s(pb.RenewRequest(lease_id="l", ttl=duration(seconds, nanos)))
    assert bad_request(on_renew) == "ttl: is not a valid google.protobuf.Duration"


# --- enums ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (pb.RUN_STATUS_SUCCEEDED, RunStatus.SUCCEEDED),
        (pb.RUN_STATUS_FAILED, RunStatus.FAILED),
        (pb.RUN_STATUS_CANCELLED, RunStatus.CANCELLED),
    ],
)
def test_a_known_run_status_maps_to_the_core(value: int, expected: RunStatus) -> None:
    assert wire.run_status(value) is expected


@pytest.mark.parametrize("value", [pb.RUN_STATUS_UNSPECIFIED, 99, -1], ids=["unspecified", "unknown", "negative"])
def test_an_unspecified_or_unknown_run_status_is_rejected_naming_the_field(value: int) -> None:
    request = pb.ReleaseRequest(lease_id="l", status=enum_number(value))

    with pytest.raises(wire.BadRequest) as refused:
        wire.run_status(request.status)

    assert bad_request(refused) == (
        f"status: must be one of RUN_STATUS_SUCCEEDED, RUN_STATUS_FAILED, RUN_STATUS_CANCELLED (got {value})"
    )


def test_guard_states_filter_maps_every_known_state() -> None:
    request = pb.ListGuardsRequest(states=[pb.GUARD_STATE_RUNNING, pb.GUARD_STATE_RETRY_APPROVED])

    assert wire.guard_states(request.states) == {GuardState.RUNNING, GuardState.RETRY_APPROVED}
    assert wire.guard_states([]) == frozenset()


@pytest.mark.parametrize("value", [pb.GUARD_STATE_UNSPECIFIED, 99], ids=["unspecified", "unknown"])
def test_an_unspecified_or_unknown_guard_state_is_rejected_naming_the_field(value: int) -> None:
    request = pb.ListGuardsRequest(states=[pb.GUARD_STATE_RUNNING, enum_number(value)])

    with pytest.raises(wire.BadRequest) as refused:
        wire.guard_states(request.states)

    message = bad_request(refused)
    assert message.startswith("states: must be one of GUARD_STATE_RUNNING, GUARD_STATE_SUCCEEDED, ")
    assert message.endswith(f"GUARD_STATE_RETRY_APPROVED (got {value})")


def test_an_unknown_on_conflict_is_rejected_naming_the_field() -> None:
    with pytest.raises(wire.BadRequest) as refused:
        acquire(pb.AcquireRequest(task_key="s::t", on_conflict=enum_number(99)), stream_bound=True)

    assert bad_request(refused) == (
        "on_conflict: must be one of ON_CONFLICT_UNSPECIFIED, ON_CONFLICT_REJECT, ON_CONFLICT_JOIN, "
        "ON_CONFLICT_QUEUE, ON_CONFLICT_KEEP_NEWEST (got 99)"
    )


def test_on_conflict_join_on_a_unary_acquire_is_rejected() -> None:
    with pytest.raises(wire.BadRequest) as refused:
        acquire(pb.AcquireRequest(task_key="s::t", on_conflict=pb.ON_CONFLICT_JOIN), stream_bound=False)

    assert bad_request(refused) == "on_conflict: ON_CONFLICT_JOIN needs a Hold stream"


@pytest.mark.parametrize(
    ("on_conflict", "stream_bound", "join"),
    [
        (pb.ON_CONFLICT_UNSPECIFIED, False, False),
        (pb.ON_CONFLICT_REJECT, False, False),
        (pb.ON_CONFLICT_REJECT, True, False),
        (pb.ON_CONFLICT_JOIN, True, True),
    ],
)
def test_on_conflict_says_whether_a_hold_caller_joins_the_winner(
    on_conflict: int, stream_bound: bool, join: bool
) -> None:
    request = pb.AcquireRequest(task_key="s::t", on_conflict=enum_number(on_conflict))

    command, joins = acquire(request, stream_bound=stream_bound)

    assert joins is join
    assert command.stream_bound is stream_bound
    assert command.lease_id == "lease-1"


# --- paging ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(0, 100), (1, 1), (1000, 1000)])
def test_page_size_of_0_means_100_and_up_to_1000_is_kept(value: int, expected: int) -> None:
    assert wire.page_size(value) == expected


def test_page_size_over_1000_is_rejected() -> None:
    with pytest.raises(wire.BadRequest) as refused:
        wire.page_size(pb.ListGuardsRequest(page_size=1001).page_size)

    assert bad_request(refused) == "page_size: must be at most 1000"


@pytest.mark.parametrize("last_key", ["s::t", "é" * 256, "a/b+c=d::😀", "x" * 512])
def test_a_page_token_round_trips_its_last_key(last_key: str) -> None:
    token = wire.encode_page_token(last_key)

    assert token.isascii()
    assert wire.decode_page_token(token) == last_key


def test_an_empty_page_token_starts_at_the_first_key() -> None:
    assert wire.decode_page_token("") == ""


@pytest.mark.parametrize(
    "token",
    [
        "abc",
        "not a token!",
        "!!!!",
        base64.urlsafe_b64encode(b"\xff\xfe\xfd").decode(),
        base64.urlsafe_b64encode(b"line\nbreak").decode(),
        base64.urlsafe_b64encode(b"k" * 513).decode(),
    ],
    ids=["bad-padding", "not-base64", "decodes-to-nothing", "not-utf-8", "not-a-task-key", "too-long-for-a-task-key"],
)
def test_a_page_token_the_server_did_not_issue_is_rejected(token: str) -> None:
    with pytest.raises(wire.BadRequest) as refused:
        wire.decode_page_token(token)

    assert bad_request(refused) == "page_token: is not a token this server issued"


# --- rendering -------------------------------------------------------------------------------------


def acquired(task_key: str, ttl_s: float | None, *, stream_bound: bool = False) -> GuardRecord:
    command = Acquire(
        task_key=task_key,
        run_id="run-1",
        holder="host-a",
        ttl_s=ttl_s,
        lease_id="lease-1",
        stream_bound=stream_bound,
        labels=(("team", "infra"), ("zone", "eu")),
    )
    decision = decide(None, command, T0, Policy())
    assert decision.record is not None
    return decision.record


def test_a_rendered_guard_carries_key_parts_deadline_ttl_and_labels() -> None:
    record = acquired("session-1::nightly-build", ttl_s=1.5)

    message = wire.guard(record, stale=False)

    assert (message.task_key, message.session_key, message.task_name) == (
        "session-1::nightly-build",
        "session-1",
        "nightly-build",
    )
    assert message.state == pb.GUARD_STATE_RUNNING
    assert (message.run_id, message.holder, message.fencing_token, message.attempt) == ("run-1", "host-a", 1, 1)
    assert message.HasField("expires_at")
    assert message.expires_at.ToDatetime(tzinfo=UTC) == T0.wall + timedelta(seconds=1.5)
    assert message.ttl.ToNanoseconds() == 1_500_000_000
    assert dict(message.labels) == {"team": "infra", "zone": "eu"}
    assert message.started_at.ToDatetime(tzinfo=UTC) == T0.wall
    assert message.heartbeat_at.ToDatetime(tzinfo=UTC) == T0.wall
    assert not message.HasField("released_at")
    assert message.released_by == ""
    assert message.stale is False


def test_a_guard_without_a_ttl_renders_without_expires_at_or_ttl() -> None:
    record = acquired("session-1::hold", ttl_s=None, stream_bound=True)
    assert record.ttl_s is None

    message = wire.guard(record, stale=True)

    assert not message.HasField("expires_at")
    assert not message.HasField("ttl")
    assert message.stream_bound is True
    assert message.stale is True


@pytest.mark.parametrize(
    ("task_key", "session_key", "task_name"),
    [("no-separator", "", "no-separator"), ("a::b::c", "a::b", "c"), ("::t", "", "t")],
)
def test_a_rendered_guard_splits_the_task_key_at_the_last_separator(
    task_key: str, session_key: str, task_name: str
) -> None:
    message = wire.guard(acquired(task_key, ttl_s=30.0), stale=False)

    assert (message.session_key, message.task_name) == (session_key, task_name)


def test_a_force_released_guard_renders_who_released_it_and_when() -> None:
    running = acquired("s::t", ttl_s=30.0)
    later = Instant(T0.monotonic + 5, T0.wall + timedelta(seconds=5))
    decision = decide(running, ForceRelease("s::t", "alice", "stuck since Monday"), later, Policy())
    assert decision.record is not None

    message = wire.guard(decision.record, stale=False)

    assert message.state == pb.GUARD_STATE_CANCELLED
    assert message.released_by == "alice"
    assert message.last_status == pb.RUN_STATUS_CANCELLED
    assert message.last_detail == "stuck since Monday"
    assert message.released_at.ToDatetime(tzinfo=UTC) == later.wall

    event = wire.guard_event(decision.events[0], stale=False)
    assert event.type == pb.GUARD_EVENT_TYPE_FORCE_RELEASED
    assert (event.actor, event.reason) == ("alice", "stuck since Monday")
    assert event.occurred_at.ToDatetime(tzinfo=UTC) == later.wall
    assert event.guard == message
    assert decision.events[0].type is EventType.FORCE_RELEASED
