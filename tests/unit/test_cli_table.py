"""How ``taskguard ls`` shortens keys and holders and which columns leave a narrow table first."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskguard.cli.table import ELLIPSIS, Column, elide_end, elide_key, fit

KEY = "agent:ops:7f3c9e2a-5b1d-4c8e-9f0a-1d2e3f4a5b6c::nightly-report"


def test_a_key_that_fits_is_left_alone() -> None:
    assert elide_key(KEY, len(KEY)) == KEY


def test_a_long_key_keeps_its_task_name_and_the_start_of_its_session() -> None:
    assert elide_key(KEY, 32) == "agent:ops:7f3c9…::nightly-report"
    # The least of the session still kept before the task name.
    assert elide_key(KEY, 21) == "agen…::nightly-report"


def test_a_task_name_too_long_to_keep_whole_keeps_the_end_of_the_key() -> None:
    assert elide_key(KEY, 20) == "agent:…ightly-report"
    assert elide_key("no-separator-in-this-key-at-all", 10) == "no-…at-all"


def test_widths_too_small_for_any_text() -> None:
    assert elide_key(KEY, 1) == ELLIPSIS and elide_key(KEY, 0) == ""
    assert elide_end("build-host-17", 1) == ELLIPSIS and elide_end("build-host-17", 0) == ""


def test_a_holder_is_cut_at_its_end() -> None:
    assert elide_end("build-host-17 pid 48213", 16) == "build-host-17 p…"
    assert elide_end("short", 16) == "short"


@given(st.text(min_size=0, max_size=80), st.integers(min_value=0, max_value=100))
def test_shortened_text_is_never_wider_than_asked_and_keeps_both_ends(text: str, width: int) -> None:
    for shortened in (elide_key(text, width), elide_end(text, width)):
        assert len(shortened) <= width
        assert (shortened == text) == (len(text) <= width)
        if shortened != text and width > 1:
            head, _, tail = shortened.partition(ELLIPSIS)
            assert text.startswith(head) and text.endswith(tail)


COLUMNS = (
    Column("KEY", shorten="key"),
    Column("STATE"),
    Column("RUN ID", drop_rank=2),
    Column("HOLDER", shorten="end"),
    Column("TOKEN", drop_rank=1),
)
ROW = (KEY, "RUNNING", "0f8e4c1a-2b3d-4e5f-8a9b-0c1d2e3f4a5b", "build-host-17 pid 48213 python -m reports", "12")


def _fit(width: int | None) -> list[list[str]]:
    return [line.split("  ") for line in fit(COLUMNS, [ROW], width).splitlines()]


def test_no_width_prints_everything_in_full() -> None:
    (header, row) = [[cell.strip() for cell in line if cell] for line in _fit(None)]
    assert header == ["KEY", "STATE", "RUN ID", "HOLDER", "TOKEN"] and row == list(ROW)


@pytest.mark.parametrize(
    ("width", "headers"),
    [
        (200, ["KEY", "STATE", "RUN ID", "HOLDER", "TOKEN"]),
        (150, ["KEY", "STATE", "HOLDER", "TOKEN"]),  # the highest drop rank goes first
        (120, ["KEY", "STATE", "HOLDER"]),
        (40, ["KEY", "STATE", "HOLDER"]),  # the columns that never leave stay, shortened
    ],
)
def test_columns_leave_in_drop_rank_order_and_lines_fit(width: int, headers: list[str]) -> None:
    text = fit(COLUMNS, [ROW], width)
    header, row = text.splitlines()
    assert [cell.strip() for cell in header.split("  ") if cell] == headers
    assert max(len(header), len(row)) <= width, text


def test_holders_give_way_before_keys_lose_their_task_name() -> None:
    _, row = fit(COLUMNS, [ROW], 60).splitlines()
    key, state, holder = (cell.strip() for cell in row.split("  ") if cell)
    assert key.endswith("…::nightly-report") and state == "RUNNING" and holder == "build-host-17 p…"
    assert len(row) <= 60


def test_a_terminal_too_narrow_for_the_least_gets_the_least_not_less() -> None:
    _, row = fit(COLUMNS, [ROW], 10).splitlines()
    key, _, holder = (cell.strip() for cell in row.split("  ") if cell)
    assert (len(key), len(holder)) == (16, 8)
