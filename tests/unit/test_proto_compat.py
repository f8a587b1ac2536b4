"""The proto stays compatible with every released one (proto/breaking.py runs buf), and the check sees each break.

Each case below changes a copy of the released baseline, so that buf compares two valid images: ``old`` is what
was released (the baseline, given something to lose where the break removes a type or a service), ``new`` is
the baseline with the change.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

from tests.support import ROOT

Set = descriptor_pb2.FileDescriptorSet
Field = descriptor_pb2.FieldDescriptorProto
PACKAGE = "taskguard.v1"


def _breaking_module() -> Any:
    spec = importlib.util.spec_from_file_location("taskguard_breaking", ROOT / "proto" / "breaking.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


breaking = _breaking_module()
BASELINE = breaking.BASELINES / "taskguard-v1-0.1.0.binpb"


def _file(files: Set) -> descriptor_pb2.FileDescriptorProto:
    return next(file for file in files.file if file.package == PACKAGE)


def _message(files: Set, name: str) -> descriptor_pb2.DescriptorProto:
    return next(message for message in _file(files).message_type if message.name == name)


def _field(files: Set, message: str, name: str) -> Field:
    return next(field for field in _message(files, message).field if field.name == name)


def _enum(files: Set, name: str) -> descriptor_pb2.EnumDescriptorProto:
    return next(enum for enum in _file(files).enum_type if enum.name == name)


def _method(files: Set, name: str) -> descriptor_pb2.MethodDescriptorProto:
    return next(method for method in _file(files).service[0].method if method.name == name)


def _remove(items: Any, name: str) -> None:
    items.remove(next(item for item in items if item.name == name))


def _spare_message(files: Set) -> None:
    _file(files).message_type.add(name="Spare").field.add(
        name="note", number=1, json_name="note", type=Field.TYPE_STRING
    )


def _spare_nested_message(files: Set) -> None:
    _message(files, "Guard").nested_type.add(name="Spare")


def _spare_enum(files: Set) -> None:
    _file(files).enum_type.add(name="Spare").value.add(name="SPARE_UNSPECIFIED", number=0)


def _spare_service(files: Set) -> None:
    _file(files).service.add(name="Spare").method.add(
        name="Get", input_type=".taskguard.v1.GetGuardRequest", output_type=".taskguard.v1.Guard"
    )


def _explicit_presence(files: Set) -> None:
    message = _message(files, "ReleaseRequest")
    message.oneof_decl.add(name="_detail")  # proto3's `optional` is a synthetic oneof of one
    field = _field(files, "ReleaseRequest", "detail")
    field.proto3_optional = True
    field.oneof_index = len(message.oneof_decl) - 1


def _reserve_field(files: Set, message: str, name: str) -> None:
    target = _message(files, message)
    number = _field(files, message, name).number
    _remove(target.field, name)
    target.reserved_range.add(start=number, end=number + 1)  # a message's ranges end exclusively
    target.reserved_name.append(name)


def _reserve_value(files: Set, enum: str, name: str) -> None:
    target = _enum(files, enum)
    number = next(value.number for value in target.value if value.name == name)
    _remove(target.value, name)
    target.reserved_range.add(start=number, end=number)  # an enum's ranges end inclusively
    target.reserved_name.append(name)


def _move_to_a_new_file(files: Set, name: str) -> None:
    main = _file(files)
    extra = descriptor_pb2.FileDescriptorProto(name="taskguard/v1/more.proto", package=PACKAGE, syntax="proto3")
    extra.message_type.add().CopyFrom(_message(files, name))
    _remove(main.message_type, name)
    main.dependency.append(extra.name)
    files.file.insert(list(files.file).index(main), extra)  # an image lists a file after its imports


def _set(field: Field, **values: Any) -> None:
    for name, value in values.items():
        setattr(field, name, value)


def _nothing(files: Set) -> None:
    pass


Change = Callable[[Set], object]
# kind: (what the released proto had beyond the baseline, what the next one does to it, buf's rule, its words)
BREAKS: dict[str, tuple[Change, Change, str, str]] = {
    "message removed": (
        _spare_message,
        _nothing,
        "PACKAGE_MESSAGE_NO_DELETE",
        '"Spare" was deleted',
    ),
    "nested message removed": (
        _spare_nested_message,
        _nothing,
        "PACKAGE_MESSAGE_NO_DELETE",
        '"Guard.Spare" was deleted',
    ),
    "field removed": (
        _nothing,
        lambda s: _remove(_message(s, "AcquireRequest").field, "holder"),
        "FIELD_NO_DELETE",
        'field "3" with name "holder" on message "AcquireRequest" was deleted',
    ),
    "field removed, its number and name reserved": (
        _nothing,
        lambda s: _reserve_field(s, "AcquireRequest", "holder"),
        "FIELD_NO_DELETE",
        'field "3" with name "holder" on message "AcquireRequest" was deleted',
    ),
    "field number changed": (
        _nothing,
        lambda s: _set(_field(s, "AcquireRequest", "holder"), number=30),
        "FIELD_NO_DELETE",
        'field "3" with name "holder" on message "AcquireRequest" was deleted',
    ),
    "field renamed": (
        _nothing,
        lambda s: _set(_field(s, "AcquireRequest", "holder"), name="owner", json_name="owner"),
        "FIELD_SAME_NAME",
        'changed name from "holder" to "owner"',
    ),
    "field JSON name changed": (
        _nothing,
        lambda s: _set(_field(s, "AcquireRequest", "run_id"), json_name="run_id"),
        "FIELD_SAME_JSON_NAME",
        'from "runId" to "run_id"',
    ),
    "field scalar type changed": (
        _nothing,
        lambda s: _set(_field(s, "CheckFenceRequest", "fencing_token"), type=Field.TYPE_STRING),
        "FIELD_SAME_TYPE",
        'changed type from "uint64" to "string"',
    ),
    "field message type changed": (
        _nothing,
        lambda s: _set(_field(s, "RenewResponse", "guard"), type_name=".taskguard.v1.KeyPolicy"),
        "FIELD_SAME_TYPE",
        'from "taskguard.v1.Guard" to "taskguard.v1.KeyPolicy"',
    ),
    "field label changed": (
        _nothing,
        lambda s: _set(_field(s, "ListGuardsResponse", "guards"), label=Field.LABEL_OPTIONAL),
        "FIELD_SAME_CARDINALITY",
        'on message "ListGuardsResponse" changed cardinality from "repeated"',
    ),
    "field presence changed": (
        _nothing,
        _explicit_presence,
        "FIELD_SAME_CARDINALITY",
        'from "optional with implicit presence" to "optional with explicit presence"',
    ),
    "field moved out of its oneof": (
        _nothing,
        lambda s: _field(s, "HoldRequest", "release").ClearField("oneof_index"),
        "FIELD_SAME_ONEOF",
        '"release" on message "HoldRequest" moved from inside to outside a oneof',
    ),
    "enum removed": (
        _spare_enum,
        _nothing,
        "PACKAGE_ENUM_NO_DELETE",
        '"Spare" was deleted',
    ),
    "enum value removed": (
        _nothing,
        lambda s: _remove(_enum(s, "RunStatus").value, "RUN_STATUS_CANCELLED"),
        "ENUM_VALUE_NO_DELETE",
        'enum value "3" on enum "RunStatus" was deleted',
    ),
    "enum value removed, its number and name reserved": (
        _nothing,
        lambda s: _reserve_value(s, "RunStatus", "RUN_STATUS_CANCELLED"),
        "ENUM_VALUE_NO_DELETE",
        'enum value "3" on enum "RunStatus" was deleted',
    ),
    "enum value renamed": (
        _nothing,
        lambda s: _set(_enum(s, "RunStatus").value[3], name="RUN_STATUS_ABORTED"),
        "ENUM_VALUE_SAME_NAME",
        'from "RUN_STATUS_CANCELLED" to "RUN_STATUS_ABORTED"',
    ),
    "service removed": (
        _spare_service,
        _nothing,
        "PACKAGE_SERVICE_NO_DELETE",
        'service "Spare" was deleted',
    ),
    "method removed": (
        _nothing,
        lambda s: _remove(_file(s).service[0].method, "CheckFence"),
        "RPC_NO_DELETE",
        'RPC "CheckFence" on service "TaskGuard" was deleted',
    ),
    "method request type changed": (
        _nothing,
        lambda s: _set(_method(s, "Renew"), input_type=".taskguard.v1.ResumeRequest"),
        "RPC_SAME_REQUEST_TYPE",
        'from "taskguard.v1.RenewRequest" to "taskguard.v1.ResumeRequest"',
    ),
    "method response type changed": (
        _nothing,
        lambda s: _set(_method(s, "GetGuard"), output_type=".taskguard.v1.RenewResponse"),
        "RPC_SAME_RESPONSE_TYPE",
        'from "taskguard.v1.Guard" to "taskguard.v1.RenewResponse"',
    ),
    "method client streaming changed": (
        _nothing,
        lambda s: _set(_method(s, "Hold"), client_streaming=False),
        "RPC_SAME_CLIENT_STREAMING",
        '"Hold" on service "TaskGuard" changed from client streaming to client unary',
    ),
    "method server streaming changed": (
        _nothing,
        lambda s: _set(_method(s, "WatchGuards"), server_streaming=False),
        "RPC_SAME_SERVER_STREAMING",
        '"WatchGuards" on service "TaskGuard" changed from server streaming to server unary',
    ),
}

ADDITIONS: dict[str, Change] = {
    "a field added": lambda s: _message(s, "AcquireRequest").field.add(
        name="priority", number=99, json_name="priority", type=Field.TYPE_INT32
    ),
    "a message added": _spare_message,
    "an enum added": _spare_enum,
    "an enum value added": lambda s: _enum(s, "RunStatus").value.add(name="RUN_STATUS_SKIPPED", number=9),
    "a method added": lambda s: (
        _file(s)
        .service[0]
        .method.add(name="Ping", input_type=".taskguard.v1.GetGuardRequest", output_type=".taskguard.v1.Guard")
    ),
    "a service added": _spare_service,
    "a message moved to another file of the package": lambda s: _move_to_a_new_file(s, "ResumeRequest"),
}


def _image(tmp_path: Path, name: str, change: Change) -> Path:
    files = Set.FromString(BASELINE.read_bytes())
    change(files)
    path = tmp_path / f"{name}.binpb"
    path.write_bytes(files.SerializeToString())
    return path


def test_the_current_proto_keeps_every_released_one() -> None:
    released = breaking.baselines()
    assert BASELINE in released
    for baseline in released:
        assert breaking.breaking_changes(baseline) == [], baseline.name


@pytest.mark.parametrize("kind", BREAKS)
def test_the_check_reports_each_kind_of_break(tmp_path: Path, kind: str) -> None:
    released, change, rule, words = BREAKS[kind]
    old = _image(tmp_path, "old", released)
    assert breaking.breaking_changes(old, _image(tmp_path, "same", released)) == []
    found = breaking.breaking_changes(old, _image(tmp_path, "new", change))
    assert any(item.rule == rule and words in item.message for item in found), found


@pytest.mark.parametrize("kind", ADDITIONS)
def test_the_check_lets_compatible_changes_through(tmp_path: Path, kind: str) -> None:
    assert breaking.breaking_changes(BASELINE, _image(tmp_path, "new", ADDITIONS[kind])) == []


def test_the_command_fails_on_a_break_and_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert breaking.main([]) == 0
    broken = _image(tmp_path, "broken", BREAKS["method removed"][1])
    real = breaking.breaking_changes
    monkeypatch.setattr(breaking, "breaking_changes", lambda against: real(against, broken))
    assert breaking.main([]) == 1
    assert 'against taskguard-v1-0.1.0.binpb: taskguard/v1/taskguard.proto: Previously present RPC "CheckFence"' in (
        capsys.readouterr().err
    )


def test_a_released_baseline_is_never_rewritten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(breaking, "sidecar_version", lambda: "0.1.0")
    before = BASELINE.read_bytes()
    with pytest.raises(SystemExit, match="is never rewritten"):
        breaking.write_baseline()
    assert BASELINE.read_bytes() == before
