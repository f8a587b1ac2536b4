"""What the dashboard knows: the guards, a capped feed of events, each key's recent history, the watch's health.

Theory of operation: ``follow.py`` hands every event of the WatchGuards
stream, in revision order, to ``DashboardState.apply``; it replaces the guard
(every event carries the guard after the change), appends the event to the
feed and to the key's history, and returns a ``Change`` that ``app.py`` fans
out to the open pages. Guards are never deleted by the sidecar, so neither
are they here. SNAPSHOT events (the state when the watch started) update the
guards only: they are not things that happened.

Everything is kept as ready-made JSON text, because it is written to every
page many times and never read here again. Bounded by design: the feed holds
``feed_cap`` events, a key's history ``history_cap``, and histories are kept
for the ``history_keys_cap`` keys that changed last (one guard's history is
what the dashboard saw since it started, not the sidecar's event log).

Nothing here does I/O or knows aiohttp or gRPC; times come in as arguments.
"""

from __future__ import annotations

import json
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from taskguard_client import EventType, Guard, GuardEvent, GuardState

FEED_CAP = 200
HISTORY_CAP = 50
HISTORY_KEYS_CAP = 10_000

ConnectionState = Literal["connecting", "up", "down"]

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


def guard_document(guard: Guard, awaiting_approval: bool) -> dict[str, Any]:
    """A guard as the page reads it: the proto's field names, times as ISO 8601 UTC."""
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
    }


def event_document(event: GuardEvent) -> dict[str, Any]:
    """An event as a feed or history line: who, what, and for refusals who was refused and which run won."""
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
    }


@dataclass(frozen=True, slots=True)
class Change:
    """What one applied event changed: the guard's new JSON and, unless it was a SNAPSHOT, the event's."""

    task_key: str
    guard_json: str
    event_json: str | None
    revision: int


@dataclass(frozen=True, slots=True)
class Connection:
    """Whether the dashboard's watch of the sidecar is established, and since when."""

    state: ConnectionState
    message: str
    since: datetime

    def json(self) -> str:
        return _json({"state": self.state, "message": self.message, "since": _iso(self.since)})


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
        self._guards: dict[str, str] = {}
        self._feed: deque[str] = deque(maxlen=feed_cap)
        self._history: OrderedDict[str, deque[str]] = OrderedDict()
        # Keys whose last acquisition was refused for want of an approval (see _APPROVABLE).
        self._refused_retry: set[str] = set()
        self.revision = 0
        self.connection = Connection("connecting", "connecting to the sidecar", now)

    def __len__(self) -> int:
        return len(self._guards)

    def apply(self, event: GuardEvent) -> Change:
        """Take one event of the watch, in revision order."""
        guard = event.guard
        key = guard.task_key
        if event.type is EventType.RETRY_REFUSED:
            self._refused_retry.add(key)
        elif guard.state not in _APPROVABLE:
            self._refused_retry.discard(key)
        awaiting = guard.state is GuardState.FAILED or (guard.state in _APPROVABLE and key in self._refused_retry)
        guard_json = _json(guard_document(guard, awaiting))
        self._guards[key] = guard_json
        self.revision = max(self.revision, event.revision)
        if event.type is EventType.SNAPSHOT:
            return Change(key, guard_json, None, event.revision)
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
        return Change(key, guard_json, event_json, event.revision)

    def set_connection(self, state: ConnectionState, message: str, now: datetime) -> Connection | None:
        """Record the watch's health; the new ``Connection``, or None when the state did not change."""
        if state == self.connection.state and (state == "up" or message == self.connection.message):
            return None
        since = self.connection.since if state == self.connection.state else now
        self.connection = Connection(state, message, since)
        return self.connection

    def hello_json(self, stale_after_s: float) -> str:
        """Everything a page needs to start: every guard, the feed, the connection, and the caps."""
        return (
            f'{{"revision":{self.revision},"stale_after_s":{json.dumps(stale_after_s)},'
            f'"feed_cap":{self.feed_cap},"history_cap":{self.history_cap},'
            f'"connection":{self.connection.json()},'
            f'"guards":[{",".join(self._guards.values())}],'
            f'"feed":[{",".join(self._feed)}]}}'
        )

    def guard_json(self, task_key: str) -> str | None:
        return self._guards.get(task_key)

    def history_json(self, task_key: str) -> str:
        """The events seen for ``task_key`` since the dashboard started (the last ``history_cap``), oldest first."""
        return f"[{','.join(self._history.get(task_key, ()))}]"
