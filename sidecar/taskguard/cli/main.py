"""The ``taskguard`` command: ``serve`` runs the sidecar; every other command is a client of it.

The client commands use the public ``taskguard_client`` API and nothing else
of the sidecar's, like httpx's ``_main.py`` on its public ``Client``. They
report a failure as one line on stderr and a documented exit code (``EPILOG``),
never a traceback. ``run`` lives in ``cli_run.py``; the exit codes, reporting, the escaping of
the sidecar's text and the connection options both use live in ``cli_common.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

import shtab

import taskguard_client
from taskguard import __version__, config
from taskguard.cli import run as cli_run
from taskguard.cli import table
from taskguard.cli.common import EXIT_FENCE_INVALID, EXIT_INTERRUPTED, EXIT_OK, client_options, iso, report, shown, warn
from taskguard_client import (
    Client,
    Guard,
    GuardEvent,
    GuardState,
    Holder,
    KeyPolicy,
    TaskGuardError,
    Waiter,
    default_address,
)

EPILOG = """\
The client commands talk to the sidecar at --addr; without it, at $TASKGUARD_ADDR, else at the
sidecar's default socket: unix:$XDG_RUNTIME_DIR/taskguard/taskguard.sock, or
unix:/tmp/taskguard-<uid>/taskguard.sock when $XDG_RUNTIME_DIR is unset.

exit codes:
  0    success; run: the command exited 0, --on-conflict skip found the task running,
       or --on-conflict join (wait) saw the run it waited for succeed
  1    check-fence: the token does not hold the guard
  2    usage error
  65   the sidecar refused an argument, such as a malformed task key (INVALID_ARGUMENT)
  66   no such guard or lease (NOT_FOUND)
  67   the guard's state does not allow it, e.g. approve-retry of a guard that did not fail (FAILED_PRECONDITION)
  69   the sidecar is not reachable, or did not answer within --timeout (UNAVAILABLE, DEADLINE_EXCEEDED)
  70   any other error the sidecar reported
  75   run: another run holds the guard (ALREADY_RUNNING)
  76   run: the last run failed and a retry needs approve-retry (RETRY_REQUIRES_APPROVAL); also with skip and wait
  77   permission denied, including a sidecar socket this user may not open
  79   run: the guard was lost while the command ran (force-released, expired, or not resumable after the
       sidecar went away); the command got SIGTERM, and stderr says when the guard was lost
  80   run --on-conflict join (wait): the run waited for did not succeed
  81   run: the last run was lost (abandoned, expired, force-released) and the key's lock-delay keeps it
       closed until the time stderr names (LOCK_DELAYED); also with skip and wait
  82   run --on-conflict queue|keep-newest: the key's queue is full (QUEUE_FULL)
  83   run --on-conflict queue|keep-newest: --max-wait (or the key's max_wait) passed first (WAIT_TIMED_OUT)
  84   run --on-conflict keep-newest: a newer trigger took this one's place in the queue (SUPERSEDED)
  126  run: the command cannot be executed
  127  run: the command was not found (nothing was acquired)
  N    run: the command's exit status; 128+N when a signal N killed it (also when the sidecar could
       not be told that it ended: stderr then says the run's end was not recorded)
  130  interrupted (Ctrl-C); while run's command runs, the signal goes to it and its status counts
"""


def _duration(value: str) -> float:
    try:
        seconds = config.parse_duration_s(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("must be a duration > 0")
    return seconds


def _state(value: str) -> GuardState:
    try:
        return GuardState(value.upper())
    except ValueError:
        names = ", ".join(state.value for state in GuardState)
        raise argparse.ArgumentTypeError(f"must be one of {names}") from None


# --- presenting ---------------------------------------------------------------------------


def _span(delta: timedelta) -> str:
    total = int(abs(delta.total_seconds()))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _json_value(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Guard | GuardEvent | KeyPolicy | Waiter | Holder):
        return {field.name: _json_value(getattr(value, field.name)) for field in fields(value)}
    if isinstance(value, dict):
        return {key: _json_value(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [_json_value(item) for item in value]
    return value


def guard_json(guard: Guard) -> dict[str, Any]:
    document: dict[str, Any] = _json_value(guard)
    return document


def _state_text(guard: Guard) -> str:
    if guard.stale and guard.running:
        return f"{guard.state.value} (stale)"
    if not guard.running and guard.lock_delay_until is not None and guard.lock_delay_until > datetime.now(UTC):
        return f"{guard.state.value} (lock-delay)"
    return guard.state.value


# Wide to narrow: when the table is too wide, the highest drop rank leaves first; key, state, holder, age and
# expiry always stay (the key and holder are shortened instead).
_COLUMNS = (
    table.Column("KEY", shorten="key"),
    table.Column("STATE"),
    table.Column("RUN ID", drop_rank=3),
    table.Column("HOLDER", shorten="end"),
    table.Column("STARTED", drop_rank=4),
    table.Column("AGE"),
    table.Column("EXPIRES"),
    # Callers waiting in the key's queue (on_conflict queue, keep-newest, supersede).
    table.Column("QUEUE"),
    # Runs holding the key now: more than one where its rule's max_holders lets several hold it at once.
    table.Column("RUNS", drop_rank=5),
    table.Column("TOKEN", drop_rank=1),
    table.Column("DUPS", drop_rank=2),
)


def _table(guards: Sequence[Guard], now: datetime, width: int | None) -> str:
    rows = [
        tuple(
            shown(cell)
            for cell in (
                guard.task_key,
                _state_text(guard),
                guard.run_id,
                guard.holder or "-",
                iso(guard.started_at),
                _span(now - guard.started_at),
                _expires(guard, now),
                str(len(guard.waiters)),
                str(len(guard.runs)),
                str(guard.fencing_token),
                str(guard.duplicate_count),
            )
        )
        for guard in guards
    ]
    return table.fit(_COLUMNS, rows, width)


def _expires(guard: Guard, now: datetime) -> str:
    if not guard.running or guard.expires_at is None:
        return "-"
    left = guard.expires_at - now
    return f"in {_span(left)}" if left >= timedelta(0) else f"{_span(left)} ago"


def _event_line(event: GuardEvent) -> str:
    guard = event.guard
    parts = [f"{event.revision:>8}", f"{event.type.value:<17}", guard.task_key, _state_text(guard)]
    parts.append(f"run={guard.run_id} token={guard.fencing_token}")
    if guard.holder:
        parts.append(f"holder={guard.holder!r}")
    if event.trigger_run_id:
        parts.append(f"refused={event.trigger_run_id} ({event.trigger_holder or '-'})")
    if event.actor:
        parts.append(f"by={event.actor!r}")
    if event.reason:
        parts.append(f"reason={event.reason!r}")
    elif not guard.running and guard.last_detail and event.type.value not in ("SNAPSHOT", "DUPLICATE_REFUSED"):
        parts.append(f"detail={guard.last_detail!r}")
    return shown(" ".join(parts))


def _print(text: str) -> None:
    # Callers hand in text made of shown() parts (or JSON, whose escapes cover every control character).
    print(text, flush=True)


def _say(text: str) -> None:
    """One line on stdout, shown inert."""
    _print(shown(text))


# --- commands -----------------------------------------------------------------------------

_Command = Callable[[Client, argparse.Namespace], int]


def _client_command(command: _Command) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        address = args.addr or default_address()
        try:
            with Client(address, timeout=args.timeout, **client_options(args)) as client:
                return command(client, args)
        except TaskGuardError as error:
            return report(error, address, args.timeout)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            # The reader went away (taskguard watch | head); keep the final flush at exit from failing too.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK

    return run


def _ls(client: Client, args: argparse.Namespace) -> int:
    guards = list(client.list(prefix=args.prefix, states=args.state, stale_only=args.stale))
    if args.json:
        _print(json.dumps([guard_json(guard) for guard in guards], indent=2))
    elif guards:
        _print(_table(guards, datetime.now(UTC), None if args.wide else table.output_width()))
    else:
        print("no guards", file=sys.stderr)
    return EXIT_OK


def _get(client: Client, args: argparse.Namespace) -> int:
    guard = client.get(args.key)
    if args.json:
        _print(json.dumps(guard_json(guard), indent=2))
        return EXIT_OK
    document = guard_json(guard)
    width = max(len(name) for name in document)
    _print("\n".join(f"{name.ljust(width)}  {shown(_plain(value))}" for name, value in document.items()))
    return EXIT_OK


def _plain(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{key}={item}" for key, item in value.items()) or "-"
    if isinstance(value, list):
        # The queue (each waiter since it queued) or a semaphore's other runs (each since it started).
        return (
            "; ".join(
                f"{item['run_id']} ({item['holder']}, since {item.get('queued_at') or item.get('started_at')})"
                for item in value
            )
            or "-"
        )
    return str(value)


def _watch(client: Client, args: argparse.Namespace) -> int:
    with client.watch(args.prefix, start_revision=args.start_revision, include_snapshot=args.snapshot) as events:
        for event in events:
            _print(json.dumps(_json_value(event)) if args.json else _event_line(event))
    return EXIT_OK


def _approve_retry(client: Client, args: argparse.Namespace) -> int:
    guard = client.approve_retry(args.key, args.approver or getpass.getuser(), args.reason)
    _say(f"{guard.task_key}: {guard.state.value} by {guard.approved_by} (run {guard.run_id} may be retried once)")
    return EXIT_OK


def _force_release(client: Client, args: argparse.Namespace) -> int:
    guard = client.force_release(args.key, args.operator or getpass.getuser(), args.reason)
    _say(f"{guard.task_key}: run {guard.run_id} {guard.state.value} by {guard.released_by}")
    return EXIT_OK


def _check_fence(client: Client, args: argparse.Namespace) -> int:
    if client.check_fence(args.key, args.token):
        _say(f"{args.key}: fencing token {args.token} holds the guard")
        return EXIT_OK
    _say(f"{args.key}: fencing token {args.token} does not hold the guard")
    return EXIT_FENCE_INVALID


def _serve(args: argparse.Namespace) -> int:
    from taskguard import server

    try:
        settings = config.load(args)
    except config.ConfigError as error:
        warn(str(error))
        return 2
    try:
        return asyncio.run(server.run(settings))
    except Exception as error:  # start-up failures: one clear line, no traceback
        warn(f"cannot start: {error}")
        return 1


def _dashboard(args: argparse.Namespace) -> int:
    from taskguard.dashboard import app

    address = args.addr or default_address()
    return app.main(args, address, {**client_options(args), "timeout": args.timeout})


def _doctor(args: argparse.Namespace) -> int:
    from taskguard.cli import doctor

    try:
        settings = config.load(args)
    except config.ConfigError as error:
        print(f"FAIL config: {error}")
        return 1
    return doctor.report(settings)


# --- parsing ------------------------------------------------------------------------------


def _connection(parser: argparse.ArgumentParser, defaults: bool) -> None:
    # On the main parser with defaults; repeated on each client command without, so they may come after it too.
    parser.add_argument(
        "--addr",
        default=None if defaults else argparse.SUPPRESS,
        help="sidecar address, unix:PATH or HOST:PORT (default: $TASKGUARD_ADDR, else the sidecar's default socket)",
    )
    parser.add_argument(
        "--timeout",
        type=_duration,
        metavar="D",
        default=10.0 if defaults else argparse.SUPPRESS,
        help="deadline of each call to the sidecar, such as 10s or 500ms (default: 10s)",
    )
    unset = None if defaults else argparse.SUPPRESS
    _complete_files(
        parser.add_argument(
            "--token-file",
            default=unset,
            metavar="FILE",
            help="file with the bearer token to present (default: $TASKGUARD_TOKEN_FILE, or $TASKGUARD_TOKEN itself)",
        ),
        parser.add_argument(
            "--tls-ca", default=unset, metavar="PEM", help="CA that signed the sidecar's certificate (TLS)"
        ),
        parser.add_argument("--tls-cert", default=unset, metavar="PEM", help="client certificate for mTLS"),
        parser.add_argument("--tls-key", default=unset, metavar="PEM", help="client private key for mTLS"),
    )


# The headings `taskguard --help` lists the commands under, in this order; every command is under one.
COMMAND_GROUPS = (
    ("Guards", ("ls", "get", "watch")),
    ("Runs", ("run", "check-fence")),
    ("Operators", ("approve-retry", "force-release", "dashboard")),
    ("Sidecar", ("serve", "doctor")),
    ("Shell", ("completion",)),
)
COMPLETION_SHELLS = ("bash", "zsh", "fish")


class _GroupedHelp(argparse.RawDescriptionHelpFormatter):
    """argparse lists subcommands in one block; the main parser's description lists them by COMMAND_GROUPS."""

    def _format_action(self, action: argparse.Action) -> str:
        # The subcommands stay on the parser (shtab completes them from there); only their block is left out.
        if isinstance(action, argparse._SubParsersAction):
            return ""
        return super()._format_action(action)


def _grouped_commands(helps: dict[str, str]) -> str:
    grouped = [name for _, names in COMMAND_GROUPS for name in names]
    if sorted(grouped) != sorted(helps):
        raise RuntimeError(f"COMMAND_GROUPS {sorted(grouped)} do not match the commands {sorted(helps)}")
    width = max(len(name) for name in helps) + 2
    sections = [
        f"{title}:\n" + "\n".join(f"  {name.ljust(width)}{helps[name]}" for name in names)
        for title, names in COMMAND_GROUPS
    ]
    return "\n\n".join(sections) + "\n\nRun `taskguard COMMAND --help` for a command's options."


def _completion(args: argparse.Namespace) -> int:
    # shtab writes the script from the parser itself, so every command and option is in it as it is now.
    try:
        _print(shtab.complete(build_parser(), shell=args.shell))
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def _complete_files(*actions: argparse.Action) -> None:
    for action in actions:
        action.complete = shtab.FILE  # type: ignore[attr-defined]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskguard",
        epilog=EPILOG,
        formatter_class=_GroupedHelp,
    )
    # Both: the client's package carries the API stubs the sidecar serves.
    versions = f"taskguard-sidecar {__version__}, taskguard-sidecar-client {taskguard_client.__version__}"
    parser.add_argument("--version", action="version", version=versions)
    _connection(parser, defaults=True)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    helps: dict[str, str] = {}

    def command(name: str, help: str, **options: Any) -> argparse.ArgumentParser:
        helps[name] = help  # for the grouped listing
        return subparsers.add_parser(name, help=help, **options)

    serve = command("serve", help="run the sidecar")
    config.add_arguments(serve)
    serve.set_defaults(run=_serve)
    check = command("doctor", help="check the configuration, the database and the listener; change nothing")
    config.add_arguments(check)
    check.set_defaults(run=_doctor)

    def client_command(name: str, help: str, run: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        sub = command(name, help=help, description=help, epilog=EPILOG)
        sub.formatter_class = argparse.RawDescriptionHelpFormatter
        _connection(sub, defaults=False)
        sub.set_defaults(run=run)
        return sub

    ls = client_command("ls", "list guards as a table (or JSON)", _client_command(_ls))
    ls.add_argument("--prefix", default="", help="only keys starting with this")
    ls.add_argument("--state", type=_state, nargs="+", action="extend", metavar="S", help="only guards in these states")
    ls.add_argument("--stale", action="store_true", help="only stale guards (abandoned, expired, or silent)")
    ls.add_argument("--json", action="store_true", help="print one JSON list")
    ls.add_argument(
        "--wide",
        action="store_true",
        help="every column, every key in full (default: fit $COLUMNS, else the terminal, else 80 columns, by"
        " leaving out STARTED, RUN ID, DUPS and TOKEN in that order, then shortening holders and keys with …)",
    )

    get = client_command("get", "show one guard", _client_command(_get))
    get.add_argument("key", help="the task key, <session_key>::<task_name>")
    get.add_argument("--json", action="store_true", help="print one JSON object")

    watch = client_command("watch", "print guard events as they happen (resumes by itself)", _client_command(_watch))
    watch.add_argument("--prefix", default="", help="only keys starting with this")
    watch.add_argument(
        "--from", dest="start_revision", type=int, default=0, metavar="REV", help="first revision (default: now)"
    )
    watch.add_argument("--snapshot", action="store_true", help="first print the current guards as SNAPSHOT events")
    watch.add_argument("--json", action="store_true", help="print one JSON object per line")

    approve = client_command(
        "approve-retry", "let a failed guard be acquired once more", _client_command(_approve_retry)
    )
    approve.add_argument("key")
    approve.add_argument("--reason", required=True)
    approve.add_argument("--approver", help="who approves (default: this user)")

    force = client_command(
        "force-release", "end a stuck run as CANCELLED; its holder loses the lease", _client_command(_force_release)
    )
    force.add_argument("key")
    force.add_argument("--reason", required=True)
    force.add_argument("--operator", help="who releases it (default: this user)")

    fence = client_command(
        "check-fence", "exit 0 while TOKEN's run holds the guard of KEY, else 1", _client_command(_check_fence)
    )
    fence.add_argument("key")
    fence.add_argument("token", type=int)

    run = client_command("run", "hold KEY's guard while a command runs: taskguard run KEY -- CMD ARGS...", cli_run.main)
    run.usage = "%(prog)s [options] KEY -- CMD [ARGS...]"
    run.add_argument("key")
    run.add_argument("--ttl", type=_duration, metavar="D", help="lease TTL, kept alive by heartbeats (default: none)")
    run.add_argument("--run-id", metavar="ID", help="the run's id (default: a new UUID)")
    run.add_argument("--holder", metavar="H", help="shown to runs refused meanwhile (default: host, pid and command)")
    run.add_argument(
        "--on-conflict",
        choices=("fail", "skip", "join", "wait", "queue", "keep-newest", "supersede"),
        default="fail",
        help="when another run holds the guard: exit 75 (fail); exit 0 (skip); wait for it to end and exit 0 if"
        " it succeeded (join, or its old name wait); wait in the key's FIFO queue and run CMD when its turn"
        " comes (queue); the same, but a newer keep-newest trigger takes this one's place, which exits 84"
        " (keep-newest); ask the running run to stop and run CMD first when it has, where the key's rule allows"
        " it (supersede; a superseded run's CMD gets SIGTERM). Queued positions go to stderr",
    )
    run.add_argument(
        "--max-wait",
        type=_duration,
        metavar="D",
        help="queue, keep-newest: give up after D in the queue, exit 83 (default: the key's max_wait, or none)",
    )

    dashboard = client_command("dashboard", "serve a live web page of the guards for operators", _dashboard)
    dashboard.description = (
        "Serve a live web page of the guards. The page shows nothing until it is given the viewer token, the"
        " contents of --viewer-token-file (created, mode 0600, with a random token when it does not exist);"
        " approve-retry and force-release also need the sidecar's operator token, pasted into the page."
        " Neither token ever goes in a URL or a log."
    )
    dashboard.add_argument(
        "--listen", default="127.0.0.1:8080", metavar="HOST:PORT", help="where to serve (default: 127.0.0.1:8080)"
    )
    dashboard.add_argument(
        "--viewer-token-file",
        metavar="FILE",
        help="the token the page must present to read anything; only this user may open the file"
        " (default: ~/.local/share/taskguard/dashboard.token)",
    )
    dashboard.add_argument("--allow-remote", action="store_true", help="allow a --listen that is not loopback")
    dashboard.add_argument(
        "--stale-after",
        type=_duration,
        default=120.0,
        metavar="D",
        help="mark RUNNING guards silent this long stale, like the sidecar's stale_after (default: 120s)",
    )

    completion = command(
        "completion",
        help="print the shell completion script: taskguard completion bash|zsh|fish",
        # One line: fish shows a command's description beside it when completing.
        description="Print the completion script for SHELL on stdout.",
        epilog="Install it where each shell looks for one, for example:\n"
        "  bash: taskguard completion bash > ~/.local/share/bash-completion/completions/taskguard\n"
        "  zsh:  taskguard completion zsh > ~/.zfunc/_taskguard   (with ~/.zfunc on $fpath, before compinit)\n"
        "  fish: taskguard completion fish > ~/.config/fish/completions/taskguard.fish\n"
        "The script is made from this taskguard's commands: make it again after an upgrade.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    completion.add_argument("shell", choices=COMPLETION_SHELLS, metavar="SHELL", help="bash, zsh or fish")
    completion.set_defaults(run=_completion)
    parser.description = "Task Guard sidecar and tools\n\n" + _grouped_commands(helps)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Everything after "--" is run's command: argparse cannot mix it with run's own options reliably.
    command: list[str] | None = None
    if "--" in arguments and "run" in arguments[: arguments.index("--")]:
        split = arguments.index("--")
        arguments, command = arguments[:split], arguments[split + 1 :]
    args = parser.parse_args(arguments)
    if args.command == "run":
        if not command:
            parser.error("run needs a command after --, as in: taskguard run KEY -- CMD ARGS...")
        args.argv = command
    code: int = args.run(args)
    return code
