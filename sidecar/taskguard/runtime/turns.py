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
import contextlib
import functools
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
    GuardReply,
    GuardState,
    Leave,
    Outcome,
    Rejected,
    Rejection,
)
from taskguard.runtime.engine import Engine, Result
from taskguard.runtime.events import EventHub

Spawn = Callable[[Coroutine[Any, Any, Result]], None]

# A waiter hears a change of its place at most this often (its final answer at once).
NOTICE_INTERVAL_S = 0.25


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


class TurnBoard:
    """The waiting calls of every key, each event of a key told once to the calls waiting on it.

    One listener per key, and each waiter's place read from one map per event: a drain of N waiters costs
    O(N) per event, not O(N) per waiter per event.
    """

    def __init__(self, hub: EventHub) -> None:
        self._hub = hub
        self._turns: dict[str, list[Turn]] = {}
        self._unfollow: dict[str, Callable[[], None]] = {}

    def join(self, turn: Turn) -> None:
        key = turn.acquire.task_key
        if key not in self._turns:
            self._turns[key] = []
            self._unfollow[key] = self._hub.follow(key, functools.partial(self._heard, key))
        self._turns[key].append(turn)

    def leave(self, turn: Turn) -> None:
        key = turn.acquire.task_key
        turns = self._turns.get(key, [])
        if turn in turns:
            turns.remove(turn)
        if not turns and key in self._turns:
            del self._turns[key]
            self._unfollow.pop(key)()

    def _heard(self, key: str, event: Event) -> None:
        places = {waiter.run_id: place for place, waiter in enumerate(event.guard.waiters, 1)}
        for turn in list(self._turns.get(key, ())):
            turn.heard(event, places.get(turn.run_id, 0))


class Turn:
    """One acquisition's wait in its key's queue, from before it is decided (so no event is missed)."""

    def __init__(self, engine: Engine, board: TurnBoard, spawn: Spawn, acquire: Acquire, may_wait: bool) -> None:
        self._engine = engine
        self._board = board
        self._spawn = spawn
        self._acquire = acquire
        if may_wait:
            board.join(self)
        self._told: tuple[int, GuardState | None] = (0, None)
        # What the waiter has yet to hear: its final news, else the latest change of its place (older ones
        # are passed over: a waiter far back in a fast queue hears where it is, not every step on the way).
        self._final: TurnNews | None = None
        self._latest: TurnNews | None = None
        self._wake = asyncio.Event()
        self._next_notice = 0.0
        self._settled = False
        # Set once queued: when, and behind which run (telemetry's wait span starts there and links to it).
        self.ahead: GuardRecord | None = None
        self.queued_at: datetime | None = None

    @property
    def run_id(self) -> str:
        return self._acquire.run_id

    def queued(self, reply: AcquireReply) -> None:
        """The acquisition was answered QUEUED: where the waiter stands now."""
        self._told = (reply.position, _holding_up(reply.guard))
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
        """The next thing this waiter must hear (a final one settles the turn).

        A change of place is told at most once per ``NOTICE_INTERVAL_S`` (the latest place then), while a
        final answer is told at once: a queue of N waiters would otherwise send N notices per handover, and
        the next waiter's ACQUIRED would wait behind them.
        """
        loop = asyncio.get_running_loop()
        while True:
            if self._final is not None:
                self._settled = True
                return self._final
            changed = (
                self._latest is not None and (self._latest.position, _holding_up(self._latest.guard)) != self._told
            )
            if changed and loop.time() >= self._next_notice:
                latest, self._latest = self._latest, None
                assert latest is not None
                self._told = (latest.position, _holding_up(latest.guard))
                self._next_notice = loop.time() + NOTICE_INTERVAL_S
                return latest
            self._wake.clear()
            if changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._next_notice - loop.time())
            else:
                await self._wake.wait()

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
        # The reply is the claimed run's (a semaphore's record may speak for another of its runs).
        assert isinstance(result.reply, GuardReply) and result.reply.guard is not None
        return result.reply.guard

    def close(self, reason: str) -> None:
        """The call is over: a waiter that heard nothing final leaves the queue (or the turn it missed)."""
        self._board.leave(self)
        if not self._settled:
            self._settled = True
            cmd = self._acquire
            self._spawn(self._engine.execute(Leave(cmd.task_key, cmd.run_id, cmd.lease_id, reason)))

    def settle(self) -> None:
        """The call took up its run (claimed), or was never queued: it is no waiter."""
        self._settled = True
        self._board.leave(self)

    def heard(self, event: Event, position: int) -> None:
        """One event of the key, and the waiter's place after it (0: not in the queue)."""
        if self._final is not None:
            return
        run_id, guard = self._acquire.run_id, event.guard
        if event.type is EventType.ACQUIRED and (guard.run_id, guard.lease_id) == (run_id, self._acquire.lease_id):
            self._final = TurnNews(Outcome.ACQUIRED, guard)
        elif event.waiter_run_id == run_id and event.type is EventType.SUPERSEDED:
            self._final = TurnNews(Outcome.SUPERSEDED, guard, superseded_by=event.trigger_run_id)
        elif event.waiter_run_id == run_id and event.type is EventType.DEQUEUED:
            self._final = TurnNews(Outcome.WAIT_TIMED_OUT, guard)
        elif position:
            self._latest = TurnNews(Outcome.QUEUED, guard, position=position)
            if asyncio.get_running_loop().time() < self._next_notice:
                return  # told of its place lately: it will read the latest when its interval is over
        else:
            return
        self._wake.set()


# A key that ended in one of these may not serve its queue yet (an approval, a lock-delay): worth telling.
_HOLDING_UP = frozenset({GuardState.FAILED, GuardState.ABANDONED, GuardState.EXPIRED})


def _holding_up(guard: GuardRecord) -> GuardState | None:
    """What keeps the queue waiting besides a running run, if anything (a free key serves it at once)."""
    return guard.state if guard.state in _HOLDING_UP else None
