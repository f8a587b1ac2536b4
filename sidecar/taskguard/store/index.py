"""The in-memory index of guards that the single-process backends keep in front of their log."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import replace

from taskguard.guard.model import Durability, Event, GuardRecord
from taskguard.store import CommitListener, Committed, StoreConflict, Write


class GuardIndex:
    """Every guard by key, in key order, plus the lease of each current run (a semaphore's: each of its runs).

    Not thread-safe: it lives on the event loop that owns the store.
    """

    def __init__(self) -> None:
        self._guards: dict[str, GuardRecord] = {}
        self._sorted_keys: list[str] = []
        self._current_leases: dict[str, str] = {}
        self._listeners: list[CommitListener] = []

    def get(self, task_key: str) -> GuardRecord | None:
        return self._guards.get(task_key)

    def key_of_current_lease(self, lease_id: str) -> str | None:
        return self._current_leases.get(lease_id)

    def check(self, write: Write) -> None:
        current = self._guards.get(write.record.task_key)
        revision = current.revision if current is not None else 0
        if revision != write.expected_revision:
            raise StoreConflict.at(write.record.task_key, revision, write.expected_revision)

    def put(self, record: GuardRecord) -> None:
        previous = self._guards.get(record.task_key)
        if previous is None:
            bisect.insort(self._sorted_keys, record.task_key)
        elif previous.holders or record.holders:
            for gone in {run.lease_id for run in (previous, *previous.holders)} - _leases_of(record):
                self._current_leases.pop(gone, None)
        elif previous.lease_id != record.lease_id:
            self._current_leases.pop(previous.lease_id, None)
        self._guards[record.task_key] = record
        if record.lease_id:
            self._current_leases[record.lease_id] = record.task_key
        for holder in record.holders:
            self._current_leases[holder.lease_id] = record.task_key

    def scan(self, prefix: str, after: str, limit: int) -> list[GuardRecord]:
        if limit <= 0:
            return []
        start = bisect.bisect_right(self._sorted_keys, after) if after else 0
        if prefix and prefix > after:
            start = max(start, bisect.bisect_left(self._sorted_keys, prefix))
        found: list[GuardRecord] = []
        for key in self._sorted_keys[start:]:
            if not key.startswith(prefix):
                break
            found.append(self._guards[key])
            if len(found) >= limit:
                break
        return found

    def running(self) -> list[GuardRecord]:
        """Guards that a run holds (a semaphore's record may speak for a failed run while others go on)."""
        return [guard for guard in self._guards.values() if guard.running or guard.holders]

    def queued(self) -> list[GuardRecord]:
        """Guards with waiters, or a turn no waiter took up yet."""
        return [
            guard
            for guard in self._guards.values()
            if guard.waiters or not guard.claimed or any(not run.claimed for run in guard.holders)
        ]

    def subscribe(self, listener: CommitListener) -> None:
        self._listeners.append(listener)

    def publish(self, events: Sequence[Event]) -> None:
        if events:
            for listener in self._listeners:
                listener(events)


def _leases_of(record: GuardRecord) -> set[str]:
    return {run.lease_id for run in (record, *record.holders)}


def other_runs_changed(committed: Committed) -> list[GuardRecord]:
    """A semaphore's runs other than the one its record speaks for that this commit changed, each as its last
    event tells it: their snapshots are what a release of a run that left the record is answered from."""
    record = committed.record
    if not record.holders and not any(event.guard.lease_id != record.lease_id for event in committed.events):
        return []
    changed = {event.guard.lease_id: event.guard for event in committed.events if event.guard.lease_id}
    changed.pop(record.lease_id, None)
    return list(changed.values())


def stamp(write: Write, first_revision: int) -> Committed:
    """Give ``write``'s events consecutive revisions from ``first_revision``.

    A state change (SYNC) moves the guard's revision to its last event's; a
    refused trigger (LAZY) is an event of its own but leaves the guard's
    revision where the last state change put it.
    """
    moves_revision = write.durability is Durability.SYNC
    events: list[Event] = []
    for offset, event in enumerate(write.events):
        revision = first_revision + offset
        guard = replace(event.guard, revision=revision) if moves_revision else event.guard
        events.append(replace(event, revision=revision, guard=guard))
    record = write.record
    if moves_revision and events:
        record = replace(record, revision=events[-1].revision)
    return Committed(record, tuple(events))


class IndexedStore:
    """The reads a store answers from its in-memory ``GuardIndex`` (all three backends keep one)."""

    _index: GuardIndex

    async def get(self, task_key: str) -> GuardRecord | None:
        return self._index.get(task_key)

    async def scan(self, prefix: str, after: str, limit: int) -> list[GuardRecord]:
        return self._index.scan(prefix, after, limit)

    async def running(self) -> list[GuardRecord]:
        return self._index.running()

    def subscribe(self, listener: CommitListener) -> None:
        self._index.subscribe(listener)

    def _current_run(self, lease_id: str) -> GuardRecord | None:
        key = self._index.key_of_current_lease(lease_id)
        return self._index.get(key) if key is not None else None


class SingleWriterStore(IndexedStore):
    """A store this process alone writes (SQLite, memory): nobody else holds streams on it."""

    _revision: int

    async def unowned_stream_guards(self) -> list[GuardRecord]:
        # After a start, no stream holds anything yet (an unclaimed turn is a waiter's, not a holder's).
        return [run for record in self._index.running() for run in record.runs if run.stream_bound and run.claimed]

    async def orphaned_waiters(self) -> list[GuardRecord]:
        # Every waiter was a call to this process, and a start has none yet.
        return self._index.queued()

    async def confirm(self, task_key: str) -> GuardRecord | None:
        # The index is the store's own state: nothing can be newer.
        return self._index.get(task_key)

    def ensure_current(self) -> None:
        return None

    async def latest_revision(self) -> int:
        # This process alone writes: its own head is the store's.
        return self._revision
