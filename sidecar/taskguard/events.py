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
from collections import deque
from collections.abc import AsyncIterator, Sequence

from taskguard.core import Event, EventType, GuardRecord
from taskguard.store import Store

_REPLAY_PAGE = 256


class WatchOverflow(Exception):
    """The watcher fell behind its buffer; it can resume after ``last_revision``."""

    def __init__(self, last_revision: int) -> None:
        super().__init__(f"watcher fell behind; resume with start_revision={last_revision + 1}")
        self.last_revision = last_revision


class TooManyWatchers(Exception):
    pass


class Watcher:
    """One WatchGuards stream's buffer.

    While the stream catches up from the log, an overflow only drops the
    buffer (``dropped``): the catch-up is our own slowness and simply reads
    further. Once live, an overflow means the client is not reading, and
    ``overflowed`` tells its stream to end.
    """

    def __init__(self, prefix: str, capacity: int) -> None:
        self.prefix = prefix
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
        matching = [event for event in events if event.task_key.startswith(self.prefix)]
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


class EventHub:
    def __init__(self, store: Store, buffer_size: int = 4096, max_watchers: int = 1024) -> None:
        self._store = store
        self._buffer_size = buffer_size
        self._max_watchers = max_watchers
        self._watchers: set[Watcher] = set()
        self._run_waiters: dict[str, list[tuple[int, asyncio.Future[GuardRecord]]]] = {}
        store.subscribe(self.publish)

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
            ended = guard.fencing_token > token or (guard.fencing_token == token and not guard.running)
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

    def open(self, prefix: str) -> Watcher:
        """Register a watcher; its buffer fills with every event from now on."""
        if len(self._watchers) >= self._max_watchers:
            raise TooManyWatchers(f"at most {self._max_watchers} watchers at once")
        watcher = Watcher(prefix, self._buffer_size)
        self._watchers.add(watcher)
        return watcher

    def close(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    async def stream(self, watcher: Watcher, start_revision: int, include_snapshot: bool) -> AsyncIterator[Event]:
        """Events for ``watcher``: snapshot, then history from ``start_revision``, then live.

        Raises RevisionCompacted when ``start_revision`` is older than the log
        keeps, and WatchOverflow when the watcher fell behind its buffer.
        """
        head = self._store.revision
        watcher.last_revision = head if start_revision == 0 else start_revision - 1
        watcher.delivered = watcher.last_revision
        if include_snapshot:
            async for event in self._snapshot(watcher.prefix, head):
                yield event
        while True:
            async for event in self._replay(watcher, head):
                yield event
            if not watcher.dropped:
                break
            # The buffer was dropped while we caught up; it restarts empty
            # from the current head, and the log covers the rest.
            watcher.dropped = False
            head = self._store.revision
        watcher.live = True
        while True:
            while watcher.buffer:
                event = watcher.buffer.popleft()
                if event.revision <= watcher.last_revision:
                    continue
                watcher.last_revision = event.revision
                yield event
            if watcher.overflowed.is_set():
                raise WatchOverflow(watcher.last_revision)
            watcher.wakeup.clear()
            await watcher.wakeup.wait()

    async def _snapshot(self, prefix: str, head: int) -> AsyncIterator[Event]:
        after = ""
        while True:
            page = await self._store.scan(prefix, after, _REPLAY_PAGE)
            for record in page:
                yield Event(EventType.SNAPSHOT, record, record.heartbeat_at, revision=head)
            if len(page) < _REPLAY_PAGE:
                return
            after = page[-1].task_key

    async def _replay(self, watcher: Watcher, head: int) -> AsyncIterator[Event]:
        while watcher.last_revision < head:
            page = await self._store.events_since(watcher.last_revision + 1, _REPLAY_PAGE)
            if not page:
                return
            for event in page:
                if event.revision > head:
                    return
                watcher.last_revision = event.revision
                if event.task_key.startswith(watcher.prefix):
                    yield event
