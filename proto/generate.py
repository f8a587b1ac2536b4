#!/usr/bin/env python3
"""The only producer of generated code: Python stubs from proto/ into taskguard_client.v1.

Usage: python proto/generate.py [--out DIR]

The stubs are committed (see STYLE.md, "Generated code: committed");
tests/unit/test_generated_code_is_fresh.py regenerates them into a temporary
folder and fails when the committed copies differ.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO = "taskguard/v1/taskguard.proto"
PACKAGE_DIR = ROOT / "clients" / "python" / "taskguard_client" / "v1"
GENERATED = ("taskguard_pb2.py", "taskguard_pb2.pyi", "taskguard_pb2_grpc.py")

# protoc names the import after the proto's path; the package lives elsewhere.
_PROTOC_IMPORT = "from taskguard.v1 import taskguard_pb2 as taskguard_dot_v1_dot_taskguard__pb2"
_PACKAGE_IMPORT = "from taskguard_client.v1 import taskguard_pb2 as taskguard_dot_v1_dot_taskguard__pb2"


def generate(out: Path) -> list[Path]:
    """Write the stubs into ``out`` and return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        well_known = Path(protoc.__file__).parent / "_proto"
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                f"--python_out={scratch}",
                f"--pyi_out={scratch}",
                f"--grpc_python_out={scratch}",
                str(PROTO_ROOT / PROTO),
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed with exit code {code}")
        written = []
        for name in GENERATED:
            source = Path(scratch) / "taskguard" / "v1" / name
            text = source.read_text()
            if name.endswith("_grpc.py"):
                if _PROTOC_IMPORT not in text:
                    raise SystemExit(f"{name}: protoc's import line changed; update generate.py")
                text = text.replace(_PROTOC_IMPORT, _PACKAGE_IMPORT)
            target = out / name
            target.write_text(text)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR)
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
