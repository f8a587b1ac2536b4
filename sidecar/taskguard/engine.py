"""The write path: read the guard, let the core decide, commit, then answer.

Commands on one task key run one at a time (a per-key mutex), so a decision
is always made on the committed state and a reply never reports something the
store does not have yet. Different keys never wait for each other; their
commits share the store's group-commit batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from taskguard import core, model
from taskguard.clock import Clock, instant
from taskguard.model import Command, Decision, Event, GuardRecord, Policy, Rejected, RejectionKind, Reply
from taskguard.store import Store, StoreConflict, Write

# A conflict means another writer (another sidecar sharing the store) won the
# race; decide again on what it wrote. Within one process it cannot happen.
_MAX_CONFLICT_RETRIES = 16

_T = TypeVar("_T")

LeaseCommand = model.Renew | model.Heartbeat | model.Release | model.Resume


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
        self.store = store
        self.clock = clock
        self.policy = policy
        self._mutex = KeyedMutex()

    async def execute(self, command: Command) -> Result:
        """Decide and commit ``command`` on its task key."""
        return await self._mutex.run(command.task_key, lambda: self._decide_and_commit(command))

    async def execute_on_lease(self, lease_id: str, build: Callable[[str], LeaseCommand]) -> Result:
        """Run a command that names its guard by lease: Renew, Heartbeat, Release, Resume."""
        run = await self.store.find_run(lease_id)
        if run is None:
            return Result(Rejected(RejectionKind.NOT_FOUND, "lease_id", "no such lease"), None)
        command = build(run.task_key)
        return await self._mutex.run(command.task_key, lambda: self._decide_on_lease(command))

    async def _decide_on_lease(self, command: LeaseCommand) -> Result:
        current = await self.store.get(command.task_key)
        if current is not None and current.lease_id == command.lease_id:
            return await self._decide_and_commit(command)
        # The lease's run no longer holds the guard. Its snapshot is read again here, under the key's
        # mutex: the one read to find the key may predate the run's end, committed while this waited.
        run = await self.store.find_run(command.lease_id)
        return Result(core.answer_past_run(run, current, command, instant(self.clock), self.policy), run)

    async def _decide_and_commit(self, command: Command) -> Result:
        for _ in range(_MAX_CONFLICT_RETRIES):
            record = await self.store.get(command.task_key)
            now = instant(self.clock)
            try:
                if (healing := core.healing(record, command, now)) is not None:
                    # Healing is a transition of its own, committed first: every
                    # commit then carries one state change, one event, one revision
                    # (which a store like etcd maps onto one transaction each).
                    record = (await self._commit(record, healing)).record
                decision = core.decide(record, command, now, self.policy)
                return await self._commit(record, decision)
            except StoreConflict:
                continue
        raise StoreConflict(f"guard {command.task_key!r} kept changing under {type(command).__name__}")

    async def _commit(self, before: GuardRecord | None, decision: Decision) -> Result:
        if decision.record is None:
            return Result(decision.reply, before)
        committed = await self.store.commit(
            Write(
                record=decision.record,
                events=decision.events,
                durability=decision.durability,
                expected_revision=before.revision if before is not None else 0,
            )
        )
        return Result(_restamp(decision.reply, committed.record), committed.record, committed.events)

    async def get(self, task_key: str) -> GuardRecord | None:
        return await self.store.get(task_key)

    def now(self) -> float:
        return self.clock.monotonic()


def _restamp(reply: Reply, record: GuardRecord) -> Reply:
    """Put the committed record (with its revision) into the reply."""
    match reply:
        case model.AcquireReply():
            return replace(reply, guard=record)
        case model.GuardReply():
            return model.GuardReply(record)
        case _:
            return reply
