"""Fitting ``taskguard ls``'s table into a terminal: which columns go first, and how long text is shortened.

Pure text in, text out, so the rules are unit-tested without a sidecar. Cells arrive already made
inert by ``common.shown``; shortening works on that escaped text, so an escape is never split from view
into something a terminal would act on.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass

ELLIPSIS = "…"
GAP = "  "
# How far each shortened column gives way, in turn, while the table is still too wide: first holders to a
# width that still tells hosts apart, then keys to one that still shows a task name, then both to the least
# that says anything at all.
SHRINK_STEPS = (("end", 16), ("key", 24), ("end", 8), ("key", 16))
# Kept before the "…" when a key is cut before its task name, so the session it belongs to still shows.
MIN_SESSION_HEAD = 4


@dataclass(frozen=True)
class Column:
    header: str
    # Columns with a higher drop rank leave first when the table is too wide; 0 never leaves.
    drop_rank: int = 0
    # How a too-long cell is shortened: "key" elides the middle and keeps the task name, "end" cuts the end,
    # None never shortens (short values: states, ages, numbers).
    shorten: str | None = None


def output_width() -> int:
    """$COLUMNS when set, else the terminal's width when stdout is one, else 80 (what pipes and files get)."""
    return shutil.get_terminal_size((80, 24)).columns


def elide_key(key: str, width: int) -> str:
    """``key`` in at most ``width`` characters: the task name (after the last ``::``) kept whole when it can be.

    ``agent:ops:7f3c9e2a-5b1d-4c8e-9f0a-1d2e3f4a5b6c::nightly-report`` at 32 is
    ``agent:ops:7f3c9…::nightly-report``: the part people tell their tasks apart by survives, and so does the
    start of the session. A task name too long for that keeps a third of the width for the key's start and
    the rest for its end.
    """
    if len(key) <= width:
        return key
    if width <= len(ELLIPSIS):
        return ELLIPSIS[:width]
    _, separator, task = key.rpartition("::")
    tail = separator + task
    if separator and len(tail) + len(ELLIPSIS) + MIN_SESSION_HEAD <= width:
        return key[: width - len(ELLIPSIS) - len(tail)] + ELLIPSIS + tail
    head = (width - len(ELLIPSIS)) // 3
    return key[:head] + ELLIPSIS + key[len(key) - (width - len(ELLIPSIS) - head) :]


def elide_end(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    return text[: max(width - len(ELLIPSIS), 0)] + ELLIPSIS[: max(width, 0)]


def _shortened(column: Column, cell: str, width: int) -> str:
    if column.shorten == "key":
        return elide_key(cell, width)
    if column.shorten == "end":
        return elide_end(cell, width)
    return cell


def fit(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int | None) -> str:
    """The table in ``width`` characters a line (``None``: every column in full).

    First the columns with the highest drop rank leave, one at a time, while the table is too wide; when
    only the ones that never leave are left, holders and keys are shortened by ``SHRINK_STEPS``: a
    terminal narrower than their last step gets lines that wrap, never a table without its keys.
    """
    kept = list(range(len(columns)))
    natural = [max(len(row[index]) for row in ([column.header for column in columns], *rows)) for index in kept]

    def total(indices: Sequence[int], widths: Sequence[int]) -> int:
        return sum(widths[index] for index in indices) + len(GAP) * (len(indices) - 1)

    widths = list(natural)
    if width is not None:
        while total(kept, widths) > width:
            droppable = [index for index in kept if columns[index].drop_rank > 0]
            if not droppable:
                break
            kept.remove(max(droppable, key=lambda index: columns[index].drop_rank))
        for kind, floor in SHRINK_STEPS:
            for index in kept:
                excess = total(kept, widths) - width
                if excess > 0 and columns[index].shorten == kind:
                    widths[index] = max(widths[index] - excess, min(floor, natural[index]))
    lines = []
    for row in ([column.header for column in columns], *rows):
        cells = [_shortened(columns[index], row[index], widths[index]).ljust(widths[index]) for index in kept]
        lines.append(GAP.join(cells).rstrip())
    return "\n".join(lines)
