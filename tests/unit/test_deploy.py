"""The deployment files say what the sidecar actually accepts."""

from __future__ import annotations

import argparse
import configparser
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import yaml

from taskguard import config
from taskguard.cli import main as cli
from tests.support import ROOT

DEPLOY = ROOT / "deploy"


def _serve_args(argv: list[str]) -> argparse.Namespace:
    return cli.build_parser().parse_args(["serve", *argv])


def test_the_sample_config_is_valid_and_matches_the_unit(tmp_path: Path) -> None:
    settings = config.load(_serve_args(["--config", str(DEPLOY / "taskguard.toml")]), environ={})
    assert settings.listen == "unix:/run/taskguard/taskguard.sock"
    assert settings.db == Path("/var/lib/taskguard/taskguard.db")
    assert settings.socket_mode == 0o660 and settings.operator_uids == (0,)
    unit = _unit()
    assert settings.listen.startswith("unix:/run/" + unit["Service"]["RuntimeDirectory"] + "/")
    assert str(settings.db).startswith("/var/lib/" + unit["Service"]["StateDirectory"] + "/")


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "systemd" / "taskguard.service")
    return parser


def test_the_systemd_unit_is_hardened_and_verifies(tmp_path: Path) -> None:
    service = _unit()["Service"]
    for directive, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "RuntimeDirectory": "taskguard",
        "StateDirectory": "taskguard",
        "KillSignal": "SIGTERM",
        "CapabilityBoundingSet": "",
    }.items():
        assert service[directive] == value, directive
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    text = (DEPLOY / "systemd" / "taskguard.service").read_text()
    unit = tmp_path / "taskguard.service"
    unit.write_text(text.replace("/opt/taskguard/venv/bin/taskguard", str(Path(sys.executable).parent / "taskguard")))
    verified = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert verified.returncode == 0, verified.stderr
    assert "taskguard.service" not in verified.stderr, verified.stderr


def _manifest() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((DEPLOY / "k8s" / "sidecar.yaml").read_text())
    return document


def test_the_kubernetes_manifest_runs_a_native_sidecar_sharing_the_socket() -> None:
    pod = _manifest()["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    args = dict(arg.removeprefix("--").split("=", 1) for arg in sidecar["args"])
    settings = config.load(_serve_args([f"--{k}={v}" for k, v in args.items()]), environ={})
    health_port = int(settings.health_listen.rpartition(":")[2])
    for probe in ("startupProbe", "livenessProbe"):
        assert sidecar[probe]["grpc"]["port"] == health_port
    socket_path = settings.listen.removeprefix("unix:")
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    sidecar_mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    (app,) = pod["containers"]
    app_mounts = {m["name"]: m["mountPath"] for m in app["volumeMounts"]}
    shared = [name for name in app_mounts if sidecar_mounts.get(name) == app_mounts[name]]
    assert shared and all("emptyDir" in volumes[name] for name in shared)
    assert any(socket_path.startswith(app_mounts[name] + "/") for name in shared)
    env = {item["name"]: item["value"] for item in app["env"]}
    assert env["TASKGUARD_ADDR"] == settings.listen
    assert str(settings.db).startswith(sidecar_mounts["taskguard-state"] + "/")


def test_the_container_file_starts_the_sidecar_as_non_root_with_a_health_port() -> None:
    text = (DEPLOY / "container" / "Containerfile").read_text()
    assert 'ENTRYPOINT ["/opt/taskguard/bin/taskguard", "serve"]' in text
    assert "USER 10001:10001" in text
    assert '"--health-listen", "0.0.0.0:8081"' in text and "EXPOSE 8081" in text
    manifest_image_user = _manifest()["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert manifest_image_user == 10001


# Every instruction a Containerfile may have (the Dockerfile reference; buildah and podman take the same).
INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip


def test_the_container_file_parses_and_copies_only_what_the_checkout_has() -> None:
    """What a build checks first, without a builder: tests/integration/test_container.py builds and runs it."""
    commands = dockerfile.parse_file(str(DEPLOY / "container" / "Containerfile"))
    assert {command.cmd.upper() for command in commands} <= INSTRUCTIONS, [command.cmd for command in commands]
    first = next(command for command in commands if command.cmd.upper() != "ARG")
    assert first.cmd.upper() == "FROM", first.original
    stages = [command.value[2] for command in commands if command.cmd.upper() == "FROM" and len(command.value) == 3]
    for command in commands:
        if command.cmd.upper() in ("ENTRYPOINT", "CMD", "VOLUME"):
            assert command.json, f"{command.original!r} is not in exec (JSON) form: signals would go to a shell"
        if command.cmd.upper() not in ("COPY", "ADD"):
            continue
        source_stage = [flag.split("=", 1)[1] for flag in command.flags if flag.startswith("--from=")]
        if source_stage:
            assert source_stage[0] in stages, command.original
            continue
        *sources, _ = command.value
        for source in sources:
            assert (ROOT / source).exists(), f"line {command.start_line}: {source} is not in the checkout"
            assert not Path(source).is_absolute() and ".." not in Path(source).parts, source
