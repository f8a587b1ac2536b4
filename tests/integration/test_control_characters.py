"""Text a terminal would act on: refused on the way in, shown inert on the way out.

A holder like ``"x\\x1b[2J\\nFAKE ROW"`` would clear an operator's screen and forge a row of ``taskguard ls``.
The sidecar refuses control characters (C0, DEL, C1) in every free-text field with INVALID_ARGUMENT naming
the field; the CLI escapes whatever it prints, because an older database or another sidecar can still hold
such text (here written straight into the SQLite file).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc import aio

from taskguard_client import AsyncClient, GuardState, RunStatus
from taskguard_client.v1 import taskguard_pb2 as pb
from taskguard_client.v1 import taskguard_pb2_grpc as pb_grpc
from tests.support import ROOT, InProcess, SidecarProcess, acquire

HOSTILE = "x\x1b[2J\nFAKE ROW"
# The same, as the CLI shows it: escaped in tables and listings; on one line in a message on stderr.
ESCAPED = "x\\x1b[2J\\nFAKE ROW"
ESCAPED_IN_A_MESSAGE = "x\\x1b[2J FAKE ROW"
CONTROL_RULE = "must not contain control characters (C0, DEL or C1)"
TIMEOUT_S = 20.0

# One of each kind: ESC (C0, the start of every escape sequence), newline (a forged row), DEL, and CSI (C1:
# an escape sequence in one character, which many terminals honour).
SAMPLES = {"esc-and-newline": HOSTILE, "del": "a\x7fb", "c1-csi": "a\x9b2Jb", "nul": "a\x00b", "tab": "a\tb"}

Call = Callable[[pb_grpc.TaskGuardStub, str], Awaitable[Any]]


def _acquire(**fields: Any) -> Callable[[str], Call]:
    def call_with(text: str) -> Call:
        def call(stub: pb_grpc.TaskGuardStub, key: str) -> Awaitable[Any]:
            values = {name: value(text) if callable(value) else value for name, value in fields.items()}
            return stub.Acquire(pb.AcquireRequest(task_key=f"{key}-new", **values))

        return call

    return call_with


def _release(stub: pb_grpc.TaskGuardStub, lease_id: str, text: str) -> Awaitable[Any]:
    return stub.Release(pb.ReleaseRequest(lease_id=lease_id, status=pb.RUN_STATUS_SUCCEEDED, detail=text))


# field -> (the state the key is put in first, the call that sends the text)
FIELDS: dict[str, tuple[str, Callable[[str], Call]]] = {
    "holder": ("running", _acquire(holder=lambda text: text)),
    "labels": ("running", _acquire(labels=lambda text: {text: "v"})),
    "labels[team]": ("running", _acquire(labels=lambda text: {"team": text})),
    "approver": (
        "failed",
        lambda text: (
            lambda stub, key: stub.ApproveRetry(pb.ApproveRetryRequest(task_key=key, approver=text, reason="ok"))
        ),
    ),
    "reason (approve-retry)": (
        "failed",
        lambda text: (
            lambda stub, key: stub.ApproveRetry(pb.ApproveRetryRequest(task_key=key, approver="ops", reason=text))
        ),
    ),
    "operator": (
        "running",
        lambda text: (
            lambda stub, key: stub.ForceRelease(pb.ForceReleaseRequest(task_key=key, operator=text, reason="ok"))
        ),
    ),
    "reason (force-release)": (
        "running",
        lambda text: (
            lambda stub, key: stub.ForceRelease(pb.ForceReleaseRequest(task_key=key, operator="ops", reason=text))
        ),
    ),
}


@pytest.mark.parametrize("sample", SAMPLES)
@pytest.mark.parametrize("field", FIELDS)
async def test_control_characters_in_free_text_are_invalid_argument_naming_the_field_and_change_nothing(
    in_process: InProcess, key: str, field: str, sample: str
) -> None:
    stub = in_process.stub
    setup, make_call = FIELDS[field]
    held = await acquire(stub, key, ttl_s=600, holder="clean")
    if setup == "failed":
        await stub.Release(pb.ReleaseRequest(lease_id=held.lease_id, status=pb.RUN_STATUS_FAILED, detail="exit 1"))
    before = await stub.GetGuard(pb.GetGuardRequest(task_key=key))

    with pytest.raises(aio.AioRpcError) as refused:
        await make_call(SAMPLES[sample])(stub, key)

    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    name = field.split(" ")[0]
    # A label key was printable-only already (it is a name); the rest is free text.
    rule = "must be 1..63 bytes of printable UTF-8" if name == "labels" else CONTROL_RULE
    assert refused.value.details() == f"{name}: {rule}"
    assert await stub.GetGuard(pb.GetGuardRequest(task_key=key)) == before
    listed = await stub.ListGuards(pb.ListGuardsRequest(key_prefix=key))
    assert [guard.task_key for guard in listed.guards] == [key]  # the refused acquisition made no guard


@pytest.mark.parametrize("sample", SAMPLES)
async def test_a_release_detail_with_control_characters_is_refused_and_the_run_stays_held(
    in_process: InProcess, key: str, sample: str
) -> None:
    stub = in_process.stub
    held = await acquire(stub, key, ttl_s=600)
    with pytest.raises(aio.AioRpcError) as refused:
        await _release(stub, held.lease_id, SAMPLES[sample])
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == f"detail: {CONTROL_RULE}"
    stored = await stub.GetGuard(pb.GetGuardRequest(task_key=key))
    stored.ClearField("policy")  # only GetGuard fills it in
    assert stored == held.guard


@pytest.mark.parametrize("where", ["acquire", "release"])
async def test_a_hold_stream_refuses_control_characters_in_its_holder_and_its_release_detail(
    in_process: InProcess, key: str, where: str
) -> None:
    call = in_process.stub.Hold()
    try:
        holder = HOSTILE if where == "acquire" else "clean"
        await call.write(pb.HoldRequest(acquire=pb.AcquireRequest(task_key=key, holder=holder)))
        if where == "release":
            answer = await asyncio.wait_for(call.read(), TIMEOUT_S)
            assert answer.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
            release = pb.HoldRelease(status=pb.RUN_STATUS_FAILED, detail=HOSTILE)
            await call.write(pb.HoldRequest(release=release))
        with pytest.raises(aio.AioRpcError) as refused:
            while (message := await asyncio.wait_for(call.read(), TIMEOUT_S)) is not aio.EOF:
                assert message.event == pb.HOLD_EVENT_ACQUIRE_RESULT and where == "acquire", message
            await call
        field = "holder" if where == "acquire" else "detail"
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == f"{field}: {CONTROL_RULE}"
    finally:
        call.cancel()
    if where == "acquire":
        listed = await in_process.stub.ListGuards(pb.ListGuardsRequest(key_prefix=key))
        assert list(listed.guards) == []


async def test_printable_text_of_every_script_is_still_accepted(in_process: InProcess, key: str) -> None:
    text = "worker-7 (nightly.sh) é ü 日本語 😀 \\x1b stays text"
    answer = await acquire(in_process.stub, key, holder=text, labels={"team": text})
    assert (answer.guard.holder, dict(answer.guard.labels)) == (text, {"team": text})


async def test_a_hold_whose_block_raises_a_multi_line_error_still_releases_failed(
    in_process: InProcess, key: str
) -> None:
    async with AsyncClient(in_process.address) as client:
        with pytest.raises(RuntimeError):
            async with client.hold(key):
                raise RuntimeError("step 2 failed:\n  disk full\x1b[0m")
        guard = await client.get(key)
    assert (guard.state, guard.last_detail) == (GuardState.FAILED, "step 2 failed:   disk full\\x1b[0m")


# --- the CLI shows stored hostile text inert --------------------------------------------------------------


async def _taskguard(address: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskguard",
        "--addr",
        address,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(process.communicate(), TIMEOUT_S)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def _inert(text: str) -> None:
    """Nothing a terminal acts on besides the line breaks the CLI put there itself, and no forged line."""
    for line in text.splitlines():
        assert line.isprintable(), repr(line)
        assert not line.startswith("FAKE ROW"), text


def _plant(db: Any, key: str, **fields: str) -> None:
    """Write text into the stored guard, as an older sidecar (which took anything) would have."""
    with sqlite3.connect(db) as connection:
        for name, value in fields.items():
            changed = connection.execute(
                "UPDATE guards SET doc = json_set(doc, ?, ?) WHERE task_key = ?", (f"$.{name}", value, key)
            ).rowcount
            assert changed == 1
    connection.close()


async def test_the_cli_escapes_hostile_text_stored_in_the_database(
    sidecar_factory: Callable[..., SidecarProcess], key: str
) -> None:
    sidecar = sidecar_factory()
    running, failed = f"{key}-running", f"{key}-failed"
    async with AsyncClient(sidecar.address) as client:
        await client.acquire(running, ttl=3600, holder="placeholder", labels={"team": "placeholder"})
        lease = await client.acquire(failed, holder="placeholder")
        await client.release(lease.lease_id, RunStatus.FAILED, "placeholder")
    assert await asyncio.to_thread(sidecar.terminate) == 0
    _plant(sidecar.db, running, holder=HOSTILE, run_id=f"run-{HOSTILE}")
    _plant(sidecar.db, failed, holder=HOSTILE, last_detail=f"exit code 3 {HOSTILE}")
    await asyncio.to_thread(sidecar.start)

    code, out, err = await _taskguard(sidecar.address, "ls", "--prefix", key)
    assert code == 0, err
    _inert(out)
    lines = out.splitlines()
    assert len(lines) == 3, out  # the header and two guards: no forged row
    assert ESCAPED in lines[1] and ESCAPED in lines[2]
    assert f"run-{ESCAPED}" in out

    code, out, err = await _taskguard(sidecar.address, "ls", "--prefix", key, "--json")
    assert code == 0 and "\x1b" not in out, err
    assert {guard["holder"] for guard in json.loads(out)} == {HOSTILE}  # JSON keeps the text, escaped

    code, out, err = await _taskguard(sidecar.address, "get", failed)
    assert code == 0, err
    _inert(out)
    assert f"exit code 3 {ESCAPED}" in out

    # A conflict names the run in the way; a retry refusal quotes its detail: both on stderr.
    code, out, err = await _taskguard(sidecar.address, "run", running, "--", "true")
    assert code == 75, err
    _inert(err)
    assert ESCAPED_IN_A_MESSAGE in err and len(err.splitlines()) == 1
    code, out, err = await _taskguard(sidecar.address, "run", failed, "--", "true")
    assert code == 76, err
    _inert(err)
    assert f"exit code 3 {ESCAPED_IN_A_MESSAGE}" in err and len(err.splitlines()) == 1

    code, out, err = await _taskguard(sidecar.address, "force-release", running, "--reason", "stuck")
    assert code == 0, err
    _inert(out)
    assert f"run-{ESCAPED}" in out


async def test_run_names_an_unprintable_command_inertly_in_its_default_holder(
    sidecar_factory: Callable[..., SidecarProcess], key: str, workdir: Any
) -> None:
    sidecar = sidecar_factory()
    command = workdir / "bad\x1bname"
    command.write_text("#!/bin/sh\nexit 0\n")
    command.chmod(0o755)
    code, _, err = await _taskguard(sidecar.address, "run", key, "--", str(command))
    assert code == 0, err
    async with AsyncClient(sidecar.address) as client:
        guard = await client.get(key)
    assert guard.holder.endswith("(bad\\x1bname)"), guard.holder
