"""The dashboard's model (``taskguard.dashboard.state``) and its --listen rule, without processes."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from taskguard.dashboard.app import parse_listen
from taskguard.dashboard.state import DashboardState
from taskguard_client import EventType, Guard, GuardEvent, GuardState, Holder, Waiter

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


def event(at: int, kind: EventType, **changes: object) -> GuardEvent:
    """The event at revision ``at``; ``changes`` to the guard it carries (its own ``revision`` among them)."""
    guard = replace(GUARD, **changes)  # type: ignore[arg-type]
    return GuardEvent(at, kind, guard, "", "", NOW, "", "")


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


def test_a_connection_that_went_down_says_why_and_when_it_was_last_live() -> None:
    state = DashboardState(NOW)
    never = state.set_connection("down", "not reachable", NOW, "unreachable")
    assert never is not None and never.last_live_at is None  # nothing known yet, so nothing "last known"
    state.set_connection("up", "watching", NOW + timedelta(seconds=5))
    stopped_at = NOW + timedelta(seconds=60)
    stopped = state.set_connection("down", "sidecar stopped; waiting for it", stopped_at, "stopped")
    assert stopped is not None
    assert json.loads(stopped.json()) == {
        "state": "down",
        "message": "sidecar stopped; waiting for it",
        "since": "2026-11-26T12:01:00.000Z",
        "reason": "stopped",
        "last_live_at": "2026-11-26T12:01:00.000Z",
    }
    later = state.set_connection("down", "still not reachable", stopped_at + timedelta(seconds=30), "unreachable")
    assert later is not None and (later.since, later.last_live_at) == (stopped_at, stopped_at)
    back = state.set_connection("up", "watching", stopped_at + timedelta(seconds=40))
    assert back is not None and back.reason == "" and back.last_live_at == stopped_at


def feed_of(state: DashboardState) -> list[int]:
    return [item["revision"] for item in json.loads(state.hello_json(120.0))["feed"]]


def guards_of(state: DashboardState) -> dict[str, dict[str, object]]:
    return {guard["task_key"]: guard for guard in json.loads(state.hello_json(120.0))["guards"]}


def test_the_log_before_the_snapshot_fills_the_feed_and_histories_and_leaves_the_guards_as_the_snapshot_has_them() -> (
    None
):
    state = DashboardState(NOW)
    # Now: run 2 of the key is RUNNING; the log tells how run 1 went.
    state.apply(event(6, EventType.SNAPSHOT, run_id="r2", fencing_token=2, revision=5))
    assert feed_of(state) == []
    replay = [
        event(1, EventType.ACQUIRED),
        event(2, EventType.DUPLICATE_REFUSED, duplicate_count=1),
        event(3, EventType.RELEASED, state=GuardState.FAILED, duplicate_count=1, revision=3),
        event(4, EventType.RETRY_APPROVED, state=GuardState.RETRY_APPROVED, duplicate_count=1, revision=4),
        event(5, EventType.ACQUIRED, run_id="r2", fencing_token=2, revision=5),
    ]
    for old in replay:
        change = state.apply(old)
        assert change is not None and change.event_json is not None
        # Older than the snapshot: the guard stays as it is now, never FAILED again for a moment.
        assert json.loads(change.guard_json)["state"] == "RUNNING"
        assert json.loads(change.guard_json)["run_id"] == "r2"
    assert feed_of(state) == [1, 2, 3, 4, 5]
    assert [item["revision"] for item in json.loads(state.history_json("s1::job"))] == [1, 2, 3, 4, 5]
    live = state.apply(event(7, EventType.RELEASED, state=GuardState.SUCCEEDED, run_id="r2", fencing_token=2))
    assert live is not None and json.loads(live.guard_json)["state"] == "SUCCEEDED"


def test_events_applied_before_are_skipped_when_the_watch_starts_again_further_back() -> None:
    state = DashboardState(NOW)
    for revision in (1, 2, 3):
        state.apply(event(revision, EventType.DUPLICATE_REFUSED, duplicate_count=revision))
    # The log moved on while the sidecar was away: the watch starts again at its oldest event, with a snapshot.
    state.apply(event(5, EventType.SNAPSHOT, duplicate_count=4))
    assert state.apply(event(2, EventType.DUPLICATE_REFUSED, duplicate_count=2)) is None
    assert state.apply(event(3, EventType.DUPLICATE_REFUSED, duplicate_count=3)) is None
    assert state.apply(event(4, EventType.DUPLICATE_REFUSED, duplicate_count=4)) is not None
    assert feed_of(state) == [1, 2, 3, 4]
    assert guards_of(state)["s1::job"]["duplicate_total"] == 4


def test_a_new_database_is_followed_from_its_start_again() -> None:
    state = DashboardState(NOW)
    state.apply(event(40, EventType.ACQUIRED))
    state.forget_log_position()
    assert state.apply(event(1, EventType.ACQUIRED, run_id="fresh")) is not None
    assert guards_of(state)["s1::job"]["run_id"] == "fresh"


def test_the_dups_total_keeps_the_runs_before_while_the_run_count_starts_again() -> None:
    state = DashboardState(NOW)
    for revision in range(1, 4):
        state.apply(event(revision, EventType.DUPLICATE_REFUSED, duplicate_count=revision))
    state.apply(event(4, EventType.RELEASED, state=GuardState.SUCCEEDED, duplicate_count=3))
    second = {"run_id": "r2", "fencing_token": 2}
    state.apply(event(5, EventType.ACQUIRED, duplicate_count=0, **second))
    assert (guards_of(state)["s1::job"]["duplicate_count"], guards_of(state)["s1::job"]["duplicate_total"]) == (0, 3)
    state.apply(event(6, EventType.DUPLICATE_REFUSED, duplicate_count=1, **second))
    assert (guards_of(state)["s1::job"]["duplicate_count"], guards_of(state)["s1::job"]["duplicate_total"]) == (1, 4)


def test_the_dups_total_is_right_during_the_replay_too() -> None:
    state = DashboardState(NOW)
    second = {"run_id": "r2", "fencing_token": 2}
    state.apply(event(9, EventType.SNAPSHOT, duplicate_count=2, **second))
    assert guards_of(state)["s1::job"]["duplicate_total"] == 2  # only the snapshot: this run's
    state.apply(event(1, EventType.ACQUIRED))
    state.apply(event(2, EventType.DUPLICATE_REFUSED, duplicate_count=1))
    state.apply(event(3, EventType.DUPLICATE_REFUSED, duplicate_count=2))
    # Half-way: run 1's two, and run 2's two from the snapshot, though the log has not reached run 2 yet.
    assert guards_of(state)["s1::job"]["duplicate_total"] == 4
    state.apply(event(4, EventType.ACQUIRED, duplicate_count=0, **second))
    state.apply(event(5, EventType.DUPLICATE_REFUSED, duplicate_count=1, **second))
    state.apply(event(6, EventType.DUPLICATE_REFUSED, duplicate_count=2, **second))
    assert guards_of(state)["s1::job"]["duplicate_total"] == 4


def test_a_refused_retry_in_the_log_marks_an_abandoned_guard_of_the_snapshot_awaiting_approval() -> None:
    state = DashboardState(NOW)
    abandoned = {"state": GuardState.ABANDONED, "revision": 2}
    state.apply(event(3, EventType.SNAPSHOT, duplicate_count=1, **abandoned))
    assert guards_of(state)["s1::job"]["awaiting_approval"] is False  # a snapshot cannot tell
    state.apply(event(2, EventType.ABANDONED, **abandoned))
    change = state.apply(event(3, EventType.RETRY_REFUSED, duplicate_count=1, **abandoned))
    assert change is not None and json.loads(change.guard_json)["awaiting_approval"] is True


def waiter(run_id: str, *, wait_s: float | None = None, keep_newest: bool = False) -> Waiter:
    until = NOW + timedelta(seconds=wait_s) if wait_s is not None else None
    return Waiter(run_id, f"host-{run_id}", NOW, until, keep_newest)


def queue_event(at: int, kind: EventType, waiters: tuple[Waiter, ...], **fields: str) -> GuardEvent:
    """A queue event of the running r1's key: ``waiters`` after it; ``fields`` of the event (trigger, waiter)."""
    guard = replace(GUARD, waiters=waiters, revision=at)
    return GuardEvent(
        at,
        kind,
        guard,
        fields.get("trigger", ""),
        "",
        NOW,
        "",
        fields.get("reason", ""),
        waiter_run_id=fields.get("waiter", ""),
    )


def test_a_guards_queue_is_its_length_and_its_waiters_in_line_and_queue_events_say_who_and_where() -> None:
    state = DashboardState(NOW)
    first, second = waiter("w1", wait_s=30), waiter("w2")
    queued = state.apply(queue_event(2, EventType.QUEUED, (first,), trigger="w1", waiter="w1"))
    assert queued is not None and json.loads(queued.guard_json)["queue_length"] == 1
    change = state.apply(queue_event(3, EventType.QUEUED, (first, second), trigger="w2", waiter="w2"))
    assert change is not None and change.event_json is not None
    guard = json.loads(change.guard_json)
    assert guard["queue_length"] == 2
    assert guard["waiters"] == [
        {
            "run_id": "w1",
            "holder": "host-w1",
            "queued_at": "2026-11-26T12:00:00.000Z",
            "wait_until": "2026-11-26T12:00:30.000Z",
            "keep_newest": False,
            "superseding": False,
        },
        {
            "run_id": "w2",
            "holder": "host-w2",
            "queued_at": "2026-11-26T12:00:00.000Z",
            "wait_until": None,
            "keep_newest": False,
            "superseding": False,
        },
    ]
    line = json.loads(change.event_json)
    # "w2 queued behind r1, position 2": the waiter, the run it waits for, its place.
    assert (line["waiter_run_id"], line["run_id"], line["position"], line["queue_length"]) == ("w2", "r1", 2, 2)

    newest = waiter("w3", keep_newest=True)
    superseded = state.apply(
        queue_event(4, EventType.SUPERSEDED, (first, newest), trigger="w3", waiter="w2", reason="newer")
    )
    assert superseded is not None and superseded.event_json is not None
    line = json.loads(superseded.event_json)
    assert (line["type"], line["waiter_run_id"], line["trigger_run_id"], line["position"]) == (
        "SUPERSEDED",
        "w2",
        "w3",
        None,
    )
    dequeued = state.apply(queue_event(5, EventType.DEQUEUED, (newest,), waiter="w1", reason="its max_wait passed"))
    assert dequeued is not None and dequeued.event_json is not None
    assert json.loads(dequeued.event_json)["reason"] == "its max_wait passed"
    assert [w["run_id"] for w in json.loads(dequeued.guard_json)["waiters"]] == ["w3"]
    full = state.apply(queue_event(6, EventType.QUEUE_FULL_REFUSED, (newest,), trigger="w4"))
    assert full is not None and full.event_json is not None
    assert (json.loads(full.event_json)["trigger_run_id"], json.loads(full.event_json)["queue_length"]) == ("w4", 1)
    assert [item["type"] for item in json.loads(state.hello_json(120.0))["feed"]] == [
        "QUEUED",
        "QUEUED",
        "SUPERSEDED",
        "DEQUEUED",
        "QUEUE_FULL_REFUSED",
    ]


def test_a_guard_without_waiters_has_an_empty_queue_and_its_lock_delay_is_in_its_json() -> None:
    state = DashboardState(NOW)
    lost = state.apply(
        event(2, EventType.ABANDONED, state=GuardState.ABANDONED, lock_delay_until=NOW + timedelta(seconds=5))
    )
    assert lost is not None
    guard = json.loads(lost.guard_json)
    assert (guard["queue_length"], guard["waiters"]) == (0, [])
    assert guard["lock_delay_until"] == "2026-11-26T12:00:05.000Z"


def test_a_superseded_run_shows_who_asked_it_to_stop_and_when_it_is_force_released() -> None:
    state = DashboardState(NOW)
    asked = state.apply(
        event(2, EventType.STOP_REQUESTED, stop_requested_by="newer", stop_at=NOW + timedelta(seconds=30))
    )
    assert asked is not None and asked.event_json is not None
    guard = json.loads(asked.guard_json)
    assert (guard["stop_requested_by"], guard["stop_at"]) == ("newer", "2026-11-26T12:00:30.000Z")
    assert json.loads(asked.event_json)["type"] == "STOP_REQUESTED"


def test_a_key_several_runs_hold_shows_how_many_and_the_others() -> None:
    state = DashboardState(NOW)
    other = Holder("r0", "h0", 1, 1, NOW - timedelta(seconds=9), NOW + timedelta(seconds=51), NOW, False, {}, True)
    held = state.apply(event(3, EventType.ACQUIRED, run_id="r1", fencing_token=2, holders=(other,)))
    assert held is not None
    guard = json.loads(held.guard_json)
    assert guard["runs"] == 2
    assert guard["holders"] == [
        {
            "run_id": "r0",
            "holder": "h0",
            "fencing_token": 1,
            "started_at": "2026-11-26T11:59:51.000Z",
            "expires_at": "2026-11-26T12:00:51.000Z",
            "stream_bound": False,
            "stale": True,
        }
    ]
    # An event about the older run is told from that run; the row still shows the key's newest run.
    renewed = state.apply(
        event(
            4, EventType.RENEWED, run_id="r0", fencing_token=1, holders=(replace(other, run_id="r1", fencing_token=2),)
        )
    )
    assert renewed is not None
    assert (json.loads(renewed.guard_json)["run_id"], json.loads(renewed.guard_json)["runs"]) == ("r1", 2)
    # The older run ends: the key is still held, by the newer one.
    ended = state.apply(
        event(
            5,
            EventType.RELEASED,
            run_id="r0",
            fencing_token=1,
            state=GuardState.SUCCEEDED,
            holders=(replace(other, run_id="r1", fencing_token=2),),
        )
    )
    assert ended is not None
    row = json.loads(ended.guard_json)
    assert (row["state"], row["run_id"], row["runs"], row["holders"]) == ("RUNNING", "r1", 1, [])
    assert json.loads(ended.event_json or "{}")["run_id"] == "r0"  # the feed says whose run ended
    # A failed run speaks for the key while another goes on: one run holds it.
    failed = state.apply(event(6, EventType.RELEASED, state=GuardState.FAILED, holders=(other,)))
    assert failed is not None
    assert (json.loads(failed.guard_json)["state"], json.loads(failed.guard_json)["runs"]) == ("FAILED", 1)


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
