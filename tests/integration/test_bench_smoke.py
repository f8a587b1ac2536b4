"""The benchmark's load generator, Task Guard side only, in miniature: so bench/ cannot silently rot."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from bench.queue_handover import Run, check_drain
from taskguard_client.v1 import taskguard_pb2 as pb
from tests.support import ROOT, SidecarProcess


def _run_load(sidecar: SidecarProcess, *flags: str) -> list[dict[str, Any]]:
    assert sidecar.process is not None
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.load",
            "--target",
            sidecar.address,
            f"--pid=taskguard={sidecar.process.pid}",
            *flags,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_bench_load_measures_every_scenario_against_a_real_sidecar(sidecar: SidecarProcess) -> None:
    results = _run_load(
        sidecar,
        "--scenarios=a,b,c,d,e",
        "--systems=taskguard",
        "--concurrency=1,4",
        "--duration=2",
        "--warmup=0",
        "--max-cycles=20",
        "--storm=50",
        "--holds=30",
        "--drop=10",
        "--idle=0",
        "--watch-concurrency=4",
        "--watchers=0,2",
        "--waiters=20",  # within the default rule's max_queue of 64
    )
    by_scenario: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        assert result["system"] == "taskguard"
        by_scenario.setdefault(result["scenario"], []).append(result)

    cycles = by_scenario["a"]
    assert [result["concurrency"] for result in cycles] == [1, 4]
    for result in cycles:
        assert result["cycles"] == 20
        assert result["cycles_per_s"] > 0
        assert 0 < result["acquire_p50_ms"] <= result["acquire_p99_ms"]
        assert result["errors"] == {} and result["refused"] == 0
        assert result["server_cpu_us_per_cycle"] > 0

    [storm] = by_scenario["b"]
    assert storm["winners"] == [1]
    assert storm["answered"] == [50]
    assert storm["errors"] == {}
    assert storm["all_answered_ms"] > 0

    [held] = by_scenario["c"]
    assert held["held"] == 30
    assert held["rss_held_mib"] > 0
    assert held["abandoned"] == held["dropped"] == 10
    assert held["all_abandoned_ms"] is not None

    watched = {result["watchers"]: result for result in by_scenario["d"]}
    assert set(watched) == {0, 2}
    assert watched[2]["cycles"] == 20 and watched[2]["errors"] == {}
    assert watched[2]["watch_events"] >= 2 * 2 * 20  # each watcher sees ACQUIRED and RELEASED of every cycle
    assert watched[2]["watchers_ended_early"] == {}

    [queue] = by_scenario["e"]
    assert queue["problems"] == []
    assert queue["ran"] == 20
    assert 0 < queue["handover_p50_ms"] <= queue["handover_p99_ms"] <= queue["handover_max_ms"]
    # Each waiter hears where it stands at most every NOTICE_INTERVAL_S (its latest place), and something at once.
    assert 19 <= queue["notices"] <= 20 * 19 // 2


def test_queue_drain_checks_catch_a_waiter_out_of_turn_and_one_that_never_ran() -> None:
    holder = Run("holder", fencing_token=1, release_sent_at=1.0, released_at=1.1)

    def ran(run_id: str, place: int, token: int, at: float) -> Run:
        return Run(run_id, place=place, fencing_token=token, acquired_at=at, release_sent_at=at + 0.1)

    in_order = [ran("w0", 1, 2, 2.0), ran("w1", 2, 3, 3.0)]
    final = pb.Guard(state=pb.GUARD_STATE_SUCCEEDED, fencing_token=3)
    assert check_drain(holder, in_order, final) == []

    swapped = [ran("w0", 1, 3, 3.0), ran("w1", 2, 2, 2.0)]
    assert any("ACQUIRED before w0 released" in problem for problem in check_drain(holder, swapped, final))
    never = [ran("w0", 1, 2, 2.0), Run("w1", place=2)]
    problems = check_drain(holder, never, pb.Guard(state=pb.GUARD_STATE_RUNNING, fencing_token=3))
    assert any("never ran" in problem for problem in problems)
    assert any("the key ended GUARD_STATE_RUNNING" in problem for problem in problems)
