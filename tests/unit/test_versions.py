"""One version per distribution, in its package; the sidecar asks for a client it can serve; --version says both."""

from __future__ import annotations

import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import taskguard
import taskguard_client
from taskguard.cli import main as cli
from tests.support import ROOT


def _project(path: str) -> dict[str, object]:
    document = tomllib.loads((ROOT / path).read_text())
    assert isinstance(document, dict)
    return document


def _client_requirement() -> Requirement:
    client_name = _project("clients/python/pyproject.toml")["project"]["name"]  # type: ignore[index]
    dependencies = _project("pyproject.toml")["project"]["dependencies"]  # type: ignore[index]
    found = [Requirement(text) for text in dependencies if Requirement(text).name == client_name]
    assert len(found) == 1, dependencies
    return found[0]


@pytest.mark.parametrize(
    ("pyproject", "attribute"),
    [("pyproject.toml", "taskguard.__version__"), ("clients/python/pyproject.toml", "taskguard_client.__version__")],
)
def test_each_distribution_takes_its_version_from_its_package(pyproject: str, attribute: str) -> None:
    document = _project(pyproject)
    project = document["project"]
    assert isinstance(project, dict)
    assert "version" not in project and project["dynamic"] == ["version"]
    assert document["tool"]["setuptools"]["dynamic"]["version"] == {"attr": attribute}  # type: ignore[index]


def test_the_sidecar_depends_on_the_client_of_its_own_version() -> None:
    assert _client_requirement().specifier.contains(taskguard_client.__version__)


def test_the_sidecar_refuses_a_client_of_the_next_incompatible_version() -> None:
    client = Version(taskguard_client.__version__)
    # Before 1.0 a minor version may break (PEP 440's ~= and semver's 0.x agree); after it, a major one.
    incompatible = f"0.{client.minor + 1}.0" if client.major == 0 else f"{client.major + 1}.0.0"
    assert not _client_requirement().specifier.contains(incompatible)


def test_taskguard_version_prints_the_sidecars_version_and_the_clients(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == (
        f"taskguard-sidecar {taskguard.__version__}, taskguard-sidecar-client {taskguard_client.__version__}\n"
    )
