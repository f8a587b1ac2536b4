"""What the dashboard knows: the guards, a capped feed of events, each key's recent history, the watch's health.

Theory of operation: ``follow.py`` hands every event of the WatchGuards
stream, in revision order, to ``DashboardState.apply``, and ``app.py`` fans the
``Change`` it returns out to the open pages. The watch starts at the oldest
revision the sidecar's event log keeps, with a snapshot first:

* SNAPSHOT events (the state when the watch started) set the guards. They are
  not things that happened, so they are in neither the feed nor a history.
* The log's events up to the snapshot's revision (the *replay*) fill the feed
  and the histories with what happened before this dashboard started, so a
  restarted dashboard shows what the last one did. They are older than the
  snapshot, so they leave the guards as the snapshot set them; only what they
  tell that a guard does not (a refused retry, refusals of earlier runs) is
  taken from them.
* Later events are live: each carries the guard after the change, which
  replaces the one held.

An event at or below the last one applied is skipped: a watch restarted from
further back than it needed (the log's oldest event, after the log moved on)
repeats nothing. Guards are never deleted by the sidecar, so neither are they
here.

Derived per key, from the events in revision order: whether the guard awaits
an operator's approval (FAILED always; ABANDONED or EXPIRED once a retry was
refused for want of one), and how many acquisitions were refused over every
run the log shows (``duplicate_total``; the guard's own ``duplicate_count``
starts again at 0 with each run).

Everything is kept as ready-made JSON text, because it is written to every
page many times and never read here again. Bounded by design: the feed holds
``feed_cap`` events, a key's history ``history_cap``, and histories are kept
for the ``history_keys_cap`` keys that changed last.

Nothing here does I/O or knows aiohttp or gRPC; times come in as arguments.
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

from taskguard_client import EventType, Guard, GuardEvent, GuardState, Holder, Waiter

FEED_CAP = 200
HISTORY_CAP = 50
HISTORY_KEYS_CAP = 10_000

ConnectionState = Literal["connecting", "up", "down"]
# Why the watch is down: the sidecar said it is stopping, it cannot be reached, it refused the watch, or its
# log no longer reaches back to where the watch stood (every guard is read again).
DownReason = Literal["", "stopped", "unreachable", "refused", "resync"]

# States in which a refused acquisition (RETRY_REFUSED) means the key waits for an operator: FAILED always does;
# ABANDONED and EXPIRED do when the sidecar's policy says so, which the dashboard learns from the refusal itself.
_APPROVABLE = frozenset({GuardState.FAILED, GuardState.ABANDONED, GuardState.EXPIRED})


def _iso(at: datetime | None) -> str | None:
    if at is None:
        return None
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json(document: dict[str, Any]) -> str:
    # ASCII only: no raw U+2028 or newline can end up inside a server-sent event's data line.
    return json.dumps(document, separators=(",", ":"))


def waiter_document(waiter: Waiter) -> dict[str, Any]:
    return {
        "run_id": waiter.run_id,
        "holder": waiter.holder,
        "queued_at": _iso(waiter.queued_at),
        "wait_until": _iso(waiter.wait_until),
        "keep_newest": waiter.keep_newest,
        "superseding": waiter.superseding,
    }


def _position(guard: Guard, run_id: str) -> int | None:
    """``run_id``'s place in the guard's queue, from 1 (None: not in it)."""
    return next((place for place, waiter in enumerate(guard.waiters, 1) if waiter.run_id == run_id), None)


def guard_document(guard: Guard, awaiting_approval: bool, duplicate_total: int | None = None) -> dict[str, Any]:
    """A guard as the page reads it: the proto's field names, times as ISO 8601 UTC.

    ``duplicate_total``: refusals over every run of the key the dashboard knows of (default: this run's).
    """
    return {
        "task_key": guard.task_key,
        "session_key": guard.session_key,
        "task_name": guard.task_name,
        "state": guard.state.value,
        "run_id": guard.run_id,
        "holder": guard.holder,
        "started_at": _iso(guard.started_at),
        "expires_at": _iso(guard.expires_at),
        "heartbeat_at": _iso(guard.heartbeat_at),
        "released_at": _iso(guard.released_at),
        "fencing_token": guard.fencing_token,
        "attempt": guard.attempt,
        "duplicate_count": guard.duplicate_count,
        "duplicate_total": guard.duplicate_count if duplicate_total is None else duplicate_total,
        "stale": guard.stale,
        "stream_bound": guard.stream_bound,
        "last_status": guard.last_status.value if guard.last_status else None,
        "last_detail": guard.last_detail,
        "approved_by": guard.approved_by,
        "approval_reason": guard.approval_reason,
        "released_by": guard.released_by,
        "ttl_s": guard.ttl.total_seconds() if guard.ttl is not None else None,
        "labels": dict(guard.labels),
        "revision": guard.revision,
        "awaiting_approval": awaiting_approval,
        # A lost run's key stays closed until then (its rule's lock-delay); the page shows it while it lasts.
        "lock_delay_until": _iso(guard.lock_delay_until),
        "hold_until": _iso(guard.hold_until),
        # First in line first, as the sidecar serves them.
        "queue_length": len(guard.waiters),
        "waiters": [waiter_document(waiter) for waiter in guard.waiters],
        # RUNNING and superseded: the newer run it should stop for, and when it is force-released.
        "stop_requested_by": guard.stop_requested_by,
        "stop_at": _iso(guard.stop_at),
        # A key several runs may hold at once: how many hold it now, and the others than this one, oldest first.
        "runs": len(guard.runs),
        "holders": [holder_document(holder) for holder in guard.holders],
    }


def holder_document(holder: Holder) -> dict[str, Any]:
    return {
        "run_id": holder.run_id,
        "holder": holder.holder,
        "fencing_token": holder.fencing_token,
        "started_at": _iso(holder.started_at),
        "expires_at": _iso(holder.expires_at),
        "stream_bound": holder.stream_bound,
        "stale": holder.stale,
    }


def event_document(event: GuardEvent) -> dict[str, Any]:
    """An event as a feed or history line: who, what, and for refusals who was refused and which run won.

    Queue events name the waiter (``waiter_run_id``); QUEUED says where it stands after the change
    (``position``, from 1), since the page is told the guard of the newest event only.
    """
    guard = event.guard
    return {
        "revision": event.revision,
        "type": event.type.value,
        "occurred_at": _iso(event.occurred_at),
        "task_key": guard.task_key,
        "state": guard.state.value,
        # For DUPLICATE_REFUSED and RETRY_REFUSED: the run that holds (or last held) the guard, i.e. the winner.
        "run_id": guard.run_id,
        "holder": guard.holder,
        "fencing_token": guard.fencing_token,
        "duplicate_count": guard.duplicate_count,
        "trigger_run_id": event.trigger_run_id,
        "trigger_holder": event.trigger_holder,
        "actor": event.actor,
        "reason": event.reason,
        "detail": guard.last_detail,
        "lock_delay_until": _iso(guard.lock_delay_until),
        "waiter_run_id": event.waiter_run_id,
        "position": _position(guard, event.waiter_run_id) if event.type is EventType.QUEUED else None,
        "queue_length": len(guard.waiters),
    }


# Ended runs that still speak for a key several runs hold: what the key does next waits on them.
_SPEAKS_FOR_THE_KEY = frozenset({GuardState.FAILED, GuardState.RETRY_APPROVED})


def key_view(guard: Guard) -> Guard:
    """The guard of a key as its row shows it. An event about one of a semaphore's runs is told from that run
    (its fields, the key's other runs in ``holders``); the row shows the key as the sidecar's record does: its
    newest running run, with the others as holders, unless the run ended failed (then it speaks for the key)."""
    if not guard.holders or (not guard.running and guard.state in _SPEAKS_FOR_THE_KEY):
        return guard
    runs = guard.runs
    newest = max(runs, key=lambda run: run.fencing_token)
    if guard.running and guard.fencing_token == newest.fencing_token:
        return guard
    return replace(
        guard,
        state=GuardState.RUNNING,
        run_id=newest.run_id,
        holder=newest.holder,
        fencing_token=newest.fencing_token,
        attempt=newest.attempt,
        started_at=newest.started_at,
        expires_at=newest.expires_at,
        heartbeat_at=newest.heartbeat_at,
        stream_bound=newest.stream_bound,
        labels=newest.labels,
        stale=newest.stale,
        ttl=None,
        hold_until=None,
        last_status=None,
        last_detail="",
        released_at=None,
        released_by="",
        holders=tuple(run for run in runs if run is not newest),
    )


@dataclass(frozen=True, slots=True)
class Change:
    """What one applied event changed: the guard's new JSON and, unless it was a SNAPSHOT, the event's."""

    task_key: str
    guard_json: str
    event_json: str | None
    revision: int


@dataclass(frozen=True, slots=True)
class Connection:
    """Whether the dashboard's watch of the sidecar is established, since when, and when it last was.

    ``reason`` says why it is down (``DownReason``); ``last_live_at`` is when the watch was last up, which is
    as of when the guards are known while it is down (None: never up yet).
    """

    state: ConnectionState
    message: str
    since: datetime
    reason: DownReason = ""
    last_live_at: datetime | None = None

    def json(self) -> str:
        return _json(
            {
                "state": self.state,
                "message": self.message,
                "since": _iso(self.since),
                "reason": self.reason,
                "last_live_at": _iso(self.last_live_at),
            }
        )


@dataclass(slots=True)
class _Refusals:
    """One key's refusals as the log tells them: the run last seen (by fencing token), its count, and the
    counts of the runs before it."""

    fencing_token: int
    count: int
    earlier_runs: int = 0


class DashboardState:
    """The dashboard's in-memory model of the sidecar's guards. Not thread-safe: one event loop owns it."""

    def __init__(
        self,
        now: datetime,
        *,
        feed_cap: int = FEED_CAP,
        history_cap: int = HISTORY_CAP,
        history_keys_cap: int = HISTORY_KEYS_CAP,
    ) -> None:
        self.feed_cap = feed_cap
        self.history_cap = history_cap
        self._history_keys_cap = history_keys_cap
        self._guards: dict[str, Guard] = {}
        self._guard_json: dict[str, str] = {}
        self._feed: deque[str] = deque(maxlen=feed_cap)
        self._history: OrderedDict[str, deque[str]] = OrderedDict()
        # Keys whose last acquisition was refused for want of an approval (see _APPROVABLE).
        self._refused_retry: set[str] = set()
        self._refusals: dict[str, _Refusals] = {}
        self.revision = 0
        # The newest snapshot's revision: events up to it are older than the guards held.
        self.snapshot_revision = 0
        # The last event applied (not a SNAPSHOT): events up to it are in the feed already.
        self.logged_revision = 0
        self.connection = Connection("connecting", "connecting to the sidecar", now)

    def __len__(self) -> int:
        return len(self._guards)

    def apply(self, event: GuardEvent) -> Change | None:
        """Take one event of the watch, in revision order; None when it was applied before."""
        guard = event.guard
        key = guard.task_key
        if event.type is EventType.SNAPSHOT:
            self.snapshot_revision = max(self.snapshot_revision, event.revision)
            self.revision = max(self.revision, event.revision)
            self._guards[key] = guard
            return Change(key, self._render(key), None, event.revision)
        if event.revision <= self.logged_revision:
            return None
        self.logged_revision = event.revision
        self.revision = max(self.revision, event.revision)
        if event.type is EventType.RETRY_REFUSED:
            self._refused_retry.add(key)
        elif guard.state not in _APPROVABLE:
            self._refused_retry.discard(key)
        shown = key_view(guard)
        self._count(shown)
        if event.revision > self.snapshot_revision or key not in self._guards:
            self._guards[key] = shown
        event_json = _json(event_document(event))
        self._feed.append(event_json)
        history = self._history.get(key)
        if history is None:
            history = self._history[key] = deque(maxlen=self.history_cap)
            if len(self._history) > self._history_keys_cap:
                self._history.popitem(last=False)
        else:
            self._history.move_to_end(key)
        history.append(event_json)
        return Change(key, self._render(key), event_json, event.revision)

    def forget_log_position(self) -> None:
        """The sidecar's log starts again (a new database): its revisions are not the ones applied so far."""
        self.snapshot_revision = self.logged_revision = 0
        self._refusals.clear()

    def _count(self, guard: Guard) -> None:
        tally = self._refusals.get(guard.task_key)
        if tally is None:
            self._refusals[guard.task_key] = _Refusals(guard.fencing_token, guard.duplicate_count)
            return
        if tally.fencing_token != guard.fencing_token:
            # A new run (each acquisition raises the fencing token): its count starts again at 0.
            tally.earlier_runs += tally.count
            tally.fencing_token = guard.fencing_token
        tally.count = guard.duplicate_count

    def _duplicate_total(self, guard: Guard) -> int:
        tally = self._refusals.get(guard.task_key)
        if tally is None:
            return guard.duplicate_count
        # During the replay the guard held can be a later run than the log has reached yet.
        unfinished = tally.count if tally.fencing_token != guard.fencing_token else 0
        return tally.earlier_runs + unfinished + guard.duplicate_count

    def _render(self, key: str) -> str:
        guard = self._guards[key]
        awaiting = guard.state is GuardState.FAILED or (guard.state in _APPROVABLE and key in self._refused_retry)
        text = _json(guard_document(guard, awaiting, self._duplicate_total(guard)))
        self._guard_json[key] = text
        return text

    def set_connection(
        self, state: ConnectionState, message: str, now: datetime, reason: DownReason = ""
    ) -> Connection | None:
        """Record the watch's health; the new ``Connection``, or None when nothing the page shows changed."""
        current = self.connection
        if state == current.state and (state == "up" or (message, reason) == (current.message, current.reason)):
            return None
        since = current.since if state == current.state else now
        last_live_at = now if current.state == "up" and state != "up" else current.last_live_at
        self.connection = Connection(state, message, since, reason if state == "down" else "", last_live_at)
        return self.connection

    def hello_json(self, stale_after_s: float) -> str:
        """Everything a page needs to start: every guard, the feed, the connection, and the caps."""
        return (
            f'{{"revision":{self.revision},"stale_after_s":{json.dumps(stale_after_s)},'
            f'"feed_cap":{self.feed_cap},"history_cap":{self.history_cap},'
            f'"connection":{self.connection.json()},'
            f'"guards":[{",".join(self._guard_json.values())}],'
            f'"feed":[{",".join(self._feed)}]}}'
        )

    def guard_json(self, task_key: str) -> str | None:
        return self._guard_json.get(task_key)

    def history_json(self, task_key: str) -> str:
        """The last ``history_cap`` events of ``task_key`` the dashboard knows (from the log), oldest first."""
        return f"[{','.join(self._history.get(task_key, ()))}]"
