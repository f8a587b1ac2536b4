"""The committed stubs are exactly what proto/generate.py makes from proto/."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT


def _generate_module() -> object:
    spec = importlib.util.spec_from_file_location("taskguard_generate", ROOT / "proto" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("which", ["TASKGUARD", "ETCD"])
def test_generated_stubs_match_the_proto(tmp_path: Path, which: str) -> None:
    generate: Any = _generate_module()
    stubs = getattr(generate, which)
    fresh = generate.generate(tmp_path, stubs)
    stale = [path.name for path in fresh if path.read_bytes() != (stubs.package_dir / path.name).read_bytes()]
    assert not stale, f"stale generated code: {stale}; run python proto/generate.py and commit the result"


def test_the_grpc_stub_imports_the_messages_from_the_client_package() -> None:
    text = (ROOT / "clients/python/taskguard_client/v1/taskguard_pb2_grpc.py").read_text()
    assert "from taskguard_client.v1 import taskguard_pb2" in text
