"""The names users are told to install are the names the packages are built under."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
# Someone else's project holds this name on PyPI (0.2.3, looked up 2026-12-02/03).
TAKEN_ON_PYPI = "taskguard"


def _pyproject(path: str) -> dict[str, object]:
    return tomllib.loads((ROOT / path).read_text())["project"]  # type: ignore[no-any-return]


def _package(path: str) -> dict[str, object]:
    return json.loads((ROOT / path).read_text())  # type: ignore[no-any-return]


def _install_lines(tool: str) -> list[str]:
    """The names after ``<tool> install`` in the README's shell blocks (flags and paths left out)."""
    names = []
    for block in re.findall(r"```(?:sh|console)\n(.*?)```", README, re.S):
        for match in re.finditer(rf"^\$? *{tool} install ([^#\n]+)", block, re.M):
            names += [word for word in match.group(1).split() if not word.startswith(("-", ".", "/", "$"))]
    return names


def test_the_readme_installs_the_python_distributions_by_their_built_names() -> None:
    sidecar = _pyproject("pyproject.toml")
    client = _pyproject("clients/python/pyproject.toml")
    installed = _install_lines("pipx") + _install_lines("pip")
    assert sidecar["name"] in installed
    assert client["name"] in installed
    assert TAKEN_ON_PYPI not in installed
    assert TAKEN_ON_PYPI not in (sidecar["name"], client["name"])


def test_the_sidecar_depends_on_the_client_by_its_name() -> None:
    dependencies = _pyproject("pyproject.toml")["dependencies"]
    assert isinstance(dependencies, list)
    assert _pyproject("clients/python/pyproject.toml")["name"] in {Requirement(text).name for text in dependencies}


def test_the_readme_installs_the_node_client_by_its_package_name() -> None:
    package = _package("clients/node/package.json")
    assert _install_lines("npm") == [package["name"]]
    lock = _package("clients/node/package-lock.json")
    assert lock["name"] == package["name"]
    assert f'from "{package["name"]}"' in (ROOT / "clients/node/README.md").read_text()


def test_the_readme_names_the_openclaw_plugin_package() -> None:
    assert f"`{_package('clients/openclaw/package.json')['name']}`" in README


def test_the_readme_installs_the_openclaw_plugin_from_the_tarball_npm_pack_names() -> None:
    plugin = _package("clients/openclaw/package.json")
    tarball = f"{plugin['name']}-{plugin['version']}.tgz"
    assert f"openclaw plugins install ./.cache/packs/{tarball} " in README
    assert "--link" not in README
    client = _package("clients/node/package.json")
    assert f"npm install /path/to/taskguard/.cache/packs/{client['name']}-{client['version']}.tgz " in README


def test_no_package_is_named_in_a_scope_the_project_does_not_own() -> None:
    packages = ["clients/node", "clients/openclaw", "examples/gateway-scenario", "tests/openclaw/stall-plugin"]
    for folder in packages:
        name = _package(f"{folder}/package.json")["name"]
        assert isinstance(name, str) and not name.startswith("@"), f"{folder}: {name}"
