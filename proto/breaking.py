#!/usr/bin/env python3
"""Does the proto still speak to the clients already out there? buf's breaking-change check against released protos.

Usage: python proto/breaking.py [--write-baseline]

Each released proto is kept as a FileDescriptorSet in proto/compat/
(``taskguard-v1-<version>.binpb``, made by protoc's ``--descriptor_set_out
--include_imports``, which buf reads as an image). ``buf breaking`` compares
today's proto/ with each of them under buf's PACKAGE rules (proto/buf.yaml): a
client generated from a released proto keeps working, on the wire, in JSON and
in its generated code. So nothing is removed, not even behind a reserved
number (a field that is no longer used stays, marked deprecated), renamed or
renumbered; no field's type, cardinality, presence or oneof changes, nor a
method's types or streaming. Adding is fine, and so is moving a type to
another file of the package.

buf is the buf project's own binary from PyPI's buf-bin (pinned in the dev
extra), in .venv/bin beside the interpreter. ``--write-baseline`` records
today's proto as the baseline of the sidecar's current version: do that when
a version is released.
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO = "taskguard/v1/taskguard.proto"
BASELINES = PROTO_ROOT / "compat"
CONFIG = PROTO_ROOT / "buf.yaml"
SIDECAR_INIT = ROOT / "sidecar" / "taskguard" / "__init__.py"


@dataclass(frozen=True)
class Break:
    rule: str  # buf's rule id, such as RPC_NO_DELETE
    message: str
    path: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message} ({self.rule})"


def buf() -> Path:
    """The venv's buf (not resolved: .venv/bin/python may be a link to the system's interpreter), else PATH's."""
    beside = Path(sys.executable).parent / "buf"
    found = beside if beside.exists() else shutil.which("buf")
    if found is None:
        raise SystemExit("buf is missing: python3 .ci/dev.py setup installs it (PyPI's buf-bin, in the dev extra)")
    return Path(found)


def baselines() -> list[Path]:
    return sorted(BASELINES.glob("taskguard-v1-*.binpb"))


def breaking_changes(against: Path, current: Path = PROTO_ROOT) -> list[Break]:
    """What ``current`` (proto/, or an image file) breaks of the image ``against``; empty when nothing."""
    completed = subprocess.run(
        [buf(), "breaking", current, "--against", against, "--config", CONFIG, "--error-format", "json"],
        capture_output=True,
        text=True,
        check=False,
        cwd=PROTO_ROOT,
    )
    # 0: compatible; 100: breaking changes found (one JSON object a line); anything else: buf could not compare.
    if completed.returncode not in (0, 100):
        raise RuntimeError(f"buf breaking failed ({completed.returncode}): {completed.stderr.strip()}")
    found = []
    for line in completed.stdout.splitlines():
        item = json.loads(line)
        found.append(Break(item["type"], item["message"], item["path"]))
    if completed.returncode == 100 and not found:
        raise RuntimeError(f"buf breaking reported a break but named none: {completed.stderr.strip()}")
    return found


def sidecar_version() -> str:
    """``taskguard.__version__``, read the way setuptools reads it (statically), without importing the sidecar."""
    for node in ast.parse(SIDECAR_INIT.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return str(ast.literal_eval(node.value))
    raise SystemExit(f"{SIDECAR_INIT}: no __version__")


def write_baseline() -> Path:
    target = BASELINES / f"taskguard-v1-{sidecar_version()}.binpb"
    if target.exists():
        raise SystemExit(f"{target.relative_to(ROOT)} exists: a released proto's baseline is never rewritten")
    well_known = Path(protoc.__file__).parent / "_proto"
    arguments = [f"-I{PROTO_ROOT}", f"-I{well_known}", f"--descriptor_set_out={target}", "--include_imports"]
    if protoc.main(["grpc_tools.protoc", *arguments, str(PROTO_ROOT / PROTO)]) != 0:
        raise SystemExit("protoc failed")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-baseline", action="store_true", help="record today's proto for this version")
    args = parser.parse_args(argv)
    if args.write_baseline:
        print(f"wrote {write_baseline().relative_to(ROOT)}")
        return 0
    failed = False
    for baseline in baselines():
        for change in breaking_changes(baseline):
            print(f"against {baseline.name}: {change}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
