"""Waiting in a key's queue: one queued caller's view of its key's committed events.

The core decides who is next and when (``core`` serves a queue in the same
decisions that free a key); this module only tells one waiting call what
concerns it: its place moved, its turn came (it then claims the run the core
started for it), a newer trigger took its place, its max_wait passed. A call
that ends while it waits leaves the queue at once (``Leave``); if its turn came
meanwhile, that run ends CANCELLED unheld, and the next waiter's turn comes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from taskguard.guard.model import (
    Acquire,
    AcquireReply,
    Claim,
    Event,
    EventType,
    GuardRecord,
    GuardState,
    Leave,
    Outcome,
    Rejected,
    Rejection,
)
from taskguard.runtime.engine import Engine, Result
from taskguard.runtime.events import EventHub

Spawn = Callable[[Coroutine[Any, Any, Result]], None]


@dataclass(frozen=True, slots=True)
class TurnNews:
    """What a waiter hears: QUEUED (its place or the guard ahead changed), ACQUIRED, SUPERSEDED, WAIT_TIMED_OUT."""

    outcome: Outcome
    guard: GuardRecord
    position: int = 0
    superseded_by: str = ""

    @property
    def final(self) -> bool:
        return self.outcome is not Outcome.QUEUED

    def reply(self) -> AcquireReply:
        return AcquireReply(self.outcome, self.guard, position=self.position)


class Turn:
    """One acquisition's wait in its key's queue, from before it is decided (so no event is missed)."""

    def __init__(self, engine: Engine, hub: EventHub, spawn: Spawn, acquire: Acquire) -> None:
        self._engine = engine
        self._spawn = spawn
        self._acquire = acquire
        self._news: asyncio.Queue[Event] = asyncio.Queue()
        self._stop_following = hub.follow(acquire.task_key, self._news.put_nowait)
        self._position = 0
        self._state: GuardState | None = None
        self._settled = False
        # Set once queued: when, and behind which run (telemetry's wait span starts there and links to it).
        self.ahead: GuardRecord | None = None
        self.queued_at: datetime | None = None

    @property
    def run_id(self) -> str:
        return self._acquire.run_id

    def queued(self, reply: AcquireReply) -> None:
        """The acquisition was answered QUEUED: where the waiter stands now."""
        self._position, self._state = reply.position, _holding_up(reply.guard)
        self.ahead = reply.guard
        self.queued_at = reply.guard.waiters[reply.position - 1].queued_at

    @property
    def acquire(self) -> Acquire:
        return self._acquire

    @property
    def settled(self) -> bool:
        """Whether the waiter heard a final answer (or the call is over)."""
        return self._settled

    async def news(self) -> TurnNews:
        """The next thing this waiter must hear (a final one settles the turn)."""
        while True:
            news = self._read(await self._news.get())
            if news is None:
                continue
            if news.final:
                self._settled = True
            return news

    async def outcome(self) -> TurnNews:
        """Wait through every change of place for the final news (a unary Acquire's answer)."""
        while not (news := await self.news()).final:
            pass
        return news

    async def claim(self, admitted: GuardRecord) -> GuardRecord:
        """Take up the run the waiter's turn started; Rejection if it is gone already."""
        result = await self._engine.execute(Claim(admitted.task_key, admitted.lease_id))
        if isinstance(result.reply, Rejected):
            raise Rejection(result.reply)
        assert result.record is not None
        return result.record

    def close(self, reason: str) -> None:
        """The call is over: a waiter that heard nothing final leaves the queue (or the turn it missed)."""
        self._stop_following()
        if not self._settled:
            self._settled = True
            cmd = self._acquire
            self._spawn(self._engine.execute(Leave(cmd.task_key, cmd.run_id, cmd.lease_id, reason)))

    def settle(self) -> None:
        """The call took up its run (claimed): from now on it is a holder, not a waiter."""
        self._settled = True
        self._stop_following()

    def _read(self, event: Event) -> TurnNews | None:
        run_id, guard = self._acquire.run_id, event.guard
        if event.type is EventType.ACQUIRED and (guard.run_id, guard.lease_id) == (run_id, self._acquire.lease_id):
            return TurnNews(Outcome.ACQUIRED, guard)
        if event.waiter_run_id == run_id and event.type is EventType.SUPERSEDED:
            return TurnNews(Outcome.SUPERSEDED, guard, superseded_by=event.trigger_run_id)
        if event.waiter_run_id == run_id and event.type is EventType.DEQUEUED:
            return TurnNews(Outcome.WAIT_TIMED_OUT, guard)
        position, holding_up = guard.position(run_id), _holding_up(guard)
        if position == 0 or (position, holding_up) == (self._position, self._state):
            return None
        self._position, self._state = position, holding_up
        return TurnNews(Outcome.QUEUED, guard, position=position)


# A key that ended in one of these may not serve its queue yet (an approval, a lock-delay): worth telling.
_HOLDING_UP = frozenset({GuardState.FAILED, GuardState.ABANDONED, GuardState.EXPIRED})


def _holding_up(guard: GuardRecord) -> GuardState | None:
    """What keeps the queue waiting besides a running run, if anything (a free key serves it at once)."""
    return guard.state if guard.state in _HOLDING_UP else None
