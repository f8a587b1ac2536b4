"""Per-key rules over real gRPC: lock-delay, max hold, failure handling, and the effective rule in GetGuard.

In-process sidecars on a real socket, on SQLite and etcd; the manual clock moves only when a test says so,
so deadlines are exact and nothing sleeps. The CLI part runs the real `taskguard` commands against a real
sidecar process configured by a TOML file.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from taskguard.clock import ManualClock
from taskguard.guard.model import FailureHandling, KeyRule
from taskguard_client import AsyncClient, Conflict, Lease, LeaseLost, LockDelayed, Outcome, RunStatus
from taskguard_client.v1 import taskguard_pb2 as pb
from tests.support import ROOT, InProcess, SidecarProcess, acquire, watch_until

pytestmark = pytest.mark.backends("sqlite", "etcd")

RULES = (
    KeyRule(name="careful", match="careful:*", lock_delay_s=30.0),
    KeyRule(name="capped", match="capped:*", max_hold_s=10.0),
    KeyRule(name="flaky", match="flaky:*", failure=FailureHandling.REOPEN),
)


@pytest.fixture
async def ruled(in_process_factory: object) -> InProcess:
    harness: InProcess = await in_process_factory(ManualClock(), rules=RULES)  # type: ignore[operator]
    return harness


async def test_an_abandoned_holders_key_stays_closed_for_its_lock_delay(ruled: InProcess, key: str) -> None:
    task_key = f"careful:{key}"
    call = ruled.stub.Hold()
    await call.write(pb.HoldRequest(acquire=pb.AcquireRequest(task_key=task_key)))
    held = await call.read()
    assert held.outcome == pb.ACQUIRE_OUTCOME_ACQUIRED
    # The holder's stream drops (its process died): the run is abandoned and the lock-delay starts.
    call.cancel()
    await watch_until(
        ruled.stub,
        lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_ABANDONED for e in seen),
        key_prefix=task_key,
        start_revision=held.guard.revision,
    )
    async with AsyncClient(ruled.address) as client:
        with pytest.raises(LockDelayed) as refused:
            await client.acquire(task_key)
        assert refused.value.until is not None
        assert refused.value.guard.state.value == "ABANDONED"
        assert f"the key opens at {refused.value.until.isoformat().replace('+00:00', 'Z')}"[:30] in str(refused.value)
        guard = await client.get(task_key)
        assert guard.lock_delay_until == refused.value.until
        assert guard.policy is not None and guard.policy.rule == "careful"
        assert guard.policy.lock_delay == timedelta(seconds=30)

        await ruled.advance(29.9)
        assert (await client.acquire(task_key, on_conflict="return")).outcome is Outcome.LOCK_DELAYED  # type: ignore[union-attr]
        await ruled.advance(0.1)
        lease = await client.acquire(task_key)
        assert lease.fencing_token == held.guard.fencing_token + 1


async def test_a_refusal_during_lock_delay_is_a_watch_event(ruled: InProcess, key: str) -> None:
    task_key = f"careful:{key}"
    held = await acquire(ruled.stub, task_key, ttl_s=60)
    await ruled.stub.ForceRelease(pb.ForceReleaseRequest(task_key=task_key, operator="ops", reason="stuck"))

    refused = await acquire(ruled.stub, task_key)

    assert refused.outcome == pb.ACQUIRE_OUTCOME_LOCK_DELAYED
    assert refused.guard.HasField("lock_delay_until")
    events = await watch_until(
        ruled.stub,
        lambda seen: any(e.type == pb.GUARD_EVENT_TYPE_LOCK_DELAY_REFUSED for e in seen),
        key_prefix=task_key,
        start_revision=held.guard.revision,
    )
    assert [e.type for e in events][-2:] == [pb.GUARD_EVENT_TYPE_FORCE_RELEASED, pb.GUARD_EVENT_TYPE_LOCK_DELAY_REFUSED]


async def test_a_holder_past_its_max_hold_is_told_on_its_stream_before_anyone_else_gets_the_key(
    ruled: InProcess, key: str
) -> None:
    task_key = f"capped:{key}"
    async with AsyncClient(ruled.address) as client:
        # Leaving a hold whose lease was lost raises that loss: the holder cannot miss it.
        with pytest.raises(LeaseLost) as lost:
            async with client.hold(task_key) as held:
                assert held.guard.hold_until is not None  # type: ignore[union-attr]
                assert held.guard.hold_until - held.guard.started_at == timedelta(seconds=10)  # type: ignore[union-attr]
                for _ in range(3):  # an open stream holds the key, but not past its max hold
                    await ruled.advance(3)
                    assert (await client.get(task_key)).running
                await ruled.advance(1.5)  # 10.5 s after it started
                told = await held.wait_lost()  # type: ignore[union-attr]
                successor = await client.acquire(task_key)
        assert lost.value is told
        assert "held for the max_hold of 10s (rule 'capped')" in str(told)

        ended = await watch_until(
            ruled.stub,
            lambda seen: any(
                e.type == pb.GUARD_EVENT_TYPE_ACQUIRED and e.guard.run_id == successor.run_id for e in seen
            ),
            key_prefix=task_key,
            start_revision=1,
        )
        expired = next(e for e in ended if e.type == pb.GUARD_EVENT_TYPE_EXPIRED)
        assert expired.guard.last_detail == "held for the max_hold of 10s (rule 'capped')"
        assert expired.revision < ended[-1].revision


async def test_a_key_whose_rule_reopens_failures_needs_no_approval(ruled: InProcess, key: str) -> None:
    async with AsyncClient(ruled.address) as client:
        for task_key, reopens in ((f"flaky:{key}", True), (f"strict:{key}", False)):
            lease = await client.acquire(task_key)
            await client.release(lease.lease_id, RunStatus.FAILED, "boom")
            again = await client.acquire(task_key, on_conflict="return")
            if reopens:
                assert isinstance(again, Lease) and again.fencing_token == lease.fencing_token + 1
            else:
                assert isinstance(again, Conflict) and again.outcome is Outcome.RETRY_REQUIRES_APPROVAL


@pytest.mark.backends("sqlite")
def test_the_cli_shows_the_rules_and_the_effective_rule_of_a_key(workdir: Path) -> None:
    config = workdir / "taskguard.toml"
    config.write_text(
        'lock_delay = "5s"\n[[rules]]\nname = "deploys"\nmatch = "*::deploy"\nfailure = "reopen"\nmax_hold = "2h"\n'
    )
    sidecar = SidecarProcess(workdir, ("--config", str(config)))
    sidecar.start()
    try:

        def taskguard(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "taskguard", "--addr", sidecar.address, *args],
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=60,
            )

        doctor = subprocess.run(
            [
                sys.executable,
                "-m",
                "taskguard",
                "doctor",
                "--config",
                str(config),
                "--listen",
                sidecar.address,
                "--db",
                str(sidecar.db),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert (
            "rule deploys: '*::deploy': on conflict reject, failed runs reopen the key, lost runs reopen the key, "
            "lock-delay 5s, max hold 7200s"
        ) in doctor.stdout
        assert "rule default: '*': on conflict reject, failed runs need approve-retry" in doctor.stdout

        assert taskguard("run", "ops::deploy", "--", "true").returncode == 0
        shown = taskguard("get", "ops::deploy").stdout
        assert "rule=deploys" in shown and "failure=reopen" in shown and "max_hold=" in shown

        # A force-released run's key stays closed for the default rule's lock-delay: `run` says until when.
        holder = subprocess.Popen(
            [sys.executable, "-m", "taskguard", "--addr", sidecar.address, "run", "ops::report", "--", "sleep", "60"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            while taskguard("get", "ops::report").returncode != 0:
                pass  # the holder has not acquired yet; each `get` is a real round trip
            assert taskguard("force-release", "ops::report", "--reason", "stuck").returncode == 0
            refused = taskguard("run", "ops::report", "--", "true")
        finally:
            holder.kill()
            holder.wait(30)
        assert refused.returncode == 81, refused.stderr
        assert "lock-delay holds it closed; the key opens at" in refused.stderr
        assert "(lock-delay)" in taskguard("ls").stdout
    finally:
        sidecar.close()
