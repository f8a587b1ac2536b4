"""The systems the load process drives, behind one small interface, and Task Guard's own side of it.

A system turns "acquire the guard of this key" and "release it" into its own calls: Task Guard's
unary ``Acquire``/``Release``, an etcd lease + transaction mutex (``bench/etcd_mutex.py``) or a Redis
``SET NX PX`` lock (``bench/redis_lock.py``).

How many connections each system gets, and the deadline of each call, are ``bench/connections.py``'s.
"""

from __future__ import annotations

import argparse
from typing import Any, Protocol

from grpc import aio

from bench.connections import MAX_GRPC_CHANNELS, RPC_TIMEOUT_S, open_channels
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc

SYSTEMS = ("taskguard", "taskguard-etcd", "etcd", "redis-durable", "redis-volatile")


class System(Protocol):
    name: str

    def connections_for(self, concurrency: int) -> int:
        """How many connections ``concurrency`` simultaneous callers get."""
        ...

    async def connect(self, connections: int) -> None:
        """Open ``connections`` connections and wait until each is ready (not part of any timing)."""
        ...

    async def acquire(self, key: str, connection: int) -> Any | None:
        """Try to take ``key``'s guard once; what ``release`` needs when taken, None when someone holds it."""
        ...

    async def release(self, handle: Any, connection: int) -> None: ...

    async def tidy(self) -> None:
        """Clean up after refused attempts (etcd: revoke the losers' leases); not timed."""
        ...

    async def close(self) -> None: ...


class TaskGuardSystem:
    """Unary Acquire (server default TTL) and Release(SUCCEEDED) against a real sidecar.

    Several targets (sidecars sharing one etcd prefix, as on several hosts): connections alternate between
    them, so a release goes to the sidecar that acquired.
    """

    name = "taskguard"

    def __init__(self, target: str, holder: str = "bench", name: str = "taskguard") -> None:
        self.name = name
        self._targets = [part for part in target.split(",") if part]
        self._holder = holder
        self._channels: list[aio.Channel] = []
        self._stubs: list[pb_grpc.TaskGuardStub] = []

    def connections_for(self, concurrency: int) -> int:
        return max(min(concurrency, MAX_GRPC_CHANNELS), len(self._targets))

    async def connect(self, connections: int) -> None:
        count = len(self._targets)
        per_target = [
            await open_channels(target, len(range(index, connections, count)))
            for index, target in enumerate(self._targets)
        ]
        self._channels = [per_target[i % count][i // count] for i in range(connections)]
        self._stubs = [pb_grpc.TaskGuardStub(channel) for channel in self._channels]

    async def acquire(self, key: str, connection: int) -> str | None:
        stub = self._stubs[connection % len(self._stubs)]
        reply = await stub.Acquire(pb.AcquireRequest(task_key=key, holder=self._holder), timeout=RPC_TIMEOUT_S)
        if reply.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED:
            lease_id: str = reply.lease_id
            return lease_id
        return None

    async def release(self, handle: str, connection: int) -> None:
        stub = self._stubs[connection % len(self._stubs)]
        await stub.Release(pb.ReleaseRequest(lease_id=handle, status=pb.RUN_STATUS_SUCCEEDED), timeout=RPC_TIMEOUT_S)

    async def tidy(self) -> None:
        return None

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        self._channels, self._stubs = [], []


def make_system(name: str, args: argparse.Namespace) -> System:
    """The system ``name`` with the addresses the runner passed on the command line."""
    # The others' modules are imported only when chosen: a run of Task Guard alone loads no Redis client.
    if name == "taskguard":
        return TaskGuardSystem(args.target)
    if name == "taskguard-etcd":
        if not args.target_etcd:
            raise SystemExit("load: --target-etcd is needed for Task Guard on its etcd store")
        return TaskGuardSystem(args.target_etcd, name="taskguard-etcd")
    if name == "etcd":
        from bench.etcd_mutex import EtcdMutex

        if not args.etcd:
            raise SystemExit("load: --etcd HOST:PORT is needed for the etcd system")
        return EtcdMutex(args.etcd)
    if name in ("redis-durable", "redis-volatile"):
        from bench.redis_lock import RedisLock

        address = args.redis_durable if name == "redis-durable" else args.redis_volatile
        if not address:
            raise SystemExit(f"load: --{name} HOST:PORT is needed for the {name} system")
        return RedisLock(name, address)
    raise SystemExit(f"load: unknown system {name!r}; one of {', '.join(SYSTEMS)}")
