"""How the benchmarked systems connect: gRPC channels each on their own connection, and one deadline per call.

A gRPC connection multiplexes calls, so the gRPC systems get one channel per concurrent client up to
``MAX_GRPC_CHANNELS``; a Redis connection carries one command at a time, so Redis gets one connection per
concurrent client (``bench/redis_lock.py``), with ``RPC_TIMEOUT_S`` as its timeout too.

The systems (``bench/systems.py``, ``bench/etcd_mutex.py``, ``bench/redis_lock.py``) and the child
processes (``bench/children.py``) build on this module and it on none of them, so imports go one way.
"""

from __future__ import annotations

from grpc import aio

MAX_GRPC_CHANNELS = 64
RPC_TIMEOUT_S = 30.0
# Without it, channels to one target share one subchannel, hence one connection (and its stream limit).
OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)


async def open_channels(target: str, count: int) -> list[aio.Channel]:
    channels = [aio.insecure_channel(target, options=[OWN_CONNECTION]) for _ in range(count)]
    for channel in channels:
        await channel.channel_ready()
    return channels
