"""The default socket folder has a well-known name: no one else may make it, own it, write in it or redirect it."""

from __future__ import annotations

import os
import random
import shutil
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from taskguard.config import ConfigError
from taskguard.front import listener
from taskguard.front.peercred import PeerCredFront
from taskguard_client import Client, PermissionDeniedError
from tests.other_user import NOBODY, needs_root, run_as, serve_or_exit, sidecar_env
from tests.support import SidecarProcess

pytestmark = needs_root


@pytest.fixture
def runtime_parent(workdir: Path) -> Path:
    """A folder like /tmp (sticky, everyone may create in it), to serve as XDG_RUNTIME_DIR."""
    workdir.chmod(0o755)
    parent = workdir / "xdg"
    parent.mkdir()
    parent.chmod(0o1777)
    return parent


def _as_nobody(*argv: str) -> None:
    result = run_as(NOBODY.pw_uid, NOBODY.pw_gid, list(argv))
    assert result.returncode == 0, result.stderr


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _serve_default(workdir: Path, runtime_parent: Path) -> tuple[int, str]:
    """``taskguard serve`` on its default socket, with ``runtime_parent`` as XDG_RUNTIME_DIR."""
    env = sidecar_env(XDG_RUNTIME_DIR=str(runtime_parent))
    return serve_or_exit(["--db", str(workdir / "tg.db")], env)


def test_the_sidecar_refuses_a_runtime_folder_another_user_made(workdir: Path, runtime_parent: Path) -> None:
    folder = runtime_parent / "taskguard"
    _as_nobody("/bin/mkdir", "-m", "0777", str(folder))
    code, stderr = _serve_default(workdir, runtime_parent)
    assert code == 1, stderr
    assert stderr.strip() == (
        f"taskguard: cannot start: listen: the socket folder {folder} belongs to uid {NOBODY.pw_uid}, "
        "not to this user (uid 0); remove it, or set listen to a socket in a folder of your own"
    )
    # Nothing was made in it, and it was neither taken over nor fixed up.
    assert list(folder.iterdir()) == []
    assert os.lstat(folder).st_uid == NOBODY.pw_uid and _mode(folder) == 0o777


def test_the_sidecar_refuses_its_own_runtime_folder_when_others_may_write_in_it(
    workdir: Path, runtime_parent: Path
) -> None:
    folder = runtime_parent / "taskguard"
    folder.mkdir()
    folder.chmod(0o777)
    code, stderr = _serve_default(workdir, runtime_parent)
    assert code == 1, stderr
    assert f"the socket folder {folder} has mode 0777: other users may write in it" in stderr
    assert list(folder.iterdir()) == []


def test_the_sidecar_refuses_a_symlink_in_place_of_its_runtime_folder(workdir: Path, runtime_parent: Path) -> None:
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    os.chown(elsewhere, NOBODY.pw_uid, NOBODY.pw_gid)
    folder = runtime_parent / "taskguard"
    _as_nobody("/bin/ln", "-s", str(elsewhere), str(folder))
    code, stderr = _serve_default(workdir, runtime_parent)
    assert code == 1, stderr
    assert f"the socket folder {folder} is a symbolic link" in stderr
    assert list(elsewhere.iterdir()) == []
    assert os.stat(elsewhere).st_uid == NOBODY.pw_uid and _mode(elsewhere) == 0o700


def test_the_sidecar_refuses_a_runtime_folder_whose_parent_another_user_owns(
    workdir: Path, runtime_parent: Path
) -> None:
    os.chown(runtime_parent, NOBODY.pw_uid, NOBODY.pw_gid)  # its owner may rename entries, sticky or not
    code, stderr = _serve_default(workdir, runtime_parent)
    assert code == 1, stderr
    assert f"the socket folder's parent {runtime_parent} belongs to uid {NOBODY.pw_uid}, who may rename it" in stderr


def test_a_missing_runtime_folder_is_made_private_and_served(
    workdir: Path, runtime_parent: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime_parent))  # the sidecar process inherits it
    default = runtime_parent / "taskguard" / "taskguard.sock"
    sidecar = SidecarProcess(workdir, ("--listen", f"unix:{default}"))  # the last --listen wins
    try:
        sidecar.start()
        assert sidecar.address == f"unix:{default}"
        folder = default.parent
        assert os.lstat(folder).st_uid == os.geteuid() and _mode(folder) == 0o700
        with Client(sidecar.address, timeout=10) as client:  # the client accepts it too
            assert list(client.list()) == []
        assert sidecar.terminate() == 0
    finally:
        sidecar.close()


@pytest.fixture
def fresh_uid() -> Iterator[int]:
    """A uid with no account and no /tmp/taskguard-<uid> yet: a sidecar's user."""
    while True:
        uid = random.randrange(40_000, 60_000)
        if not os.path.lexists(f"/tmp/taskguard-{uid}"):
            break
    yield uid
    shutil.rmtree(f"/tmp/taskguard-{uid}", ignore_errors=True)


def test_the_tmp_fallback_folder_made_by_another_user_is_refused(workdir: Path, fresh_uid: int) -> None:
    workdir.chmod(0o755)
    home = workdir / "home"
    home.mkdir()
    os.chown(home, fresh_uid, fresh_uid)
    folder = Path(f"/tmp/taskguard-{fresh_uid}")
    _as_nobody("/bin/mkdir", "-m", "0777", str(folder))
    env = sidecar_env(HOME=str(home))
    code, stderr = serve_or_exit(["--db", str(home / "tg.db")], env, user=(fresh_uid, fresh_uid))
    assert code == 1, stderr
    assert f"the socket folder {folder} belongs to uid {NOBODY.pw_uid}, not to this user (uid {fresh_uid})" in stderr
    assert list(folder.iterdir()) == []


def test_modes_are_never_set_through_a_symlink(workdir: Path) -> None:
    target = workdir / "target"
    target.write_text("x")
    target.chmod(0o600)
    link = workdir / "tg.sock"
    link.symlink_to(target)
    for path in (link, target):  # a symlink swapped in for the socket, or a file
        with pytest.raises(ConfigError, match="no longer the socket this sidecar made"):
            listener._set_mode(path, 0o666, NOBODY.pw_gid)
        assert _mode(target) == 0o600 and os.stat(target).st_gid == 0 and _mode(link) == 0o777


# --- clients ----------------------------------------------------------------------------


def test_the_python_client_refuses_a_default_folder_another_user_made(
    runtime_parent: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = runtime_parent / "taskguard"
    _as_nobody("/bin/mkdir", "-m", "0777", str(folder))
    # The other user's socket, where this client's calls and token would go.
    trap = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    trap.bind(str(folder / "taskguard.sock"))
    trap.listen(8)
    trap.setblocking(False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime_parent))
    monkeypatch.delenv("TASKGUARD_ADDR", raising=False)
    try:
        with pytest.raises(PermissionDeniedError, match=f"the socket folder {folder} belongs to uid"):
            with Client(timeout=2, token="secret-token") as client:
                client.list()
        with pytest.raises(BlockingIOError):
            trap.accept()  # nobody connected to it
    finally:
        trap.close()


def test_the_python_client_claims_a_missing_default_folder(
    runtime_parent: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime_parent))
    monkeypatch.delenv("TASKGUARD_ADDR", raising=False)
    with Client(timeout=1):
        pass
    folder = runtime_parent / "taskguard"
    assert os.lstat(folder).st_uid == os.geteuid() and _mode(folder) == 0o700
    # A symlink there is refused, not followed.
    folder.rmdir()
    folder.symlink_to(runtime_parent)
    with pytest.raises(PermissionDeniedError, match="is not a folder"):
        Client(timeout=1)


def test_a_relay_folder_another_user_made_beside_a_shared_socket_is_refused(
    sidecar_factory: Callable[..., SidecarProcess], workdir: Path
) -> None:
    workdir.chmod(0o1777)  # a folder others may create in, like /tmp
    planted = workdir / ".tg.sock.d"
    _as_nobody("/bin/mkdir", "-m", "0700", str(planted))
    sidecar = sidecar_factory("--socket-mode", "0666", start=False)
    with pytest.raises(RuntimeError, match="sidecar exited with 1"):
        sidecar.start()
    assert f"listen: {planted} (the relay's private folder) is not a 0700 folder of this user's" in sidecar.log()
    assert os.lstat(planted).st_uid == NOBODY.pw_uid


def test_a_relayed_caller_whose_credentials_the_kernel_did_not_give_has_no_uid(workdir: Path) -> None:
    front = PeerCredFront(workdir / "public.sock", workdir / "inner.sock", workdir / "peers")
    front._uids = {"/x/1.peer": -1, "/x/2.peer": 1000}
    assert front.uid_for("unix:/x/1.peer") is None
    assert front.uid_for("unix:/x/2.peer") == 1000
