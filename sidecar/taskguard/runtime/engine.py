"""The one way into the guards: commands go in, committed events come out.

The write path: read the guard, let the core decide, commit, then answer.
The shells (the gRPC front, leases, events, telemetry) reach the store, the
clock and the policy only through the operations here.

Commands on one task key run one at a time (a per-key mutex), so a decision
is always made on the committed state and a reply never reports something the
store does not have yet. Different keys never wait for each other; their
commits share the store's group-commit batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from taskguard.clock import Clock, instant
from taskguard.guard import core, model
from taskguard.guard.model import (
    NO_SUCH_LEASE,
    Command,
    Decision,
    Event,
    GuardQuery,
    GuardRecord,
    GuardState,
    Policy,
    Reply,
)
from taskguard.store import CommitListener, SharedStore, Store, StoreConflict, Write

# A conflict means another writer (another sidecar sharing the store) won the
# race; decide again on what it wrote. Within one process it cannot happen.
_MAX_CONFLICT_RETRIES = 16
# Guards read per store scan while filtering a ListGuards page.
_SCAN_CHUNK = 512

_T = TypeVar("_T")

LeaseCommand = model.Renew | model.Heartbeat | model.Release | model.Resume


@dataclass(frozen=True, slots=True)
class Recovery:
    # RUNNING stream-bound guards that no live sidecar holds.
    unowned_stream_guards: list[GuardRecord]
    running: list[GuardRecord]
    # Guards with waiters (or an unclaimed turn) whose calls ended with the last process.
    orphaned_waiters: list[GuardRecord]


@dataclass(frozen=True, slots=True)
class Result:
    """The reply plus what was committed, for the shells that follow up (leases, telemetry)."""

    reply: Reply
    record: GuardRecord | None
    events: tuple[Event, ...] = ()


class KeyedMutex:
    """One asyncio.Lock per task key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    async def run(self, key: str, work: Callable[[], Awaitable[_T]]) -> _T:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                return await work()
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class Engine:
    def __init__(self, store: Store, clock: Clock, policy: Policy) -> None:
        self._store = store
        # A shared store's name for this sidecar; "" for a store this process alone writes.
        self._host = store.host_id if isinstance(store, SharedStore) else ""
        self._clock = clock
        self._policy = policy
        self._mutex = KeyedMutex()
        self._listeners: list[CommitListener] = []
        # Every committed batch, this sidecar's or (on a shared store) another's, reaches the shells from here.
        store.subscribe(self._publish)

    async def execute(self, command: Command) -> Result:
        """Decide and commit ``command`` on its task key."""
        if isinstance(command, model.Acquire) and self._host and not command.host:
            command = replace(command, host=self._host)  # the call is here, should it wait in the queue
        return await self._mutex.run(command.task_key, lambda: self._decide_and_commit(command))

    async def execute_on_lease(self, lease_id: str, build: Callable[[str], LeaseCommand]) -> Result:
        """Run a command that names its guard by lease: Renew, Heartbeat, Release, Resume."""
        run = await self._store.find_run(lease_id)
        if run is None:
            return Result(NO_SUCH_LEASE, None)
        command = build(run.task_key)
        return await self._mutex.run(command.task_key, lambda: self._decide_on_lease(command))

    async def _decide_on_lease(self, command: LeaseCommand) -> Result:
        current = await self._store.get(command.task_key)
        if current is not None and (
            current.lease_id == command.lease_id or current.run_with_lease(command.lease_id) is not None
        ):
            return await self._decide_and_commit(command)
        # The lease's run no longer holds the guard. Its snapshot is read again here, under the key's
        # mutex: the one read to find the key may predate the run's end, committed while this waited.
        run = await self._store.find_run(command.lease_id)
        return Result(core.answer_past_run(run, current, command, instant(self._clock), self._policy), run)

    async def _decide_and_commit(self, command: Command) -> Result:
        for _ in range(_MAX_CONFLICT_RETRIES):
            record = await self._store.get(command.task_key)
            now = instant(self._clock)
            try:
                if (healing := core.healing(record, command, now, self._policy)) is not None:
                    # Healing is a transition of its own, committed first: every
                    # commit then carries one state change, one event, one revision
                    # (which a store like etcd maps onto one transaction each).
                    record = (await self._commit(record, healing)).record
                decision = core.decide(record, command, now, self._policy)
                result = await self._commit(record, decision)
            except StoreConflict:
                continue
            await self._serve_queue(result.record)
            return result
        raise StoreConflict(f"guard {command.task_key!r} kept changing under {type(command).__name__}")

    async def _serve_queue(self, record: GuardRecord | None) -> None:
        """The run a command ended (or the retry it approved) hands the key to its first waiter.

        A commit of its own, so the command's reply describes what the command did.
        """
        served = core.serving(record, instant(self._clock), self._policy)
        if served is None:
            return
        try:
            await self._commit(record, served)
        except StoreConflict:
            pass  # another sidecar changed the guard first; its commit serves the queue

    async def _commit(self, before: GuardRecord | None, decision: Decision) -> Result:
        if decision.record is None:
            return Result(decision.reply, before)
        committed = await self._store.commit(
            Write(
                record=decision.record,
                events=decision.events,
                durability=decision.durability,
                expected_revision=before.revision if before is not None else 0,
            )
        )
        return Result(_restamp(decision.reply, committed.record), committed.record, committed.events)

    # --- events ---------------------------------------------------------------------

    def subscribe(self, listener: CommitListener) -> None:
        """Call ``listener`` with every durable batch of events, in revision order."""
        self._listeners.append(listener)

    def _publish(self, events: Sequence[Event]) -> None:
        for listener in self._listeners:
            listener(events)

    @property
    def head(self) -> int:
        """The revision of the last event committed (or seen, on a shared store) here."""
        return self._store.revision

    async def latest_revision(self) -> int:
        """The highest revision any event can have so far, anywhere (a shared store asks its backend)."""
        return await self._store.latest_revision()

    async def events_since(self, revision: int, limit: int) -> list[Event]:
        """Committed events from ``revision`` on; RevisionCompacted if the log no longer keeps it."""
        return await self._store.events_since(revision, limit)

    # --- reads --------------------------------------------------------------------------

    async def get(self, task_key: str) -> GuardRecord | None:
        """The guard as this sidecar's copy has it (the write path's own view)."""
        return await self._store.get(task_key)

    async def read(self, task_key: str) -> GuardRecord | None:
        """The guard for a caller who acts on it: StoreUnavailable when this copy may be stale."""
        self._store.ensure_current()
        return await self._store.get(task_key)

    async def scan(self, prefix: str, after: str, limit: int) -> list[GuardRecord]:
        """Guards whose key starts with ``prefix``, after ``after``, in key order."""
        return await self._store.scan(prefix, after, limit)

    async def find(self, query: GuardQuery) -> tuple[list[GuardRecord], str | None]:
        """One page of the guards ``query`` matches, and the key to go on after (None at the end)."""
        self._store.ensure_current()
        now = self.now()
        found: list[GuardRecord] = []
        after = query.after
        while len(found) < query.size:
            chunk = await self._store.scan(query.prefix, after, _SCAN_CHUNK)
            for record in chunk:
                after = record.task_key
                if _matches(query, record, now, self._policy):
                    found.append(record)
                    if len(found) == query.size:
                        break
            if len(chunk) < _SCAN_CHUNK and (not chunk or after == chunk[-1].task_key):
                return found, None
        return found, after

    async def check_fence(self, task_key: str, fencing_token: int) -> tuple[bool, GuardRecord | None]:
        """Whether ``fencing_token`` holds ``task_key`` now, as the store itself has it, and the guard."""
        # Not the copy reads come from: a copy can still show a run that lost its guard.
        record = await self._store.confirm(task_key)
        return core.fence_is_valid(record, fencing_token, self.now()), record

    def is_stale(self, record: GuardRecord) -> bool:
        return core.is_stale(record, self.now(), self._policy)

    async def recover(self) -> Recovery:
        """What a starting sidecar finds: runs to give the resume grace, and deadlines to arm."""
        return Recovery(
            await self._store.unowned_stream_guards(),
            await self._store.running(),
            await self._store.orphaned_waiters(),
        )

    async def running(self) -> list[GuardRecord]:
        return await self._store.running()

    # --- time ---------------------------------------------------------------------------

    def now(self) -> float:
        """The monotonic clock every deadline runs on."""
        return self._clock.monotonic()

    @property
    def resume_grace_s(self) -> float:
        return self._policy.resume_grace_s

    @property
    def policy(self) -> Policy:
        return self._policy

    def rule_for(self, task_key: str) -> model.KeyRule:
        """The rule ``task_key``'s guard follows (GetGuard shows it)."""
        return self._policy.rule_for(task_key)


def _restamp(reply: Reply, record: GuardRecord) -> Reply:
    """Put the committed record (with its revision) into the reply, or, for a reply about another of a
    semaphore's runs, that run's record at the committed revision."""
    match reply:
        case model.AcquireReply():
            return replace(reply, guard=_committed_run(reply.guard, record))
        case model.GuardReply():
            return model.GuardReply(_committed_run(reply.guard, record) if reply.guard is not None else record)
        case _:
            return reply


def _committed_run(run: GuardRecord, record: GuardRecord) -> GuardRecord:
    return record if run.fencing_token == record.fencing_token else replace(run, revision=record.revision)


def _matches(query: GuardQuery, record: GuardRecord, now: float, policy: Policy) -> bool:
    if query.states and record.state not in query.states:
        # A semaphore whose record speaks for a failed run is still RUNNING for whoever asks for running keys.
        if not (GuardState.RUNNING in query.states and record.runs):
            return False
    return not query.stale_only or core.is_stale(record, now, policy)
