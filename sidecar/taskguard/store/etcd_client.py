"""The etcd connection the etcd store talks through: one channel, retried calls, paged reads.

It knows etcd's API and nothing of guards: the store decides what to read and write.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from taskguard.store import StoreUnavailable
from taskguard.store.etcdpb import etcdv3_pb2 as etcd
from taskguard.store.etcdpb import etcdv3_pb2_grpc as etcd_grpc

# One attempt of an etcd call: longer than a healthy round trip, shorter than an election plus a retry.
ATTEMPT_S = 1.5
RETRY_S = (0.1, 0.2, 0.5, 1.0, 2.0)
_UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN)
# Keys per page of a whole-prefix read, to start with; a page too big for one message is read again in halves.
PAGE_KEYS = 1000
# etcd refuses values over its request limit (1.5 MiB by default), so one key always fits in a message this big.
MAX_MESSAGE_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class EtcdSettings:
    endpoints: tuple[str, ...]
    prefix: str = "/taskguard/"
    # This sidecar's etcd lease: how long its stream-bound guards outlive it.
    lease_ttl_s: int = 10
    timeout_s: float = 5.0
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str = ""
    password: str = ""

    @classmethod
    def from_url(cls, url: str, **options: Any) -> EtcdSettings:
        """``etcd://host1:2379,host2:2379`` (``etcds://`` says TLS; give ``ca``)."""
        scheme, _, hosts = url.partition("://")
        if scheme not in ("etcd", "etcds") or not hosts:
            raise ValueError("must be etcd://host:port[,host:port...]")
        endpoints = tuple(host.strip() for host in hosts.rstrip("/").split(",") if host.strip())
        return cls(endpoints=endpoints, **options)

    def __repr__(self) -> str:
        return f"EtcdSettings(endpoints={self.endpoints}, prefix={self.prefix!r}, user={self.user!r})"


def keepalive_interval_s(lease_ttl_s: float) -> float:
    """How often a sidecar renews its etcd lease: three tries per TTL."""
    return max(lease_ttl_s / 3, 0.2)


def unavailable(error: aio.AioRpcError) -> StoreUnavailable:
    """etcd's failure as the store reports it."""
    return StoreUnavailable(f"etcd: {error.code().name}: {error.details()}")


def range_end(prefix: bytes) -> bytes:
    """The end of the range holding every key that starts with ``prefix``."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


class EtcdClient:
    """A channel to etcd, its stubs and the auth token every call carries. Not safe across event loops."""

    def __init__(self, settings: EtcdSettings) -> None:
        self._settings = settings
        self.metadata: tuple[tuple[str, str], ...] = ()
        self._channel: aio.Channel | None = None

    async def open(self) -> None:
        self._channel = self._connect()
        self.kv = etcd_grpc.KVStub(self._channel)
        self.watch = etcd_grpc.WatchStub(self._channel)
        self.lease = etcd_grpc.LeaseStub(self._channel)
        try:
            await self.authenticate()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    def _connect(self) -> aio.Channel:
        settings = self._settings
        # Several endpoints: pick_first over all of them, so losing one member fails over to the next.
        target = settings.endpoints[0] if len(settings.endpoints) == 1 else "ipv4:" + ",".join(settings.endpoints)
        options = [
            ("grpc.keepalive_time_ms", 5000),
            ("grpc.keepalive_timeout_ms", 3000),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        if settings.ca is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=settings.ca.read_bytes(),
                private_key=settings.key.read_bytes() if settings.key else None,
                certificate_chain=settings.cert.read_bytes() if settings.cert else None,
            )
            return aio.secure_channel(target, credentials, options=options)
        return aio.insecure_channel(target, options=options)

    async def authenticate(self) -> None:
        """With etcd auth on: a token for every call (etcd expires idle ones; a call that finds its token
        invalid gets a new one and tries again)."""
        if not self._settings.user:
            return
        self.metadata = ()
        assert self._channel is not None
        reply = await self.call(
            etcd_grpc.AuthStub(self._channel).Authenticate,
            etcd.AuthenticateRequest(name=self._settings.user, password=self._settings.password),
        )
        self.metadata = (("token", reply.token),)

    async def call(self, method: Any, request: Any, timeout_s: float | None = None) -> Any:
        """A unary call to etcd, tried again within ``timeout_s`` (the store's timeout); StoreUnavailable after that.

        Attempts are short, so a call parked on a member that died or lost its
        leader moves on to the next member. Trying a transaction again is safe:
        if an attempt we gave up on did commit, the next one fails its compare,
        and the engine decides again on what etcd has.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self._settings.timeout_s if timeout_s is None else timeout_s)
        attempt = 0
        while True:
            remaining = deadline - loop.time()
            try:
                return await method(
                    request, timeout=max(min(remaining, ATTEMPT_S), 0.05), metadata=self.metadata, wait_for_ready=True
                )
            except aio.AioRpcError as error:
                if self.metadata and "invalid auth token" in (error.details() or ""):
                    await self.authenticate()
                    continue
                if error.code() not in _UNAVAILABLE:
                    raise
                if deadline - loop.time() <= RETRY_S[0]:
                    raise unavailable(error) from None
            await asyncio.sleep(min(RETRY_S[min(attempt, len(RETRY_S) - 1)], max(deadline - loop.time(), 0)))
            attempt += 1

    async def pages(
        self, prefix: bytes, revision: int = 0, keys_only: bool = False
    ) -> AsyncIterator[tuple[int, list[Any]]]:
        """Every key under ``prefix`` in key order, a page at a time, all as of one revision.

        Yields (revision, kvs): the revision is the first page's (or ``revision``
        when given), so the pages together are one consistent copy, and a watch
        from the revision after it misses nothing. Never one unbounded reply: a
        page too large for one message is asked for again with half the keys.
        """
        start, end = prefix, range_end(prefix)
        limit = PAGE_KEYS
        while True:
            request = etcd.RangeRequest(key=start, range_end=end, limit=limit, revision=revision, keys_only=keys_only)
            try:
                reply = await self.call(self.kv.Range, request)
            except aio.AioRpcError as error:
                if error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and limit > 1:
                    limit = max(limit // 2, 1)
                    continue
                raise
            revision = revision or reply.header.revision
            yield revision, list(reply.kvs)
            if not reply.more or not reply.kvs:
                return
            start = reply.kvs[-1].key + b"\x00"
            limit = min(limit * 2, PAGE_KEYS)
