"""Where calls go and what they carry: the address and its socket folder, channel options, metadata, retry secrets."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import secrets
import socket
import stat
from collections.abc import Callable, Mapping
from pathlib import Path

import grpc

from taskguard_client import _errors

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
