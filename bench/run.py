"""Run issue 6's benchmark: Task Guard against an etcd mutex and a Redis lock, on this machine.

    python3 .ci/dev.py bench [flags]          set up .venv, then this
    .venv/bin/python -m bench.run [flags]     --quick, --scenarios a,b, --json out.json, --help

Starts every server as a child process on loopback (127.0.0.1, or a unix socket for the sidecar), with
its data in one temporary folder: the sidecar (default SQLite store, a fresh one for each scenario), etcd
and two Redis servers (AOF + appendfsync always, and no persistence). Installs Debian's etcd-server and
redis-server first when their binaries are missing. Then runs ``python -m bench.load`` in a separate
process for each scenario, collects its JSON lines, prints a table with the ratios to Task Guard measured
in the same run, and stops everything. Exits 1 when a system misbehaved (errors, a storm with other than
one winner, dropped streams not all ABANDONED, a queue not drained once each in arrival order), not when
a target is missed. Scenario e (issue 16: a queue of 1,000 waiters on one key, drained by short runs) runs
only when named: ``--scenarios e``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import servers
from bench.systems import SYSTEMS

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("a", "b", "c", "d", "e")
# e (issue 16's queue drain) is asked for by name: at 1,000 waiters it takes far longer than the rest together.
DEFAULT_SCENARIOS = ("a", "b", "c", "d")
LOAD_TIMEOUT_S = 900.0
NAMES = {
    "taskguard": "Task Guard",
    "taskguard-etcd": "TG on etcd",
    "etcd": "etcd mutex",
    "redis-durable": "Redis AOF always",
    "redis-volatile": "Redis no persist",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS), help="any of a,b,c,d,e (default: a,b,c,d)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"for a and b (default: {','.join(SYSTEMS)})")
    parser.add_argument("--quick", action="store_true", help="one repetition and short runs (about a minute)")
    parser.add_argument("--reps", type=int, help="repetitions of a, b and d (default 2, 3, 2; --quick: 1)")
    parser.add_argument("--duration", type=float, help="seconds measured per scenario a run (default 4; --quick 1.5)")
    parser.add_argument("--holds", type=int, default=10_000, help="Hold streams in c")
    parser.add_argument("--drop", type=int, default=1000, help="of which dropped at once")
    parser.add_argument("--storm", type=int, default=1000, help="concurrent acquires of one key in b")
    parser.add_argument("--watchers", type=int, default=100, help="watchers in d (measured against 0)")
    parser.add_argument("--waiters", type=int, help="Hold streams queued on one key in e (default 1000; --quick 100)")
    parser.add_argument("--queue-wait", type=float, default=3600.0, help="seconds e's drain may take")
    parser.add_argument("--json", type=Path, help="also write every result (and the servers' facts) here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, databases)")
    args = parser.parse_args(argv)
    args.scenarios = [part for part in args.scenarios.split(",") if part]
    args.systems = [part for part in args.systems.split(",") if part]
    if set(args.scenarios) - set(SCENARIOS) or set(args.systems) - set(SYSTEMS) or "taskguard" not in args.systems:
        parser.error(f"scenarios are {SCENARIOS}; systems are {SYSTEMS} and must include taskguard")
    return args


def load_flags(scenario: str, args: argparse.Namespace) -> list[str]:
    quick = args.quick
    reps = args.reps or (1 if quick else {"a": 2, "b": 3, "d": 2}.get(scenario, 1))
    duration = args.duration or (1.5 if quick else 4.0)
    flags = ["--reps", str(reps), "--duration", str(duration), "--warmup", "0.3" if quick else "0.5"]
    if scenario == "b":
        flags += ["--storm", str(args.storm)]
    if scenario == "c":
        flags += ["--holds", str(args.holds), "--drop", str(args.drop), "--idle", "1" if quick else "2"]
    if scenario == "d":
        flags += ["--watchers", f"0,{args.watchers}"]
    if scenario == "e":
        flags += ["--waiters", str(waiters(args)), "--queue-wait", str(args.queue_wait)]
    return flags


def waiters(args: argparse.Namespace) -> int:
    return int(args.waiters or (100 if args.quick else 1000))


def sidecar_flags(scenario: str, args: argparse.Namespace) -> tuple[str, ...]:
    """The default rule queues 64 callers per key; e queues all its waiters on one."""
    return ("--max-queue", str(waiters(args))) if scenario == "e" else ()


def run_load(command: list[str], timeout_s: float = LOAD_TIMEOUT_S) -> list[dict[str, Any]]:
    """The load process's JSON lines, echoed as they come; its stderr goes straight to ours."""
    print("+", " ".join(command), file=sys.stderr, flush=True)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=ROOT, text=True)
    watchdog = threading.Timer(timeout_s, process.kill)
    watchdog.start()
    results = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            result = json.loads(line)
            print(f"  {json.dumps(result)}", file=sys.stderr, flush=True)
            results.append(result)
    finally:
        watchdog.cancel()
        code = process.wait()
    if code != 0:
        raise RuntimeError(f"load process exited with {code}")
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    others = [name for name in args.systems if name != "taskguard"] if {"a", "b"} & set(args.scenarios) else []
    needed = tuple(
        binary
        for binary, wanted in (("etcd", "etcd"), ("redis-server", "redis"))
        if any(name.startswith(wanted) or name.endswith(wanted) for name in others)
    )
    servers.ensure_binaries(needed)
    workdir = Path(tempfile.mkdtemp(prefix="tg-bench-", dir="/tmp"))  # short: unix socket paths
    results: list[dict[str, Any]] = []
    facts: dict[str, dict[str, str]] = {}
    try:
        with ExitStack() as stack:
            extra: list[str] = []
            pids: dict[str, int] = {}
            if "etcd" in others or "taskguard-etcd" in others:
                etcd = servers.start_etcd(workdir / "etcd")
                stack.callback(etcd.stop)
                extra += ["--etcd", etcd.address]
                pids["etcd"], facts["etcd"] = etcd.pid, etcd.facts
            for name in ("redis-durable", "redis-volatile"):
                if name in others:
                    redis = servers.start_redis(workdir / name, durable=name == "redis-durable")
                    stack.callback(redis.stop)
                    extra += [f"--{name}", redis.address]
                    pids[name], facts[name] = redis.pid, redis.facts
            for scenario in args.scenarios:
                sidecar = servers.start_sidecar(workdir / f"sidecar-{scenario}", flags=sidecar_flags(scenario, args))
                on_etcd: list[servers.Server] = []
                try:
                    facts["taskguard"] = sidecar.facts
                    sidecar_pids = {"taskguard": sidecar.pid}
                    target_flags: list[str] = []
                    if scenario in ("a", "b") and "taskguard-etcd" in others:
                        # The storm is spread over two sidecars on one prefix, as over two hosts.
                        prefix = f"/tg-etcd-{scenario}/"
                        for index in range(2 if scenario == "b" else 1):
                            on_etcd.append(
                                servers.start_sidecar(workdir / f"tg-etcd-{scenario}{index}", etcd.address, prefix)
                            )
                        facts["taskguard-etcd"] = {**on_etcd[0].facts, "sidecars": str(len(on_etcd))}
                        sidecar_pids["taskguard-etcd"] = on_etcd[0].pid
                        target_flags = ["--target-etcd", ",".join(server.address for server in on_etcd)]
                    pid_flags = [f"--pid={name}={pid}" for name, pid in {**pids, **sidecar_pids}.items()]
                    systems = ",".join(args.systems) if scenario in ("a", "b") else "taskguard"
                    command = [sys.executable, "-m", "bench.load", "--target", sidecar.address, "--scenarios", scenario]
                    command += ["--systems", systems, *target_flags, *pid_flags, *extra, *load_flags(scenario, args)]
                    # e's drain is bounded by its own --queue-wait (its queueing and checks take minutes more).
                    timeout_s = max(LOAD_TIMEOUT_S, args.queue_wait + 600) if scenario == "e" else LOAD_TIMEOUT_S
                    results += run_load(command, timeout_s)
                finally:
                    sidecar.stop()
                    for server in on_etcd:
                        server.stop()
    finally:
        if args.keep:
            print(f"bench: kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    for result in results:
        result["durability"] = durability(result["system"], facts)
    meta = {
        "date": datetime.date.today().isoformat(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "note": "client (load process) and every server share this machine",
        "args": " ".join(argv if argv is not None else sys.argv[1:]),
    }
    report = Report(results, facts, meta)
    print(report.text())
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "servers": facts, "results": results}, indent=2) + "\n")
        print(f"bench: wrote {args.json}")
    problems = report.problems()
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


def durability(system: str, facts: dict[str, dict[str, str]]) -> str:
    fact = facts.get(system, {})
    if system == "taskguard":
        return f"sqlite journal_mode={fact.get('journal_mode')} synchronous={fact.get('synchronous')}"
    if system == "taskguard-etcd":
        return "the etcd above (raft WAL fsync per commit)"
    if system == "etcd":
        return f"etcd {fact.get('version')}: {fact.get('durability')}"
    if fact.get("appendonly") != "yes":
        return f"redis {fact.get('version')}: appendonly={fact.get('appendonly')} save={fact.get('save')!r} (none)"
    return f"redis {fact.get('version')}: appendonly=yes appendfsync={fact.get('appendfsync')}"


class Report:
    """The table, the ratios to Task Guard, the issue's targets, and what went wrong."""

    def __init__(self, results: list[dict[str, Any]], facts: dict[str, dict[str, str]], meta: dict[str, Any]) -> None:
        self.results = results
        self.facts = facts
        self.meta = meta

    def of(self, scenario: str, **match: Any) -> list[dict[str, Any]]:
        return [
            result
            for result in self.results
            if result["scenario"] == scenario and all(result.get(key) == value for key, value in match.items())
        ]

    def text(self) -> str:
        lines = [
            "",
            f"Task Guard benchmark, {self.meta['date']}: {self.meta['cores']} cores, load process and servers "
            "on this one machine",
            "durability:",
        ]
        for system in self.facts:
            lines.append(f"  {NAMES[system]:<17} {durability(system, self.facts)}")
        lines += self._cycles() + self._storm() + self._holds() + self._watch() + self._queue() + self._targets()
        return "\n".join(lines)

    def _cycles(self) -> list[str]:
        rows = self.of("a")
        if not rows:
            return []
        lines = [
            "",
            "(a) acquire -> release cycles on distinct keys",
            f"  {'system':<17} {'clients':>7} {'cycles/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'srv CPU us/cycle':>17}"
            f" {'vs Task Guard':>14}",
        ]
        for row in rows:
            ours = self.of("a", system="taskguard", concurrency=row["concurrency"])
            ratio = ours[0]["cycles_per_s"] / row["cycles_per_s"] if ours and row["cycles_per_s"] else None
            lines.append(
                f"  {NAMES[row['system']]:<17} {row['concurrency']:>7} {row['cycles_per_s']:>9.0f}"
                f" {row['acquire_p50_ms']:>8.2f} {row['acquire_p99_ms']:>8.2f}"
                f" {_num(row['server_cpu_us_per_cycle']):>17}"
                f" {'' if row['system'] == 'taskguard' or ratio is None else f'TG {ratio:.2f}x':>14}"
                + (f"  errors {row['errors']}" if row["errors"] else "")
            )
        lines.append("  (vs Task Guard: Task Guard's cycles/s divided by this system's, same run)")
        return lines

    def _storm(self) -> list[str]:
        rows = self.of("b")
        if not rows:
            return []
        ours = self.of("b", system="taskguard")
        lines = [
            "",
            f"(b) duplicate storm: {rows[0]['concurrency']} concurrent acquires of one key",
            f"  {'system':<17} {'winners':>9} {'all answered ms':>16} {'p99 answer ms':>14} {'vs Task Guard':>14}",
        ]
        for row in rows:
            ratio = row["all_answered_ms"] / ours[0]["all_answered_ms"] if ours and ours[0]["all_answered_ms"] else None
            winners = ",".join(str(count) for count in row["winners"])
            lines.append(
                f"  {NAMES[row['system']]:<17} {winners:>9} {row['all_answered_ms']:>16.0f}"
                f" {row['answer_p99_ms']:>14.0f}"
                f" {'' if row['system'] == 'taskguard' or ratio is None else f'TG {ratio:.2f}x':>14}"
            )
        lines.append(
            f"  (all answered: median of {len(rows[0]['runs_all_answered_ms'])} runs; winners: one per run;"
            " vs Task Guard: this system's time divided by Task Guard's)"
        )
        return lines

    def _holds(self) -> list[str]:
        lines = []
        for row in self.of("c"):
            lines += [
                "",
                f"(c) {row['held']} Hold streams on distinct keys (Task Guard)",
                f"  opened and acquired in {row['open_s']:.1f} s; sidecar RSS {row['rss_before_mib']:.0f} -> "
                f"{row['rss_held_mib']:.0f} MiB",
                f"  sidecar CPU: {row['cpu_open_s']:.1f} s to open them (+{row['cpu_settle_s']:.1f} s in the second "
                f"after), {_num(row['idle_cpu_percent'], 1)}% of a core while holding them idle",
                f"  dropped {row['dropped']} at once (SIGKILL of their process): {row['abandoned']} ABANDONED, "
                f"first after {_num(row['first_abandoned_ms'])} ms, all after {_num(row['all_abandoned_ms'])} ms",
            ]
        return lines

    def _watch(self) -> list[str]:
        rows = self.of("d")
        if not rows:
            return []
        base = next((row for row in rows if row["watchers"] == 0), None)
        lines = [
            "",
            f"(d) scenario a at {rows[0]['concurrency']} clients with watchers (Task Guard)",
            f"  {'watchers':>8} {'cycles/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'srv CPU us/cycle':>17}"
            f" {'vs 0 watchers':>14}",
        ]
        for row in rows:
            share = row["cycles_per_s"] / base["cycles_per_s"] if base and base["cycles_per_s"] else None
            ended = f"  watchers ended early: {row['watchers_ended_early']}" if row.get("watchers_ended_early") else ""
            lines.append(
                f"  {row['watchers']:>8} {row['cycles_per_s']:>9.0f} {row['acquire_p50_ms']:>8.2f}"
                f" {row['acquire_p99_ms']:>8.2f} {_num(row['server_cpu_us_per_cycle']):>17}"
                f" {'' if share is None or not row['watchers'] else f'{share:.0%}':>14}{ended}"
            )
        return lines

    def _queue(self) -> list[str]:
        lines = []
        for row in self.of("e"):
            fifths = " / ".join(f"{value:.0f}" for value in row["handover_median_by_fifth_ms"])
            lines += [
                "",
                f"(e) {row['waiters']} Hold streams queued on one key, drained by short runs (Task Guard)",
                f"  queued in {row['open_s']:.1f} s; {row['ran']} ran one after another in {_num(row['drain_s'], 1)} s",
                f"  handover (release sent -> next ACQUIRED): p50 {row['handover_p50_ms']:.1f} ms, p99"
                f" {row['handover_p99_ms']:.1f} ms, max {row['handover_max_ms']:.1f} ms",
                f"  (from the release's reply: p50 {row['handover_from_reply_p50_ms']:.1f} ms, p99"
                f" {row['handover_from_reply_p99_ms']:.1f} ms)",
                f"  median handover by fifth of the drain, longest queue first: {fifths} ms",
                f"  queue-position notices: {row['notices']} ({row['notice_mib']:.0f} MiB); sidecar CPU"
                f" {_num(row['server_cpu_s'], 1)} s ({_num(row['server_cpu_ms_per_handover'], 1)} ms per handover)",
            ]
        return lines

    def _targets(self) -> list[str]:
        """Issue 6's targets, each with the figure that meets or misses it."""
        checks: list[tuple[str, bool | None, str]] = []
        ours = self.of("a", system="taskguard", concurrency=64)
        for other in ("etcd", "redis-durable"):
            theirs = self.of("a", system=other, concurrency=64)
            if ours and theirs:
                ratio = ours[0]["cycles_per_s"] / theirs[0]["cycles_per_s"]
                checks.append((f"(a) 64 clients: cycles/s >= 1.0x {NAMES[other]}", ratio >= 1.0, f"{ratio:.2f}x"))
        etcd = self.of("a", system="etcd", concurrency=64)
        if ours and etcd:
            p99, theirs = ours[0]["acquire_p99_ms"], etcd[0]["acquire_p99_ms"]
            checks.append(("(a) 64 clients: p99 acquire <= etcd's", p99 <= theirs, f"{p99:.1f} vs {theirs:.1f} ms"))
        for row in self.of("b", system="taskguard"):
            slowest = max(row["runs_all_answered_ms"])
            one = all(count == 1 for count in row["winners"])
            checks.append(
                ("(b) exactly one winner, all answered within 1 s", one and slowest <= 1000, f"{slowest:.0f} ms")
            )
        for row in self.of("c"):
            checks.append(
                ("(c) held streams within 300 MiB RSS", row["rss_held_mib"] <= 300, f"{row['rss_held_mib']:.0f} MiB")
            )
            abandoned_ms = row["all_abandoned_ms"]
            checks.append(
                (
                    "(c) dropped streams all ABANDONED within 2 s",
                    abandoned_ms is not None and abandoned_ms <= 2000,
                    f"{_num(abandoned_ms)} ms",
                )
            )
        rows = self.of("d")
        base = next((row for row in rows if row["watchers"] == 0), None)
        for row in rows:
            if base and row["watchers"]:
                share = row["cycles_per_s"] / base["cycles_per_s"]
                checks.append(
                    (f"(d) {row['watchers']} watchers cost <= 20% throughput", share >= 0.8, f"keeps {share:.0%}")
                )
        if not checks:
            return []
        lines = ["", "issue 6 targets (this run):"]
        lines += [f"  {'met   ' if met else 'MISSED'} {what}: {figure}" for what, met, figure in checks]
        return lines + self._etcd_targets()

    def _etcd_targets(self) -> list[str]:
        """Issue 14's targets for Task Guard on its etcd store, against the etcd mutex of the same run."""
        checks: list[tuple[str, bool, str]] = []
        ours, theirs = (
            self.of("a", system="taskguard-etcd", concurrency=64),
            self.of("a", system="etcd", concurrency=64),
        )
        if ours and theirs:
            ratio = ours[0]["cycles_per_s"] / theirs[0]["cycles_per_s"]
            checks.append(("(a) 64 clients: TG on etcd cycles/s >= 0.8x etcd mutex", ratio >= 0.8, f"{ratio:.2f}x"))
            p99, mutex_p99 = ours[0]["acquire_p99_ms"], theirs[0]["acquire_p99_ms"]
            checks.append(
                (
                    "(a) 64 clients: TG on etcd p99 acquire <= 2x etcd mutex's",
                    p99 <= 2 * mutex_p99,
                    f"{p99:.1f} vs {mutex_p99:.1f} ms ({p99 / mutex_p99:.2f}x)",
                )
            )
        for row in self.of("b", system="taskguard-etcd"):
            one = all(count == 1 for count in row["winners"])
            sidecars = self.facts.get("taskguard-etcd", {}).get("sidecars", "1")
            checks.append(
                (f"(b) TG on etcd over {sidecars} sidecars: exactly one winner", one, f"winners {row['winners']}")
            )
        if not checks:
            return []
        lines = ["", "issue 14 targets (this run):"]
        lines += [f"  {'met   ' if met else 'MISSED'} {what}: {figure}" for what, met, figure in checks]
        return lines

    def problems(self) -> list[str]:
        """Misbehaviour, as opposed to slowness."""
        found = []
        for row in self.results:
            if row.get("errors"):
                found.append(f"{row['scenario']} {row['system']} at {row['concurrency']}: errors {row['errors']}")
            if row.get("refused"):
                found.append(f"{row['scenario']} {row['system']}: {row['refused']} refusals on distinct keys")
            if row["scenario"] == "b" and any(count != 1 for count in row["winners"]):
                found.append(f"b {row['system']}: winners per run {row['winners']} (must be 1)")
            if row["scenario"] == "b" and any(count != row["concurrency"] for count in row["answered"]):
                found.append(f"b {row['system']}: answered per run {row['answered']} of {row['concurrency']}")
            if row["scenario"] == "c" and row["abandoned"] != row["dropped"]:
                found.append(f"c: {row['abandoned']} of {row['dropped']} dropped streams ABANDONED")
            if row["scenario"] == "e":
                found += [f"e: {problem}" for problem in row["problems"]]
        return found


def _num(value: float | None, decimals: int = 0) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


if __name__ == "__main__":
    sys.exit(main())
