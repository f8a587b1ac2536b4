"""The Task Guard plugin in the real OpenClaw gateway (npm openclaw@2026.9.6), a real sidecar, a scripted model.

Every tool call here is one the scripted model made and the gateway ran: the
plugin sees it in its hooks exactly as it would in production. Tests share one
gateway and one sidecar (see conftest.py) and run in file order: the last two
stop the sidecar and kill the gateway.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from taskguard_client import EventType, GuardState
from tests.openclaw.conftest import GateServer, Lab, Work, cpu_hogs
from tests.openclaw.fake_model import ToolCall
from tests.openclaw.gateway import STALL_PLUGIN, VENV_BIN, Gateway, gateway_client, reply_text

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


def test_the_gateway_runs_the_plugin_openclaw_installed_from_its_tarball(lab: Lab) -> None:
    config = json.loads((lab.gateway.workdir / "openclaw.json").read_text())
    assert "load" not in config["plugins"]  # nothing loads the checkout's folder
    installed = lab.gateway.workdir / "state" / "extensions" / "taskguard"
    assert (installed / "dist" / "index.js").is_file()
    assert (installed / "node_modules" / "taskguard-sidecar-client" / "dist" / "index.js").is_file()
    # The plugin registered in the gateway and found the wrapper on PATH (the duplicate above was blocked by it).
    line = lab.gateway.wait_for_line(r"taskguard: guarding exec, sessions_spawn", 5)
    assert f"wrapper {VENV_BIN / 'taskguard'};" in line, line


def test_without_the_taskguard_command_the_gateway_log_says_so_and_an_exec_still_takes_its_guard(lab: Lab) -> None:
    task = "no-cli"
    folder = lab.workdir / "gw-no-cli"
    folder.mkdir()
    gateway = Gateway(folder, lab.model.base_url, lab.plugin_config, taskguard_on_path=False)
    try:
        gateway.start()
        error = gateway.wait_for_line(r"taskguard: cannot find the taskguard command", 30)
        assert "no taskguard command on PATH" in error and "taskguardBin" in error, error
        lab.model.on("T-NO-CLI-START", exec_call(lab.work.command(task)))
        reply_text(gateway.agent_cli("agent:main:no-cli", "T-NO-CLI-START please"))
        lab.gates.wait_waiting(task)
        held = lab.client.get(KEY.format(task))
        assert held.state is GuardState.RUNNING and not held.stream_bound  # the plugin's TTL lease, no wrapper
        assert gateway.wait_for_line(rf"{re.escape(KEY.format(task))}: acquired run .*\(TTL lease, no wrapper\)", 5)
    finally:
        lab.gates.release(task)
        gateway.close()


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


def test_an_exec_whose_rule_queues_runs_after_the_run_it_waited_for_not_beside_it(lab: Lab) -> None:
    task = "queued-build"
    key = KEY.format(task)
    lab.model.on("T-QUEUE-BUILD", exec_call(lab.work.command(task)))
    reply_text(lab.gateway.agent_cli("agent:main:q1", "T-QUEUE-BUILD please"))
    lab.gates.wait_waiting(task)
    first = lab.client.get(key)

    second = reply_text(lab.gateway.agent_cli("agent:main:q2", "T-QUEUE-BUILD again, please"))
    assert "was not started" not in second, second  # not blocked: it waits in taskguard run
    _, queued = lab.guards.wait(lambda e: e.guard.task_key == key and e.type is EventType.QUEUED, what="QUEUED")
    assert queued.guard.run_id == first.run_id
    assert lab.gateway.wait_for_line(rf"{re.escape(key)}: already running as run {first.run_id}; rule queue", 5)
    assert lab.work.launches(task) == 1  # the second waits in the queue, not beside the first

    lab.gates.release(task)
    _, served = lab.guards.wait(
        lambda e: e.guard.task_key == key and e.type is EventType.ACQUIRED and e.waiter_run_id != "",
        what="the queued exec's turn",
    )
    assert served.guard.run_id == queued.waiter_run_id and served.guard.fencing_token > first.fencing_token
    lab.gates.wait_finished(task, 2)
    _, done = lab.guards.wait(
        lambda e: e.guard.task_key == key and e.type is EventType.RELEASED and e.guard.run_id == served.guard.run_id,
        what="the queued exec's release",
    )
    assert done.guard.state is GuardState.SUCCEEDED
    assert lab.work.launches(task) == 2 and not lab.work.records(task, "lock-conflict")


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
    # Who approved, as OpenClaw recorded it (`openclaw approvals` prints the same), not the session that asked.
    assert approved.guard.approved_by == "runtime:Chat approval (webchat:gateway-client)", approved.guard
    assert approval["id"] in approved.guard.approval_reason and session in approved.guard.approval_reason
    _, succeeded = lab.guards.wait(
        lambda e: e.guard.task_key == key and e.type is EventType.RELEASED and e.guard.state is GuardState.SUCCEEDED
    )
    assert lab.work.launches(task) == 2, retry_reply  # the failed run and the one approved retry
    assert len(lab.guards.of(key, EventType.RETRY_APPROVED)) == 1
    assert succeeded.guard.attempt == 2


def fail_once(lab: Lab, task: str, session: str, marker: str) -> tuple[str, Path]:
    """Runs ``task`` once from ``session`` (a CLI run) so that it fails with exit code 3; its key and exit code file."""
    key = KEY.format(task)
    exit_code = lab.workdir / f"{task}-exit-code"
    exit_code.write_text("3")
    lab.model.on(marker, exec_call(lab.work.command(task, exit_code), background=False))
    lab.gates.release(task)  # it finishes as soon as it starts
    reply_text(lab.gateway.agent_cli(session, f"{marker} now"))
    _, failed = lab.guards.wait(lambda e: e.guard.task_key == key and e.type is EventType.RELEASED)
    assert failed.guard.state is GuardState.FAILED and "exit code 3" in failed.guard.last_detail
    return key, exit_code


def test_a_retry_approved_with_openclaw_approvals_resolve_records_the_cli_as_the_approver(lab: Lab) -> None:
    task = "export-cli-approved"
    key, exit_code = fail_once(lab, task, "agent:main:t8", "T8-EXPORT")
    exit_code.write_text("0")
    with gateway_client(lab.gateway.port) as chat:
        retry_run = chat.send("agent:main:t8-chat", "T8-EXPORT once more")
        approval = chat.approval_requested(retry_run)
        assert lab.work.launches(task) == 1
        resolved = lab.gateway.cli("approvals", "resolve", approval["id"], "allow-once")
        assert resolved.returncode == 0 and "by runtime:cli" in resolved.stdout, resolved.stdout + resolved.stderr
        retry_reply = chat.reply(retry_run)
    _, approved = lab.guards.wait(lambda e: e.guard.task_key == key and e.type is EventType.RETRY_APPROVED)
    assert approved.guard.approved_by == "runtime:cli", approved.guard
    assert approval["id"] in approved.guard.approval_reason and "agent:main:t8-chat" in approved.guard.approval_reason
    _, succeeded = lab.guards.wait(
        lambda e: e.guard.task_key == key and e.type is EventType.RELEASED and e.guard.state is GuardState.SUCCEEDED
    )
    assert succeeded.guard.attempt == 2 and lab.work.launches(task) == 2, retry_reply


def test_a_retry_from_a_cli_run_is_told_when_the_last_run_failed_and_how_to_approve_it(lab: Lab) -> None:
    task = "export-from-cli"
    session = "agent:main:t9"
    key, exit_code = fail_once(lab, task, session, "T9-EXPORT")
    failed = lab.client.get(key)
    exit_code.write_text("0")

    # `openclaw agent` from a command line has no chat to show an approval in.
    retry = reply_text(lab.gateway.agent_cli(session, "T9-EXPORT again"))
    assert "Plugin approval unavailable" not in retry, retry
    assert failed.released_at is not None
    for part in (
        "was not started",
        failed.run_id,
        failed.released_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "exit code 3",
        f"taskguard approve-retry {key}",
        "/approve",
    ):
        assert part in retry, f"{part!r} not in {retry!r}"
    assert lab.work.launches(task) == 1 and lab.client.get(key).state is GuardState.FAILED

    # Doing what it says lets exactly one more run through, from the same command line.
    approve = subprocess.run(
        [
            str(VENV_BIN / "taskguard"),
            "--addr",
            lab.sidecar.address,
            "approve-retry",
            key,
            "--reason",
            "checked the log",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert approve.returncode == 0, approve.stderr
    again = reply_text(lab.gateway.agent_cli(session, "T9-EXPORT after the approval"))
    _, succeeded = lab.guards.wait(
        lambda e: e.guard.task_key == key and e.type is EventType.RELEASED and e.guard.state is GuardState.SUCCEEDED
    )
    assert succeeded.guard.attempt == 2 and lab.work.launches(task) == 2, again


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


# --- the first call after a gateway start, a late grant --------------------------------------------------------------

GATEWAY_STARTS = 3
STALL_MS = 3000  # twice the decision budget, like the gateway's own main-thread stalls as it starts


@pytest.mark.timeout(1500)
def test_the_first_call_after_each_gateway_start_is_guarded_while_the_machine_is_loaded(lab: Lab) -> None:
    """Each start: CPU hogs on both cores while the gateway starts and takes its first calls, and the main thread
    blocked for 3 s while those calls wait (the way the gateway's SQLite passes block it); the first call is
    sessions_spawn from two sessions at once. Exactly one sub-agent starts, guarded, every time, and neither
    call is let through without a guard."""
    decisions: list[str] = []
    for start in range(GATEWAY_STARTS):
        folder = lab.workdir / f"restart-{start}"
        folder.mkdir()
        label = f"restart-digest-{start}"
        key = KEY.format(f"spawn:{label}")

        def spawn(prompt: str, label: str = label) -> list[ToolCall]:
            # Same task (the label names it); the DM's call also blocks the main thread while both wait.
            stall = f" STALL:{STALL_MS}" if "please" in prompt else ""
            return [ToolCall("sessions_spawn", {"task": f"GATE:{label}{stall} Write the digest.", "label": label})]

        lab.model.on(f"T10-START-{start}", spawn)
        gateway = Gateway(folder, lab.model.base_url, lab.plugin_config, (STALL_PLUGIN,), start_timeout_s=600)
        try:
            with cpu_hogs(2):
                gateway.start()
                with gateway_client(gateway.port) as chat:
                    first = chat.send(f"agent:main:dm-r{start}", f"T10-START-{start} please")
                    second = chat.send(f"agent:main:ops-r{start}", f"T10-START-{start} for the team")
                    replies = [chat.reply(first, 300), chat.reply(second, 300)]
            assert gateway.wait_for_line(r"stall: blocked the main thread", 30)  # the stall did happen
            unguarded = [line for line in gateway.lines if "WITHOUT a guard" in line]
            assert not unguarded, unguarded
            accepted = [text for text in replies if '"status": "accepted"' in text]
            blocked = [text for text in replies if "already running" in text]
            assert len(accepted) == 1 and len(blocked) == 1, replies
            held = lab.client.get(key)
            assert held.state is GuardState.RUNNING and held.stream_bound and held.run_id in blocked[0]
            decisions += [line for line in gateway.lines if re.search(rf"{re.escape(key)}: .*decided in", line)]
            assert len([line for line in decisions if key in line]) == 2, decisions
            lab.model.open_gate(label)  # the sub-agent's model call returns; it completes
            _, released = lab.guards.wait(
                lambda e, key=key: e.guard.task_key == key and e.type is EventType.RELEASED, 120
            )
            assert released.guard.state is GuardState.SUCCEEDED and released.guard.run_id == held.run_id
        finally:
            gateway.close()
    print(f"\nfirst calls after {GATEWAY_STARTS} gateway starts under load:")
    for line in decisions:
        print("  " + re.sub(r"^.*?taskguard: ", "", line))


def test_a_late_grant_after_an_allow_decision_keeps_the_guard_until_the_exec_ends(lab: Lab) -> None:
    task = "late-grant"
    key = KEY.format(task)
    lab.model.on("T11-LATE", exec_call(lab.work.command(task)))

    def poll(prompt: str) -> list[ToolCall]:
        return [ToolCall("process", {"action": "poll", "sessionId": prompt.split()[-1]})]

    lab.model.on("T11-POLL", poll)
    mark = lab.gateway.mark()
    lab.sidecar.terminate()
    try:
        with gateway_client(lab.gateway.port) as chat:
            first = chat.reply(chat.send("agent:main:t11-a", "T11-LATE now"))
    finally:
        lab.sidecar.start()  # once the exec was let through (policy allow), while it runs
    assert "still running" in first.lower(), first
    assert lab.gateway.wait_for_line(rf"{re.escape(key)}: .*WITHOUT a guard", 30, mark)
    lab.gates.wait_waiting(task)  # it runs, past its lock
    assert lab.gateway.wait_for_line(rf"{re.escape(key)}: guarded late: the sidecar granted run", 60, mark)
    held = lab.client.get(key)
    assert held.state is GuardState.RUNNING and held.labels["openclaw.session_key"] == "agent:main:t11-a"

    with gateway_client(lab.gateway.port) as chat:
        second = chat.reply(chat.send("agent:main:t11-b", "T11-LATE again"))
    assert "already running" in second and held.run_id in second, second
    assert lab.work.launches(task) == 1
    # Kept, not just granted: the plugin renews it while the exec runs.
    lab.guards.wait(
        lambda e: e.guard.task_key == key and e.type is EventType.RENEWED, 90, "a renewal of the late grant"
    )
    assert lab.client.get(key).state is GuardState.RUNNING

    lab.gates.release(task)
    lab.gates.wait_finished(task, 1)
    process_session = re.search(r"session ([\w-]+)", first)
    assert process_session, first
    with gateway_client(lab.gateway.port) as chat:
        chat.reply(chat.send("agent:main:t11-a", f"T11-POLL {process_session.group(1)}"))
    _, released = lab.guards.wait(lambda e: e.guard.task_key == key and e.type is EventType.RELEASED, 60)
    assert released.guard.state is GuardState.SUCCEEDED and released.guard.run_id == held.run_id
    assert lab.work.launches(task) == 1 and not lab.work.records(task, "lock-conflict")


# --- trouble: the sidecar stops, the gateway dies (these run last: they stop what the others share) ---------------


BUDGET_AND_CHECK_MS = 1500 + 1000  # decisionTimeoutMs, then at most 1 s to find the sidecar unreachable


def test_with_the_sidecar_stopped_each_policy_answers_after_the_budget_and_the_reachability_check(lab: Lab) -> None:
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
        decisions, stalls = {}, {}
        for task, policy in ((allowed, "allow"), (blocked, "block")):
            line = lab.gateway.wait_for_line(
                rf"taskguard: agent:main::{task}: cannot connect .*policy {policy}.*decided in \d+ ms", 30, mark
            )
            decisions[policy] = int(re.search(r"decided in (\d+) ms", line).group(1))  # type: ignore[union-attr]
            # The gateway's own event loop stalls count in the wait too; the plugin logs how long it was blocked.
            stalled = re.search(r"event loop was blocked (\d+) ms", line)
            stalls[policy] = int(stalled.group(1)) if stalled else 0
        # End to end too: from the model's tool call to the model request that carries the tool's result.
        gaps = {}
        for marker, policy in (("T5-HOUSEKEEPING", "allow"), ("T5-PAYOUT", "block")):
            asked = next(r for r in lab.model.requests if marker in r.prompt and r.tool_calls)
            answered = next(r for r in lab.model.requests if marker in r.prompt and r.tool_results)
            gaps[policy] = answered.received_at - asked.received_at
        print(
            f"\nsidecar stopped: plugin decisions {decisions} ms (event loop blocked {stalls} ms meanwhile); "
            f"tool call to tool result {gaps} s"
        )
        assert all(decisions[p] - stalls[p] <= BUDGET_AND_CHECK_MS for p in decisions), (decisions, stalls)
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
        reply = chat.reply(chat.send("agent:main:t6", "T6-RESEARCH please"))
        assert '"status": "accepted"' in reply, reply
    lab.model.wait_for(lambda r: "GATE:killed" in r.prompt and "[Subagent Task]" in r.prompt)
    # The sidecar was just restarted: should the plugin's call have found it still down, the spawn was let
    # through (policy allow) and takes the grant once the sidecar answers.
    lab.guards.wait(lambda e: e.guard.task_key == key and e.type is EventType.ACQUIRED, 60, "the sub-agent's guard")
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
