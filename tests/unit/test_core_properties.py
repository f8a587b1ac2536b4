"""``core.decide`` over random command sequences, checked against a small model.

A Hypothesis ``RuleBasedStateMachine`` plays the engine: it keeps the store as a dict, applies
``decision.record`` when there is one, and moves a pretend clock forward. Alongside it runs a
model of each guard written from the rules in the core's docstring, not from its code; after
every step the model must agree with the reply and with the (healed) stored record.

Invariants checked on every step:

* at most one lease holds each key (at most one RUNNING run);
* fencing tokens strictly rise with every fresh acquisition of a key and never repeat;
* a key that reached FAILED is acquired fresh again only after an ApproveRetry, and one approval
  admits exactly one fresh acquisition;
* RETRY_REQUIRES_APPROVAL is the answer exactly when the model says the key waits for approval;
* an INVALID_ARGUMENT rejection never changes the record; other rejections change it only by healing;
* ACQUIRED replies carry the stored record's lease_id; duplicate_count is 0 after a fresh acquisition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from taskguard.guard.core import decide, heal, lease_problem
from taskguard.guard.model import (
    Abandon,
    Acquire,
    AcquireReply,
    ApproveRetry,
    AwaitResume,
    Command,
    Decision,
    Durability,
    EventType,
    Expire,
    ForceRelease,
    GuardRecord,
    GuardReply,
    GuardState,
    Heartbeat,
    Instant,
    KeyRule,
    Outcome,
    Policy,
    Rejected,
    RejectionKind,
    Release,
    Renew,
    Reply,
    Resume,
    RunStatus,
)

KEYS = ("sess-a::build", "sess-a::deploy", "nightly")
RUN_IDS = tuple(f"run-{i}" for i in range(5))
HOLDERS = ("host-a", "host-b", "host-c")
APPROVERS = ("ops-bob", "ops-carol")
OPERATORS = ("ops-alice", "")
T0 = 1000.0
WALL0 = datetime(2026, 1, 1, tzinfo=UTC)

BASE = Policy(default_ttl_s=20.0, max_ttl_s=100.0, stale_after_s=50.0)
APPROVAL = replace(BASE, default_rule=KeyRule(abandoned_requires_approval=True, expired_requires_approval=True))

RELEASED_STATE = {
    RunStatus.SUCCEEDED: GuardState.SUCCEEDED,
    RunStatus.FAILED: GuardState.FAILED,
    RunStatus.CANCELLED: GuardState.CANCELLED,
}

keys = st.sampled_from(KEYS)
ttls = st.one_of(
    st.none(),
    st.floats(0.5, BASE.max_ttl_s),
    st.sampled_from([BASE.max_ttl_s, 0.0, -5.0, BASE.max_ttl_s + 0.5, math.inf, math.nan]),
)
pauses = st.one_of(st.floats(0.0, 40.0), st.sampled_from([0.0, 1.0, 20.0]))

# What a reply says, in the terms the model predicts.
Expected = tuple[object, ...]
GUARD: Expected = ("guard",)


def signature(reply: Reply) -> Expected:
    match reply:
        case AcquireReply():
            return (reply.outcome, reply.fresh)
        case GuardReply():
            return GUARD
        case Rejected():
            return (reply.kind, reply.field)
    raise AssertionError(reply)


def rejected(kind: RejectionKind, field: str) -> Expected:
    return (kind, field)


@dataclass
class ModelGuard:
    state: GuardState
    run_id: str
    lease_id: str
    fencing_token: int
    ttl_s: float | None
    deadline: float | None
    stream_bound: bool
    last_status: RunStatus = RunStatus.UNSPECIFIED
    released_by: str = ""


class GuardMachine(RuleBasedStateMachine):
    """The engine's part, played with a dict for a store and a number for a clock."""

    policy: Policy = BASE

    def __init__(self) -> None:
        super().__init__()
        self.monotonic = T0
        self.store: dict[str, GuardRecord] = {}
        self.model: dict[str, ModelGuard] = {}
        self.minted = 0
        self.leases: dict[str, list[str]] = {key: [] for key in KEYS}
        self.tokens: dict[str, list[int]] = {key: [] for key in KEYS}
        # FAILED bookkeeping, from observed records only.
        self.awaiting_approval: set[str] = set()
        self.approved_by: dict[str, str] = {}

    # --- the model ------------------------------------------------------------------

    def needs_approval(self, state: GuardState) -> bool:
        return (
            state is GuardState.FAILED
            or (state is GuardState.ABANDONED and self.policy.default_rule.abandoned_requires_approval)
            or (state is GuardState.EXPIRED and self.policy.default_rule.expired_requires_approval)
        )

    def valid_ttl(self, ttl_s: float | None) -> bool:
        return ttl_s is None or 0 < ttl_s <= self.policy.max_ttl_s

    def deadline(self, ttl_s: float | None) -> float | None:
        return None if ttl_s is None else self.monotonic + ttl_s

    def model_heal(self) -> None:
        for guard in self.model.values():
            if guard.state is GuardState.RUNNING and guard.deadline is not None and self.monotonic >= guard.deadline:
                guard.state, guard.deadline, guard.last_status = GuardState.EXPIRED, None, RunStatus.UNSPECIFIED

    def lease_refusal(self, guard: ModelGuard | None, lease_id: str) -> Expected | None:
        if guard is None:
            return rejected(RejectionKind.NOT_FOUND, "lease_id")
        if guard.lease_id != lease_id or guard.state is not GuardState.RUNNING:
            return rejected(RejectionKind.FAILED_PRECONDITION, "lease_id")
        return None

    def model_acquire(self, cmd: Acquire) -> Expected:
        guard = self.model.get(cmd.task_key)
        ttl_s = cmd.ttl_s if cmd.ttl_s is not None or cmd.stream_bound else self.policy.default_ttl_s
        if not self.valid_ttl(ttl_s):
            return rejected(RejectionKind.INVALID_ARGUMENT, "ttl")
        if guard is not None and guard.state is GuardState.RUNNING:
            if guard.run_id != cmd.run_id:
                return (Outcome.ALREADY_RUNNING, False)
            if cmd.stream_bound and not guard.stream_bound:
                guard.stream_bound, guard.ttl_s, guard.deadline = True, ttl_s, self.deadline(ttl_s)
            return (Outcome.ACQUIRED, False)
        if guard is not None and self.needs_approval(guard.state):
            return (Outcome.RETRY_REQUIRES_APPROVAL, False)
        if guard is not None and guard.run_id == cmd.run_id:
            return rejected(RejectionKind.FAILED_PRECONDITION, "run_id")
        self.model[cmd.task_key] = ModelGuard(
            state=GuardState.RUNNING,
            run_id=cmd.run_id,
            lease_id=cmd.lease_id,
            fencing_token=(guard.fencing_token if guard else 0) + 1,
            ttl_s=ttl_s,
            deadline=self.deadline(ttl_s),
            stream_bound=cmd.stream_bound,
        )
        return (Outcome.ACQUIRED, True)

    def model_renew(self, cmd: Renew) -> Expected:
        if not self.valid_ttl(cmd.ttl_s):
            return rejected(RejectionKind.INVALID_ARGUMENT, "ttl")
        guard = self.model.get(cmd.task_key)
        if (refusal := self.lease_refusal(guard, cmd.lease_id)) is not None:
            return refusal
        assert guard is not None
        if cmd.ttl_s is not None:
            guard.ttl_s = cmd.ttl_s
        guard.deadline = self.deadline(guard.ttl_s)
        return GUARD

    def model_heartbeat(self, cmd: Heartbeat) -> Expected:
        guard = self.model.get(cmd.task_key)
        if (refusal := self.lease_refusal(guard, cmd.lease_id)) is not None:
            return refusal
        assert guard is not None
        guard.deadline = self.deadline(guard.ttl_s)
        return GUARD

    def model_resume(self, cmd: Resume) -> Expected:
        guard = self.model.get(cmd.task_key)
        if (refusal := self.lease_refusal(guard, cmd.lease_id)) is not None:
            return refusal
        assert guard is not None
        guard.stream_bound, guard.deadline = True, self.deadline(guard.ttl_s)
        return (Outcome.ACQUIRED, False)

    def model_release(self, cmd: Release) -> Expected:
        guard = self.model.get(cmd.task_key)
        released_by_holder = (
            guard is not None
            and guard.state is not GuardState.RUNNING
            and guard.last_status is not RunStatus.UNSPECIFIED
            and not guard.released_by
        )
        if guard is not None and released_by_holder and guard.lease_id == cmd.lease_id:
            return GUARD if guard.last_status is cmd.status else rejected(RejectionKind.FAILED_PRECONDITION, "status")
        if (refusal := self.lease_refusal(guard, cmd.lease_id)) is not None:
            return refusal
        assert guard is not None
        guard.state, guard.last_status, guard.deadline = RELEASED_STATE[cmd.status], cmd.status, None
        return GUARD

    def model_await_resume(self, cmd: AwaitResume) -> Expected:
        # A restart finds what the store kept: a stream run the model healed (time passed while the
        # sidecar was down) is still RUNNING there, and now waits for its holder with no deadline.
        guard, record = self.model.get(cmd.task_key), self.store.get(cmd.task_key)
        if (
            guard is not None
            and record is not None
            and record.running
            and record.stream_bound
            and record.fencing_token == cmd.fencing_token
        ):
            guard.state, guard.deadline, guard.last_status = GuardState.RUNNING, None, RunStatus.UNSPECIFIED
        return GUARD

    def model_expire(self, cmd: Expire) -> Expected:
        return GUARD  # the model heals as time passes; a live deadline is never expired early

    def model_abandon(self, cmd: Abandon) -> Expected:
        guard = self.model.get(cmd.task_key)
        if (
            guard is not None
            and guard.fencing_token == cmd.fencing_token
            and guard.state is GuardState.RUNNING
            and guard.stream_bound
        ):
            guard.state, guard.last_status, guard.deadline = GuardState.ABANDONED, RunStatus.UNSPECIFIED, None
        return GUARD

    def model_approve_retry(self, cmd: ApproveRetry) -> Expected:
        guard = self.model.get(cmd.task_key)
        if guard is None:
            return rejected(RejectionKind.NOT_FOUND, "task_key")
        if not self.needs_approval(guard.state):
            return rejected(RejectionKind.FAILED_PRECONDITION, "task_key")
        guard.state = GuardState.RETRY_APPROVED
        return GUARD

    def model_force_release(self, cmd: ForceRelease) -> Expected:
        guard = self.model.get(cmd.task_key)
        if guard is None:
            return rejected(RejectionKind.NOT_FOUND, "task_key")
        if guard.state is not GuardState.RUNNING:
            return rejected(RejectionKind.FAILED_PRECONDITION, "task_key")
        guard.state, guard.last_status, guard.deadline = GuardState.CANCELLED, RunStatus.CANCELLED, None
        guard.released_by = cmd.operator or "an operator"
        return GUARD

    def predict(self, cmd: Command) -> Expected:
        match cmd:
            case Acquire():
                return self.model_acquire(cmd)
            case Renew():
                return self.model_renew(cmd)
            case Heartbeat():
                return self.model_heartbeat(cmd)
            case Release():
                return self.model_release(cmd)
            case Resume():
                return self.model_resume(cmd)
            case AwaitResume():
                return self.model_await_resume(cmd)
            case Expire():
                return self.model_expire(cmd)
            case Abandon():
                return self.model_abandon(cmd)
            case ApproveRetry():
                return self.model_approve_retry(cmd)
            case ForceRelease():
                return self.model_force_release(cmd)
        raise AssertionError(cmd)

    # --- the engine's part ------------------------------------------------------------

    def now(self) -> Instant:
        return Instant(self.monotonic, WALL0 + timedelta(seconds=self.monotonic - T0))

    def execute(self, cmd: Command) -> Decision:
        key = cmd.task_key
        before = self.store.get(key)
        healed_before = heal(before, self.now(), self.policy)[0]
        waited_for_approval = self.model.get(key) is not None and self.needs_approval(self.model[key].state)

        decision = decide(before, cmd, self.now(), self.policy)
        expected = self.predict(cmd)

        assert signature(decision.reply) == expected, (cmd, decision.reply, expected)
        self.check_decision(cmd, before, decision)
        if decision.record is not None:
            self.store[key] = decision.record
        after = self.store.get(key)

        if isinstance(cmd, Acquire):
            refused_for_approval = (
                isinstance(decision.reply, AcquireReply) and decision.reply.outcome is Outcome.RETRY_REQUIRES_APPROVAL
            )
            assert refused_for_approval == (self.valid_ttl(self.effective_ttl(cmd)) and waited_for_approval)
        if isinstance(decision.reply, AcquireReply) and decision.reply.outcome is Outcome.ACQUIRED:
            assert after is not None and after.running
            assert decision.reply.lease_id == after.lease_id == decision.reply.guard.lease_id
        if isinstance(decision.reply, AcquireReply) and decision.reply.fresh:
            assert after is not None
            self.check_fresh_acquisition(key, healed_before, after)
        if isinstance(cmd, ApproveRetry) and isinstance(decision.reply, GuardReply):
            self.awaiting_approval.discard(key)
            self.approved_by[key] = cmd.approver
        if after is not None and after.state is GuardState.FAILED:
            self.awaiting_approval.add(key)
        return decision

    def effective_ttl(self, cmd: Acquire) -> float | None:
        return cmd.ttl_s if cmd.ttl_s is not None or cmd.stream_bound else self.policy.default_ttl_s

    def check_decision(self, cmd: Command, before: GuardRecord | None, decision: Decision) -> None:
        if decision.record is not None:
            assert decision.record.task_key == cmd.task_key
        if isinstance(decision.reply, Rejected):
            if decision.reply.kind is RejectionKind.INVALID_ARGUMENT:
                assert decision.record is None and decision.events == ()
            elif decision.record is not None:
                # Only healing may ride along with a rejection.
                assert before is not None and before.running
                assert decision.record.state is GuardState.EXPIRED
                assert [event.type for event in decision.events] == [EventType.EXPIRED]
        if isinstance(cmd, Expire | Abandon) and (before is None or cmd.fencing_token != before.fencing_token):
            assert decision.record is None and decision.events == ()
        if decision.durability is Durability.VOLATILE:
            assert isinstance(cmd, Heartbeat | AwaitResume) and decision.events == ()
        if decision.durability is Durability.LAZY:
            assert before is not None and decision.record is not None
            assert decision.record == replace(before, duplicate_count=before.duplicate_count + 1)

    def check_fresh_acquisition(self, key: str, healed_before: GuardRecord | None, started: GuardRecord) -> None:
        # The run before this one had ended: never two RUNNING runs at once.
        assert healed_before is None or not healed_before.running
        # FAILED is acquired again only through one approval, and that approval is spent here.
        assert key not in self.awaiting_approval, f"{key} acquired after FAILED without an approval"
        if healed_before is not None and healed_before.state is GuardState.RETRY_APPROVED:
            approver = self.approved_by.pop(key)
            assert started.approved_by == approver
        else:
            assert key not in self.approved_by
            assert started.approved_by == ""
        assert started.duplicate_count == 0
        assert all(started.fencing_token > token for token in self.tokens[key])
        self.tokens[key].append(started.fencing_token)

    # --- choices -----------------------------------------------------------------------

    def mint_lease(self, key: str) -> str:
        self.minted += 1
        lease_id = f"lease-{self.minted}"
        self.leases[key].append(lease_id)
        return lease_id

    def pick_key(self, data: st.DataObject) -> str:
        """Any key, but a key that has a guard half the time (a missing key answers NOT_FOUND, rarely of interest)."""
        known = sorted(self.store)
        return data.draw(st.one_of(st.sampled_from(KEYS), st.sampled_from(known)) if known else keys)

    def pick_lease(self, data: st.DataObject, key: str) -> str:
        """The key's current lease, an older or losing one, or one never minted."""
        choices = [*self.leases[key], "lease-never-minted"]
        current = self.store[key].lease_id if key in self.store else "lease-never-minted"
        return data.draw(st.one_of(st.just(current), st.sampled_from(choices)))

    def pick_token(self, data: st.DataObject, key: str) -> int:
        """The key's current fencing token, an older one, or the next one (not issued yet)."""
        issued = self.tokens[key]
        return data.draw(st.sampled_from([*issued, (issued[-1] if issued else 0) + 1]))

    # --- rules -------------------------------------------------------------------------

    @rule(seconds=pauses)
    def time_passes(self, seconds: float) -> None:
        self.monotonic += seconds
        self.model_heal()

    @precondition(lambda self: any(g.deadline is not None and g.deadline > self.monotonic for g in self.model.values()))
    @rule(data=st.data())
    def time_reaches_a_deadline_exactly(self, data: st.DataObject) -> None:
        deadlines = sorted(
            g.deadline for g in self.model.values() if g.deadline is not None and g.deadline > self.monotonic
        )
        self.monotonic = data.draw(st.sampled_from(deadlines))
        self.model_heal()

    @rule(key=keys, run_id=st.sampled_from(RUN_IDS), holder=st.sampled_from(HOLDERS), ttl_s=ttls, hold=st.booleans())
    def acquire(self, key: str, run_id: str, holder: str, ttl_s: float | None, hold: bool) -> None:
        self.execute(Acquire(key, run_id, holder, ttl_s, self.mint_lease(key), stream_bound=hold))

    @precondition(lambda self: bool(self.store))
    @rule(data=st.data(), holder=st.sampled_from(HOLDERS), ttl_s=ttls, hold=st.booleans())
    def the_last_run_on_a_key_asks_again(
        self, data: st.DataObject, holder: str, ttl_s: float | None, hold: bool
    ) -> None:
        key = data.draw(st.sampled_from(sorted(self.store)))
        run_id = self.store[key].run_id
        self.execute(Acquire(key, run_id, holder, ttl_s, self.mint_lease(key), stream_bound=hold))

    @rule(data=st.data(), ttl_s=ttls)
    def renew(self, data: st.DataObject, ttl_s: float | None) -> None:
        key = self.pick_key(data)
        self.execute(Renew(key, self.pick_lease(data, key), ttl_s))

    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        key = self.pick_key(data)
        self.execute(Heartbeat(key, self.pick_lease(data, key)))

    @rule(data=st.data(), status=st.sampled_from(list(RELEASED_STATE)))
    def release(self, data: st.DataObject, status: RunStatus) -> None:
        key = self.pick_key(data)
        self.execute(Release(key, self.pick_lease(data, key), status, f"released {status.name}"))

    @rule(data=st.data())
    def resume(self, data: st.DataObject) -> None:
        key = self.pick_key(data)
        self.execute(Resume(key, self.pick_lease(data, key)))

    @rule(data=st.data())
    def sidecar_restarts(self, data: st.DataObject) -> None:
        key = self.pick_key(data)
        self.execute(AwaitResume(key, self.pick_token(data, key)))

    @rule(data=st.data())
    def sweeper_expires(self, data: st.DataObject) -> None:
        key = self.pick_key(data)
        self.execute(Expire(key, self.pick_token(data, key)))

    @rule(data=st.data())
    def stream_drops(self, data: st.DataObject) -> None:
        key = self.pick_key(data)
        self.execute(Abandon(key, self.pick_token(data, key), "stream dropped"))

    @rule(data=st.data(), approver=st.sampled_from(APPROVERS))
    def approve_retry(self, data: st.DataObject, approver: str) -> None:
        key = self.pick_key(data)
        self.execute(ApproveRetry(key, approver, "looked at it"))

    @rule(data=st.data(), operator=st.sampled_from(OPERATORS))
    def force_release(self, data: st.DataObject, operator: str) -> None:
        key = self.pick_key(data)
        self.execute(ForceRelease(key, operator, "stuck"))

    # --- invariants ----------------------------------------------------------------------

    @invariant()
    def at_most_one_lease_holds_each_key(self) -> None:
        for key in KEYS:
            current = heal(self.store.get(key), self.now(), self.policy)[0]
            holding = [lease for lease in self.leases[key] if lease_problem(current, lease) is None]
            assert len(holding) <= 1
            if holding:
                assert current is not None and current.running and holding == [current.lease_id]

    @invariant()
    def the_model_agrees_with_the_store(self) -> None:
        assert self.model.keys() == self.store.keys()
        for key, guard in self.model.items():
            current = heal(self.store[key], self.now(), self.policy)[0]
            assert current is not None
            seen = (
                current.state,
                current.run_id,
                current.lease_id,
                current.fencing_token,
                current.ttl_s,
                current.expires_deadline,
                current.stream_bound,
                current.last_status,
                current.released_by,
            )
            modelled = (
                guard.state,
                guard.run_id,
                guard.lease_id,
                guard.fencing_token,
                guard.ttl_s,
                guard.deadline,
                guard.stream_bound,
                guard.last_status,
                guard.released_by,
            )
            assert seen == modelled

    @invariant()
    def fencing_tokens_never_repeat(self) -> None:
        for key in KEYS:
            assert len(set(self.tokens[key])) == len(self.tokens[key])
            assert self.tokens[key] == sorted(self.tokens[key])
            if key in self.store:
                assert self.store[key].fencing_token == self.tokens[key][-1]


class ApprovalPolicyMachine(GuardMachine):
    policy = APPROVAL


SETTINGS = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_random_command_sequences_keep_every_invariant_under_the_default_policy() -> None:
    run_state_machine_as_test(GuardMachine, settings=SETTINGS)


def test_random_command_sequences_keep_every_invariant_when_abandoned_and_expired_need_approval() -> None:
    run_state_machine_as_test(ApprovalPolicyMachine, settings=SETTINGS)
