"""Who gets a run's lease back by its run_id: the caller that made it, and nobody else."""

from __future__ import annotations

from dataclasses import replace

import pytest

from taskguard.front import wire
from taskguard.guard.core import decide
from taskguard.guard.model import Acquire, AcquireReply, Outcome
from taskguard_client._call import retry_secret
from taskguard_client.v1 import taskguard_pb2 as pb
from tests.unit.test_core_transitions import DEFAULT, acquire, at, commit

SECRET = "s" * 16
OTHER_SECRET = "t" * 16


def _again(held_by: Acquire, retry: Acquire) -> AcquireReply:
    held = commit(None, held_by, at(0))
    reply = decide(held, replace(retry, lease_id="lease-minted-again"), at(1), DEFAULT).reply
    assert isinstance(reply, AcquireReply)
    return reply


def _anonymous(secret: str) -> Acquire:
    return replace(acquire("run-1"), principal="anonymous", retry_key=wire.retry_key(secret, shared_principal=True))


def test_a_shared_principal_gets_its_run_back_only_with_the_same_retry_secret() -> None:
    mine = _anonymous(SECRET)
    assert _again(mine, mine).lease_id == "lease-run-1"
    for thief in (_anonymous(OTHER_SECRET), _anonymous("")):
        stolen = _again(mine, thief)
        assert stolen.outcome is Outcome.ALREADY_RUNNING and stolen.lease_id == ""


def test_a_shared_principal_without_a_secret_never_gets_a_run_back() -> None:
    secretless = _anonymous("")
    assert secretless.retry_key is None
    refused = _again(secretless, secretless)
    assert refused.outcome is Outcome.ALREADY_RUNNING and refused.lease_id == ""


def test_a_callers_own_principal_needs_no_secret_and_ignores_one() -> None:
    mine = replace(acquire("run-1"), principal="uid:1000", retry_key=wire.retry_key(SECRET, shared_principal=False))
    assert mine.retry_key == ""
    retry = replace(mine, retry_key=wire.retry_key(OTHER_SECRET, shared_principal=False))
    assert _again(mine, retry).lease_id == "lease-run-1"
    stranger = replace(retry, principal="uid:65534")
    assert _again(mine, stranger).lease_id == ""


def test_runs_stored_before_retry_keys_go_back_to_their_own_uid_only() -> None:
    old_uid_run = replace(acquire("run-1"), principal="uid:1000")  # retry_key "" as loaded from an old row
    assert _again(old_uid_run, old_uid_run).lease_id == "lease-run-1"
    old_tcp_run = replace(acquire("run-1"), principal="anonymous")
    assert _again(old_tcp_run, _anonymous(SECRET)).lease_id == ""


def test_the_retry_key_is_a_digest_never_the_secret() -> None:
    key = wire.retry_key(SECRET, shared_principal=True)
    assert key is not None and key.startswith("sha256:") and SECRET not in key


@pytest.mark.parametrize("secret", ["short", "x" * 129, "é" * 16, "tab\there-and-more"])
def test_a_retry_secret_outside_the_rule_is_rejected_naming_the_field(secret: str) -> None:
    request = pb.AcquireRequest(task_key="s::t", retry_secret=secret)
    with pytest.raises(wire.BadRequest) as error:
        wire.acquire(request, stream_bound=False, new_lease_id="l", shared_principal=True)
    assert str(error.value) == "retry_secret: must be 16..128 bytes of printable ASCII"


def test_the_client_sends_the_same_secret_for_every_attempt_of_a_run_and_another_for_another_run() -> None:
    first = retry_secret("s::t", "run-1")
    assert first == retry_secret("s::t", "run-1")
    assert first not in (retry_secret("s::t", "run-2"), retry_secret("s::u", "run-1"))
    wire.retry_key(first, shared_principal=True)  # within the rule
