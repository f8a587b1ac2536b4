"""How every call is made: the address, channel options, trace metadata, deadlines and retries."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import os
import random
import secrets
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from taskguard_client import _errors
from taskguard_client._errors import DeadlineExceededError, StatusError, UnavailableError

_T = TypeVar("_T")

ADDRESS_ENV = "TASKGUARD_ADDR"

# A local sidecar is cheap to reconnect to: try again soon after it comes back,
# instead of gRPC's default of 1 s growing to 2 min. While the channel waits out
# its backoff, calls fail at once with the last connect error, so the cap must
# stay well inside RetryPolicy's retries (about 0.75 s on average): at 2 s, six
# in eight first calls after a sidecar restart still failed.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 250),
)

# How long a Hold keeps trying to resume its lease after its stream broke: the
# sidecar's default resume grace (it abandons the run when that passes).
RESUME_WINDOW_S = 15.0


def default_address(environ: Mapping[str, str] | None = None) -> str:
    """``$TASKGUARD_ADDR``, else the sidecar's default socket.

    That is ``unix:$XDG_RUNTIME_DIR/taskguard/taskguard.sock``, or
    ``unix:/tmp/taskguard-<uid>/taskguard.sock`` without ``XDG_RUNTIME_DIR``:
    the same rule as the sidecar's own default (``taskguard/config.py``),
    repeated here because this package must not import the sidecar.
    """
    environ = os.environ if environ is None else environ
    if environ.get(ADDRESS_ENV):
        return environ[ADDRESS_ENV]
    return f"unix:{_default_folder(environ) / 'taskguard.sock'}"


def _default_folder(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "taskguard" if base else Path(f"/tmp/taskguard-{os.getuid()}")


def check_default_socket(address: str, environ: Mapping[str, str] | None = None) -> None:
    """Refuse (PermissionDeniedError) to talk to the default socket when its folder is not this user's own.

    The default folder has a well-known name, so another user could make it
    first and put a socket of theirs in it, to receive this client's calls and
    tokens. As the sidecar does, the client uses that folder only when it is
    a real folder (not a symlink) of this user's that no one else may write;
    when it is missing, the client makes it (0700), so that nobody else can
    take the name before the sidecar starts. Other addresses are the caller's
    choice and are not checked.
    """
    environ = os.environ if environ is None else environ
    folder = _default_folder(environ)
    if not address.startswith("unix:") or Path(address.removeprefix("unix:").removeprefix("//")).parent != folder:
        return
    try:
        os.mkdir(folder, 0o700)  # never follows a symlink: one at `folder` is EEXIST
    except FileExistsError:
        pass
    except OSError:
        return  # its parent is missing or not writable: nobody else can make it there either
    me = os.geteuid()
    st = os.lstat(folder)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        problem = "is not a folder (a symbolic link?)"
    elif st.st_uid != me:
        problem = f"belongs to uid {st.st_uid}, not to this user (uid {me})"
    elif st.st_mode & 0o022:
        problem = f"has mode {stat.S_IMODE(st.st_mode):04o}: other users may write in it"
    else:
        return
    raise _errors.PermissionDeniedError(
        grpc.StatusCode.PERMISSION_DENIED,
        f"not connecting to {address}: the socket folder {folder} {problem}, so another user may be "
        "listening there; remove it, or set TASKGUARD_ADDR",
    )


# Where the sidecar cannot tell callers apart (they share a token, or have
# none), it hands a run's lease back only to a retry that carries the same
# retry_secret as the run's first attempt. The secret is an HMAC of the key
# and run_id under a key this process draws once: every attempt, and every
# later acquire of the same run_id from this process, sends the same secret,
# and nobody else can compute it.
_RETRY_SECRET_KEY = secrets.token_bytes(32)


def retry_secret(task_key: str, run_id: str) -> str:
    digest = hmac.new(_RETRY_SECRET_KEY, f"{task_key}\0{run_id}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def default_holder() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of calls that are safe to repeat, when the sidecar answers UNAVAILABLE.

    Delays grow exponentially from ``initial_backoff_s`` up to
    ``max_backoff_s``, each drawn uniformly below its cap ("full jitter", from
    the AWS Architecture Blog's "Exponential Backoff and Jitter"), so clients
    that lost the sidecar together do not come back together.
    ``max_attempts`` counts the first attempt. Watches and resuming Hold
    streams use the delays without the attempt limit.
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def delays(self) -> Iterator[float]:
        """Endless jittered delays, one before each retry."""
        cap = self.initial_backoff_s
        while True:
            yield random.uniform(0, cap)
            cap = min(cap * self.multiplier, self.max_backoff_s)


@functools.cache
def _propagator_inject() -> Callable[[dict[str, str]], None] | None:
    # OpenTelemetry is optional: when it is installed, the caller's trace
    # continues in the sidecar; when it is not, this costs one failed import.
    try:
        from opentelemetry import propagate
    except ImportError:
        return None
    return propagate.inject


def metadata(token: str | None = None) -> tuple[tuple[str, str], ...]:
    """A call's metadata: the bearer ``token`` if any, and the current OpenTelemetry context.

    The context goes as ``traceparent``/``tracestate`` (whatever the configured
    propagator writes), only when OpenTelemetry is installed and a span is current.
    """
    carrier: dict[str, str] = {}
    inject = _propagator_inject()
    if inject is not None:
        inject(carrier)
    if token:
        carrier["authorization"] = f"Bearer {token}"
    return tuple(carrier.items())


def _retryable(error: StatusError, deadline: float | None) -> bool:
    # Not PermissionDeniedError (a socket we may not open), although gRPC says UNAVAILABLE for it.
    # Against a deadline an attempt that timed out (waiting for the sidecar to come back) is retried too.
    return isinstance(error, UnavailableError) or (deadline is not None and isinstance(error, DeadlineExceededError))


async def retry_async(attempt: Callable[[], Awaitable[_T]], policy: RetryPolicy, deadline: float | None = None) -> _T:
    """Run ``attempt`` until it succeeds or fails for good; gRPC failures become typed errors.

    With ``deadline`` (a ``time.monotonic()`` value) UNAVAILABLE and
    DEADLINE_EXCEEDED are retried until then instead of ``policy.max_attempts`` times.
    """
    delays = policy.delays()
    tries = 0
    while True:
        tries += 1
        try:
            return await attempt()
        except (grpc.RpcError, StatusError) as caught:
            error = _typed(caught)
            delay = next(delays)
            if not _retryable(error, deadline) or not _may_retry(tries, delay, policy, deadline):
                if error is caught:
                    raise
                raise error from caught
        await asyncio.sleep(delay)


def retry_sync(attempt: Callable[[], _T], policy: RetryPolicy, deadline: float | None = None) -> _T:
    """``retry_async`` for the blocking client."""
    delays = policy.delays()
    tries = 0
    while True:
        tries += 1
        try:
            return attempt()
        except (grpc.RpcError, StatusError) as caught:
            error = _typed(caught)
            delay = next(delays)
            if not _retryable(error, deadline) or not _may_retry(tries, delay, policy, deadline):
                if error is caught:
                    raise
                raise error from caught
        time.sleep(delay)


def _typed(error: grpc.RpcError | StatusError) -> StatusError:
    return error if isinstance(error, StatusError) else _errors.from_rpc_error(error)


def _may_retry(tries: int, delay: float, policy: RetryPolicy, deadline: float | None) -> bool:
    if deadline is not None:
        return time.monotonic() + delay < deadline
    return tries < policy.max_attempts
