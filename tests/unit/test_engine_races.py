"""The engine under commands that overtake each other on one key.

A lease command finds its key by the lease's run before it queues on the
key's mutex; here the run ends and another run takes the key while it waits.
The store holds the first commit back until both later commands are queued,
so the order is the same every time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest

from taskguard.clock import ManualClock
from taskguard.front import rpc
from taskguard.guard import core, model
from taskguard.guard.model import Acquire, Durability, Policy, Rejected, RejectionKind, RunStatus
from taskguard.runtime.engine import Engine, LeaseCommand, Result
from taskguard.store import Committed, StoreConflict, Write
from taskguard.store.memory import MemoryStore


class GatedStore(MemoryStore):
    """Holds state changes back while ``gate`` is closed; ``waiting`` says one is held."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock)
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = asyncio.Event()

    async def commit(self, write: Write) -> Committed:
        if write.durability is Durability.SYNC and not self.gate.is_set():
            self.waiting.set()
            await self.gate.wait()
        return await super().commit(write)


def _acquire(run_id: str, lease_id: str) -> Acquire:
    return Acquire("s::job", run_id, f"holder-{run_id}", 600.0, lease_id, stream_bound=False)


async def _let_queue() -> None:
    # Tasks run to their first real wait in creation order: a few turns of the loop queue them all.
    for _ in range(5):
        await asyncio.sleep(0)


LATE_COMMANDS: dict[str, Callable[[str], LeaseCommand]] = {
    "renew": lambda key: model.Renew(key, "L1"),
    "renew with a ttl": lambda key: model.Renew(key, "L1", 30.0),
    "heartbeat": lambda key: model.Heartbeat(key, "L1"),
    "resume": lambda key: model.Resume(key, "L1"),
    "release with another status": lambda key: model.Release(key, "L1", RunStatus.FAILED),
}


@pytest.mark.parametrize("late", LATE_COMMANDS.values(), ids=LATE_COMMANDS.keys())
async def test_a_lease_command_queued_behind_its_runs_end_and_a_new_run_is_told_the_lease_is_gone(
    late: Callable[[str], LeaseCommand],
) -> None:
    clock = ManualClock()
    store = GatedStore(clock)
    engine = Engine(store, clock, Policy())
    await engine.execute(_acquire("first", "L1"))
    store.gate.clear()
    release = asyncio.ensure_future(
        engine.execute_on_lease("L1", lambda key: model.Release(key, "L1", RunStatus.SUCCEEDED))
    )
    await asyncio.wait_for(store.waiting.wait(), 5)
    taken = asyncio.ensure_future(engine.execute(_acquire("second", "L2")))
    queued = asyncio.ensure_future(engine.execute_on_lease("L1", late))
    await _let_queue()
    store.gate.set()
    _, second, answer = await asyncio.wait_for(asyncio.gather(release, taken, queued), 5)
    assert isinstance(second.reply, model.AcquireReply) and second.reply.outcome is model.Outcome.ACQUIRED
    assert isinstance(answer.reply, Rejected), answer.reply
    assert answer.reply.kind is RejectionKind.FAILED_PRECONDITION
    assert answer.reply.field in ("lease_id", "status")
    assert "released with SUCCEEDED" in answer.reply.rule
    guard = await engine.get("s::job")
    assert guard is not None and guard.run_id == "second" and guard.lease_id == "L2"


async def test_a_repeated_release_queued_behind_a_new_run_is_still_idempotent() -> None:
    clock = ManualClock()
    store = GatedStore(clock)
    engine = Engine(store, clock, Policy())
    await engine.execute(_acquire("first", "L1"))
    store.gate.clear()

    def release(key: str) -> LeaseCommand:
        return model.Release(key, "L1", RunStatus.SUCCEEDED, "done")

    original = asyncio.ensure_future(engine.execute_on_lease("L1", release))
    await asyncio.wait_for(store.waiting.wait(), 5)
    taken = asyncio.ensure_future(engine.execute(_acquire("second", "L2")))
    repeated = asyncio.ensure_future(engine.execute_on_lease("L1", release))
    await _let_queue()
    store.gate.set()
    first, _, again = await asyncio.wait_for(asyncio.gather(original, taken, repeated), 5)
    assert _state(first) is model.GuardState.SUCCEEDED
    assert _state(again) is model.GuardState.SUCCEEDED
    assert again.record is not None and again.record.run_id == "first"


def _state(result: Result) -> model.GuardState:
    assert isinstance(result.reply, model.GuardReply) and result.reply.guard is not None, result.reply
    return result.reply.guard.state


def test_a_past_runs_stale_snapshot_that_would_still_renew_answers_lease_lost() -> None:
    clock = ManualClock()
    now = model.Instant(clock.monotonic(), clock.now_utc())
    acquired = core.decide(None, _acquire("first", "L1"), now, Policy()).record
    assert acquired is not None
    taken = core.decide(
        core.decide(acquired, model.Release("s::job", "L1", RunStatus.SUCCEEDED), now, Policy()).record,
        _acquire("second", "L2"),
        now,
        Policy(),
    ).record
    # ``acquired`` is what a lagging copy may still show for L1: RUNNING.
    answer = core.answer_past_run(acquired, taken, model.Renew("s::job", "L1"), now, Policy())
    assert isinstance(answer, Rejected) and answer.kind is RejectionKind.FAILED_PRECONDITION
    assert "run second (fencing token 2) acquired the guard since" in answer.rule


class AlwaysLosingStore(MemoryStore):
    """A shared store on which another sidecar wins every race for the guard."""

    async def commit(self, write: Write) -> Committed:
        raise StoreConflict.at(write.record.task_key, write.expected_revision + 1, write.expected_revision)


async def test_a_guard_that_keeps_changing_under_a_command_answers_unavailable_not_internal() -> None:
    clock = ManualClock()
    engine = Engine(AlwaysLosingStore(clock), clock, Policy())
    with pytest.raises(StoreConflict) as lost:
        await engine.execute(_acquire("first", "L1"))
    code, message = rpc.status_for(lost.value)
    assert code is grpc.StatusCode.UNAVAILABLE
    assert message == "guard 's::job' kept changing under Acquire; try again"
