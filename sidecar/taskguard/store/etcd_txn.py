"""Group commit for etcd: the transitions of different keys that wait at the same time share one transaction.

Each transition brings its compare (the guard key's mod revision), its writes
and the read etcd should answer when a compare fails. A transaction's compares
all have to hold for any of it to apply, so when one fails etcd applies
nothing and answers every transition's read: the transitions whose key moved
are told so (the store refreshes them and the engine decides again), the rest
go out again at once in the next transaction, without the losers. One bad key
costs its neighbours one more round trip, never a wrong answer.

A transaction never writes one key twice (etcd refuses that), and stays under
etcd's limit of operations per transaction; what does not fit waits for the
next. Up to ``MAX_IN_FLIGHT`` transactions are on their way at once, so etcd's
own batching of proposals sees them together.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from grpc import aio

from taskguard.store import StoreUnavailable
from taskguard.store.etcd_client import EtcdClient, unavailable
from taskguard.store.etcdpb import etcdv3_pb2 as etcd

log = logging.getLogger(__name__)

# etcd's default --max-txn-ops: the most compares, and the most operations of either branch, in one transaction.
MAX_TXN_OPS = 128
MAX_IN_FLIGHT = 3
# A further transaction goes out beside the one in flight only when this many wait: a short queue waits and
# shares the next transaction, a long one does not wait a whole round trip behind a full one.
QUEUE_FOR_ANOTHER = 24
# A transaction's request stays well under etcd's default request limit (1.5 MiB).
MAX_TXN_BYTES = 1 << 20


class LeaseNotFound(StoreUnavailable):
    """etcd no longer has the sidecar lease a write was to be attached to."""


@dataclass(frozen=True, slots=True)
class Committed:
    """The transition applied at ``revision``, its events numbered from ``slot`` within it."""

    revision: int
    slot: int


@dataclass(frozen=True, slots=True)
class Moved:
    """The compared key is no longer at the expected mod revision; ``kvs`` is what etcd has now."""

    kvs: tuple[Any, ...]


Outcome = Committed | Moved


@dataclass(eq=False)
class Transition:
    """One key's writes. Transitions sharing a transaction share its etcd revision, so each gets its own
    ``slots`` numbers within it (its events' revisions): ``build(slot)`` makes the writes for the first."""

    build: Callable[[int], list[Any]]
    keys: frozenset[bytes]
    compare_key: bytes | None = None
    expected_mod: int = 0
    uses_lease: bool = False
    slots: int = 0
    # Lease ids of past runs the guard document lists (the store's, carried along).
    runs: tuple[str, ...] = ()
    slot: int = -1
    ops: list[Any] = field(default_factory=list)
    future: asyncio.Future[Outcome] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def place(self, slot: int) -> int:
        """Build the writes for ``slot`` (once per slot); their size in bytes."""
        if slot != self.slot:
            self.slot, self.ops = slot, self.build(slot)
        return int(sum(op.ByteSize() for op in self.ops)) + len(self.compare_key or b"") + 16


class TxnBatcher:
    """Not safe across event loops."""

    def __init__(self, client: EtcdClient) -> None:
        self._client = client
        self._queue: deque[Transition] = deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.transactions = 0

    async def submit(self, transition: Transition) -> Outcome:
        self._queue.append(transition)
        self._dispatch()
        return await transition.future

    def _dispatch(self) -> None:
        while self._queue and (
            self._in_flight == 0 or (self._in_flight < MAX_IN_FLIGHT and len(self._queue) >= QUEUE_FOR_ANOTHER)
        ):
            batch = self._take()
            self._in_flight += 1
            task = asyncio.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[Transition]:
        """The longest run of queued transitions that fits one transaction; the rest keep their places."""
        batch: list[Transition] = []
        keys: set[bytes] = set()
        compares = ops = size = slots = 0
        kept: deque[Transition] = deque()
        while self._queue:
            transition = self._queue.popleft()
            fits = (
                compares + (transition.compare_key is not None) <= MAX_TXN_OPS
                and not keys & transition.keys
                and not transition.future.done()
            )
            if fits:
                grown = size + transition.place(slots)
                if len(transition.ops) > MAX_TXN_OPS:
                    # It would wait for room forever (the store keeps its changes within the limit).
                    transition.future.set_exception(
                        StoreUnavailable(
                            f"a change of {len(transition.ops)} writes is more than etcd takes in one transaction"
                            f" ({MAX_TXN_OPS})"
                        )
                    )
                    continue
                fits = ops + len(transition.ops) <= MAX_TXN_OPS and (not batch or grown <= MAX_TXN_BYTES)
            if not fits:
                if not transition.future.done():
                    kept.append(transition)
                if len(kept) > MAX_TXN_OPS:
                    break
                continue
            slots += transition.slots
            batch.append(transition)
            keys |= transition.keys
            compares += transition.compare_key is not None
            ops += len(transition.ops)
            size = grown
        kept.extend(self._queue)
        self._queue = kept
        return batch

    async def _send(self, batch: list[Transition]) -> None:
        try:
            await self._commit(batch)
        finally:
            self._in_flight -= 1
            self._dispatch()

    async def _commit(self, batch: list[Transition]) -> None:
        batch = [transition for transition in batch if not transition.future.done()]
        if not batch:
            return
        checked = [transition for transition in batch if transition.compare_key is not None]
        request = etcd.TxnRequest(
            compare=[
                etcd.Compare(
                    result=etcd.Compare.EQUAL,
                    target=etcd.Compare.MOD,
                    key=transition.compare_key,
                    mod_revision=transition.expected_mod,
                )
                for transition in checked
            ],
            success=[op for transition in batch for op in transition.ops],
            failure=[
                etcd.RequestOp(request_range=etcd.RangeRequest(key=transition.compare_key)) for transition in checked
            ],
        )
        try:
            reply = await self._client.call(self._client.kv.Txn, request)
        except aio.AioRpcError as error:
            if "lease not found" in (error.details() or ""):
                self._without_lease(batch)
                return
            self._fail(batch, unavailable(error))
            return
        except Exception as error:
            self._fail(batch, error)
            return
        self.transactions += 1
        if reply.succeeded:
            for transition in batch:
                if not transition.future.done():
                    transition.future.set_result(Committed(reply.header.revision, transition.slot))
            return
        retry: list[Transition] = [transition for transition in batch if transition.compare_key is None]
        for transition, response in zip(checked, reply.responses, strict=True):
            kvs = tuple(response.response_range.kvs)
            mod = kvs[0].mod_revision if kvs else 0
            if mod != transition.expected_mod:
                if not transition.future.done():
                    transition.future.set_result(Moved(kvs))
            else:
                retry.append(transition)
        # The ones that did not lose go first, ahead of anything queued since.
        self._queue.extendleft(reversed(retry))

    def _without_lease(self, batch: list[Transition]) -> None:
        """Those that needed the lease fail; the others go again without them."""
        retry = []
        for transition in batch:
            if transition.uses_lease:
                if not transition.future.done():
                    transition.future.set_exception(LeaseNotFound("this sidecar's etcd lease expired"))
            else:
                retry.append(transition)
        self._queue.extendleft(reversed(retry))

    @staticmethod
    def _fail(batch: list[Transition], error: BaseException) -> None:
        for transition in batch:
            if not transition.future.done():
                transition.future.set_exception(error)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
