"""The client's pure parts: its default address, the status -> error table, metadata, details."""

from __future__ import annotations

import sys

import grpc
import pytest

from taskguard_client import (
    FailedPreconditionError,
    InvalidArgumentError,
    LeaseLost,
    LeaseNotFoundError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    RetryPolicy,
    StatusError,
    UnavailableError,
    _call,
    _errors,
    _protocol,
    default_address,
)
from taskguard_client.v1 import taskguard_pb2 as pb


def test_the_default_address_follows_the_sidecars_rule() -> None:
    assert default_address({"TASKGUARD_ADDR": "127.0.0.1:7000", "XDG_RUNTIME_DIR": "/run/user/7"}) == "127.0.0.1:7000"
    assert default_address({"XDG_RUNTIME_DIR": "/run/user/7"}) == "unix:/run/user/7/taskguard/taskguard.sock"
    import os

    assert default_address({}) == f"unix:/tmp/taskguard-{os.getuid()}/taskguard.sock"


def test_the_client_default_matches_the_sidecar_default() -> None:
    from taskguard import config

    for environ in ({}, {"XDG_RUNTIME_DIR": "/run/user/7", "HOME": "/home/x"}):
        assert default_address(environ) == config.default_settings(environ=environ).listen


@pytest.mark.parametrize(
    ("code", "message", "kind"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "task_key: must be 1..512 bytes of printable UTF-8", InvalidArgumentError),
        (grpc.StatusCode.NOT_FOUND, "task_key: no guard has this key", NotFoundError),
        (grpc.StatusCode.NOT_FOUND, "lease_id: no such lease", LeaseNotFoundError),
        (grpc.StatusCode.FAILED_PRECONDITION, "lease_id: lease lost: the guard expired at x", LeaseLost),
        (grpc.StatusCode.FAILED_PRECONDITION, "task_key: guard is SUCCEEDED, not RUNNING", FailedPreconditionError),
        (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", UnavailableError),
        (grpc.StatusCode.UNAVAILABLE, "connect failed: unix:/run/tg.sock: Permission denied", PermissionDeniedError),
        (grpc.StatusCode.PERMISSION_DENIED, "ForceRelease is for operators", PermissionDeniedError),
        (grpc.StatusCode.DATA_LOSS, "?", StatusError),
    ],
)
def test_each_status_becomes_its_typed_error(code: grpc.StatusCode, message: str, kind: type[StatusError]) -> None:
    error = _errors.from_status(code, message)
    assert type(error) is kind
    assert (error.code, error.message, str(error)) == (code, message, message)


def test_out_of_range_names_the_oldest_revision_and_says_to_relist() -> None:
    message = "start_revision: revision 1 is no longer retained; the oldest available is 1190"
    error = _errors.from_status(grpc.StatusCode.OUT_OF_RANGE, message)
    assert isinstance(error, OutOfRangeError) and error.oldest_revision == 1190
    assert "re-list" in str(error)


def test_metadata_is_empty_without_opentelemetry_or_a_span(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _call.metadata() == ()  # installed, but no span is current
    assert _call.metadata("s3cret") == (("authorization", "Bearer s3cret"),)
    _call._propagator_inject.cache_clear()
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # makes the import fail
    try:
        assert _call._propagator_inject() is None
        assert _call.metadata() == ()
    finally:
        _call._propagator_inject.cache_clear()


def test_backoff_delays_grow_to_the_cap_with_jitter_below_it() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.4, multiplier=2)
    delays = policy.delays()
    caps = [0.1, 0.2, 0.4, 0.4, 0.4]
    for cap in caps:
        assert 0 <= next(delays) <= cap


def test_a_long_detail_is_cut_to_what_the_sidecar_accepts() -> None:
    assert _protocol.fit_detail("short") == "short"
    cut = _protocol.fit_detail("é" * 5000)
    assert len(cut.encode()) <= _protocol.MAX_DETAIL_BYTES and cut.endswith("...")


def test_a_detail_loses_its_control_characters_which_the_sidecar_refuses() -> None:
    assert _protocol.fit_detail("Traceback:\r\n  boom\x1b[2J\x9b\x7f é") == "Traceback:   boom\\x1b[2J\\x9b\\x7f é"


def _snapshot(key: str, guard_revision: int, head: int) -> pb.GuardEvent:
    return pb.GuardEvent(
        type=pb.GUARD_EVENT_TYPE_SNAPSHOT,
        revision=head,
        guard=pb.Guard(task_key=key, revision=guard_revision, state=pb.GUARD_STATE_RUNNING),
    )


def test_a_watch_broken_during_its_snapshot_takes_a_new_one_and_hands_out_only_what_changed() -> None:
    position = _protocol.WatchPosition("s::", 0, include_snapshot=True)
    assert position.take(_snapshot("s::a", 3, head=10)) is not None
    assert position.take(_snapshot("s::b", 5, head=10)) is not None
    # The stream breaks before the snapshot ended: the next request asks for a snapshot again.
    again = position.request()
    assert again.include_snapshot and again.start_revision == 0
    assert position.take(_snapshot("s::a", 3, head=12)) is None  # unchanged: not handed out twice
    assert position.take(_snapshot("s::b", 11, head=12)) is not None  # changed meanwhile
    assert position.take(_snapshot("s::c", 12, head=12)) is not None  # new meanwhile
    live = pb.GuardEvent(
        type=pb.GUARD_EVENT_TYPE_ACQUIRED, revision=13, guard=pb.Guard(task_key="s::d", state=pb.GUARD_STATE_RUNNING)
    )
    assert position.take(live) is not None
    resumed = position.request()
    assert not resumed.include_snapshot and resumed.start_revision == 14
