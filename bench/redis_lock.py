"""The Redis side: ``SET key token NX PX ttl`` to take, a compare-and-delete Lua script (EVALSHA) to give back.

The release script is the one Redis's documentation of SET gives for a single-instance lock: delete the
key only while it still holds our token, so a lock that expired and was taken by someone else survives.
"""

from __future__ import annotations

import asyncio
import os

import redis.asyncio as redis

from bench.connections import RPC_TIMEOUT_S

TTL_MS = 60_000
RELEASE_SCRIPT = """
if redis.call("get", KEYS[1]) == ARGV[1] then
    return redis.call("del", KEYS[1])
else
    return 0
end
"""


class RedisLock:
    def __init__(self, name: str, address: str) -> None:
        self.name = name
        host, _, port = address.rpartition(":")
        self._host, self._port = host, int(port)
        self._client: redis.Redis | None = None
        self._release_sha = ""

    def connections_for(self, concurrency: int) -> int:
        return concurrency

    async def connect(self, connections: int) -> None:
        pool = redis.BlockingConnectionPool(
            host=self._host, port=self._port, max_connections=connections, timeout=RPC_TIMEOUT_S
        )
        self._client = redis.Redis(connection_pool=pool, socket_timeout=RPC_TIMEOUT_S)
        # As many simultaneous PINGs as connections make the pool open them all now, not while timed.
        await asyncio.gather(*(self._client.ping() for _ in range(connections)))
        self._release_sha = await self._client.script_load(RELEASE_SCRIPT)

    async def acquire(self, key: str, connection: int) -> tuple[str, bytes] | None:
        assert self._client is not None
        token = os.urandom(16).hex().encode()
        if await self._client.set(key, token, nx=True, px=TTL_MS):
            return key, token
        return None

    async def release(self, handle: tuple[str, bytes], connection: int) -> None:
        assert self._client is not None
        key, token = handle
        await self._client.evalsha(self._release_sha, 1, key, token)

    async def tidy(self) -> None:
        return None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            await self._client.connection_pool.disconnect()
            self._client = None
