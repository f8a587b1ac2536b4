"""The etcd store's group commit against a real etcd: shared transactions, and only the loser of a compare loses."""

from __future__ import annotations

import asyncio
import uuid

from taskguard.store.etcd_client import EtcdClient, EtcdSettings
from taskguard.store.etcd_txn import Committed, Moved, Transition, TxnBatcher
from taskguard.store.etcdpb import etcdv3_pb2 as etcd
from tests.etcd_cluster import EtcdCluster


def _put(key: bytes, value: bytes, expected_mod: int) -> Transition:
    def build(slot: int) -> list[etcd.RequestOp]:
        return [etcd.RequestOp(request_put=etcd.PutRequest(key=key, value=value + b"@%d" % slot))]

    return Transition(build=build, keys=frozenset({key}), compare_key=key, expected_mod=expected_mod, slots=1)


async def test_transitions_waiting_together_share_transactions_and_only_the_one_whose_key_moved_loses(
    etcd_server: EtcdCluster,
) -> None:
    client = EtcdClient(EtcdSettings(endpoints=(etcd_server.members[0].endpoint,)))
    await client.open()
    batcher = TxnBatcher(client)
    prefix = f"/group-{uuid.uuid4().hex}/".encode()
    try:
        moved_key = prefix + b"moved"
        first = await client.call(client.kv.Put, etcd.PutRequest(key=moved_key, value=b"someone else"))
        keys = [prefix + b"k%02d" % i for i in range(40)]
        before = batcher.transactions
        outcomes = await asyncio.gather(
            *(batcher.submit(_put(key, b"v", 0)) for key in keys),
            # Expects the key absent (mod 0), but another writer put it: its compare fails.
            batcher.submit(_put(moved_key, b"mine", 0)),
        )
        *fresh, loser = outcomes
        assert isinstance(loser, Moved) and loser.kvs[0].mod_revision == first.header.revision
        assert all(isinstance(outcome, Committed) for outcome in fresh)
        # 41 transitions, not 41 transactions: the first goes alone, the rest wait behind it and share.
        assert batcher.transactions - before <= 4, batcher.transactions - before
        # Transitions in one transaction share its revision, each with slots of its own.
        committed = [outcome for outcome in fresh if isinstance(outcome, Committed)]
        places = {(outcome.revision, outcome.slot) for outcome in committed}
        assert len(places) == len(committed)
        stored = await client.call(
            client.kv.Range, etcd.RangeRequest(key=prefix + b"k", range_end=prefix + b"l", limit=100)
        )
        assert [kv.key for kv in stored.kvs] == keys
        for kv, outcome in zip(stored.kvs, committed, strict=True):
            assert kv.mod_revision == outcome.revision and kv.value == b"v@%d" % outcome.slot
        kept = await client.call(client.kv.Range, etcd.RangeRequest(key=moved_key))
        assert kept.kvs[0].value == b"someone else"
    finally:
        await batcher.close()
        await client.close()
