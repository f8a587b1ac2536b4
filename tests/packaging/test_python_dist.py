"""The wheels `.ci/dev.py dist` builds work where users put them: a fresh venv, a client-only venv, pipx.

The artifacts are built once for the module, and each install goes into a place of its own, through pip's usual
cache: the sidecar's venv is made without pip (this interpreter's pip installs into it with ``--python``); the
client's venv and pipx run the README's lines as typed. Nothing of the checkout is on the installed programs'
path: they run from their own folders, the interpreters isolated (``-I``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
import uuid
import venv
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

import taskguard
import taskguard_client
from tests.support import ROOT, SidecarProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SIDECAR = "taskguard-sidecar"
CLIENT = "taskguard-sidecar-client"
# Where each distribution's package lives in the checkout, and its import name.
PACKAGES = {SIDECAR: ROOT / "sidecar" / "taskguard", CLIENT: ROOT / "clients" / "python" / "taskguard_client"}
VERSIONS = {SIDECAR: taskguard.__version__, CLIENT: taskguard_client.__version__}


def _env() -> dict[str, str]:
    """This environment without what would let an installed program see the checkout or this venv."""
    hidden = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")
    return {name: value for name, value in os.environ.items() if name not in hidden}


def _run(*command: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    completed = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, cwd=cwd, env=env or _env(), check=False
    )
    assert completed.returncode == 0, (
        f"{command} exited {completed.returncode}:\n{completed.stdout}\n{completed.stderr}"
    )
    return completed.stdout


@dataclass(frozen=True)
class Venv:
    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def script(self, name: str) -> Path:
        return self.root / "bin" / name

    def install(self, *requirements: str | Path) -> None:
        pip = (sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", "--python", self.python)
        _run(*pip, "install", *requirements)

    def run_python(self, code: str, *args: str) -> str:
        return _run(self.python, "-I", "-c", code, *args, cwd=self.root)

    def distributions(self) -> dict[str, Message]:
        """Name -> metadata of everything installed here, as this venv's own interpreter sees it."""
        listing = self.run_python(
            "import importlib.metadata as m, json;"
            "print(json.dumps([d.read_text('METADATA') for d in m.distributions()]))"
        )
        found = [HeaderParser().parsestr(text) for text in json.loads(listing)]
        return {_canonical(metadata["Name"]): metadata for metadata in found}


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _new_venv(root: Path, python: str | Path = sys.executable, with_pip: bool = False) -> Venv:
    if Path(python) == Path(sys.executable):
        venv.EnvBuilder(with_pip=with_pip, clear=True).create(root)
    else:
        _run(python, "-m", "venv", *([] if with_pip else ["--without-pip"]), root)
    return Venv(root)


def _readme_line(tool: str) -> str:
    """The README's first-screen Python install line that runs ``tool``, without its comment."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- install-python: begin -->", 1)[1].split("<!-- install-python: end -->", 1)[0]
    lines = [line.split("#", 1)[0].strip() for line in block.splitlines() if line.startswith(f"{tool} install ")]
    assert len(lines) == 1, block
    return lines[0]


def _shell(line: str, cwd: Path, path_first: Path, env: dict[str, str] | None = None) -> str:
    """``line`` as a user types it, in ``cwd``, with ``path_first`` first on PATH."""
    env = env or _env()
    return _run("bash", "-c", line, cwd=cwd, env={**env, "PATH": f"{path_first}{os.pathsep}{env.get('PATH', '')}"})


@dataclass(frozen=True)
class Artifacts:
    folder: Path
    wheels: dict[str, Path]
    sdists: dict[str, Path]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    folder = tmp_path_factory.mktemp("artifacts") / "dist"  # the README's lines name it so
    _run(sys.executable, ROOT / ".ci" / "dev.py", "dist", "--outdir", folder, cwd=ROOT)
    stems = {name: f"{name.replace('-', '_')}-{VERSIONS[name]}" for name in PACKAGES}
    return Artifacts(
        folder,
        {name: folder / f"{stem}-py3-none-any.whl" for name, stem in stems.items()},
        {name: folder / f"{stem}.tar.gz" for name, stem in stems.items()},
    )


@pytest.fixture(scope="module")
def installed(artifacts: Artifacts, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    """A fresh venv with the two wheels and nothing else of ours: `pip install dist/*.whl`."""
    environment = _new_venv(tmp_path_factory.mktemp("venv") / "sidecar")
    environment.install(*sorted(artifacts.folder.glob("*.whl")))
    return environment


@pytest.fixture(scope="module")
def served(installed: Venv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    """The installed `taskguard serve`, on a socket and a database of its own."""
    workdir = tmp_path_factory.mktemp("served")
    sidecar = SidecarProcess(workdir, command=(str(installed.script("taskguard")),), cwd=workdir)
    sidecar.start()
    yield sidecar
    sidecar.close()


def _metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as archive:
        name = next(entry for entry in archive.namelist() if entry.endswith(".dist-info/METADATA"))
        return HeaderParser().parsestr(archive.read(name).decode())


def _runtime_requirements(metadata: Message) -> list[Requirement]:
    requirements = [Requirement(text) for text in metadata.get_all("Requires-Dist") or []]
    return [requirement for requirement in requirements if not requirement.marker]


def test_dist_builds_an_sdist_and_a_wheel_of_each_distribution_at_its_version(artifacts: Artifacts) -> None:
    built = sorted(path.name for path in artifacts.folder.iterdir())
    assert built == sorted(path.name for path in [*artifacts.wheels.values(), *artifacts.sdists.values()])
    for name, wheel in artifacts.wheels.items():
        metadata = _metadata(wheel)
        assert (metadata["Name"], metadata["Version"]) == (name, VERSIONS[name])
    client = _metadata(artifacts.wheels[CLIENT])
    assert sorted(requirement.name for requirement in _runtime_requirements(client)) == ["grpcio", "protobuf"]
    on_client = [r for r in _runtime_requirements(_metadata(artifacts.wheels[SIDECAR])) if r.name == CLIENT]
    assert len(on_client) == 1 and on_client[0].specifier.contains(VERSIONS[CLIENT])


def test_each_wheel_carries_every_file_its_package_keeps_in_git(artifacts: Artifacts) -> None:
    for name, package in PACKAGES.items():
        tracked = _run("git", "ls-files", "-z", package, cwd=ROOT).split("\0")
        expected = {str(Path(path).relative_to(package.parent.relative_to(ROOT))) for path in tracked if path}
        # Generated stubs, their .pyi files, py.typed and the dashboard's page are all in the package's tree.
        assert any(path.endswith(".pyi") for path in expected), name
        with zipfile.ZipFile(artifacts.wheels[name]) as archive:
            missing = expected - set(archive.namelist())
        assert not missing, f"{name}'s wheel lacks {sorted(missing)}"


def test_the_wheels_alone_serve_and_answer_through_the_installed_client(
    installed: Venv, served: SidecarProcess
) -> None:
    assert set(installed.distributions()) >= {SIDECAR, CLIENT}
    assert _run(installed.script("taskguard"), "--version", cwd=installed.root) == (
        f"{SIDECAR} {VERSIONS[SIDECAR]}, {CLIENT} {VERSIONS[CLIENT]}\n"
    )
    key = f"packaging-{uuid.uuid4().hex[:8]}::installed"
    answer = installed.run_python(
        "import json, sys, taskguard, taskguard_client\n"
        "from taskguard_client import AlreadyRunning, Client\n"
        "with Client(sys.argv[1]) as client:\n"
        "    lease = client.acquire(sys.argv[2], ttl=60)\n"
        "    try:\n"
        "        client.acquire(sys.argv[2], ttl=60)\n"
        "        refused = None\n"
        "    except AlreadyRunning as error:\n"
        "        refused = error.run_id\n"
        "    released = client.release(lease.lease_id, 'succeeded').state.value\n"
        "print(json.dumps({'run_id': lease.run_id, 'refused': refused, 'released': released,\n"
        "    'files': [taskguard.__file__, taskguard_client.__file__]}))\n",
        served.address,
        key,
    )
    facts = json.loads(answer)
    assert facts["refused"] == facts["run_id"]
    assert facts["released"] == "SUCCEEDED"
    assert all(Path(path).is_relative_to(installed.root) for path in facts["files"]), facts["files"]


def test_the_installed_dashboard_serves_its_page_from_the_package(
    installed: Venv, served: SidecarProcess, tmp_path: Path
) -> None:
    command = [installed.script("taskguard"), "dashboard", "--addr", served.address, "--listen", "127.0.0.1:0"]
    command += ["--viewer-token-file", tmp_path / "viewer.token"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, cwd=tmp_path, env=_env(), text=True) as dashboard:
        try:
            assert dashboard.stdout is not None
            line = dashboard.stdout.readline()  # it prints where it serves once it does
            assert "serving http://" in line, line
            url = line.split("serving ", 1)[1].split()[0]
            static = PACKAGES[SIDECAR] / "dashboard" / "static"
            for path, name in (("", "index.html"), ("static/app.js", "app.js"), ("static/app.css", "app.css")):
                with urllib.request.urlopen(url + path, timeout=10) as response:
                    assert response.read() == (static / name).read_bytes(), name
        finally:
            dashboard.terminate()
        assert dashboard.wait(timeout=30) == 0


def _oldest_python(requires_python: str) -> tuple[str | Path, str]:
    """An interpreter of the oldest minor version the distribution claims, and that version; or a skip."""
    specifier = SpecifierSet(requires_python)
    oldest = min(
        (f"3.{minor}" for minor in range(8, 20) if specifier.contains(f"3.{minor}.0")),
        key=lambda text: int(text.split(".")[1]),
    )
    if f"{sys.version_info.major}.{sys.version_info.minor}" == oldest:
        return sys.executable, oldest
    found = shutil.which(f"python{oldest}")
    if found is None:
        pytest.skip(f"no python{oldest} here, the oldest Python {requires_python} claims")
    return found, oldest


def test_the_client_wheel_alone_brings_only_grpcio_and_protobuf_and_holds_on_the_oldest_python(
    artifacts: Artifacts, served: SidecarProcess, tmp_path: Path
) -> None:
    python, oldest = _oldest_python(_metadata(artifacts.wheels[CLIENT])["Requires-Python"])
    client_only = _new_venv(tmp_path / "client", python, with_pip=True)
    own = set(client_only.distributions())  # pip (and setuptools, on 3.11): the venv's, not the client's
    _shell(_readme_line("pip"), artifacts.folder.parent, client_only.root / "bin")
    installed = client_only.distributions()
    # What grpcio and protobuf need in turn is theirs to choose; nothing else may come with the client.
    wanted = {CLIENT, "grpcio", "protobuf"}
    for name in ("grpcio", "protobuf"):
        wanted |= {_canonical(r.name) for r in _runtime_requirements(installed[name])}
    assert {CLIENT, "grpcio", "protobuf"} <= set(installed) - own <= wanted, sorted(installed)
    key = f"packaging-{uuid.uuid4().hex[:8]}::client-only"
    answer = client_only.run_python(
        "import sys, taskguard_client\n"
        "with taskguard_client.Client(sys.argv[1]) as client:\n"
        "    with client.hold(sys.argv[2]) as held:\n"
        "        print(client.get(sys.argv[2]).state.value, held.fencing_token)\n"
        "    print(client.get(sys.argv[2]).state.value)\n"
        "print('%d.%d' % sys.version_info[:2])\n",
        served.address,
        key,
    )
    assert answer.splitlines() == ["RUNNING 1", "SUCCEEDED", oldest]


def test_pipx_installs_the_sidecar_wheel_with_the_client_beside_it(
    artifacts: Artifacts, served: SidecarProcess, tmp_path: Path
) -> None:
    home, bin_dir = tmp_path / "pipx", tmp_path / "bin"
    env = {**_env(), "PIPX_HOME": str(home), "PIPX_BIN_DIR": str(bin_dir), "PIPX_MAN_DIR": str(tmp_path / "man")}
    # The README's line, typed in the folder that holds dist/, with the dev venv's pipx.
    _shell(_readme_line("pipx"), artifacts.folder.parent, Path(sys.executable).parent, env)
    taskguard_command = bin_dir / "taskguard"
    assert _run(taskguard_command, "--version", cwd=tmp_path) == (
        f"{SIDECAR} {VERSIONS[SIDECAR]}, {CLIENT} {VERSIONS[CLIENT]}\n"
    )
    key = f"packaging-{uuid.uuid4().hex[:8]}::pipx"
    _run(taskguard_command, "run", key, "--addr", served.address, "--", "true", cwd=tmp_path)
    guard = json.loads(_run(taskguard_command, "get", key, "--addr", served.address, "--json", cwd=tmp_path))
    assert guard["state"] == "SUCCEEDED"
