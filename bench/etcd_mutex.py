"""The etcd side: a lease + transaction mutex, the way etcd's client/v3/concurrency package does it.

One attempt on ``key`` (the mutex prefix ``key + "/"``), as ``NewSession`` + ``Mutex.TryLock``:

1. LeaseGrant (TTL 60 s): the session's lease.
2. Txn: if create_revision(prefix + hex(leaseID)) == 0 then put that key with the lease (our place in the
   queue) and range the prefix for the key with the lowest create revision (the owner); else get our key
   and the owner. We hold the mutex when the owner is our own key.
3. Otherwise TryLock deletes our key and answers "already locked" (the loser's lease is revoked later,
   by ``tidy``, outside the timing).

Release, as ``Mutex.Unlock`` + ``Session.Close``: DeleteRange(our key), then LeaseRevoke.
Acquire latency is steps 1 and 2: an etcd user has no mutex before both returned.

The client is grpc.aio on the stubs of etcd's API that the sidecar's etcd store uses
(``taskguard.store.etcdpb``, from ``proto/etcd/etcdv3.proto``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from grpc import aio

from bench.connections import MAX_GRPC_CHANNELS, RPC_TIMEOUT_S, open_channels
from taskguard.store.etcdpb import etcdv3_pb2, etcdv3_pb2_grpc

LEASE_TTL_S = 60


def prefix_end(prefix: bytes) -> bytes:
    """The range end that makes [prefix, end) every key starting with ``prefix`` (clientv3's GetPrefixRangeEnd)."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\x00"


class EtcdMutex:
    name = "etcd"

    def __init__(self, address: str) -> None:
        self._address = address
        self.pb, self._pb_grpc = etcdv3_pb2, etcdv3_pb2_grpc
        self._channels: list[aio.Channel] = []
        self._kv: list[Any] = []
        self._lease: list[Any] = []
        self._losers: list[int] = []

    def connections_for(self, concurrency: int) -> int:
        return min(concurrency, MAX_GRPC_CHANNELS)

    async def connect(self, connections: int) -> None:
        self._channels = await open_channels(self._address, connections)
        self._kv = [self._pb_grpc.KVStub(channel) for channel in self._channels]
        self._lease = [self._pb_grpc.LeaseStub(channel) for channel in self._channels]

    async def acquire(self, key: str, connection: int) -> tuple[bytes, int] | None:
        pb = self.pb
        kv, lease = self._kv[connection % len(self._kv)], self._lease[connection % len(self._lease)]
        granted = await lease.LeaseGrant(pb.LeaseGrantRequest(TTL=LEASE_TTL_S), timeout=RPC_TIMEOUT_S)
        prefix = f"{key}/".encode()
        my_key = prefix + f"{granted.ID:x}".encode()
        owner = pb.RangeRequest(
            key=prefix,
            range_end=prefix_end(prefix),
            sort_target=pb.RangeRequest.CREATE,
            sort_order=pb.RangeRequest.ASCEND,
            limit=1,
        )
        reply = await kv.Txn(
            pb.TxnRequest(
                compare=[pb.Compare(result=pb.Compare.EQUAL, target=pb.Compare.CREATE, key=my_key, create_revision=0)],
                success=[
                    pb.RequestOp(request_put=pb.PutRequest(key=my_key, value=b"", lease=granted.ID)),
                    pb.RequestOp(request_range=owner),
                ],
                failure=[pb.RequestOp(request_range=pb.RangeRequest(key=my_key)), pb.RequestOp(request_range=owner)],
            ),
            timeout=RPC_TIMEOUT_S,
        )
        my_revision = reply.header.revision
        if not reply.succeeded:
            my_revision = reply.responses[0].response_range.kvs[0].create_revision
        owners = reply.responses[1].response_range.kvs
        if not owners or owners[0].create_revision == my_revision:
            return my_key, granted.ID
        await kv.DeleteRange(pb.DeleteRangeRequest(key=my_key), timeout=RPC_TIMEOUT_S)
        self._losers.append(granted.ID)
        return None

    async def release(self, handle: tuple[bytes, int], connection: int) -> None:
        my_key, lease_id = handle
        pb = self.pb
        await self._kv[connection % len(self._kv)].DeleteRange(pb.DeleteRangeRequest(key=my_key), timeout=RPC_TIMEOUT_S)
        await self._lease[connection % len(self._lease)].LeaseRevoke(
            pb.LeaseRevokeRequest(ID=lease_id), timeout=RPC_TIMEOUT_S
        )

    async def tidy(self) -> None:
        losers, self._losers = self._losers, []
        for start in range(0, len(losers), 256):
            await asyncio.gather(
                *(
                    self._lease[i % len(self._lease)].LeaseRevoke(
                        self.pb.LeaseRevokeRequest(ID=lease_id), timeout=RPC_TIMEOUT_S
                    )
                    for i, lease_id in enumerate(losers[start : start + 256])
                )
            )

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        self._channels, self._kv, self._lease = [], [], []
