"""Fan-out of committed events: WatchGuards streams and waiters for a run's end.

The store calls ``EventHub.publish`` after every durable batch, in revision
order. Each watcher has a bounded buffer; publishing never waits for a
watcher, and a watcher whose buffer overflows is told so (``overflowed``) and
ended by its stream, free to resume from the last revision it saw. Resuming
reads the store's event log up to the revision the watcher registered at and
then switches to the live buffer, so a watcher sees every revision once, in
order, across reconnects and restarts.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from taskguard.guard.model import Event, EventType, GuardRecord

_REPLAY_PAGE = 256
_BATCH_LINGER_S = 0.1


class WatchOverflow(Exception):
    """The watcher fell behind its buffer; it can resume after ``last_revision``."""

    def __init__(self, last_revision: int) -> None:
        super().__init__(f"watcher fell behind; resume with start_revision={last_revision + 1}")
        self.last_revision = last_revision


class TooManyWatchers(Exception):
    pass


class RevisionAhead(Exception):
    """A watch asked to start past the next revision the store will commit."""

    def __init__(self, requested: int, head: int) -> None:
        super().__init__(
            f"revision {requested} is ahead of the store, whose last revision is {head}; "
            f"start at {head + 1} or earlier (0: from now)"
        )


class Watcher:
    """One WatchGuards stream's buffer.

    While the stream catches up from the log, an overflow only drops the
    buffer (``dropped``): the catch-up is our own slowness and simply reads
    further. Once live, an overflow means the client is not reading, and
    ``overflowed`` tells its stream to end.
    """

    def __init__(self, prefix: str, capacity: int, connection: str = "") -> None:
        self.prefix = prefix
        self.connection = connection
        self.capacity = capacity
        self.buffer: deque[Event] = deque()
        self.wakeup = asyncio.Event()
        self.overflowed = asyncio.Event()
        self.live = False
        self.dropped = False
        # The last revision taken from the buffer or log, and the last one the
        # stream finished writing (where a resume must start after).
        self.last_revision = 0
        self.delivered = 0

    def offer(self, events: Sequence[Event]) -> None:
        if self.dropped or self.overflowed.is_set():
            return
        matching = [event for event in events if event.task_key.startswith(self.prefix)] if self.prefix else events
        if not matching:
            return
        if len(self.buffer) + len(matching) > self.capacity:
            self.buffer.clear()
            if self.live:
                self.overflowed.set()
            else:
                self.dropped = True
        else:
            self.buffer.extend(matching)
        self.wakeup.set()


class EventLog(Protocol):
    """What the hub reads and hears (the engine): committed batches, the log, and the guards."""

    def subscribe(self, listener: Callable[[Sequence[Event]], None]) -> None: ...

    @property
    def head(self) -> int: ...

    async def latest_revision(self) -> int: ...

    async def events_since(self, revision: int, limit: int) -> list[Event]: ...

    async def scan(self, prefix: str, after: str, limit: int) -> list[GuardRecord]: ...


class EventHub:
    def __init__(
        self,
        engine: EventLog,
        buffer_size: int = 4096,
        max_watchers: int = 1024,
        max_watchers_per_connection: int = 256,
    ) -> None:
        self._engine = engine
        self._buffer_size = buffer_size
        self._max_watchers = max_watchers
        # Below the global limit, whatever is configured: room is always left for another connection.
        self._max_per_connection = max(1, min(max_watchers_per_connection, max_watchers - 1))
        self._watchers: set[Watcher] = set()
        self._per_connection: Counter[str] = Counter()
        self._run_waiters: dict[str, list[tuple[int, asyncio.Future[GuardRecord]]]] = {}
        self._followers: dict[str, list[Callable[[Event], None]]] = {}
        engine.subscribe(self.publish)

    @property
    def watcher_count(self) -> int:
        return len(self._watchers)

    def publish(self, events: Sequence[Event]) -> None:
        for watcher in self._watchers:
            watcher.offer(events)
        if self._run_waiters:
            for event in events:
                if event.task_key in self._run_waiters:
                    self._settle_run_waiters(event.guard)
        if self._followers:
            for event in events:
                for listener in self._followers.get(event.task_key, ()):
                    listener(event)

    def follow(self, task_key: str, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``listener`` with each committed event of ``task_key``; the function returned stops it."""
        self._followers.setdefault(task_key, []).append(listener)

        def stop() -> None:
            listeners = self._followers.get(task_key, [])
            if listener in listeners:
                listeners.remove(listener)
            if not listeners:
                self._followers.pop(task_key, None)

        return stop

    # --- waiting for a run to end --------------------------------------------------

    def run_ended(self, record: GuardRecord) -> asyncio.Future[GuardRecord]:
        """A future for the final snapshot of the run ``record`` belongs to.

        It resolves with the first committed snapshot in which that run no
        longer holds the guard. Cancel it to stop waiting.
        """
        future: asyncio.Future[GuardRecord] = asyncio.get_running_loop().create_future()
        waiters = self._run_waiters.setdefault(record.task_key, [])
        waiters.append((record.fencing_token, future))
        future.add_done_callback(lambda _: self._forget(record.task_key, future))
        return future

    def check_run(self, current: GuardRecord | None) -> None:
        """Settle waiters against a guard read after they registered (closes the register/commit race)."""
        if current is not None:
            self._settle_run_waiters(current)

    def _settle_run_waiters(self, guard: GuardRecord) -> None:
        for token, future in list(self._run_waiters.get(guard.task_key, ())):
            # A run ended when the guard has issued its token and no run holding the key has it (a semaphore's
            # newer runs go on beside it).
            ended = token <= guard.newest_token and all(run.fencing_token != token for run in guard.runs)
            if ended and not future.done():
                future.set_result(guard)

    def _forget(self, task_key: str, future: asyncio.Future[GuardRecord]) -> None:
        waiters = self._run_waiters.get(task_key)
        if waiters is None:
            return
        waiters[:] = [(token, waiting) for token, waiting in waiters if waiting is not future]
        if not waiters:
            del self._run_waiters[task_key]

    # --- watching --------------------------------------------------------------------

    def open(self, prefix: str, connection: str = "") -> Watcher:
        """Register a watcher; its buffer fills with every event from now on.

        ``connection`` names where it comes from: no one connection may take
        the whole global limit, so an operator's dashboard always finds room.
        """
        if len(self._watchers) >= self._max_watchers:
            raise TooManyWatchers(f"at most {self._max_watchers} watchers at once")
        if self._per_connection[connection] >= self._max_per_connection:
            raise TooManyWatchers(
                f"at most {self._max_per_connection} watchers per connection (max_watchers_per_connection)"
            )
        watcher = Watcher(prefix, self._buffer_size, connection)
        self._watchers.add(watcher)
        self._per_connection[connection] += 1
        return watcher

    def close(self, watcher: Watcher) -> None:
        if watcher in self._watchers:
            self._watchers.discard(watcher)
            self._per_connection[watcher.connection] -= 1
            if not self._per_connection[watcher.connection]:
                del self._per_connection[watcher.connection]

    async def batches(
        self, watcher: Watcher, start_revision: int, include_snapshot: bool, limit: int = _REPLAY_PAGE
    ) -> AsyncIterator[list[Event]]:
        """Events for ``watcher``: snapshot, then history from ``start_revision``, then live.

        Each batch is whatever is ready, up to ``limit`` events: a page of the
        snapshot or the log, or everything buffered since the last one.
        Raises RevisionCompacted when ``start_revision`` is older than the log
        keeps, RevisionAhead when it is past the store's next revision, and
        WatchOverflow when the watcher fell behind its buffer.
        """
        head = self._engine.head
        if start_revision > head + 1:
            # Past this copy: on a shared store another sidecar may have seen it already, so ask the store.
            latest = await self._engine.latest_revision()
            if start_revision > latest + 1:
                # Nothing would ever be sent to it: a silent watch that looks healthy.
                raise RevisionAhead(start_revision, latest)
        watcher.last_revision = head if start_revision == 0 else start_revision - 1
        watcher.delivered = watcher.last_revision
        if include_snapshot:
            async for page in self._snapshot(watcher.prefix, head, limit):
                yield page
        while True:
            async for page in self._replay(watcher, head, limit):
                yield page
            if not watcher.dropped:
                break
            # The buffer was dropped while we caught up; it restarts empty
            # from the current head, and the log covers the rest.
            watcher.dropped = False
            head = self._engine.head
        watcher.live = True
        loop = asyncio.get_running_loop()
        last_sent = 0.0
        while True:
            if limit > 1 and len(watcher.buffer) < limit:
                # Like Nagle: a watcher that sent a batch moments ago waits out the rest of the
                # linger, so a busy stream gathers many events per message (one message costs a
                # watcher about as much as its events), while a quiet one is not delayed at all.
                wait = last_sent + _BATCH_LINGER_S - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            batch: list[Event] = []
            while watcher.buffer and len(batch) < limit:
                event = watcher.buffer.popleft()
                if event.revision > watcher.last_revision:
                    watcher.last_revision = event.revision
                    batch.append(event)
            if batch:
                last_sent = loop.time()
                yield batch
                continue
            if watcher.overflowed.is_set():
                raise WatchOverflow(watcher.last_revision)
            watcher.wakeup.clear()
            await watcher.wakeup.wait()

    async def _snapshot(self, prefix: str, head: int, limit: int) -> AsyncIterator[list[Event]]:
        after = ""
        while True:
            page = await self._engine.scan(prefix, after, _REPLAY_PAGE)
            snapshot = [Event(EventType.SNAPSHOT, record, record.heartbeat_at, revision=head) for record in page]
            for start in range(0, len(snapshot), limit):
                yield snapshot[start : start + limit]
            if len(page) < _REPLAY_PAGE:
                return
            after = page[-1].task_key

    async def _replay(self, watcher: Watcher, head: int, limit: int) -> AsyncIterator[list[Event]]:
        # Pages are read at their own size, whatever the batch size: a one-event batch must not
        # cost one read of the log (for etcd, one short-lived watch) per event.
        while watcher.last_revision < head:
            page = await self._engine.events_since(watcher.last_revision + 1, _REPLAY_PAGE)
            if not page:
                return
            batch: list[Event] = []
            for event in page:
                if event.revision > head:
                    break
                watcher.last_revision = event.revision
                if event.task_key.startswith(watcher.prefix):
                    batch.append(event)
                if len(batch) == limit:
                    yield batch
                    batch = []
            if batch:
                yield batch
            if page[-1].revision > head:
                return
