"""Helper processes of the load process, so that what they do is not on its event loop.

``hold``: open COUNT Hold streams on keys PREFIX0..PREFIX{COUNT-1}, print one JSON line once every one is
acquired, then hold them until killed (scenario c drops them all at once with SIGKILL) or until stdin closes.

``watch``: open COUNT WatchGuardBatches streams on every key (what the Python and Node clients' watch
uses), reading raw messages continuously and counting the events in them without decoding them (a
watcher that keeps up as cheaply as a client can); print ``{"opened": N}``, then ``{"ready": N}`` once
every watcher has seen an event, then on "stop" (or end of stdin) a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from typing import Any

import grpc
from grpc import aio

from bench.connections import open_channels
from bench.raw import count_batch_entries
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc

OPEN_AT_ONCE = 500
MAX_LIFE_S = 900.0  # a child left behind by a crashed parent still goes away
CATCH_UP_S = 10.0
WATCH_METHOD = "/taskguard.v1.TaskGuard/WatchGuardBatches"


def say(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


async def stdin_closed_or(text: str) -> str:
    """Return the rest of the line when stdin sends a line starting with ``text``; "" when it closes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            return ""
        if line.strip().split(b" ", 1)[0] == text.encode():
            return line.decode().strip().removeprefix(text).strip()


async def hold(target: str, prefix: str, count: int, channels_wanted: int, holder: str) -> int:
    channels = await open_channels(target, channels_wanted)
    stubs = [pb_grpc.TaskGuardStub(channel) for channel in channels]
    gate = asyncio.Semaphore(OPEN_AT_ONCE)
    calls: list[Any] = []

    async def open_one(i: int) -> int:
        async with gate:
            call = stubs[i % len(stubs)].Hold(timeout=MAX_LIFE_S)
            calls.append(call)
            acquire = pb.AcquireRequest(task_key=f"{prefix}{i}", holder=holder)
            await call.write(pb.HoldRequest(acquire=acquire))
            first: pb.HoldResponse = await call.read()
            if first.outcome != pb.ACQUIRE_OUTCOME_ACQUIRED:
                raise RuntimeError(f"hold {prefix}{i}: {pb.AcquireOutcome.Name(first.outcome)}")
            revision: int = first.guard.revision
            return revision

    started = time.perf_counter()
    revisions = await asyncio.gather(*(open_one(i) for i in range(count)))
    say({"acquired": len(revisions), "max_revision": max(revisions), "open_s": time.perf_counter() - started})
    try:
        await asyncio.wait_for(stdin_closed_or("stop"), MAX_LIFE_S)
    except TimeoutError:
        pass
    for call in calls:
        call.cancel()
    for channel in channels:
        await channel.close()
    return 0


async def watch(target: str, count: int, channels_wanted: int) -> int:
    channels = await open_channels(target, channels_wanted)
    counts = [0] * count
    ended: collections.Counter[str] = collections.Counter()
    first_seen = [asyncio.Event() for _ in range(count)]
    target = [0]  # set by "stop N": the events every watcher is to see before the summary
    caught_up: set[int] = set()
    all_caught_up = asyncio.Event()
    methods: list[Any] = [
        channel.unary_stream(
            WATCH_METHOD,
            request_serializer=pb.WatchGuardsRequest.SerializeToString,
            response_deserializer=None,  # raw bytes: counting is all a benchmark watcher needs
        )
        for channel in channels
    ]
    calls = [methods[i % len(methods)](pb.WatchGuardsRequest(), timeout=MAX_LIFE_S) for i in range(count)]

    async def read(i: int) -> None:
        try:
            async for raw in calls[i]:
                counts[i] += count_batch_entries(raw)
                first_seen[i].set()
                if target[0] and counts[i] >= target[0] and i not in caught_up:
                    caught_up.add(i)
                    if len(caught_up) == count:
                        all_caught_up.set()
        except asyncio.CancelledError:
            ended["stopped"] += 1
            raise
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, aio.AioRpcError) else None
            ended["stopped" if code == grpc.StatusCode.CANCELLED else str(code.name if code else error)] += 1
        else:
            ended["server ended"] += 1

    readers = [asyncio.ensure_future(read(i)) for i in range(count)]
    say({"opened": count})
    try:
        await asyncio.wait_for(asyncio.gather(*(seen.wait() for seen in first_seen)), 60.0)
        say({"ready": count})
        expected = await asyncio.wait_for(stdin_closed_or("stop"), MAX_LIFE_S)
        # "stop N": first let every watcher receive N events (watch batches linger up to 100 ms).
        if expected:
            target[0] = int(expected)
            caught_up.update(i for i in range(count) if counts[i] >= target[0])
            if len(caught_up) < count:
                all_caught_up.clear()
                await asyncio.wait_for(all_caught_up.wait(), CATCH_UP_S)
    except TimeoutError:
        pass
    ended_early = dict(ended)
    for call in calls:
        call.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    say(
        {
            "watchers": count,
            "events": sum(counts),
            "min_per_watcher": min(counts),
            "max_per_watcher": max(counts),
            "ended_before_stop": ended_early,
        }
    )
    for channel in channels:
        await channel.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.children", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    holding = sub.add_parser("hold")
    holding.add_argument("--target", required=True)
    holding.add_argument("--prefix", required=True)
    holding.add_argument("--count", type=int, required=True)
    holding.add_argument("--channels", type=int, default=1)
    holding.add_argument("--holder", default="bench-drop")
    watching = sub.add_parser("watch")
    watching.add_argument("--target", required=True)
    watching.add_argument("--count", type=int, required=True)
    watching.add_argument("--channels", type=int, default=4)
    args = parser.parse_args(argv)
    if args.command == "hold":
        return asyncio.run(hold(args.target, args.prefix, args.count, args.channels, args.holder))
    return asyncio.run(watch(args.target, args.count, args.channels))


if __name__ == "__main__":
    sys.exit(main())
