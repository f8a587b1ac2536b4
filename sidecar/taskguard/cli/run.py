"""``taskguard run KEY -- CMD ARGS...``: hold a task's guard while a command runs, like flock(1) for tasks.

The guard is held over a Hold stream (``AsyncClient.hold``) while CMD runs as
a child process, so it is ABANDONED at once if this process dies, even by
SIGKILL: the kernel closes the connection (the child inherits no descriptor
of it: subprocesses close every descriptor but 0-2), and nothing else keeps
the guard.

* CMD sees TASKGUARD_TASK_KEY, TASKGUARD_RUN_ID and TASKGUARD_FENCING_TOKEN.
* Exit 0 releases SUCCEEDED; any other exit releases FAILED ("exit code N" or
  "killed by signal SIGX"); the exit code is CMD's (128+N for signal N).
* SIGINT, SIGTERM and SIGHUP are forwarded to CMD, and the run is released
  CANCELLED once CMD has exited. (Ctrl-C on a terminal where this is the
  foreground process group reaches CMD from the kernel already: that SIGINT is not sent
  a second time.)
* If the guard is taken away while CMD runs (force-released, expired, or not
  resumable after the sidecar went away), CMD gets SIGTERM (SIGKILL after
  10 s) and the exit code is 79; the message names when the guard was lost.
* If CMD ended by itself but its release cannot be delivered (the sidecar is
  gone and did not come back within the resume window, or took the guard
  away meanwhile), the exit code is still CMD's own, and stderr says that the
  run's end was not recorded: the sidecar will see the stream gone and mark
  the guard ABANDONED, not SUCCEEDED or FAILED.
* A conflict prints the run in the way and exits 75 (already running) or 76
  (a retry needs approval); ``--on-conflict skip`` exits 0 when the task is
  running; ``--on-conflict join`` (``wait``) joins the running run and exits 0
  if it succeeded, else 80. ``--on-conflict queue`` waits in the key's FIFO
  queue (each change of place on stderr) and runs CMD when its turn comes;
  ``keep-newest`` too, but a newer keep-newest trigger takes its place (84).
  A full queue exits 82; a ``--max-wait`` that passes, 83.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from taskguard.cli.common import (
    EXIT_CANNOT_EXECUTE,
    EXIT_COMMAND_NOT_FOUND,
    EXIT_INTERRUPTED,
    EXIT_JOINED_RUN_FAILED,
    EXIT_LEASE_LOST,
    EXIT_OK,
    client_options,
    iso,
    report,
    shown,
    warn,
)
from taskguard_client import (
    AsyncClient,
    AsyncHold,
    Conflict,
    Guard,
    GuardState,
    LeaseLost,
    OnConflict,
    Outcome,
    RunStatus,
    TaskGuardError,
    default_address,
)

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_KILL_AFTER_S = 10.0


class _Stopped(Exception):
    """The guard was lost while CMD ran and CMD was stopped; already reported on stderr."""


def main(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_main(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except TaskGuardError as error:
        return report(error, args.addr or default_address(), args.timeout)


async def _main(args: argparse.Namespace) -> int:
    command: list[str] = args.argv
    if shutil.which(command[0]) is None:
        # Before acquiring anything: a typo should not cost the task a run.
        warn(f"{command[0]}: command not found")
        return EXIT_COMMAND_NOT_FOUND
    # A file name may hold anything; the sidecar takes no control characters in a holder.
    holder = args.holder or f"{socket.gethostname()}:{os.getpid()} ({shown(os.path.basename(command[0]))})"
    on_conflict = _ON_CONFLICT[args.on_conflict]
    async with AsyncClient(args.addr, timeout=args.timeout, **client_options(args)) as client:
        try:
            async with client.hold(
                args.key,
                run_id=args.run_id,
                ttl=args.ttl,
                holder=holder,
                on_conflict=on_conflict,
                max_wait=args.max_wait,
                on_queued=_tell_queued,
            ) as held:
                if isinstance(held, Conflict):
                    return _conflict(held, args.on_conflict)
                return await _supervise(held, command)
        except _Stopped:
            return EXIT_LEASE_LOST
        except LeaseLost as lost:
            warn(f"{args.key}: {lost}")
            return EXIT_LEASE_LOST


# What the client is asked for: a conflict comes back as a Conflict to report, except from a queue, whose
# refusals (queue full, timed out, superseded) the client raises.
_ON_CONFLICT: dict[str, OnConflict] = {
    "fail": "return",
    "skip": "return",
    "join": "join",
    "wait": "join",
    "queue": "queue",
    "keep-newest": "keep-newest",
}


def _tell_queued(position: int, guard: Guard) -> None:
    why = f", which is {guard.state.value}: {guard.last_detail or 'waiting'}" if not guard.running else ""
    warn(f"{guard.task_key}: queued, position {position} behind run {guard.run_id}{why}")


def _conflict(conflict: Conflict, on_conflict: str) -> int:
    guard = conflict.guard
    if conflict.joined:
        how = f"{guard.state.value}: {guard.last_detail}" if guard.last_detail else guard.state.value
        warn(f"{guard.task_key}: run {guard.run_id} ended {how}")
        return EXIT_OK if guard.state is GuardState.SUCCEEDED else EXIT_JOINED_RUN_FAILED
    if conflict.outcome is Outcome.ALREADY_RUNNING and on_conflict == "skip":
        warn(f"skipped: {conflict.error()}")
        return EXIT_OK
    return report(conflict.error(), "", 0)


def _environment(held: AsyncHold) -> dict[str, str]:
    # The child gets this process's environment as it is, plus its run's facts.
    return {
        **os.environ,
        "TASKGUARD_TASK_KEY": held.task_key,
        "TASKGUARD_RUN_ID": held.run_id,
        "TASKGUARD_FENCING_TOKEN": str(held.fencing_token),
    }


async def _supervise(held: AsyncHold, command: Sequence[str]) -> int:
    loop = asyncio.get_running_loop()
    forwarded: list[signal.Signals] = []
    process: asyncio.subprocess.Process | None = None

    from_terminal = _in_foreground()

    def forward(signum: signal.Signals) -> None:
        forwarded.append(signum)
        if signum is signal.SIGINT and from_terminal:
            return  # the terminal sent it to the whole foreground group, CMD included
        if process is not None and process.returncode is None:
            process.send_signal(signum)

    # Before the command starts: a signal that arrives while it starts must reach it too.
    for signum in FORWARDED_SIGNALS:
        loop.add_signal_handler(signum, forward, signum)
    try:
        try:
            process = await asyncio.create_subprocess_exec(*command, env=_environment(held))
        except OSError as error:
            code = EXIT_COMMAND_NOT_FOUND if isinstance(error, FileNotFoundError) else EXIT_CANNOT_EXECUTE
            detail = f"cannot start {command[0]}: {error.strerror}"
            warn(detail)
            # It never ran: CANCELLED, so that the next attempt needs no approval.
            await _record_end(held, RunStatus.CANCELLED, detail)
            return code
        for signum in forwarded:
            if not (signum is signal.SIGINT and from_terminal):
                process.send_signal(signum)
        exited = asyncio.ensure_future(process.wait())
        lost = asyncio.ensure_future(held.wait_lost())
        try:
            await asyncio.wait({exited, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        if not exited.done():
            loss = lost.result()
            warn(
                f"{held.task_key}: the guard was lost at {iso(_lost_at(loss, held))} ({loss});"
                f" sending SIGTERM to {command[0]}"
            )
            await _stop(process, exited)
            raise _Stopped()
        returncode = exited.result()
        status, detail = _ending(returncode, forwarded)
        # Still forwarding: a signal now finds the command gone and changes nothing.
        await _record_end(held, status, detail)
    finally:
        for signum in FORWARDED_SIGNALS:
            loop.remove_signal_handler(signum)
    return returncode if returncode >= 0 else 128 - returncode


async def _record_end(held: AsyncHold, status: RunStatus, detail: str) -> None:
    """Release the run; when that cannot be delivered, say so. CMD's own exit status is the answer either way."""
    try:
        await held.release(status, detail)
    except TaskGuardError as error:
        how = f"{status.value}: {detail}" if detail else status.value
        warn(f"{held.task_key}: the run's end ({how}) was not recorded: {error}")


def _lost_at(lost: LeaseLost, held: AsyncHold) -> datetime:
    """When the guard was lost: when the sidecar ended the run, if the loss says; else now, when it was noticed."""
    guard: Guard | None = lost.guard
    if guard is not None and guard.fencing_token == held.fencing_token and not guard.running and guard.released_at:
        return guard.released_at
    return datetime.now(UTC)


def _in_foreground() -> bool:
    """Whether this process is in the foreground process group of its terminal (so Ctrl-C reaches its children too)."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError):
        return False


async def _stop(process: asyncio.subprocess.Process, exited: asyncio.Future[int]) -> None:
    process.terminate()
    try:
        await asyncio.wait_for(asyncio.shield(exited), _KILL_AFTER_S)
    except TimeoutError:
        process.kill()
        await exited


def _describe(returncode: int) -> str:
    if returncode < 0:
        return f"killed by signal {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


def _ending(returncode: int, forwarded: Sequence[signal.Signals]) -> tuple[RunStatus, str]:
    if forwarded:
        names = ", ".join(dict.fromkeys(signum.name for signum in forwarded))
        return RunStatus.CANCELLED, f"{names} forwarded to the command; {_describe(returncode)}"
    if returncode == 0:
        return RunStatus.SUCCEEDED, ""
    return RunStatus.FAILED, _describe(returncode)
