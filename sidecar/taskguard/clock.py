"""Clocks: monotonic seconds for deadlines, UTC wall time for display."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

from taskguard.guard.model import Instant


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def now_utc(self) -> datetime: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def now_utc(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    """A clock that moves only when told to (tests)."""

    def __init__(self, start: datetime | None = None) -> None:
        self._monotonic = 1000.0
        self._wall = start or datetime(2026, 1, 1, tzinfo=UTC)

    def monotonic(self) -> float:
        return self._monotonic

    def now_utc(self) -> datetime:
        return self._wall

    def advance(self, seconds: float) -> None:
        self._monotonic += seconds
        self._wall += timedelta(seconds=seconds)


def instant(clock: Clock) -> Instant:
    return Instant(clock.monotonic(), clock.now_utc())


def to_monotonic(at: datetime, now: Instant) -> float:
    """Map a stored UTC time onto this process's monotonic clock (deadlines survive restarts this way)."""
    return now.monotonic + (at - now.wall).total_seconds()
