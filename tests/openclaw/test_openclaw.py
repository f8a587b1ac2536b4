"""The Task Guard plugin in the real OpenClaw gateway (npm openclaw@2026.9.6), a real sidecar, a scripted model.

Every tool call here is one the scripted model made and the gateway ran: the
plugin sees it in its hooks exactly as it would in production. Tests share one
gateway and one sidecar (see conftest.py) and run in file order: the last two
stop the sidecar and kill the gateway.
"""

from __future__ import annotations

import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from taskguard_client import EventType, GuardState
from tests.openclaw.conftest import GateServer, Lab, Work
from tests.openclaw.fake_model import ToolCall
from tests.openclaw.gateway import gateway_client, reply_text

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

KEY = "agent:main::{}"


def exec_call(command: str, background: bool = True) -> ToolCall:
    arguments: dict[str, object] = {"command": command}
    if background:
        arguments["background"] = True
    return ToolCall("exec", arguments)


def test_a_backgrounded_exec_asked_for_again_is_blocked_naming_the_first_run(lab: Lab) -> None:
    task = "report-bg"
    lab.model.on("T1-START-REPORT", exec_call(lab.work.command(task)))

    first = reply_text(lab.gateway.agent_cli("agent:main:t1", "T1-START-REPORT please"))
    assert "still running" in first.lower(), first
    lab.gates.wait_waiting(task)  # the process runs, past its lock
    winner = lab.client.get(KEY.format(task))
    assert winner.state is GuardState.RUNNING and winner.stream_bound  # taskguard run took the lease over

    second = reply_text(lab.gateway.agent_cli("agent:main:t1", "T1-START-REPORT again, please"))
    assert "already running" in second, second
    assert winner.run_id in second and "agent:main:t1" in second, second
    assert lab.work.launches(task) == 1

    lab.gates.release(task)
    _, released = lab.guards.wait(
        lambda e: e.guard.task_key == KEY.format(task) and e.type is EventType.RELEASED, what="release of report-bg"
    )
    assert released.guard.state is GuardState.SUCCEEDED and released.guard.run_id == winner.run_id
    assert lab.work.launches(task) == 1 and not lab.work.records(task, "lock-conflict")


def test_two_sessions_at_once_launch_the_task_exactly_once(lab: Lab) -> None:
    task = "sync-two-sessions"
    lab.model.on("T2-SYNC", exec_call(lab.work.command(task)))
    with gateway_client(lab.gateway.port) as chat:
        # A channel session and a cron-like lane of the same agent, at the same moment.
        channel_run = chat.send("agent:main:discord:channel:ops", "T2-SYNC from the ops channel")
        cron_run = chat.send("agent:main:cron:nightly-sync", "T2-SYNC scheduled")
        replies = {"channel": chat.reply(channel_run), "cron": chat.reply(cron_run)}
    lab.gates.wait_waiting(task)
    winner = lab.client.get(KEY.format(task))
    blocked = [who for who, text in replies.items() if "already running" in text]
    started = [who for who, text in replies.items() if "still running" in text.lower()]
    assert len(blocked) == 1 and len(started) == 1, replies
    assert winner.run_id in replies[blocked[0]], replies
    assert lab.work.launches(task) == 1 and lab.gates.waiting(task) == 1
    winner_session = winner.labels["openclaw.session_key"]
    assert winner_session in replies[blocked[0]] and winner_session.endswith(
        "ops" if started == ["channel"] else "nightly-sync"
    )
    lab.gates.release(task)
    lab.guards.wait(lambda e: e.guard.task_key == KEY.format(task) and e.type is EventType.RELEASED)


def test_sessions_spawn_from_two_sessions_starts_one_sub_agent_released_at_subagent_ended(lab: Lab) -> None:
    key = KEY.format("spawn:digest-of-the-week")
    spawn = ToolCall("sessions_spawn", {"task": "GATE:digest Write the weekly digest.", "label": "digest-of-the-week"})
    lab.model.on("T3-DIGEST", spawn)
    with gateway_client(lab.gateway.port) as chat:
        first = chat.send("agent:main:dm-alice", "T3-DIGEST please")
        second = chat.send("agent:main:ops-channel", "T3-DIGEST for the team")
        replies = [chat.reply(first), chat.reply(second)]
    accepted = [text for text in replies if '"status": "accepted"' in text]
    blocked = [text for text in replies if "already running" in text]
    assert len(accepted) == 1 and len(blocked) == 1, replies
    children = lab.model.wait_for(lambda r: "GATE:digest" in r.prompt and "[Subagent Task]" in r.prompt)
    assert len(children) == 1
    held = lab.client.get(key)
    assert held.state is GuardState.RUNNING and held.stream_bound and held.run_id in blocked[0]

    lab.model.open_gate("digest")  # the sub-agent's model call returns; the sub-agent completes
    _, released = lab.guards.wait(lambda e: e.guard.task_key == key and e.type is EventType.RELEASED)
    assert released.guard.state is GuardState.SUCCEEDED and released.guard.run_id == held.run_id
    subagent_runs = {
        r.prompt for r in lab.model.requests if "GATE:digest" in r.prompt and "[Subagent Task]" in r.prompt
    }
    assert len(subagent_runs) == 1


def test_a_failed_command_needs_an_approval_then_runs_exactly_once(lab: Lab) -> None:
    task = "flaky-export"
    key = KEY.format(task)
    exit_code = lab.workdir / "flaky-exit-code"
    exit_code.write_text("3")
    lab.model.on("T4-EXPORT", exec_call(lab.work.command(task, exit_code), background=False))
    session = "agent:main:flaky"
    with gateway_client(lab.gateway.port) as chat:
        lab.gates.release(task)  # the export finishes as soon as it starts
        failed_reply = chat.reply(chat.send(session, "T4-EXPORT now"))
        _, failed = lab.guards.wait(lambda e: e.guard.task_key == key and e.type is EventType.RELEASED)
        assert failed.guard.state is GuardState.FAILED and "exit code 3" in failed.guard.last_detail, failed_reply

        exit_code.write_text("0")
        retry_run = chat.send(session, "T4-EXPORT once more")
        approval = chat.approval_requested(retry_run)
        assert task in approval["request"]["title"] and "exit code 3" in approval["request"]["description"]
        assert lab.work.launches(task) == 1  # nothing ran while the approval was pending
        # The way a chat user answers a plugin approval; from the operator's own chat session
        # (see clients/openclaw/README.md for why not from the waiting session itself).
        confirmation = chat.reply(chat.send("agent:main:operator", f"/approve {approval['id']} allow-once"))
        assert "allow-once" in confirmation, confirmation
        retry_reply = chat.reply(retry_run)

    _, approved = lab.guards.wait(lambda e: e.guard.task_key == key and e.type is EventType.RETRY_APPROVED)
    assert approved.guard.approved_by.startswith("webchat:"), approved.guard
    _, succeeded = lab.guards.wait(
        lambda e: e.guard.task_key == key and e.type is EventType.RELEASED and e.guard.state is GuardState.SUCCEEDED
    )
    assert lab.work.launches(task) == 2, retry_reply  # the failed run and the one approved retry
    assert len(lab.guards.of(key, EventType.RETRY_APPROVED)) == 1
    assert succeeded.guard.attempt == 2


# --- the gateway scenario (issue 4's, see examples/gateway-scenario), through the real gateway ----------------------

SCENARIO_TASKS = ("nightly-report", "weekly-digest", "sync-inventory")
CHANNEL, THREAD, DM, CRON = "agent:main:ops-channel", "agent:main:ops-thread", "agent:main:dm-alice", "agent:main:cron"
OPERATOR = "agent:main:operator"


@dataclass
class Replay:
    """What one replay of the scenario saw: launches and lock conflicts downstream, what the triggers were told."""

    name: str
    work: Work
    replies: list[str] = field(default_factory=list)
    triggers: int = 0
    approvals_asked: int = 0
    approvals_denied: int = 0

    def launches(self, task: str | None = None) -> int:
        return len(self.work.records(task, "launch"))

    def conflicts(self) -> int:
        return len(self.work.records(None, "lock-conflict"))

    def failed_runs(self) -> int:
        return len([r for r in self.work.records(None, "end") if r["exit_code"] != 0])

    def told_already_running(self) -> int:
        return len([text for text in self.replies if "already running" in text])


def replay_scenario(lab: Lab, gateway_port: int, replay: Replay, guarded: bool) -> None:
    """16 triggers for 3 tasks from 4 sessions in 4 waves; every wave's runs wait until its triggers are answered."""
    gates, work = replay.work.gates, replay.work
    exit_code = work.folder / "sync-inventory-exit-code"
    exit_code.write_text("1")  # the first sync-inventory run fails (its upstream API answered 503)
    marker = f"SCENARIO-{replay.name}"

    def calls(prompt: str) -> list[ToolCall]:
        task = next(task for task in SCENARIO_TASKS if task in prompt)
        return [exec_call(work.command(task, exit_code if task == "sync-inventory" else None))]

    lab.model.on(marker, calls)

    def launched() -> int:
        # Every exec that got through was backgrounded: "Command still running (session ..., pid N)".
        return len([text for text in replay.replies if "still running" in text.lower()])

    with gateway_client(gateway_port) as chat:

        def wave(*triggers: tuple[str, str], approvals: str | None = None) -> None:
            """Sessions in parallel; within a session one message after the other, as its lane would take them
            (a message sent into a busy session would steer or interrupt its active turn instead)."""
            replay.triggers += len(triggers)
            by_session: dict[str, list[str]] = {}
            for session, task in triggers:
                by_session.setdefault(session, []).append(task)

            def lane(session: str, tasks: list[str]) -> list[str]:
                replies = []
                for task in tasks:
                    run = chat.send(session, f"{marker} run {task}")
                    if approvals is not None and guarded:
                        approval = chat.approval_requested(run)
                        answer = chat.reply(
                            chat.send(f"{OPERATOR}-{session}", f"/approve {approval['id']} {approvals}")
                        )
                        assert approvals in answer, answer
                    replies.append(chat.reply(run))
                return replies

            with ThreadPoolExecutor(len(by_session)) as lanes:
                for replies in lanes.map(lambda item: lane(*item), by_session.items()):
                    replay.replies.extend(replies)
            if approvals is not None and guarded:
                replay.approvals_asked += len(triggers)
                replay.approvals_denied += len(triggers) if approvals == "deny" else 0

        # 1. kickoff: the channel asks for the report, cron for the sync, the DM for the digest.
        wave((CHANNEL, "nightly-report"), (CRON, "sync-inventory"), (DM, "weekly-digest"))
        for task in SCENARIO_TASKS:
            gates.wait_waiting(task)
        # 2. while they run: "run it again", the thread and the DM follow up, cron fires everything.
        wave(
            (CHANNEL, "nightly-report"),
            (THREAD, "nightly-report"),
            (DM, "weekly-digest"),
            (CRON, "nightly-report"),
            (CRON, "weekly-digest"),
            (CRON, "sync-inventory"),
            (THREAD, "sync-inventory"),
            (DM, "nightly-report"),
            (CHANNEL, "weekly-digest"),
        )
        gates.wait_settled(launched())  # the duplicates that got through met the locks
        for task in SCENARIO_TASKS:
            gates.release(task)  # the first runs end: two succeed, sync-inventory fails
        gates.wait_settled(launched())
        if guarded:  # the wrapper reports the failure once its command has exited
            lab.guards.wait(
                lambda e: e.guard.task_key == KEY.format("sync-inventory") and e.guard.state is GuardState.FAILED
            )
        # 3. after the failure: cron retries twice, the user asks again. With the guard each asks for an
        #    approval, which the operator denies.
        wave((CRON, "sync-inventory"), (CRON, "sync-inventory"), (CHANNEL, "sync-inventory"), approvals="deny")
        gates.wait_settled(launched())
        # 4. the operator approves one retry; it runs (and succeeds).
        exit_code.write_text("0")
        wave((DM, "sync-inventory"), approvals="allow-once")
        gates.wait_settled(launched())
        if guarded:
            lab.guards.wait(
                lambda e: e.guard.task_key == KEY.format("sync-inventory") and e.guard.state is GuardState.SUCCEEDED
            )


def test_the_gateway_scenario_launches_each_logical_task_once_with_the_plugin(lab: Lab) -> None:
    results: dict[str, Replay] = {}
    for name, guarded in (("unguarded", False), ("guarded", True)):
        folder = lab.workdir / f"scenario-{name}"
        folder.mkdir()
        gates = GateServer(folder / "gates.sock")
        try:
            replay = Replay(name, Work(folder, gates))
            port = lab.gateway.port if guarded else lab.bare_gateway().port
            replay_scenario(lab, port, replay, guarded)
            results[name] = replay
        finally:
            gates.release_all()
            gates.close()
    without, with_ = results["unguarded"], results["guarded"]
    rows = [
        ("trigger messages", without.triggers, with_.triggers),
        ("launches of the downstream script", without.launches(), with_.launches()),
        *[(f"  {task}", without.launches(task), with_.launches(task)) for task in SCENARIO_TASKS],
        ("lock conflicts seen by the script", without.conflicts(), with_.conflicts()),
        ("failed runs", without.failed_runs(), with_.failed_runs()),
        ("answered 'already running' (winner's run id)", without.told_already_running(), with_.told_already_running()),
        ("approvals asked / denied", "-", f"{with_.approvals_asked} / {with_.approvals_denied}"),
    ]
    print("\nGateway scenario through the real OpenClaw gateway (openclaw 2026.9.6, scripted model):")
    print(f"{'':48}{'without plugin':>16}{'with plugin':>14}")
    for label, a, b in rows:
        print(f"{label:48}{a!s:>16}{b!s:>14}")
    assert {task: with_.launches(task) for task in SCENARIO_TASKS} == {
        "nightly-report": 1,
        "weekly-digest": 1,
        "sync-inventory": 2,  # the failed run, then exactly one approved retry
    }
    assert with_.conflicts() == 0 and with_.approvals_asked == 4 and with_.approvals_denied == 3
    assert with_.told_already_running() == 9  # every trigger of wave 2
    assert without.launches() > with_.launches() and without.conflicts() > 0


# --- trouble: the sidecar stops, the gateway dies (these run last: they stop what the others share) ---------------


def test_with_the_sidecar_stopped_each_policy_answers_within_two_seconds(lab: Lab) -> None:
    allowed, blocked = "housekeeping", "critical-payout"  # the second has a rule: onUnavailable block
    lab.model.on("T5-HOUSEKEEPING", exec_call(lab.work.command(allowed)))
    lab.model.on("T5-PAYOUT", exec_call(lab.work.command(blocked)))
    lab.gates.release(allowed)
    lab.sidecar.terminate()
    mark = lab.gateway.mark()
    try:
        with gateway_client(lab.gateway.port) as chat:
            allow_run = chat.send("agent:main:t5-a", "T5-HOUSEKEEPING now")
            block_run = chat.send("agent:main:t5-b", "T5-PAYOUT now")
            allow_reply, block_reply = chat.reply(allow_run), chat.reply(block_run)
        decisions = {}
        for task, policy in ((allowed, "allow"), (blocked, "block")):
            line = lab.gateway.wait_for_line(
                rf"taskguard: agent:main::{task}: .*policy {policy}.*decided in \d+ ms", 30, mark
            )
            decisions[policy] = int(re.search(r"decided in (\d+) ms", line).group(1))  # type: ignore[union-attr]
        # End to end too: from the model's tool call to the model request that carries the tool's result.
        gaps = {}
        for marker, policy in (("T5-HOUSEKEEPING", "allow"), ("T5-PAYOUT", "block")):
            asked = next(r for r in lab.model.requests if marker in r.prompt and r.tool_calls)
            answered = next(r for r in lab.model.requests if marker in r.prompt and r.tool_results)
            gaps[policy] = answered.received_at - asked.received_at
        print(f"\nsidecar stopped: plugin decisions {decisions} ms; tool call to tool result {gaps} s")
        assert all(ms < 2000 for ms in decisions.values()), decisions
        assert "still running" in allow_reply.lower(), allow_reply  # allow: it ran, without a guard
        assert "could not confirm" in block_reply and "not started" in block_reply, block_reply
        lab.gates.wait_settled(1)
        assert lab.work.launches(allowed) == 1 and lab.work.launches(blocked) == 0
        assert lab.gateway.wait_for_line(rf"taskguard: agent:main::{allowed}: .*WITHOUT a guard", 5, mark)
    finally:
        lab.sidecar.start()


def test_the_gateway_killed_while_a_sub_agent_holds_its_guard_leaves_it_abandoned_within_two_seconds(lab: Lab) -> None:
    key = KEY.format("spawn:deep-research")
    lab.model.on("T6-RESEARCH", ToolCall("sessions_spawn", {"task": "GATE:killed Research.", "label": "deep-research"}))
    with gateway_client(lab.gateway.port) as chat:
        # The sidecar was just restarted: should the plugin's first call still find it down, the spawn is let
        # through unguarded (policy allow, logged); then it is asked again, by when the channel is back.
        for attempt in range(3):
            mark = lab.gateway.mark()
            reply = chat.reply(chat.send(f"agent:main:t6-{attempt}", "T6-RESEARCH please"))
            assert '"status": "accepted"' in reply, reply
            if not any(f"{key}: " in line and "policy allow" in line for line in lab.gateway.lines[mark:]):
                break
    lab.model.wait_for(lambda r: "GATE:killed" in r.prompt and "[Subagent Task]" in r.prompt)
    held = lab.client.get(key)
    assert held.state is GuardState.RUNNING and held.stream_bound
    gateway_pid = int(re.search(r"openclaw@[^:]+:(\d+) ", held.holder).group(1))  # type: ignore[union-attr]

    killed_at = time.monotonic()
    os.kill(gateway_pid, signal.SIGKILL)
    seen_at, abandoned = lab.guards.wait(
        lambda e: e.guard.task_key == key and e.type is EventType.ABANDONED, 10, "ABANDONED after SIGKILL"
    )
    print(f"\ngateway SIGKILLed: guard ABANDONED {seen_at - killed_at:.3f} s later")
    assert abandoned.guard.run_id == held.run_id
    assert seen_at - killed_at < 2.0
