"""What the ``taskguard`` command offers a person at a shell: grouped help, completion in bash, zsh and fish,
and an ``ls`` that fits the terminal. Each through the real command (``python -m taskguard``), the shells
real too: bash's completion function called as bash calls it, zsh completing in its line editor on a
pseudo-terminal, fish's own ``complete -C``.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskguard.cli import main as cli
from taskguard_client import Client
from tests.support import ROOT, SidecarProcess

TIMEOUT_S = 15.0

# Half-typed command lines, and what completing the last word must offer (bash, fish) or turn it into (zsh).
COMPLETIONS = {
    ("taskguard", "l"): {"ls"},
    ("taskguard", "approve-r"): {"approve-retry"},
    ("taskguard", "ls", "--stat"): {"--state"},
    ("taskguard", "--addr", "unix:/tmp/x.sock", "ls", "--stat"): {"--state"},
    ("taskguard", "run", "--on-conflict", "w"): {"wait"},
    ("taskguard", "completion", "f"): {"fish"},
}


def _env(**extra: str) -> dict[str, str]:
    # COLUMNS is what decides ls's width when set: the tests that are not about it must not inherit one.
    env = {name: value for name, value in os.environ.items() if name not in ("COLUMNS", "LINES")}
    return {**env, **extra}


def _taskguard(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskguard", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env or _env(),
        timeout=TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three scripts, as `taskguard completion SHELL` prints them, each where its shell looks for it."""
    folder = tmp_path_factory.mktemp("completion")
    for shell, name in (("bash", "taskguard.bash"), ("zsh", "_taskguard"), ("fish", "taskguard.fish")):
        printed = _taskguard("completion", shell)
        assert printed.returncode == 0, printed.stderr
        (folder / name).write_text(printed.stdout)
    return folder


def _commands() -> set[str]:
    """Every subcommand the parser has, found on the parser itself rather than in COMMAND_GROUPS."""
    parser = cli.build_parser()
    (subparsers,) = (action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return set(subparsers.choices)


# --- help -----------------------------------------------------------------------------------


def test_help_lists_every_command_once_under_its_group() -> None:
    shown = _taskguard("--help")
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    headings = [title for title, _ in cli.COMMAND_GROUPS]
    assert [line[:-1] for line in text.splitlines() if line[:-1] in headings] == headings
    commands = _commands()
    listed: list[str] = []
    for title, _ in cli.COMMAND_GROUPS:
        section = text.split(f"\n{title}:\n", 1)[1].split("\n\n", 1)[0]
        listed += [line.split()[0] for line in section.splitlines()]
    assert sorted(listed) == sorted(commands)
    # argparse's own block of every command in one "{serve,doctor,...}" list is gone.
    assert "{serve" not in text and "positional arguments" not in text


# --- completion -----------------------------------------------------------------------------

BASH_DRIVER = r"""
source "$1"
# The function the script registered for taskguard, called as bash's programmable completion calls it.
function=$(complete -p taskguard | sed -E 's/.* -F ([^ ]+) .*/\1/')
shift
COMP_WORDS=("$@")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
COMP_LINE="$*"
COMP_POINT=${#COMP_LINE}
COMPREPLY=()
"$function" taskguard "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
"""


def _bash_complete(scripts: Path, *words: str) -> set[str]:
    done = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", BASH_DRIVER, "driver", str(scripts / "taskguard.bash"), *words],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0 and not done.stderr, done.stderr
    return {line for line in done.stdout.splitlines() if line}


def test_bash_completes_commands_options_and_choices(scripts: Path) -> None:
    assert _bash_complete(scripts, "taskguard", "") == _commands()
    for words, expected in COMPLETIONS.items():
        assert _bash_complete(scripts, *words) == expected, words
    assert _bash_complete(scripts, "taskguard", "ls", "--sta") == {"--state", "--stale"}
    # Files after the options that name one.
    assert _bash_complete(scripts, "taskguard", "ls", "--tls-ca", str(scripts / "taskguard.b")) == {
        str(scripts / "taskguard.bash")
    }


def _fish_complete(scripts: Path, line: str) -> set[str]:
    done = subprocess.run(
        ["fish", "--no-config", "-c", 'source $argv[1]; complete -C"$argv[2]"', str(scripts / "taskguard.fish"), line],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0 and not done.stderr, done.stderr
    return {entry.split("\t", 1)[0] for entry in done.stdout.splitlines()}


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed (.ci/dev.py installs Debian's)")
def test_fish_completes_commands_options_and_choices(scripts: Path) -> None:
    for words, expected in COMPLETIONS.items():
        assert _fish_complete(scripts, " ".join(words)) == expected, words
    assert _fish_complete(scripts, "taskguard ls --sta") == {"--state", "--stale"}


class _Terminal:
    """An interactive shell on a pseudo-terminal, read until what a test waits for shows up on it."""

    def __init__(self, argv: list[str], env: dict[str, str], columns: int = 200) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        self.seen = b""

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def until(self, pattern: bytes) -> re.Match[bytes]:
        deadline = time.monotonic() + TIMEOUT_S
        while (found := re.search(pattern, self.seen)) is None:
            ready, _, _ = select.select([self.master], [], [], max(deadline - time.monotonic(), 0))
            assert ready, f"waited for {pattern!r}; the terminal showed {self.seen[-400:]!r}"
            self.seen += os.read(self.master, 65536)
        self.seen = self.seen[found.end() :]
        return found

    def close(self) -> None:
        self.process.kill()
        self.process.wait(TIMEOUT_S)
        os.close(self.master)


@pytest.fixture
def zsh(scripts: Path, tmp_path: Path) -> Iterator[_Terminal]:
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed (.ci/dev.py installs Debian's)")
    terminal = _Terminal(["zsh", "-f", "-i"], {"PATH": os.environ["PATH"], "TERM": "dumb", "HOME": str(tmp_path)})
    # The script goes where zsh's compinit looks for completion functions: a folder on $fpath. Ctrl-X then
    # prints the edited line between markers (split in the source, so the echo of this line never matches).
    terminal.send(
        f"fpath=({scripts} $fpath); autoload -Uz compinit; compinit -u -d {tmp_path}/.zcompdump;"
        ' show() { print -r -- "<""<$BUFFER>"">"; BUFFER= }; zle -N show; bindkey \'^X\' show;'
        ' print RE""ADY\n'
    )
    terminal.until(rb"READY")
    yield terminal
    terminal.close()


def test_zsh_completes_commands_options_and_choices(zsh: _Terminal) -> None:
    for words, expected in COMPLETIONS.items():
        (completed,) = expected
        zsh.send(" ".join(words) + "\t\x18")
        line = zsh.until(rb"<<(.*?)>>").group(1).decode()
        assert line == " ".join((*words[:-1], completed)) + " ", words


# --- ls in a terminal's width ---------------------------------------------------------------


@pytest.fixture(scope="module")
def listed(module_sidecar: SidecarProcess) -> Iterator[tuple[str, str, str]]:
    """A guard whose key and holder are far too long for 80 columns: its prefix, key and run id."""
    prefix = f"agent:ops:{uuid.uuid4()}"
    key = f"{prefix}-{uuid.uuid4()}::nightly-report-{uuid.uuid4().hex[:8]}"
    with Client(module_sidecar.address) as client:
        lease = client.acquire(key, ttl=600, holder="build-host-17 pid 48213 python -m reports.nightly --all")
        yield prefix, key, lease.run_id
        client.release(lease.lease_id, "SUCCEEDED")


def _ls(address: str, prefix: str, *args: str, env: dict[str, str] | None = None) -> list[str]:
    done = _taskguard("--addr", address, "ls", "--prefix", prefix, *args, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_ls_fits_80_columns_when_piped_and_wide_shows_everything(
    module_sidecar: SidecarProcess, listed: tuple[str, str, str]
) -> None:
    prefix, key, run_id = listed
    header, row = _ls(module_sidecar.address, prefix)
    assert max(len(header), len(row)) <= 80, (header, row)
    assert header.split() == ["KEY", "STATE", "HOLDER", "AGE", "EXPIRES", "QUEUE"]
    shown_key = row.split()[0]
    task_name = key.rpartition("::")[2]
    assert shown_key.endswith("…::" + task_name) and key.startswith(shown_key.split("…")[0])
    assert row.split()[1] == "RUNNING" and "build-host-17" in row and run_id not in row

    header, row = _ls(module_sidecar.address, prefix, "--wide")
    assert header.split() == [
        "KEY",
        "STATE",
        "RUN",
        "ID",
        "HOLDER",
        "STARTED",
        "AGE",
        "EXPIRES",
        "QUEUE",
        "RUNS",
        "TOKEN",
        "DUPS",
    ]
    assert row.split()[:3] == [key, "RUNNING", run_id] and "python -m reports.nightly --all" in row
    assert len(row) > 80


def test_ls_takes_the_width_of_columns_or_of_its_terminal(
    module_sidecar: SidecarProcess, listed: tuple[str, str, str]
) -> None:
    prefix, key, run_id = listed
    header, row = _ls(module_sidecar.address, prefix, env=_env(COLUMNS="250"))
    assert header.split()[:4] == ["KEY", "STATE", "RUN", "ID"] and row.split()[:3] == [key, "RUNNING", run_id]

    terminal = _Terminal(
        [sys.executable, "-m", "taskguard", "--addr", module_sidecar.address, "ls", "--prefix", prefix],
        _env(),
        columns=60,
    )
    try:
        shown = terminal.until(rb"(KEY[^\r\n]*\r\n[^\r\n]*\r\n)").group(1).decode()
        assert terminal.process.wait(TIMEOUT_S) == 0
    finally:
        terminal.close()
    header, row = shown.splitlines()
    assert header.split() == ["KEY", "STATE", "HOLDER", "AGE", "EXPIRES", "QUEUE"]
    head, _, tail = row.split()[0].partition("…")
    assert len(row) <= 60 and key.startswith(head) and key.endswith(tail) and len(tail) > len(head), row
