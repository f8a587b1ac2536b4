"""The in-memory twin of the SQLite store: same contract, nothing durable (tests, throwaway sidecars)."""

from __future__ import annotations

from collections import deque

from taskguard.clock import Clock
from taskguard.guard.model import Durability, Event, GuardRecord
from taskguard.store import Committed, RevisionCompacted, Write
from taskguard.store.index import GuardIndex, SingleWriterStore, other_runs_changed, stamp
from taskguard.store.retention import Retention


class MemoryStore(SingleWriterStore):
    def __init__(self, clock: Clock, retention: Retention | None = None) -> None:
        self._clock = clock
        self._retention = retention or Retention()
        self._index = GuardIndex()
        self._runs: dict[str, GuardRecord] = {}
        self._events: deque[Event] = deque()
        self._revision = 0

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def find_run(self, lease_id: str) -> GuardRecord | None:
        current = self._current_run(lease_id)
        if current is not None:
            return current
        return self._runs.get(lease_id)

    async def commit(self, write: Write) -> Committed:
        self._index.check(write)
        if write.durability is Durability.VOLATILE:
            self._index.put(write.record)
            return Committed(write.record, ())
        committed = stamp(write, self._revision + 1)
        self._revision += len(committed.events)
        self._index.put(committed.record)
        self._runs[committed.record.lease_id] = committed.record
        for run in other_runs_changed(committed):
            self._runs[run.lease_id] = run
        self._events.extend(committed.events)
        self._prune()
        self._index.publish(committed.events)
        return committed

    def _prune(self) -> None:
        while len(self._events) > self._retention.max_events:
            self._events.popleft()
        cutoff = self._retention.cutoff(self._clock.now_utc())
        # Like the SQLite store, keep the newest event so the log never forgets the current revision.
        while cutoff is not None and len(self._events) > 1 and self._events[0].occurred_at < cutoff:
            self._events.popleft()

    async def events_since(self, revision: int, limit: int) -> list[Event]:
        revision = max(revision, 1)
        oldest = self._events[0].revision if self._events else self._revision + 1
        if revision < oldest and revision <= self._revision:
            raise RevisionCompacted(revision, oldest)
        return [event for event in self._events if event.revision >= revision][:limit]

    @property
    def revision(self) -> int:
        return self._revision

    async def flush(self) -> None:
        return None
