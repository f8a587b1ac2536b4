"""Lease keeping: turns "TTL passed", "stream dropped" and "did not resume" into commands.

This module never writes the store; it hands ``Expire`` and ``Abandon`` to
the engine, which lets the core decide (a renewal that raced the timer simply
makes the ``Expire`` a no-op), the way etcd's lessor hands expired leases to
the server instead of deleting keys itself.

* TTL deadlines: one sweeper task sleeps until the earliest deadline. Heap
  entries can be stale (renewed, released); the core's decision sorts that out,
  and the sweeper re-arms a guard whose deadline moved.
* Hold streams: a stream attaches to the run it holds; when it ends without a
  release, the run is abandoned at once. Only the stream currently attached
  can abandon it, so a holder that re-attached on a new stream is safe from
  its old stream's teardown.
* Restart: a stream-bound run found RUNNING at start-up gets the resume grace
  for its holder to come back on a new stream, then it is abandoned.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any

from taskguard.guard import core, model
from taskguard.guard.model import (
    RUN_ENDS,
    Abandon,
    Acquire,
    Event,
    EventType,
    Expire,
    GuardRecord,
    Outcome,
    Rejected,
)
from taskguard.runtime.engine import Engine, Result
from taskguard.runtime.events import EventHub
from taskguard.runtime.turns import Turn, TurnBoard

log = logging.getLogger(__name__)


class HolderLimit(Exception):
    """One caller already has as many RUNNING guards as it may."""


class LeaseKeeper:
    def __init__(self, engine: Engine, hub: EventHub, max_guards_per_holder: int = 0) -> None:
        self._engine = engine
        self._hub = hub
        self._turns = TurnBoard(hub)
        self._max_per_holder = max_guards_per_holder
        self._held_by: Counter[str] = Counter()
        self._admitting: Counter[str] = Counter()
        # Places in queues, by (task key, run id): each is a run its caller may get without asking again, so it
        # counts against the caller's limit (or queueing would take a caller past it).
        self._waiting: dict[tuple[str, str], str] = {}
        self._waiting_by: Counter[str] = Counter()
        self._heap: list[tuple[float, str, int]] = []
        self._armed: dict[str, tuple[int, float]] = {}
        self._wakeup = asyncio.Event()
        # By run (task key, fencing token): a semaphore's runs are held by streams of their own.
        self._attached: dict[tuple[str, int], object] = {}
        self._orphans: dict[tuple[str, int], asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._stopping = False
        engine.subscribe(self._on_commit)

    async def start(self) -> None:
        """Give orphaned stream holders the resume grace, then arm every deadline found in the store."""
        found = await self._engine.recover()
        for record in found.unowned_stream_guards:
            if (record.task_key, record.fencing_token) in self._attached:
                continue
            # Counted from now, whatever deadline was stored: no heartbeat could reach a sidecar that was down.
            await self._engine.execute(model.AwaitResume(record.task_key, record.fencing_token))
            self._wait_for_resume(record, "after a sidecar restart")
        for record in found.running:
            self.arm(record)
            for run in record.runs:
                self._held_by[run.principal] += 1
        for record in found.orphaned_waiters:
            await self._dismiss_waiters(record)
        self._sweeper = asyncio.create_task(self._sweep(), name="taskguard-lease-sweeper")

    async def _dismiss_waiters(
        self,
        record: GuardRecord,
        why: str = "the sidecar restarted while it waited; its call ended, and a retry queues again",
    ) -> None:
        """Waiters whose calls ended with the last process: they leave (a retry queues again)."""
        for run in record.runs:
            if not run.claimed:
                await self._engine.execute(model.Leave(record.task_key, run.run_id, run.lease_id, why))
        for waiter in record.waiters:
            await self._engine.execute(model.Leave(record.task_key, waiter.run_id, waiter.acquire.lease_id, why))

    def waiters_gone(self, record: GuardRecord) -> None:
        """A shared store says the sidecar these waiters' calls were on is gone: nothing will hear their turn."""
        if not self._stopping:
            why = "the sidecar its call was on is gone (its store lease expired); a retry queues again"
            self._spawn(self._dismiss_waiters(record, why))

    def turn(self, acquire: Acquire) -> Turn:
        """Follow ``acquire``'s key before it is decided, in case it is queued."""
        may_wait = core.conflict_policy(acquire, self._engine.policy) in model.WAITING_POLICIES
        return Turn(self._engine, self._turns, self._spawn, acquire, may_wait)

    async def stop(self) -> None:
        """Stop timers; streams that end from now on leave their guards for a later resume."""
        self._stopping = True
        for handle in self._orphans.values():
            handle.cancel()
        self._orphans.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- TTL ---------------------------------------------------------------------------

    def arm(self, record: GuardRecord) -> None:
        """Wake for what time next does to ``record``: its lease's end, a waiter's max_wait, a lock-delay's end."""
        deadline = core.next_deadline(record)
        if deadline is None:
            return
        # The timer names a run that still holds the key (a semaphore's event may be about one that ended).
        token = max((run.fencing_token for run in record.runs), default=record.fencing_token)
        armed = self._armed.get(record.task_key)
        if armed is not None and armed[0] == token and armed[1] <= deadline:
            return  # an earlier timer fires first and re-arms from what it finds
        self._armed[record.task_key] = (token, deadline)
        heapq.heappush(self._heap, (deadline, record.task_key, token))
        if self._heap[0][0] == deadline:
            self._wakeup.set()

    def _on_commit(self, events: Sequence[Event]) -> None:
        for event in events:
            self.arm(event.guard)
            principal = event.guard.principal
            if event.type is EventType.ACQUIRED:
                self._held_by[principal] += 1
            elif event.type in RUN_ENDS:
                self._held_by[principal] -= 1
                if self._held_by[principal] <= 0:
                    del self._held_by[principal]
            if event.waiter_run_id:
                self._count_waiter(event)

    def _count_waiter(self, event: Event) -> None:
        """A queue event: a waiter took a place (QUEUED), or left it (its turn came, it went, it was replaced)."""
        place = (event.task_key, event.waiter_run_id)
        if event.type is EventType.QUEUED:
            waiter = next((w for w in event.guard.waiters if w.run_id == event.waiter_run_id), None)
            if waiter is not None and place not in self._waiting:
                self._waiting[place] = waiter.acquire.principal
                self._waiting_by[waiter.acquire.principal] += 1
            return
        principal = self._waiting.pop(place, None)
        if principal is not None:
            self._waiting_by[principal] -= 1
            if self._waiting_by[principal] <= 0:
                del self._waiting_by[principal]

    @contextlib.contextmanager
    def admit(self, principal: str) -> Iterator[None]:
        """Refuse an acquisition that would take the caller ``principal`` past its limit.

        Counted by who the caller is, not by the holder string it sends, which
        it could change at will. Acquisitions being decided count too, so a
        burst cannot overshoot.
        """
        held, waiting = self._held_by[principal], self._waiting_by[principal]
        if self._max_per_holder and held + waiting + self._admitting[principal] >= self._max_per_holder:
            places = f" and waits in {waiting} queues" if waiting else ""
            raise HolderLimit(
                f"{principal} already holds {held} RUNNING guards{places} (max_guards_per_holder is "
                f"{self._max_per_holder}, counted per caller whatever holder it names)"
            )
        self._admitting[principal] += 1
        try:
            yield
        finally:
            self._admitting[principal] -= 1
            if not self._admitting[principal]:
                del self._admitting[principal]

    async def _sweep(self) -> None:
        while True:
            if not self._heap:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            delay = self._heap[0][0] - self._engine.now()
            if delay > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), delay)
                except TimeoutError:
                    pass
                continue
            await self.expire_due()

    async def expire_due(self) -> None:
        """Expire every guard whose deadline has passed by the clock's current reading."""
        due: list[tuple[str, int]] = []
        now = self._engine.now()
        while self._heap and self._heap[0][0] <= now:
            _, key, token = heapq.heappop(self._heap)
            if self._armed.get(key, (None,))[0] == token:
                del self._armed[key]
            due.append((key, token))
        # Concurrently, so that many expiries share one group commit.
        await asyncio.gather(*(self._expire(key, token) for key, token in due))

    async def _expire(self, key: str, token: int) -> None:
        try:
            result = await self._engine.execute(Expire(key, token))
        except Exception:
            log.exception("expiring %r failed; retrying in 1s", key)
            asyncio.get_running_loop().call_later(1.0, self._rearm_later, key, token)
            return
        if result.record is not None and result.record.names_run(token):
            self.arm(result.record)  # heartbeats moved the deadline

    def _rearm_later(self, key: str, token: int) -> None:
        heapq.heappush(self._heap, (self._engine.now(), key, token))
        self._wakeup.set()

    # --- streams ---------------------------------------------------------------------

    def attach(self, record: GuardRecord, stream: object) -> None:
        run = (record.task_key, record.fencing_token)
        self._attached[run] = stream
        orphan = self._orphans.pop(run, None)
        if orphan is not None:
            orphan.cancel()

    def _attached_to(self, record: GuardRecord, stream: object) -> bool:
        return self._attached.get((record.task_key, record.fencing_token)) is stream

    def detach(self, record: GuardRecord, stream: object, reason: str) -> None:
        """The stream ended without a release: abandon its run, unless it is no longer the holder."""
        if not self._attached_to(record, stream):
            return
        del self._attached[(record.task_key, record.fencing_token)]
        if not self._stopping:
            self._spawn(self._engine.execute(Abandon(record.task_key, record.fencing_token, reason)))

    def leave_for_resume(self, record: GuardRecord, stream: object, why: str) -> None:
        """The stream ends, but not because its holder went away: keep the run for a resume within the grace."""
        if not self._attached_to(record, stream):
            return
        del self._attached[(record.task_key, record.fencing_token)]
        if not self._stopping:
            self._wait_for_resume(record, f"after {why}")

    def _wait_for_resume(self, record: GuardRecord, after: str) -> None:
        grace = self._engine.resume_grace_s
        self._orphans[(record.task_key, record.fencing_token)] = asyncio.get_running_loop().call_later(
            grace,
            self._abandon_orphan,
            record.task_key,
            record.fencing_token,
            f"holder did not resume within {grace:g}s {after}",
            self._engine.now(),
        )

    def release_attachment(self, record: GuardRecord, stream: object) -> None:
        if self._attached_to(record, stream):
            del self._attached[(record.task_key, record.fencing_token)]

    def owner_lost(self, key: str, token: int) -> None:
        """The sidecar holding a stream-bound guard is gone (a shared store says so): abandon its run."""
        if (key, token) in self._attached and not self._stopping:
            return  # ours, and still attached here: a stale notice about a lease we replaced
        reason = "the sidecar that held its Hold stream is gone (its store lease expired)"
        self._spawn(self._engine.execute(Abandon(key, token, reason)))

    def lease_lost(self) -> None:
        """This sidecar lost its lease on a shared store: its streams can no longer be said to hold anything."""
        for stream in list(self._attached.values()):
            if isinstance(stream, HoldSession):
                stream.lose("this sidecar lost its lease on the shared store; another may take the guard")

    def _abandon_orphan(self, key: str, token: int, reason: str, since: float) -> None:
        self._orphans.pop((key, token), None)
        if (key, token) not in self._attached:
            # Not if it resumed elsewhere meanwhile (a shared store's other sidecar): the core sees it was heard of.
            self._spawn(self._engine.execute(Abandon(key, token, reason, quiet_since=since)))

    def _spawn(self, work: Coroutine[Any, Any, object]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a command of the lease keeper (an abandon, a dismissal) failed: %s", task.exception())

    # --- Hold sessions ---------------------------------------------------------------

    def hold(self) -> HoldSession:
        return HoldSession(self._engine, self._hub, self)


class HoldSession:
    """One Hold stream's lease: acquire or resume, heartbeats, release, and its end.

    ``ended`` resolves with the final snapshot when the held run stops holding
    the guard for any reason other than this session's own release (expired,
    force-released), or, for a JOIN, when the winning run ends.
    """

    def __init__(self, engine: Engine, hub: EventHub, keeper: LeaseKeeper) -> None:
        self._engine = engine
        self._hub = hub
        self._keeper = keeper
        self.held: GuardRecord | None = None
        self.ended: asyncio.Future[GuardRecord] | None = None
        # While the session waits in its key's queue.
        self.turn: Turn | None = None
        # Resolves with the guard when a newer trigger asks the held run to stop (SUPERSEDE).
        self.stop_requested: asyncio.Future[GuardRecord] = asyncio.get_running_loop().create_future()
        self._stop_following: Callable[[], None] | None = None
        self._released = False

    async def acquire(self, command: Acquire) -> Result:
        with self._keeper.admit(command.principal):
            turn = self._keeper.turn(command)
            try:
                result = await self._engine.execute(command)
            except BaseException:
                # Off its key's board, and out of the queue in case the acquisition was committed before it failed.
                turn.close("the waiter's Hold stream failed before it heard its answer")
                raise
        reply = result.reply
        if isinstance(reply, model.AcquireReply) and reply.outcome is Outcome.QUEUED:
            turn.queued(reply)
            self.turn = turn
        else:
            turn.settle()
        await self._watch_the_run(result)
        return result

    async def take_turn(self, admitted: GuardRecord) -> GuardRecord:
        """The waiter's turn came: hold the run it started, as if acquired just now."""
        assert self.turn is not None
        held = await self.turn.claim(admitted)
        self.turn.settle()
        self.turn = None
        await self._watch_the_run(Result(model.AcquireReply(Outcome.ACQUIRED, held), held))
        return held

    async def resume(self, lease_id: str) -> Result:
        result = await self._engine.execute_on_lease(lease_id, lambda key: model.Resume(key, lease_id))
        await self._watch_the_run(result)
        return result

    async def _watch_the_run(self, result: Result) -> None:
        """Hold the run this session won, or wait for the one it joined: either way, learn of its end."""
        reply = result.reply
        if not isinstance(reply, model.AcquireReply):
            return
        if reply.outcome is Outcome.ACQUIRED:
            self.held = reply.guard
            self._keeper.attach(reply.guard, self)
            self._follow_stop_requests(reply.guard)
        elif not reply.joined:
            return
        self.ended = self._hub.run_ended(reply.guard)
        self._hub.check_run(await self._engine.get(reply.guard.task_key))

    def _follow_stop_requests(self, held: GuardRecord) -> None:
        """Hear when a newer trigger supersedes the held run (SUPERSEDE), to tell the holder."""
        if self._stop_following is not None:
            return

        def heard(event: model.Event) -> None:
            if event.type is EventType.STOP_REQUESTED and event.guard.fencing_token == held.fencing_token:
                if not self.stop_requested.done():
                    self.stop_requested.set_result(event.guard)

        self._stop_following = self._hub.follow(held.task_key, heard)
        if held.stop_requested_by and not self.stop_requested.done():
            self.stop_requested.set_result(held)  # asked before this stream took the run up (a resume)

    def next_stop_request(self) -> asyncio.Future[GuardRecord]:
        """The holder was told of a stop request: wait for the next one (a newer superseder)."""
        self.stop_requested = asyncio.get_running_loop().create_future()
        return self.stop_requested

    async def heartbeat(self) -> Result:
        held = self._require_held()
        result = await self._engine.execute_on_lease(held.lease_id, lambda key: model.Heartbeat(key, held.lease_id))
        if result.record is not None and isinstance(result.reply, model.GuardReply):
            self._keeper.arm(result.record)
        return result

    async def release(self, status: model.RunStatus, detail: str) -> Result:
        held = self._require_held()
        result = await self._engine.execute_on_lease(
            held.lease_id, lambda key: model.Release(key, held.lease_id, status, detail)
        )
        if isinstance(result.reply, model.GuardReply):
            self._released = True
            self._keeper.release_attachment(held, self)
            if self.ended is not None:
                self.ended.cancel()
        return result

    def why_lost(self, final: GuardRecord) -> Rejected:
        """Why the held run's lease is gone, given the run's final snapshot."""
        assert self.held is not None
        return core.lost_lease(final, self.held.lease_id)

    def lose(self, why: str) -> None:
        """End the session as lost without the store's word (the store cannot be reached to say so)."""
        if self.held is None or self.ended is None or self.ended.done():
            return
        self.ended.set_result(core.presumed_lost(self.held, why))

    def leave_for_resume(self, why: str) -> None:
        """End the session without abandoning its run: the holder may resume it on a new stream."""
        if self.held is not None and not self._released:
            self._keeper.leave_for_resume(self.held, self, why)

    def close(self, reason: str) -> None:
        """The stream is over; abandon the run unless it was released, lost or left for a resume already."""
        if self.turn is not None:
            self.turn.close("the waiter's Hold stream ended before its turn came")
        if self._stop_following is not None:
            self._stop_following()
        if not self.stop_requested.done():
            self.stop_requested.cancel()
        if self.ended is not None and not self.ended.done():
            self.ended.cancel()
        if self.held is not None and not self._released:
            self._keeper.detach(self.held, self, reason)

    def _require_held(self) -> GuardRecord:
        if self.held is None:
            raise RuntimeError("no lease is held on this stream")
        return self.held
