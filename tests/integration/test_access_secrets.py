"""Secrets given where other users can read them, and tokens sent in plaintext, are warned about at start."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import SidecarProcess

OPERATOR_TOKEN = "op-1c9e3a7f5b2d4e6081"
HOLDER_TOKEN = "holder-8d2f6b0a4c1e3f57"


def test_a_token_given_as_a_flag_is_warned_about_naming_the_setting_and_the_alternatives(
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    sidecar = sidecar_factory("--operator-token", OPERATOR_TOKEN, "--holder-token", HOLDER_TOKEN)
    assert sidecar.terminate() == 0
    log = sidecar.log()
    assert (
        "operator_token is given on the command line (--operator-token), which every local user can read in "
        "/proc/<pid>/cmdline; put it in a file of mode 0600 named by operator_token_file (--operator-token-file), "
        "or in the environment variable TASKGUARD_OPERATOR_TOKEN"
    ) in log
    assert "holder_token is given on the command line (--holder-token)" in log and "holder_token_file" in log
    assert sum(" WARNING taskguard: " in line for line in log.splitlines()) == 2
    assert OPERATOR_TOKEN not in log and HOLDER_TOKEN not in log


def test_tokens_from_the_environment_or_a_private_file_are_not_warned_about(
    sidecar_factory: Callable[..., SidecarProcess], workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = workdir / "operator.token"
    token_file.write_text(OPERATOR_TOKEN)
    token_file.chmod(0o600)
    monkeypatch.setenv("TASKGUARD_HOLDER_TOKEN", HOLDER_TOKEN)  # the sidecar process inherits it
    sidecar = sidecar_factory("--operator-token-file", str(token_file))
    assert sidecar.terminate() == 0
    assert "on the command line" not in sidecar.log() and "chmod 600" not in sidecar.log()


def test_a_token_file_other_users_may_read_is_warned_about(
    sidecar_factory: Callable[..., SidecarProcess], workdir: Path
) -> None:
    token_file = workdir / "operator.token"
    token_file.write_text(OPERATOR_TOKEN)
    token_file.chmod(0o644)
    sidecar = sidecar_factory("--operator-token-file", str(token_file))
    assert sidecar.terminate() == 0
    assert f"operator_token_file {token_file} has mode 0644: other users may read it; chmod 600 it" in sidecar.log()


def test_serving_remote_clients_without_tls_is_warned_about_loudly(
    sidecar_factory: Callable[..., SidecarProcess],
) -> None:
    sidecar = sidecar_factory("--listen", "0.0.0.0:0", "--allow-remote")
    assert sidecar.terminate() == 0
    [warning] = [line for line in sidecar.log().splitlines() if "WITHOUT TLS" in line]
    assert " WARNING " in warning
    assert "listen 0.0.0.0:0 serves other hosts WITHOUT TLS: tokens, lease_ids and every guard cross the network" in (
        warning
    )
    assert "set tls_cert and tls_key" in warning


def test_remote_clients_over_tls_and_loopback_plaintext_get_no_such_warning(
    sidecar_factory: Callable[..., SidecarProcess], pki: dict[str, Path]
) -> None:
    tls = sidecar_factory(
        "--listen",
        "0.0.0.0:0",
        "--allow-remote",
        "--tls-cert",
        str(pki["server_cert"]),
        "--tls-key",
        str(pki["server_key"]),
    )
    loopback = sidecar_factory("--listen", "127.0.0.1:0", "--db", str(pki["ca"].parent / "loopback.db"))
    for sidecar in (tls, loopback):
        assert sidecar.terminate() == 0
        assert "WITHOUT TLS" not in sidecar.log()
