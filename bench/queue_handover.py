"""Scenario e (issue 16): a queue of --waiters Hold streams on one key, drained by short runs.

One run holds the key on a Hold stream; the waiters queue behind it (ON_CONFLICT_QUEUE), each on a Hold stream
of this process, so that every time is read from one monotonic clock. Then the holder releases, and each waiter
releases SUCCEEDED as soon as it hears ACQUIRED. A handover is the time from one run's release being sent to the
next waiter's ACQUIRED arriving (and, second, from that release's RELEASED reply). The sidecar needs a
``max_queue`` of at least --waiters (``serve --max-queue N``; the default rule's is 64).

The waiters read their streams as raw bytes and walk only a message's top-level fields: a queued notice carries
the whole guard, waiters and all, and decoding every one would put this process's CPU into the sidecar's
figures on a shared machine. Only answers (the first, ACQUIRED, RELEASED) are decoded.

What must hold, else the result's ``problems`` name it (and ``bench.run`` exits 1): every waiter was told
QUEUED at a distinct place, heard its place only move up, ran exactly once, after the run before it was
released, in the order of those places, with the fencing token one above the run before it; the key ends
SUCCEEDED with no waiter and no run beyond those.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from grpc import aio

from bench.connections import RPC_TIMEOUT_S, open_channels
from bench.measure import cpu_s, emit, ms, note, own_cpu_s, percentile
from bench.raw import top_fields
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc

HOLD_METHOD = "/taskguard.v1.TaskGuard/Hold"
STREAMS_PER_CHANNEL = 250  # a notice carries the whole queue: spread the bytes over a few connections
OPEN_AT_ONCE = 200
# HoldResponse's top-level fields (proto/taskguard/v1/taskguard.proto).
_OUTCOME, _GUARD, _EVENT, _POSITION = 1, 2, 4, 5


@dataclass
class Run:
    """One Hold stream's run: the holder's, or a waiter's."""

    run_id: str
    call: Any = None
    place: int = 0  # from its QUEUED answer
    notices: int = 0
    notice_bytes: int = 0
    last_place: int = 0
    acquired_at: float | None = None
    fencing_token: int = 0
    release_sent_at: float | None = None
    released_at: float | None = None
    problems: list[str] = field(default_factory=list)


def _hold(method: Any, life_s: float) -> Any:
    return method(timeout=life_s)


async def _answer(run: Run) -> pb.HoldResponse:
    raw = await run.call.read()
    if raw is aio.EOF:
        raise RuntimeError(f"{run.run_id}: the Hold stream ended without an answer")
    return pb.HoldResponse.FromString(raw)


async def _release(run: Run) -> None:
    run.release_sent_at = time.perf_counter()
    await run.call.write(pb.HoldRequest(release=pb.HoldRelease(status=pb.RUN_STATUS_SUCCEEDED)))
    reply = await _answer(run)
    run.released_at = time.perf_counter()
    if reply.event != pb.HOLD_EVENT_RELEASED:
        run.problems.append(f"{run.run_id}: answered {pb.HoldEvent.Name(reply.event)} to its release")
    await run.call.done_writing()


async def _wait_and_run(run: Run) -> None:
    """Read notices until ACQUIRED, then release at once (a short run)."""
    while True:
        raw = await run.call.read()
        now = time.perf_counter()
        if raw is aio.EOF:
            run.problems.append(f"{run.run_id}: its stream ended while it waited (place {run.last_place})")
            return
        fields = top_fields(raw)
        if fields.get(_EVENT) == pb.HOLD_EVENT_QUEUE_POSITION:
            place = fields.get(_POSITION, 0)
            if not 0 < place < run.last_place:
                run.problems.append(f"{run.run_id}: heard place {place} after {run.last_place}")
            run.notices += 1
            run.notice_bytes += len(raw)
            run.last_place = place
            continue
        answer = pb.HoldResponse.FromString(raw)
        if answer.outcome != pb.ACQUIRE_OUTCOME_ACQUIRED or not answer.lease_id:
            run.problems.append(f"{run.run_id}: heard {pb.AcquireOutcome.Name(answer.outcome)} instead of ACQUIRED")
            return
        run.acquired_at, run.fencing_token = now, answer.guard.fencing_token
        if answer.guard.run_id != run.run_id:
            run.problems.append(f"{run.run_id}: ACQUIRED names run {answer.guard.run_id}")
        await _release(run)
        return


async def _enqueue(method: Any, run: Run, key: str, life_s: float, gate: asyncio.Semaphore) -> asyncio.Task[None]:
    """Open a waiter's stream and queue it; its reader starts at once, so it misses no notice."""
    async with gate:
        run.call = _hold(method, life_s)
        acquire = pb.AcquireRequest(task_key=key, run_id=run.run_id, holder="bench-e", on_conflict=pb.ON_CONFLICT_QUEUE)
        await run.call.write(pb.HoldRequest(acquire=acquire))
        first = await _answer(run)
    if first.outcome != pb.ACQUIRE_OUTCOME_QUEUED:
        full = first.outcome == pb.ACQUIRE_OUTCOME_QUEUE_FULL
        hint = " (serve --max-queue N: the default rule queues 64)" if full else ""
        raise RuntimeError(f"{run.run_id}: {pb.AcquireOutcome.Name(first.outcome)}, not QUEUED{hint}")
    run.place = run.last_place = first.position
    return asyncio.create_task(_wait_and_run(run))


def check_drain(holder: Run, waiters: list[Run], final: pb.Guard) -> list[str]:
    problems = [problem for run in (holder, *waiters) for problem in run.problems]
    places = sorted(run.place for run in waiters)
    if places != list(range(1, len(waiters) + 1)):
        problems.append(f"places given are not 1..{len(waiters)}: {places[:5]}...")
    before = holder
    for run in sorted(waiters, key=lambda run: run.place):
        if run.acquired_at is None:
            problems.append(f"{run.run_id} (place {run.place}) never ran")
            continue
        if before.release_sent_at is not None and run.acquired_at <= before.release_sent_at:
            problems.append(f"{run.run_id} (place {run.place}) ACQUIRED before {before.run_id} released")
        if run.fencing_token != before.fencing_token + 1:
            problems.append(
                f"{run.run_id} (place {run.place}): fencing token {run.fencing_token} after {before.fencing_token}"
                " (not the next run in arrival order)"
            )
        before = run
    expected = holder.fencing_token + len(waiters)
    if final.state != pb.GUARD_STATE_SUCCEEDED or final.fencing_token != expected or final.waiters:
        problems.append(
            f"the key ended {pb.GuardState.Name(final.state)}, fencing token {final.fencing_token} (expected"
            f" {expected}), {len(final.waiters)} waiters"
        )
    return problems


def _handovers(holder: Run, waiters: list[Run]) -> tuple[list[float], list[float]]:
    """Per handover in order: from the release sent, and from its RELEASED reply, to the next ACQUIRED."""
    from_sent, from_reply = [], []
    before = holder
    for run in sorted(waiters, key=lambda run: run.place):
        if run.acquired_at is None or before.release_sent_at is None or before.released_at is None:
            break
        from_sent.append(run.acquired_at - before.release_sent_at)
        from_reply.append(run.acquired_at - before.released_at)
        before = run
    return from_sent, from_reply


def _by_queue_length(handovers: list[float], parts: int = 5) -> list[float]:
    """Median handover in each fifth of the drain, longest queue first: how its cost grows with the queue."""
    size = max(1, len(handovers) // parts)
    chunks = [handovers[i : i + size] for i in range(0, len(handovers), size)][:parts]
    return [ms(statistics.median(chunk)) for chunk in chunks if chunk]


async def scenario_e(target: str, waiters: int, wait_s: float, pids: dict[str, int]) -> None:
    pid = pids.get("taskguard")
    key = f"bench-e-{uuid.uuid4().hex[:8]}::queue"
    channels = await open_channels(target, max(1, -(-waiters // STREAMS_PER_CHANNEL)))
    methods: list[Any] = [
        channel.stream_stream(
            HOLD_METHOD,
            request_serializer=pb.HoldRequest.SerializeToString,
            response_deserializer=None,  # raw bytes: see the module's docstring
        )
        for channel in channels
    ]
    life_s = wait_s + 60.0
    holder = Run("holder")
    runs = [Run(f"w{i:05d}") for i in range(waiters)]
    try:
        holder.call = _hold(methods[0], life_s)
        acquire = pb.AcquireRequest(task_key=key, run_id="holder", holder="bench-e")
        await holder.call.write(pb.HoldRequest(acquire=acquire))
        first = await _answer(holder)
        if first.outcome != pb.ACQUIRE_OUTCOME_ACQUIRED:
            raise RuntimeError(f"holder: {pb.AcquireOutcome.Name(first.outcome)}")
        holder.fencing_token = first.guard.fencing_token
        note(f"e: queueing {waiters} Hold streams on one key")
        started = time.perf_counter()
        gate = asyncio.Semaphore(OPEN_AT_ONCE)
        readers = await asyncio.gather(
            *(_enqueue(methods[i % len(methods)], run, key, life_s, gate) for i, run in enumerate(runs))
        )
        open_s = time.perf_counter() - started
        note(f"e: {waiters} queued in {open_s:.1f}s; releasing the holder")
        server_cpu, client_cpu = cpu_s(pid) if pid else 0.0, own_cpu_s()
        await _release(holder)
        done, pending = await asyncio.wait(readers, timeout=wait_s)
        drained_at = max((run.released_at or 0.0 for run in runs), default=0.0)
        server_cpu_s = cpu_s(pid) - server_cpu if pid else None
        client_cpu_s = own_cpu_s() - client_cpu
        for task in pending:
            task.cancel()
        for task in done:
            if task.exception() is not None:
                holder.problems.append(f"a waiter failed: {task.exception()!r}")
        if pending:
            holder.problems.append(f"{len(pending)} of {waiters} waiters had not run after {wait_s:g}s")
        stub = pb_grpc.TaskGuardStub(channels[0])
        final = await stub.GetGuard(pb.GetGuardRequest(task_key=key), timeout=RPC_TIMEOUT_S)
    finally:
        for run in (holder, *runs):
            if run.call is not None:
                run.call.cancel()
        for channel in channels:
            await channel.close()
    problems = check_drain(holder, runs, final)
    for problem in problems[:20]:
        note(f"e: PROBLEM {problem}")
    from_sent, from_reply = _handovers(holder, runs)
    ordered = sorted(from_sent)
    assert holder.release_sent_at is not None
    ran = sum(run.acquired_at is not None for run in runs)
    emit(
        {
            "scenario": "e",
            "system": "taskguard",
            "concurrency": waiters,
            "waiters": waiters,
            "ran": ran,
            "open_s": round(open_s, 3),
            "drain_s": round(drained_at - holder.release_sent_at, 3) if ran else None,
            "handover_p50_ms": ms(percentile(ordered, 0.50)),
            "handover_p99_ms": ms(percentile(ordered, 0.99)),
            "handover_max_ms": ms(ordered[-1]) if ordered else 0.0,
            "handover_from_reply_p50_ms": ms(percentile(sorted(from_reply), 0.50)),
            "handover_from_reply_p99_ms": ms(percentile(sorted(from_reply), 0.99)),
            "handover_median_by_fifth_ms": _by_queue_length(from_sent),
            "notices": sum(run.notices for run in runs),
            "notice_mib": round(sum(run.notice_bytes for run in runs) / 2**20, 1),
            "server_cpu_s": round(server_cpu_s, 2) if server_cpu_s is not None else None,
            "server_cpu_ms_per_handover": round(server_cpu_s / ran * 1000, 2) if server_cpu_s and ran else None,
            "client_cpu_s": round(client_cpu_s, 2),
            "problems": problems,
        }
    )
