"""The dashboard's model (``taskguard.dashboard.state``) and its --listen rule, without processes."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from taskguard.dashboard.app import parse_listen
from taskguard.dashboard.state import DashboardState
from taskguard_client import EventType, Guard, GuardEvent, GuardState

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
GUARD = Guard(
    task_key="s1::job",
    session_key="s1",
    task_name="job",
    state=GuardState.RUNNING,
    run_id="r1",
    holder="h1",
    started_at=NOW,
    expires_at=None,
    fencing_token=1,
    attempt=1,
    last_status=None,
    last_detail="",
    released_at=None,
    duplicate_count=0,
    stream_bound=False,
    labels={},
    revision=1,
    heartbeat_at=NOW,
    stale=False,
    approved_by="",
    approval_reason="",
    ttl=None,
    released_by="",
)


def event(revision: int, kind: EventType, **changes: object) -> GuardEvent:
    guard = replace(GUARD, **changes)  # type: ignore[arg-type]
    return GuardEvent(revision, kind, guard, "", "", NOW, "", "")


def test_snapshots_update_guards_but_are_not_in_the_feed_or_history() -> None:
    state = DashboardState(NOW)
    change = state.apply(event(5, EventType.SNAPSHOT))
    assert change.event_json is None and len(state) == 1
    hello = json.loads(state.hello_json(120.0))
    assert hello["feed"] == [] and hello["revision"] == 5
    assert [guard["task_key"] for guard in hello["guards"]] == ["s1::job"]
    assert json.loads(state.history_json("s1::job")) == []


def test_a_failed_guard_awaits_approval_and_an_abandoned_one_only_once_a_retry_was_refused() -> None:
    state = DashboardState(NOW)
    failed = state.apply(event(2, EventType.RELEASED, state=GuardState.FAILED))
    assert json.loads(failed.guard_json)["awaiting_approval"] is True
    other = {"task_key": "s1::other", "task_name": "other"}
    abandoned = state.apply(event(3, EventType.ABANDONED, state=GuardState.ABANDONED, **other))
    assert json.loads(abandoned.guard_json)["awaiting_approval"] is False
    refused = state.apply(event(4, EventType.RETRY_REFUSED, state=GuardState.ABANDONED, **other))
    assert json.loads(refused.guard_json)["awaiting_approval"] is True
    approved = state.apply(event(5, EventType.RETRY_APPROVED, state=GuardState.RETRY_APPROVED, **other))
    assert json.loads(approved.guard_json)["awaiting_approval"] is False


def test_the_feed_and_the_histories_are_bounded() -> None:
    state = DashboardState(NOW, feed_cap=3, history_cap=2, history_keys_cap=2)
    for revision in range(1, 11):
        state.apply(event(revision, EventType.DUPLICATE_REFUSED, task_key=f"s1::job{revision % 2}"))
    assert [item["revision"] for item in json.loads(state.history_json("s1::job1"))] == [7, 9]
    state.apply(event(11, EventType.DUPLICATE_REFUSED, task_key="s1::job2"))
    hello = json.loads(state.hello_json(120.0))
    assert [item["revision"] for item in hello["feed"]] == [9, 10, 11]
    assert len(hello["guards"]) == 3  # guards are never dropped
    assert json.loads(state.history_json("s1::job1")) == []  # the key that changed longest ago lost its history
    assert [item["revision"] for item in json.loads(state.history_json("s1::job0"))] == [8, 10]


def test_connection_changes_are_reported_once() -> None:
    state = DashboardState(NOW)
    assert state.set_connection("up", "watching", NOW) is not None
    assert state.set_connection("up", "watching again", NOW) is None
    down = state.set_connection("down", "the watch broke", NOW)
    assert down is not None and json.loads(down.json())["state"] == "down"


@pytest.mark.parametrize("listen", ["127.0.0.1:8080", "localhost:0", "[::1]:9000", "127.0.0.2:80"])
def test_loopback_listen_addresses_are_accepted(listen: str) -> None:
    host, port = parse_listen(listen, allow_remote=False)
    assert host in listen and str(port) in listen


@pytest.mark.parametrize("listen", ["0.0.0.0:8080", "192.0.2.1:80", "example.com:80", "[::]:8080"])
def test_other_listen_addresses_need_allow_remote(listen: str) -> None:
    with pytest.raises(ValueError, match="--allow-remote"):
        parse_listen(listen, allow_remote=False)
    parse_listen(listen, allow_remote=True)


@pytest.mark.parametrize("listen", ["8080", "127.0.0.1", "127.0.0.1:http", ":8080", "127.0.0.1:70000"])
def test_malformed_listen_addresses_are_refused(listen: str) -> None:
    with pytest.raises(ValueError, match="--listen"):
        parse_listen(listen, allow_remote=True)
