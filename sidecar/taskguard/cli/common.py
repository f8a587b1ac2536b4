"""What every ``taskguard`` client command shares: exit codes, showing the sidecar's text, reporting, connecting.

``cli.py`` (the commands) and ``cli_run.py`` (``taskguard run``) both build on this and on
nothing of each other, so imports go one way: cli -> cli_run -> cli_common, cli -> cli_common.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from taskguard import config
from taskguard_client import (
    AlreadyRunning,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    LockDelayed,
    NotFoundError,
    PermissionDeniedError,
    QueueFull,
    RetryRequiresApproval,
    Superseded,
    TaskGuardError,
    UnavailableError,
    WaitTimedOut,
)

# Exit codes: the sysexits(3) numbers where one fits, and the documented table in cli.EPILOG.
EXIT_OK = 0
EXIT_FENCE_INVALID = 1
EXIT_USAGE = 2
EXIT_INVALID_ARGUMENT = 65  # EX_DATAERR
EXIT_NOT_FOUND = 66  # EX_NOINPUT
EXIT_FAILED_PRECONDITION = 67
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE
EXIT_ERROR = 70  # EX_SOFTWARE
EXIT_ALREADY_RUNNING = 75  # EX_TEMPFAIL: try again later
EXIT_RETRY_REQUIRES_APPROVAL = 76
EXIT_PERMISSION_DENIED = 77  # EX_NOPERM
EXIT_LEASE_LOST = 79
EXIT_JOINED_RUN_FAILED = 80
EXIT_LOCK_DELAYED = 81
EXIT_QUEUE_FULL = 82
EXIT_WAIT_TIMED_OUT = 83
EXIT_SUPERSEDED = 84
EXIT_CANNOT_EXECUTE = 126
EXIT_COMMAND_NOT_FOUND = 127
EXIT_INTERRUPTED = 130


def shown(text: str) -> str:
    """``text`` made safe for a terminal: every character it would act on instead of showing is escaped.

    Everything printed that came from the sidecar goes through here. The sidecar refuses control
    characters in the text callers send, but an older database, an older sidecar or another
    implementation may still hand back a holder like ``"x\\x1b[2J\\nFAKE ROW"``; shown, it is inert.
    Escapes are Python's (``\\x1b``, ``\\n``, ``\\u202e``), so nothing is lost from view.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def iso(at: datetime | None) -> str:
    return at.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z") if at else "-"


def one_line(text: str) -> str:
    return " ".join(text.split())


def warn(message: str) -> None:
    """One line on stderr, ``taskguard: ...``: whatever the message quotes from the sidecar is shown inert."""
    print(f"taskguard: {shown(one_line(message))}", file=sys.stderr, flush=True)


def report(error: TaskGuardError, address: str, timeout_s: float) -> int:
    """Print one line for ``error`` on stderr; the exit code it maps to."""
    match error:
        case PermissionDeniedError():
            message, code = f"permission denied by the sidecar at {address}: {error}", EXIT_PERMISSION_DENIED
        case UnavailableError():
            message, code = f"the sidecar at {address} is not reachable: {error}", EXIT_UNAVAILABLE
        case DeadlineExceededError():
            message, code = f"the sidecar at {address} did not answer within {timeout_s:g}s", EXIT_UNAVAILABLE
        case InvalidArgumentError():
            message, code = f"invalid argument: {error}", EXIT_INVALID_ARGUMENT
        case NotFoundError():
            message, code = f"not found: {error}", EXIT_NOT_FOUND
        case FailedPreconditionError():
            message, code = str(error), EXIT_FAILED_PRECONDITION
        case AlreadyRunning():
            message, code = str(error), EXIT_ALREADY_RUNNING
        case RetryRequiresApproval():
            hint = f"taskguard approve-retry {error.task_key} --reason ..."
            message, code = f"{error} (approve it with: {hint})", EXIT_RETRY_REQUIRES_APPROVAL
        case LockDelayed():
            message, code = str(error), EXIT_LOCK_DELAYED
        case QueueFull():
            message, code = str(error), EXIT_QUEUE_FULL
        case WaitTimedOut():
            message, code = str(error), EXIT_WAIT_TIMED_OUT
        case Superseded():
            message, code = str(error), EXIT_SUPERSEDED
        case _:
            message, code = f"the sidecar at {address} failed: {error}", EXIT_ERROR
    warn(message)
    return code


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """Token and TLS credentials for the client, from flags or TASKGUARD_TOKEN(_FILE)."""
    options: dict[str, Any] = {
        "token": config.client_token(getattr(args, "token", None), getattr(args, "token_file", None))
    }
    ca = getattr(args, "tls_ca", None)
    if ca:
        cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
        options["credentials"] = grpc.ssl_channel_credentials(
            root_certificates=Path(ca).read_bytes(),
            private_key=Path(key).read_bytes() if key else None,
            certificate_chain=Path(cert).read_bytes() if cert else None,
        )
    return options
