import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { findTaskguard, resolveSettings } from "../src/config.ts";
import { alreadyRunningReason, approvalPrompt, approvalUnavailableReason } from "../src/messages.ts";
import { describeCall, identify, normaliseCommand, safeName } from "../src/naming.ts";
import { shellQuote, wrapCommand } from "../src/shell.ts";
import { traceparentOf } from "../src/trace.ts";
import type { Guard, Holder } from "taskguard-sidecar-client";

const origin = { agentId: "ops", sessionKey: "agent:ops:discord:channel:42" };
const settings = resolveSettings(
  {
    rules: [
      { tool: "exec", match: "report\\.sh --date (\\S+)", name: "nightly-report-$1", scope: "global" },
      { match: "weekly digest", name: "weekly-digest", onUnavailable: "block" },
    ],
  },
  {},
);

describe("task keys", () => {
  test("an exec is keyed by the agent and its normalised command by default", () => {
    const id = identify("exec", { command: "  ls   -l\n" }, origin, "agent", []);
    assert.equal(id.taskKey, "agent:ops::ls -l");
    assert.equal(normaliseCommand("a \t b\n"), "a b");
  });

  test("session and global scopes", () => {
    assert.equal(identify("exec", { command: "x" }, origin, "session", []).taskKey, `${origin.sessionKey}::x`);
    assert.equal(identify("exec", { command: "x" }, origin, "global", []).taskKey, "global::x");
    // No agent id in the context: the session key carries it.
    assert.equal(identify("exec", { command: "x" }, { agentId: undefined, sessionKey: "agent:a1:s" }, "agent", []).taskKey, "agent:a1::x");
  });

  test("rules name tasks, with groups, scope and policy", () => {
    const report = identify("exec", { command: "./report.sh --date today" }, origin, "agent", settings.rules);
    assert.deepEqual([report.taskKey, report.onUnavailable], ["global::nightly-report-today", undefined]);
    const digest = identify("sessions_spawn", { task: "write the weekly digest" }, origin, "agent", settings.rules);
    assert.deepEqual([digest.taskKey, digest.onUnavailable], ["agent:ops::weekly-digest", "block"]);
  });

  test("a spawn is named by its taskName, else its label, else a hash of its task", () => {
    assert.equal(describeCall("sessions_spawn", { taskName: "digest", label: "Digest" }).name, "spawn:digest");
    assert.equal(describeCall("sessions_spawn", { label: "Digest" }).name, "spawn:Digest");
    const a = describeCall("sessions_spawn", { task: "do a" }).name;
    assert.match(a, /^spawn:spawn #[0-9a-f]{12}$/);
    assert.notEqual(a, describeCall("sessions_spawn", { task: "do b" }).name);
  });

  test("names stay valid in a key: no '::', no control characters, long ones shortened with a hash", () => {
    assert.equal(safeName("echo a::b"), "echo a: :b");
    assert.equal(safeName("a\u0007b"), "a b");
    const long = safeName(`run ${"x".repeat(400)}`);
    assert.ok(Buffer.byteLength(long) < 100, long);
    assert.match(long, /… #[0-9a-f]{12}$/);
    assert.notEqual(long, safeName(`run ${"x".repeat(399)}y`));
  });
});

describe("texts", () => {
  const guard = {
    taskKey: "agent:ops::nightly-report",
    runId: "run-1",
    holder: "openclaw@h:1 agent:ops:discord (exec)",
    startedAt: new Date("2026-01-01T10:00:00Z"),
    labels: { "openclaw.session_key": "agent:ops:discord:channel:42" },
    state: "FAILED",
    lastDetail: "exit code 3",
    releasedAt: new Date("2026-01-01T10:05:00Z"),
    holders: [],
    runs: [],
  } as unknown as Guard;

  test("ALREADY_RUNNING names the task, the run, since when, where, and where the result goes", () => {
    const reason = alreadyRunningReason("nightly-report", guard, new Date("2026-01-01T10:02:00Z"));
    for (const part of ["nightly-report", "already running", "run-1", "2026-01-01T10:00:00.000Z", "2 min ago", "agent:ops:discord:channel:42", "reported there"]) {
      assert.ok(reason.includes(part), `${part} in ${reason}`);
    }
  });

  test("ALREADY_RUNNING of a single run keeps its wording", () => {
    assert.equal(
      alreadyRunningReason("nightly-report", guard, new Date("2026-01-01T10:02:00Z")),
      'Task Guard: "nightly-report" is already running, so it was not started again. Run run-1 has been running ' +
        "since 2026-01-01T10:00:00.000Z (2 min ago), started from session agent:ops:discord:channel:42; its result " +
        "will be reported there. Tell the user it is already running (run run-1) instead of starting it again.",
    );
  });

  /** A key three runs hold at once, as the sidecar answers a refused fourth: two holders and the guard's own run. */
  function semaphore(count: number): Guard {
    const runs = Array.from({ length: count }, (_, i): Holder => {
      const startedAt = new Date(Date.parse("2026-01-01T10:00:00Z") + i * 60_000);
      const where = `agent:ops:discord:channel:${i}`;
      const session: Record<string, string> = i % 2 === 0 ? { "openclaw.session_key": where } : {};
      return {
        runId: `run-${i}`,
        holder: `openclaw@h:${i} (exec)`,
        fencingToken: i + 1,
        attempt: i + 1,
        startedAt,
        expiresAt: undefined,
        heartbeatAt: startedAt,
        streamBound: true,
        labels: session,
        stale: false,
      };
    });
    const own = runs.at(-1);
    assert.ok(own !== undefined);
    return { ...guard, ...own, state: "RUNNING", holders: runs.slice(0, -1), runs } as unknown as Guard;
  }

  test("ALREADY_RUNNING of a task several runs hold at once says how many and names each: id, since when, where", () => {
    const reason = alreadyRunningReason("nightly-report", semaphore(3), new Date("2026-01-01T10:05:00Z"));
    for (const part of [
      '"nightly-report" is already running as often as it may run at once (3 runs)',
      "not started again",
      "run run-0, since 2026-01-01T10:00:00.000Z (5 min ago), started from session agent:ops:discord:channel:0",
      "run run-1, since 2026-01-01T10:01:00.000Z (4 min ago), started from holder openclaw@h:1 (exec)",
      "run run-2, since 2026-01-01T10:02:00.000Z (3 min ago), started from session agent:ops:discord:channel:2",
      "already running 3 times at once",
      "once one of those runs ends",
    ]) {
      assert.ok(reason.includes(part), `${part} in ${reason}`);
    }
    assert.ok(reason.indexOf("run-0") < reason.indexOf("run-1") && reason.indexOf("run-1") < reason.indexOf("run-2"));
  });

  test("ALREADY_RUNNING of a task many runs hold at once names the oldest few and counts the rest", () => {
    const reason = alreadyRunningReason("nightly-report", semaphore(20), new Date("2026-01-01T11:00:00Z"));
    assert.ok(reason.includes("(20 runs)") && reason.includes("run run-7, since"), reason);
    assert.ok(!reason.includes("run-8") && reason.includes("; and 12 more."), reason);
    assert.ok(reason.length < 2000, `${reason.length}`);
  });

  test("the approval prompt gives the failed run's time and exit code, within the Gateway's limits", () => {
    const { title, description } = approvalPrompt("nightly-report", guard, "retry-run-7");
    assert.ok(title.length <= 80 && description.length <= 512);
    assert.ok(description.includes("2026-01-01T10:05:00.000Z") && description.includes("exit code 3"), description);
  });

  test("the approval prompt keeps the retry's run id (how the plugin finds it in OpenClaw's ledger) for any task", () => {
    const long = { ...guard, lastDetail: "x".repeat(4000) } as Guard;
    const { description } = approvalPrompt("n".repeat(2000), long, "c0ffee00-0000-4000-8000-000000000001");
    assert.ok(description.length <= 512, `${description.length}`);
    assert.ok(description.includes("c0ffee00-0000-4000-8000-000000000001"), description);
  });

  test("a run that cannot show an approval is told when and how the last run failed, and how to approve", () => {
    const reason = approvalUnavailableReason("nightly-report", "agent:ops::nightly-report", guard);
    for (const part of ["not started", "run-1", "2026-01-01T10:05:00.000Z", "exit code 3", "taskguard approve-retry agent:ops::nightly-report", "/approve"]) {
      assert.ok(reason.includes(part), `${part} in ${reason}`);
    }
  });
});

describe("the exec wrapper", () => {
  test("quotes for the shell", () => {
    assert.equal(shellQuote("plain/path-1.0"), "plain/path-1.0");
    assert.equal(shellQuote("it's a 'test'"), `'it'\\''s a '\\''test'\\'''`);
  });

  test("runs the command under taskguard run with the plugin's run id", () => {
    const command = wrapCommand({
      taskguardBin: "/v/bin/taskguard",
      address: "unix:/run/tg.sock",
      taskKey: "agent:ops::ls -l",
      runId: "r1",
      command: "ls -l 'x y'",
    });
    assert.equal(
      command,
      `exec /v/bin/taskguard --addr unix:/run/tg.sock run 'agent:ops::ls -l' --run-id r1 -- /bin/sh -c 'ls -l '\\''x y'\\'''`,
    );
  });

  test("an approved retry reads its gate first and runs only on go", () => {
    const command = wrapCommand({
      taskguardBin: "tg",
      address: "unix:/s",
      taskKey: "k::n",
      runId: "r",
      command: "true",
      gate: "/tmp/g/gate",
    });
    assert.match(command, /^taskguard_gate=; \{ IFS= read -r taskguard_gate < \/tmp\/g\/gate; \} 2>\/dev\/null; if \[ "\$taskguard_gate" != go \]; then .*exit 76; fi; exec tg --addr unix:\/s run k::n --run-id r -- \/bin\/sh -c true$/);
  });
});

describe("trace context", () => {
  test("ctx.trace becomes a W3C traceparent", () => {
    const trace = { traceId: "a".repeat(32), spanId: "b".repeat(16), traceFlags: "01" };
    assert.equal(traceparentOf(trace), `00-${"a".repeat(32)}-${"b".repeat(16)}-01`);
    assert.equal(traceparentOf({ traceId: "a".repeat(32) }), undefined);
    assert.equal(traceparentOf({ traceId: "0".repeat(32), spanId: "b".repeat(16) }), undefined);
  });
});

describe("the taskguard command", () => {
  const folder = mkdtempSync(join(tmpdir(), "tg-find-"));
  const bin = join(folder, "bin");
  mkdirSync(bin);
  writeFileSync(join(bin, "taskguard"), "#!/bin/sh\n", { mode: 0o755 });
  writeFileSync(join(bin, "not-executable"), "", { mode: 0o644 });
  after(() => rmSync(folder, { recursive: true, force: true }));

  test("is taskguard on PATH, as an absolute path, when none is configured", () => {
    assert.deepEqual(findTaskguard(undefined, { PATH: `/nonexistent:${bin}` }), { path: join(bin, "taskguard") });
  });

  test("is the configured path, or the configured name looked up on PATH", () => {
    assert.deepEqual(findTaskguard(join(bin, "taskguard"), { PATH: "" }), { path: join(bin, "taskguard") });
    assert.deepEqual(findTaskguard("taskguard", { PATH: bin }), { path: join(bin, "taskguard") });
  });

  test("is missing, saying where it looked and what to do, when it is not there or not executable", () => {
    const none = findTaskguard(undefined, { PATH: "/nonexistent" });
    assert.ok("missing" in none);
    assert.match(none.missing, /^no taskguard command on PATH \(\/nonexistent\); install it .*set plugins\.entries\.taskguard\.config\.taskguardBin/);
    const configured = findTaskguard(join(bin, "not-executable"), { PATH: bin });
    assert.ok("missing" in configured);
    assert.match(configured.missing, /^taskguardBin ".*not-executable" is not an executable file/);
    assert.equal(resolveSettings({}, { PATH: "/nonexistent" }).taskguardBin, undefined);
  });
});
