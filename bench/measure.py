"""What the load process measures with and how it says it: /proc readings, percentiles, its output lines.

stdout carries only JSON lines (one per result, read by ``bench/run.py``); progress goes to stderr.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


def note(text: str) -> None:
    print(f"load: {text}", file=sys.stderr, flush=True)


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


# --- /proc ---------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_s(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads) in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuMeter:
    """CPU seconds used by the server process (when its pid is known) and by this load process."""

    server_pid: int | None
    server_start: float = 0.0
    client_start: float = 0.0

    def start(self) -> None:
        self.server_start = cpu_s(self.server_pid) if self.server_pid else 0.0
        self.client_start = own_cpu_s()

    def used(self) -> tuple[float | None, float]:
        server = cpu_s(self.server_pid) - self.server_start if self.server_pid else None
        return server, own_cpu_s() - self.client_start
