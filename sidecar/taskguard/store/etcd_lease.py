"""This sidecar's own etcd lease: what its stream-bound guards and its presence key hang on.

The promise it keeps: the sidecar hears that it lost the lease before etcd can
expire it and others take its guards. etcd counts a lease's TTL from the last
keep-alive it received, which is after the moment we sent it; so the lease is
surely alive until ``sent + TTL`` of the last answered keep-alive, and a
keep-alive not answered by then (or within ``etcd_timeout``) declares the
lease lost. Keep-alives go out every ``keepalive_interval_s``, and the
configuration keeps ``etcd_timeout`` plus that interval below the TTL, so a
healthy but slow answer does not lose it.

Presence: the lease also carries ``s/<host_id>``. Other sidecars read its
delete as "that sidecar is gone" and from then on expire the TTL leases it
granted themselves (until then only it does, on its own monotonic clock).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from grpc import aio

from taskguard.store import StoreUnavailable
from taskguard.store.etcd_client import RETRY_S, EtcdClient, EtcdSettings, keepalive_interval_s
from taskguard.store.etcdpb import etcdv3_pb2 as etcd

log = logging.getLogger(__name__)


class SidecarLease:
    """Grant, keep alive, and declare lost in time. Not safe across event loops."""

    def __init__(
        self, client: EtcdClient, settings: EtcdSettings, presence: tuple[bytes, bytes], on_loss: Callable[[], None]
    ) -> None:
        self._client = client
        self._settings = settings
        self._presence = presence
        self._on_loss = on_loss
        self.id = 0
        self._alive = asyncio.Event()
        # Loop time until which the lease is surely alive in etcd.
        self._safe_until = 0.0
        self.lost_at: float | None = None

    @property
    def alive(self) -> bool:
        return self._alive.is_set() and asyncio.get_running_loop().time() < self._safe_until

    async def grant(self) -> None:
        loop = asyncio.get_running_loop()
        sent = loop.time()
        reply = await self._client.call(
            self._client.lease.LeaseGrant, etcd.LeaseGrantRequest(TTL=self._settings.lease_ttl_s)
        )
        if reply.error:
            raise StoreUnavailable(f"etcd refused a lease: {reply.error}")
        key, value = self._presence
        await self._client.call(self._client.kv.Put, etcd.PutRequest(key=key, value=value, lease=reply.ID))
        self.id = reply.ID
        self._safe_until = sent + reply.TTL
        self.lost_at = None
        self._alive.set()

    def expired(self) -> None:
        """etcd said the lease is gone (a write that used it was refused)."""
        self._lose("etcd no longer has this sidecar's lease")

    async def keep_alive(self) -> None:
        """Run until cancelled: renew, and on a loss tell the store, then get a new lease."""
        loop = asyncio.get_running_loop()
        interval = keepalive_interval_s(self._settings.lease_ttl_s)
        while True:
            try:
                call = self._client.lease.LeaseKeepAlive(metadata=self._client.metadata)
                try:
                    while True:
                        sent = loop.time()
                        budget = min(self._settings.timeout_s, self._safe_until - sent)
                        if budget <= 0:
                            raise StoreUnavailable("no keep-alive answered before the lease could lapse")
                        reply = await asyncio.wait_for(self._renew_once(call), budget)
                        if reply.TTL <= 0:
                            raise StoreUnavailable("etcd says this sidecar's lease expired")
                        self._safe_until = sent + reply.TTL
                        await asyncio.sleep(interval)
                finally:
                    call.cancel()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self._lose(f"etcd lease keep-alive failed: {type(error).__name__}: {error}")
            # The old lease may have expired: guards bound to it are gone or about to be, and
            # everyone learns it from the watch. Streams bound from now on use a new one.
            while True:
                await asyncio.sleep(RETRY_S[1])
                try:
                    await self.grant()
                    log.warning("this sidecar has a new etcd lease")
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    log.info("granting a new etcd lease failed: %s", error)
                    await asyncio.sleep(RETRY_S[2])

    async def _renew_once(self, call: Any) -> Any:
        await call.write(etcd.LeaseKeepAliveRequest(ID=self.id))
        reply = await call.read()
        if reply is aio.EOF:
            raise StoreUnavailable("etcd ended the keep-alive stream")
        return reply

    def _lose(self, why: str) -> None:
        if not self._alive.is_set():
            return
        self._alive.clear()
        self._safe_until = 0.0
        self.lost_at = asyncio.get_running_loop().time()
        log.warning("%s; this sidecar no longer vouches for its stream-bound guards", why)
        self._on_loss()
