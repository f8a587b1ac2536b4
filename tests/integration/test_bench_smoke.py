"""The benchmark's load generator, Task Guard side only, in miniature: so bench/ cannot silently rot."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

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
        "--scenarios=a,b,c,d",
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
