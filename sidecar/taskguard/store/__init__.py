"""The store: durability only, no business rules.

The engine drives every backend through ``Store``: read a guard, commit a
transition only if the guard's revision is unchanged since it was read, and
append the transition's events to a log that watchers can resume from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from taskguard.guard.model import Durability, Event, GuardRecord


class StoreError(Exception):
    """Base of the store's failures."""


class StoreConflict(StoreError):
    """The guard changed between the read and the commit; decide again."""

    @classmethod
    def at(cls, task_key: str, current: int, expected: int) -> StoreConflict:
        return cls(f"guard {task_key!r} is at revision {current}, not {expected}")


class StoreUnavailable(StoreError):
    """The store cannot commit now (disk full or read-only, backend down)."""


class GuardLost(StoreError):
    """This sidecar can no longer vouch for a guard it held (its lease on a shared store lapsed)."""


class RevisionCompacted(StoreError):
    """Events before ``oldest`` are no longer retained."""

    def __init__(self, requested: int, oldest: int) -> None:
        super().__init__(f"revision {requested} is no longer retained; the oldest available is {oldest}")
        self.requested = requested
        self.oldest = oldest


@dataclass(frozen=True, slots=True)
class Write:
    """One decided transition of one guard."""

    record: GuardRecord
    events: tuple[Event, ...]
    durability: Durability
    # The revision of the record the decision was made on; 0 when it was absent.
    expected_revision: int


@dataclass(frozen=True, slots=True)
class Committed:
    """A write as stored: the record and events stamped with their revisions."""

    record: GuardRecord
    events: tuple[Event, ...]


# Called after every durable batch with its events in revision order.
CommitListener = Callable[[Sequence[Event]], None]


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def get(self, task_key: str) -> GuardRecord | None: ...

    async def find_run(self, lease_id: str) -> GuardRecord | None:
        """The latest snapshot of the run that ``lease_id`` was minted for, current or past."""
        ...

    async def commit(self, write: Write) -> Committed:
        """Store ``write``; SYNC returns once it is durable, LAZY and VOLATILE at once.

        Callers serialise writes per task key (the engine's per-key mutex):
        a LAZY or VOLATILE write while a SYNC write of the same key is in
        flight is a StoreConflict. The events of a LAZY write may come back
        unstamped; they are published with revisions once persisted.

        Raises StoreConflict if the guard's revision moved, StoreUnavailable
        if it cannot be made durable.
        """
        ...

    async def scan(self, prefix: str, after: str, limit: int) -> list[GuardRecord]:
        """Guards whose key starts with ``prefix`` and sorts after ``after``, in key order."""
        ...

    async def running(self) -> list[GuardRecord]:
        """Every RUNNING guard (to re-arm deadlines after a restart)."""
        ...

    async def unowned_stream_guards(self) -> list[GuardRecord]:
        """RUNNING stream-bound guards that no live sidecar holds (to wait the resume grace for, then abandon)."""
        ...

    async def orphaned_waiters(self) -> list[GuardRecord]:
        """At start: guards whose waiters (or unclaimed turn) were this process's last incarnation's calls."""
        ...

    async def confirm(self, task_key: str) -> GuardRecord | None:
        """The guard as the store itself has it now, not as a copy of it may lag behind (CheckFence).

        Raises StoreUnavailable when that cannot be known within the store's timeout.
        """
        ...

    def ensure_current(self) -> None:
        """Raise StoreUnavailable when this sidecar's reads may be staler than the store's usual lag."""
        ...

    async def latest_revision(self) -> int:
        """The highest revision any event committed so far can have, anywhere (not only in this copy).

        A shared store asks its backend (StoreUnavailable when it cannot); a
        watch may start at most one past it.
        """
        ...

    async def events_since(self, revision: int, limit: int) -> list[Event]:
        """Committed events from ``revision`` on; RevisionCompacted if it is no longer kept."""
        ...

    @property
    def revision(self) -> int:
        """The revision of the last committed event."""
        ...

    def subscribe(self, listener: CommitListener) -> None: ...

    async def flush(self) -> None:
        """Persist every LAZY write made so far."""
        ...


@runtime_checkable
class SharedStore(Protocol):
    """What only a store that several sidecars share has to tell (the server wires it to the leases)."""

    # This sidecar's name among those sharing the store (a waiter's call is on one of them).
    host_id: str

    def set_waiters_gone_handler(self, handler: Callable[[GuardRecord], None]) -> None:
        """Be told of waiters whose sidecar is gone (a guard naming only them): their calls are over."""
        ...

    def set_owner_loss_handler(self, handler: Callable[[str, int], None]) -> None:
        """Be told (task key, fencing token) when the sidecar holding a stream-bound guard is gone."""
        ...

    def set_lease_loss_handler(self, handler: Callable[[], None]) -> None:
        """Be told when this sidecar's own hold on the store lapsed (its guards may be taken)."""
        ...

    def set_deadline_handler(self, handler: Callable[[GuardRecord], None]) -> None:
        """Be told of a guard whose TTL deadline the store set without a commit (arm it).

        The store does so when the sidecar that kept the deadline is gone.
        """
        ...
