"""The load process: drives the systems over their real protocols and prints one JSON line per result.

    python -m bench.load --target unix:/tmp/x/tg.sock --scenarios a,b --systems taskguard [...]

Scenarios (issue 6):
  a  acquire -> release cycles on distinct keys at each --concurrency: cycles/s, acquire latency p50/p99
  b  duplicate storm: --storm concurrent acquires of one key: winners (must be 1), time until all answered
  c  Task Guard only: --holds Hold streams on distinct keys (--drop of them held by a child process), the
     sidecar's RSS and CPU once all are acquired, then SIGKILL the child and time until all --drop are
     ABANDONED (a WatchGuards stream from the revision before the drop counts ABANDONED events)
  d  Task Guard only: scenario a at --watch-concurrency clients with 0 and with each of --watchers
     WatchGuards streams (on all keys, read continuously by a child process)
  e  Task Guard only (issue 16): --waiters Hold streams queued on one key, drained by short runs: handover
     latency from a release to the next waiter's ACQUIRED (bench/queue_handover.py; the sidecar needs
     serve --max-queue >= --waiters)

Every request loop is bounded in count (--max-cycles, --storm, --holds) and time (--duration, per-RPC
timeouts, and a deadline on every wait). Progress goes to stderr; stdout carries only JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpc import aio

from bench.connections import open_channels
from bench.measure import CpuMeter, cpu_s, emit, ms, note, percentile, rss_mib
from bench.queue_handover import scenario_e
from bench.systems import SYSTEMS, System, make_system
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
MAX_ERRORS = 100
STREAMS_PER_CHANNEL = 2000  # well under the sidecar's 4096 streams per connection
OPEN_AT_ONCE = 500
WAIT_LIMIT_S = 120.0
IDLE_SETTLE_S = 1.0


# --- scenario a: cycles --------------------------------------------------------------------


@dataclass
class CycleRun:
    cycles: int = 0
    all_cycles: int = 0  # with the warm-up's
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    refused: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    server_cpu_s: float | None = None
    client_cpu_s: float = 0.0


async def run_cycles(
    system: System, concurrency: int, *, duration_s: float, warmup_s: float, max_cycles: int, meter: CpuMeter
) -> CycleRun:
    """``concurrency`` clients, each acquiring and releasing a fresh key in a loop, for ``duration_s``.

    Cycles started during the warm-up are not counted; counting stops after ``max_cycles``.
    """
    tag = uuid.uuid4().hex[:8]
    run = CycleRun()
    await system.connect(system.connections_for(concurrency))
    try:
        started = time.perf_counter()
        measure_from = started + warmup_s
        stop_at = measure_from + duration_s
        last_done = measure_from
        meter_started = False

        async def client(n: int) -> None:
            nonlocal last_done, meter_started
            i = 0
            while True:
                began = time.perf_counter()
                if began >= stop_at or run.cycles >= max_cycles:
                    return
                if began >= measure_from and not meter_started:
                    meter_started = True
                    meter.start()
                i += 1
                key = f"bench-a-{tag}-{n}::cycle-{i}"
                try:
                    handle = await system.acquire(key, n)
                    acquired = time.perf_counter()
                    if handle is None:
                        run.refused += 1
                        continue
                    await system.release(handle, n)
                except Exception as error:
                    run.errors[_error_name(error)] += 1
                    if sum(run.errors.values()) >= MAX_ERRORS:
                        raise
                    continue
                run.all_cycles += 1
                if began >= measure_from and run.cycles < max_cycles:
                    run.cycles += 1
                    run.latencies_s.append(acquired - began)
                    last_done = max(last_done, time.perf_counter())

        if warmup_s <= 0:
            meter_started = True
            meter.start()
        await asyncio.gather(*(client(n) for n in range(concurrency)))
        run.elapsed_s = max(last_done - measure_from, 1e-9)
        run.server_cpu_s, run.client_cpu_s = meter.used()
    finally:
        await system.close()
    return run


def _error_name(error: BaseException) -> str:
    if isinstance(error, aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"[:200]
    return f"{type(error).__name__}: {error}"[:200]


def cycles_result(system: str, concurrency: int, runs: list[CycleRun], **extra: Any) -> dict[str, Any]:
    cycles = sum(run.cycles for run in runs)
    elapsed = sum(run.elapsed_s for run in runs)
    latencies = sorted(latency for run in runs for latency in run.latencies_s)
    errors: Counter[str] = Counter()
    for run in runs:
        errors.update(run.errors)
    server_cpu = [run.server_cpu_s for run in runs if run.server_cpu_s is not None]
    result: dict[str, Any] = {
        "system": system,
        "concurrency": concurrency,
        "cycles": cycles,
        "elapsed_s": round(elapsed, 3),
        "cycles_per_s": round(cycles / elapsed, 1) if elapsed else 0.0,
        "runs_cycles_per_s": [round(run.cycles / run.elapsed_s, 1) for run in runs],
        "acquire_p50_ms": ms(percentile(latencies, 0.50)),
        "acquire_p99_ms": ms(percentile(latencies, 0.99)),
        "acquire_max_ms": ms(latencies[-1]) if latencies else 0.0,
        "refused": sum(run.refused for run in runs),
        "errors": dict(errors),
        # CPU per cycle on a shared 2-core machine says more than throughput alone.
        "server_cpu_us_per_cycle": round(sum(server_cpu) / cycles * 1e6, 1) if server_cpu and cycles else None,
        "client_cpu_us_per_cycle": round(sum(run.client_cpu_s for run in runs) / cycles * 1e6, 1) if cycles else None,
    }
    result.update(extra)
    return result


async def cycles_as_asked(system: System, concurrency: int, args: argparse.Namespace, meter: CpuMeter) -> CycleRun:
    """``run_cycles`` for the duration, warm-up and cycle cap given on the command line."""
    return await run_cycles(
        system,
        concurrency,
        duration_s=args.duration,
        warmup_s=args.warmup,
        max_cycles=args.max_cycles,
        meter=meter,
    )


async def scenario_a(systems: dict[str, System], args: argparse.Namespace, pids: dict[str, int]) -> None:
    runs: dict[tuple[str, int], list[CycleRun]] = {}
    # Repetitions interleave the systems, so that a noisy moment on a shared machine is spread over all.
    for rep in range(args.reps):
        for concurrency in args.concurrency:
            for name, system in systems.items():
                note(f"a: {name} at {concurrency} clients (rep {rep + 1}/{args.reps})")
                run = await cycles_as_asked(system, concurrency, args, CpuMeter(pids.get(name)))
                runs.setdefault((name, concurrency), []).append(run)
    for concurrency in args.concurrency:
        for name in systems:
            emit({"scenario": "a", **cycles_result(name, concurrency, runs[(name, concurrency)])})


# --- scenario b: duplicate storm -----------------------------------------------------------


async def storm_once(system: System, callers: int, connections: int) -> dict[str, Any]:
    key = f"bench-b-{uuid.uuid4().hex[:8]}::storm"
    started = time.perf_counter()

    async def one(i: int) -> tuple[Any, float]:
        handle = await system.acquire(key, i % connections)
        return handle, time.perf_counter() - started

    outcomes = await asyncio.gather(*(one(i) for i in range(callers)), return_exceptions=True)
    all_answered_s = time.perf_counter() - started
    answers = [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]
    errors = Counter(_error_name(outcome) for outcome in outcomes if isinstance(outcome, BaseException))
    winners = [handle for handle, _ in answers if handle is not None]
    for handle in winners:
        await system.release(handle, 0)
    await system.tidy()
    return {
        "winners": len(winners),
        "answered": len(answers),
        "all_answered_s": all_answered_s,
        "answer_times_s": sorted(at for _, at in answers),
        "errors": errors,
    }


async def scenario_b(systems: dict[str, System], args: argparse.Namespace) -> None:
    reps: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
    for rep in range(args.reps):
        for name, system in systems.items():
            note(f"b: {name}, {args.storm} concurrent acquires of one key (rep {rep + 1}/{args.reps})")
            connections = system.connections_for(args.storm)
            await system.connect(connections)
            try:
                reps[name].append(await storm_once(system, args.storm, connections))
            finally:
                await system.close()
    for name, results in reps.items():
        times = [result["all_answered_s"] for result in results]
        answer_times = sorted(at for result in results for at in result["answer_times_s"])
        errors: Counter[str] = Counter()
        for result in results:
            errors.update(result["errors"])
        emit(
            {
                "scenario": "b",
                "system": name,
                "concurrency": args.storm,
                "winners": [result["winners"] for result in results],
                "answered": [result["answered"] for result in results],
                "all_answered_ms": ms(statistics.median(times)),
                "runs_all_answered_ms": [ms(t) for t in times],
                "answer_p50_ms": ms(percentile(answer_times, 0.50)),
                "answer_p99_ms": ms(percentile(answer_times, 0.99)),
                "errors": dict(errors),
            }
        )


# --- scenario c: held streams --------------------------------------------------------------


async def child(*argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.children",
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )


async def child_says(process: asyncio.subprocess.Process, key: str, timeout_s: float = WAIT_LIMIT_S) -> dict[str, Any]:
    """The child's next JSON line, which must carry ``key``."""
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout_s)
    if not line:
        raise RuntimeError(f"bench child exited ({await process.wait()}) before saying {key!r}")
    message: dict[str, Any] = json.loads(line)
    if key not in message:
        raise RuntimeError(f"bench child said {message}, expected {key!r}")
    return message


@contextlib.asynccontextmanager
async def reaped(process: asyncio.subprocess.Process) -> AsyncIterator[asyncio.subprocess.Process]:
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def open_holds(stubs: list[pb_grpc.TaskGuardStub], prefix: str, count: int, holder: str) -> list[Any]:
    gate = asyncio.Semaphore(OPEN_AT_ONCE)

    async def open_one(i: int) -> Any:
        async with gate:
            call = stubs[i % len(stubs)].Hold(timeout=WAIT_LIMIT_S * 5)
            await call.write(pb.HoldRequest(acquire=pb.AcquireRequest(task_key=f"{prefix}{i}", holder=holder)))
            first: pb.HoldResponse = await call.read()
            if first.outcome != pb.ACQUIRE_OUTCOME_ACQUIRED:
                raise RuntimeError(f"hold {prefix}{i}: {pb.AcquireOutcome.Name(first.outcome)}")
            return call

    return list(await asyncio.gather(*(open_one(i) for i in range(count))))


async def scenario_c(args: argparse.Namespace, pids: dict[str, int]) -> None:
    pid = pids.get("taskguard")
    if pid is None:
        raise SystemExit("load: scenario c needs --pid taskguard=PID (the sidecar's)")
    tag = uuid.uuid4().hex[:8]
    keep_prefix, drop_prefix = f"bench-c-{tag}-keep::hold-", f"bench-c-{tag}-drop::hold-"
    kept = args.holds - args.drop
    rss_before, cpu_before = rss_mib(pid), cpu_s(pid)
    note(f"c: opening {args.holds} Hold streams ({args.drop} of them in a child process)")
    started = time.perf_counter()
    holder = await child(
        "hold",
        "--target",
        args.target,
        "--prefix",
        drop_prefix,
        "--count",
        str(args.drop),
        "--channels",
        str(-(-args.drop // STREAMS_PER_CHANNEL)),
    )
    channels = await open_channels(args.target, max(1, -(-kept // STREAMS_PER_CHANNEL)))
    try:
        async with reaped(holder):
            stubs = [pb_grpc.TaskGuardStub(channel) for channel in channels]
            calls = await open_holds(stubs, keep_prefix, kept, holder="bench-keep")
            dropped = await child_says(holder, "acquired")
            open_s = time.perf_counter() - started
            rss_held, cpu_held = rss_mib(pid), cpu_s(pid)
            note(f"c: {args.holds} held after {open_s:.1f}s; sidecar RSS {rss_held} MiB; idling {args.idle}s")
            # What holding costs while nothing happens (keepalives only), after a second for the sidecar to
            # finish what the opening left behind.
            await asyncio.sleep(min(args.idle, IDLE_SETTLE_S))
            cpu_settled = cpu_s(pid)
            await asyncio.sleep(args.idle)
            cpu_idle = cpu_s(pid) - cpu_settled
            abandon = await drop_and_watch(stubs[0], holder, drop_prefix, dropped["max_revision"], args.drop)
            for call in calls:
                call.cancel()
    finally:
        for channel in channels:
            await channel.close()
    emit(
        {
            "scenario": "c",
            "system": "taskguard",
            "concurrency": args.holds,
            "held": kept + dropped["acquired"],
            "open_s": round(open_s, 3),
            "rss_before_mib": rss_before,
            "rss_held_mib": rss_held,
            "cpu_open_s": round(cpu_held - cpu_before, 2),
            "cpu_settle_s": round(cpu_settled - cpu_held, 2),
            "cpu_total_s": round(cpu_held, 2),
            "idle_s": args.idle,
            "idle_cpu_percent": round(100 * cpu_idle / args.idle, 1) if args.idle else None,
            "dropped": args.drop,
            **abandon,
        }
    )


async def drop_and_watch(
    stub: pb_grpc.TaskGuardStub, holder: asyncio.subprocess.Process, prefix: str, revision: int, count: int
) -> dict[str, Any]:
    """SIGKILL the child holding ``count`` streams; time until a watcher saw all of them ABANDONED."""
    watch = stub.WatchGuards(pb.WatchGuardsRequest(key_prefix=prefix, start_revision=revision + 1))
    # A probe key under the prefix: seeing its ACQUIRED event proves the watch is live before the kill.
    probe = await stub.Acquire(pb.AcquireRequest(task_key=f"{prefix}probe", holder="bench-probe"), timeout=30)
    abandoned: set[str] = set()
    first_s = 0.0
    killed_at = 0.0
    try:
        async with asyncio.timeout(WAIT_LIMIT_S):
            async for event in watch:
                if event.guard.task_key == f"{prefix}probe" and killed_at == 0.0:
                    killed_at = time.perf_counter()
                    os.kill(holder.pid, signal.SIGKILL)
                elif event.type == pb.GUARD_EVENT_TYPE_ABANDONED and event.guard.task_key != f"{prefix}probe":
                    if not abandoned:
                        first_s = time.perf_counter() - killed_at
                    abandoned.add(event.guard.task_key)
                    if len(abandoned) == count:
                        break
    except TimeoutError:
        note(f"c: only {len(abandoned)}/{count} ABANDONED after {WAIT_LIMIT_S}s")
    finally:
        watch.cancel()
    all_s = time.perf_counter() - killed_at if len(abandoned) == count else None
    await stub.Release(pb.ReleaseRequest(lease_id=probe.lease_id, status=pb.RUN_STATUS_SUCCEEDED), timeout=30)
    return {
        "abandoned": len(abandoned),
        "first_abandoned_ms": ms(first_s) if abandoned else None,
        "all_abandoned_ms": ms(all_s) if all_s is not None else None,
    }


# --- scenario d: watch fan-out -------------------------------------------------------------


async def scenario_d(args: argparse.Namespace, pids: dict[str, int]) -> None:
    system = make_system("taskguard", args)
    concurrency = args.watch_concurrency
    runs: dict[int, list[CycleRun]] = {watchers: [] for watchers in args.watchers}
    summaries: dict[int, list[dict[str, Any]]] = {watchers: [] for watchers in args.watchers}
    for rep in range(args.reps):
        for watchers in args.watchers:
            note(f"d: {concurrency} clients with {watchers} watchers (rep {rep + 1}/{args.reps})")
            meter = CpuMeter(pids.get("taskguard"))
            if not watchers:
                runs[watchers].append(await cycles_as_asked(system, concurrency, args, meter))
                continue
            channels = str(max(1, watchers // 25))
            async with reaped(
                await child("watch", "--target", args.target, "--count", str(watchers), "--channels", channels)
            ) as watching:
                await child_says(watching, "opened")
                await until_watchers_ready(system, watching)
                watch_cpu_before = cpu_s(watching.pid)
                runs[watchers].append(await cycles_as_asked(system, concurrency, args, meter))
                watch_cpu = cpu_s(watching.pid) - watch_cpu_before
                assert watching.stdin is not None
                # Every cycle is an ACQUIRED and a RELEASED event each watcher must see before it stops.
                seen_by_all = 2 * runs[watchers][-1].all_cycles
                watching.stdin.write(f"stop {seen_by_all}\n".encode())
                await watching.stdin.drain()
                summaries[watchers].append({**await child_says(watching, "events"), "cpu_s": watch_cpu})
    for watchers in args.watchers:
        extra: dict[str, Any] = {"watchers": watchers}
        if summaries[watchers]:
            cycles = sum(run.all_cycles for run in runs[watchers])
            events = sum(summary["events"] for summary in summaries[watchers])
            ended: Counter[str] = Counter()
            for summary in summaries[watchers]:
                ended.update(summary["ended_before_stop"])
            extra.update(
                {
                    "watch_events": events,
                    "watch_events_per_watcher_per_cycle": round(events / watchers / cycles, 2) if cycles else None,
                    "watchers_ended_early": dict(ended),
                    # The watchers' own process competes for the same two cores.
                    "watch_client_cpu_us_per_cycle": round(
                        sum(summary["cpu_s"] for summary in summaries[watchers]) / cycles * 1e6,
                        1,
                    )
                    if cycles
                    else None,
                }
            )
        emit({"scenario": "d", **cycles_result("taskguard", concurrency, runs[watchers], **extra)})


async def until_watchers_ready(system: System, watching: asyncio.subprocess.Process) -> None:
    """Acquire and release probe keys until the watch child says every watcher has seen an event."""
    assert watching.stdout is not None
    ready = asyncio.ensure_future(watching.stdout.readline())
    await system.connect(1)
    try:
        async with asyncio.timeout(WAIT_LIMIT_S):
            while not ready.done():
                handle = await system.acquire(f"bench-d-probe-{uuid.uuid4().hex[:8]}::probe", 0)
                if handle is not None:
                    await system.release(handle, 0)
                await asyncio.wait({ready}, timeout=0.1)
    finally:
        await system.close()
        if not ready.done():
            ready.cancel()
    line = ready.result()
    if b"ready" not in line:
        raise RuntimeError(f"watch child said {line!r}, expected ready")


# --- main ----------------------------------------------------------------------------------


def _list(kind: type, text: str) -> list[Any]:
    return [kind(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", required=True, help="the sidecar's address, unix:PATH")
    parser.add_argument("--target-etcd", help="a second sidecar's address, on the etcd store (system taskguard-etcd)")
    parser.add_argument("--etcd", default="", help="etcd's client address, 127.0.0.1:PORT")
    parser.add_argument("--redis-durable", default="", help="redis with appendfsync always, 127.0.0.1:PORT")
    parser.add_argument("--redis-volatile", default="", help="redis without persistence, 127.0.0.1:PORT")
    parser.add_argument("--pid", action="append", default=[], help="SYSTEM=PID of a server, for its CPU and RSS")
    parser.add_argument("--scenarios", type=lambda text: _list(str, text), default=["a", "b"])
    parser.add_argument("--systems", type=lambda text: _list(str, text), default=["taskguard"])
    parser.add_argument("--concurrency", type=lambda text: _list(int, text), default=[1, 16, 64])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds measured per scenario a run")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds before measuring, per run")
    parser.add_argument("--max-cycles", type=int, default=200_000, help="cycles counted per run, at most")
    parser.add_argument("--reps", type=int, default=1, help="repetitions of scenarios a, b and d")
    parser.add_argument("--storm", type=int, default=1000, help="concurrent acquires of one key in scenario b")
    parser.add_argument("--holds", type=int, default=10_000, help="Hold streams in scenario c")
    parser.add_argument("--drop", type=int, default=1000, help="of which dropped at once")
    parser.add_argument("--idle", type=float, default=2.0, help="seconds to measure idle CPU with all held")
    parser.add_argument("--watch-concurrency", type=int, default=64)
    parser.add_argument("--watchers", type=lambda text: _list(int, text), default=[0, 100])
    parser.add_argument("--waiters", type=int, default=1000, help="Hold streams queued on one key in scenario e")
    parser.add_argument("--queue-wait", type=float, default=600.0, help="seconds scenario e's drain may take")
    args = parser.parse_args(argv)
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    if not 0 < args.drop <= args.holds:
        parser.error("--drop must be 1..--holds")
    return args


async def run(args: argparse.Namespace) -> None:
    pids = {name: int(pid) for name, _, pid in (item.partition("=") for item in args.pid)}
    for scenario in args.scenarios:
        if scenario in ("a", "b"):
            systems = {name: make_system(name, args) for name in args.systems}
            await (scenario_a(systems, args, pids) if scenario == "a" else scenario_b(systems, args))
        elif scenario == "c":
            await scenario_c(args, pids)
        elif scenario == "d":
            await scenario_d(args, pids)
        elif scenario == "e":
            await scenario_e(args.target, args.waiters, args.queue_wait, pids)
        else:
            raise SystemExit(f"load: unknown scenario {scenario!r}; one of a, b, c, d, e")


def main(argv: list[str] | None = None) -> int:
    asyncio.run(run(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
