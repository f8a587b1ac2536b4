#!/usr/bin/env python3
"""Set up everything Task Guard needs in .venv, then serve or test.

    python3 .ci/dev.py serve [serve flags...]   set up, then run the sidecar on its embedded default
    python3 .ci/dev.py test  [pytest args...]    set up, then ruff, mypy and the whole test suite
    python3 .ci/dev.py setup                     set up only

Needs nothing but python3 (3.11+): the virtual environment, the Python
packages and the tools the tests use are installed here, and again only when
the files that list them change.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
STAMP = VENV / ".taskguard-setup"
# Whatever changes what must be installed.
INPUTS = ("pyproject.toml", "clients/python/pyproject.toml", ".ci/dev.py")


def _run(*command: str | Path, **options: object) -> None:
    print("+", " ".join(str(part) for part in command), flush=True)
    subprocess.run([str(part) for part in command], check=True, cwd=ROOT, **options)  # type: ignore[call-overload]


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


def serve(arguments: list[str]) -> int:
    os.execv(BIN / "taskguard", [str(BIN / "taskguard"), "serve", *arguments])


def test(arguments: list[str]) -> int:
    checks = [
        (BIN / "ruff", "check", "sidecar", "clients/python", "tests", "proto", ".ci"),
        (BIN / "ruff", "format", "--check", "sidecar", "clients/python", "tests", "proto", ".ci"),
        (BIN / "mypy",),
    ]
    for check in checks:
        _run(*check)
    completed = subprocess.run([str(BIN / "pytest"), *arguments], cwd=ROOT)
    return completed.returncode


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("serve", "test", "setup"):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        setup()
        if argv[0] == "serve":
            return serve(argv[1:])
        if argv[0] == "test":
            return test(argv[1:])
        return 0
    except subprocess.CalledProcessError as error:
        print(f"dev.py: {error}", file=sys.stderr)
        return error.returncode or 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
