"""Helper processes of the load process, so that what they do is not on its event loop.

``hold``: open COUNT Hold streams on keys PREFIX0..PREFIX{COUNT-1}, print one JSON line once every one is
acquired, then hold them until killed (scenario c drops them all at once with SIGKILL) or until stdin closes.

``watch``: open COUNT WatchGuards streams on every key, reading raw messages continuously without
decoding them (a watcher that keeps up as cheaply as a client can); print ``{"opened": N}``, then
``{"ready": N}`` once every watcher has seen an event, then on "stop" (or end of stdin) a JSON summary.
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

from bench.systems import open_channels
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc

OPEN_AT_ONCE = 500
MAX_LIFE_S = 900.0  # a child left behind by a crashed parent still goes away
WATCH_METHOD = "/taskguard.v1.TaskGuard/WatchGuards"


def say(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


async def stdin_closed_or(text: str) -> None:
    """Return when stdin sends ``text`` as a line, or closes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line or line.strip() == text.encode():
            return


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
            async for _ in calls[i]:
                counts[i] += 1
                first_seen[i].set()
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
        await asyncio.wait_for(stdin_closed_or("stop"), MAX_LIFE_S)
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
