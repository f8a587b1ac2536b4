"""How long the event log keeps events for watchers to resume from."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True, slots=True)
class Retention:
    # Keep at most this many of the newest events...
    max_events: int = 100_000
    # ...and none older than this (None: no age limit).
    max_age_s: float | None = 24 * 3600.0

    def cutoff(self, now: datetime) -> datetime | None:
        return now - timedelta(seconds=self.max_age_s) if self.max_age_s is not None else None
