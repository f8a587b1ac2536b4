"""The rules table: one cell for every command in every state, and what its refusals promise."""

from __future__ import annotations

import typing
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from taskguard.guard import core
from taskguard.guard.model import (
    Abandon,
    Acquire,
    ApproveRetry,
    AwaitResume,
    Command,
    Expire,
    ForceRelease,
    GuardRecord,
    GuardState,
    Heartbeat,
    Instant,
    Policy,
    Rejected,
    Release,
    Renew,
    Resume,
    RunStatus,
)

KEY = "s::t"
NOW = Instant(1000.0, datetime(2026, 1, 1, tzinfo=UTC))
STATES: list[GuardState | None] = [None, *GuardState]
COMMANDS: list[Command] = [
    Acquire(KEY, "run-2", "h", 30.0, "lease-2", False),
    Renew(KEY, "lease-1"),
    Heartbeat(KEY, "lease-1"),
    Release(KEY, "lease-1", RunStatus.SUCCEEDED),
    Resume(KEY, "lease-1"),
    AwaitResume(KEY, 1),
    Expire(KEY, 1),
    Abandon(KEY, 1, "stream dropped"),
    ApproveRetry(KEY, "ops", "ok"),
    ForceRelease(KEY, "ops", "stuck"),
]


def guard_in(state: GuardState | None) -> GuardRecord | None:
    if state is None:
        return None
    running = core.decide(None, Acquire(KEY, "run-1", "h", None, "lease-1", True), NOW, Policy()).record
    assert running is not None
    return running if state is GuardState.RUNNING else replace(running, state=state)


def test_every_command_has_a_rule_for_every_state_and_no_more() -> None:
    assert set(core.RULES) == set(typing.get_args(Command))
    for command, cells in core.RULES.items():
        assert set(cells) == set(STATES), command.__name__


@pytest.mark.parametrize("state", STATES, ids=lambda state: state.name if state else "no-guard")
@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: type(command).__name__)
def test_a_refusing_cell_changes_nothing_and_says_why(command: Command, state: GuardState | None) -> None:
    cell = core.RULES[type(command)][state]
    decision = core.decide(guard_in(state), command, NOW, Policy())
    if isinstance(cell, core.Refusal):
        assert isinstance(decision.reply, Rejected)
        assert decision.record is None and decision.events == ()
        assert decision.reply.message.startswith(f"{cell.field}: ")


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: type(command).__name__)
def test_deciding_on_a_lapsed_guard_is_healing_then_the_rule_on_the_healed_guard(command: Command) -> None:
    running = core.decide(None, Acquire(KEY, "run-1", "h", 30.0, "lease-1", True), NOW, Policy()).record
    assert running is not None
    later = Instant(NOW.monotonic + 31, NOW.wall)
    healing = core.healing(running, command, later, Policy())
    decision = core.decide(running, command, later, Policy())
    if healing is None:
        assert type(command) is AwaitResume
        return
    assert healing.record is not None and healing.record.state is GuardState.EXPIRED
    after_healing = core.decide(healing.record, command, later, Policy())
    assert core.healing(healing.record, command, later, Policy()) is None
    assert decision.reply == after_healing.reply
    assert decision.events == (*healing.events, *after_healing.events)
    assert decision.record == (after_healing.record or healing.record)
