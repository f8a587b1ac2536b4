/**
 * Rules that choose a conflict policy, against a real sidecar: a queued exec runs under the real `taskguard run`
 * after the run it waited for; a keep-newest sub-agent is replaced by a newer call; a sub-agent's wait ends
 * with the tool call's; a lock-delayed task is blocked with when it opens, not sent to an approval.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { Client } from "taskguard-sidecar-client";
import { resolveSettings } from "../src/config.ts";
import type { PluginLogger, ToolContext } from "../src/openclaw.ts";
import { TaskGuardPlugin } from "../src/plugin.ts";
import { ROOT, Sidecar, within } from "../../node/test/support.ts";

// Tasks named "locked-..." stay closed for a minute after a lost run.
const RULES = `
[[rules]]
name = "locked"
match = "*::locked-*"
lock_delay = "60s"
`;

const TASKGUARD = join(ROOT, ".venv", "bin", "taskguard");

const quiet: PluginLogger = { info: () => {}, warn: () => {}, error: () => {} };

function ctx(sessionKey: string, toolName: string, toolCallId: string): ToolContext {
  return {
    agentId: "main",
    sessionKey,
    toolName,
    toolCallId,
    trace: { traceId: randomBytes(16).toString("hex"), spanId: randomBytes(8).toString("hex"), traceFlags: "01" },
    requester: { channel: "discord", senderId: "u1" },
  };
}

let sidecar: Sidecar;
let client: Client;
let counter = 0;
const label = () => `${process.pid}-${++counter}`;

before(async () => {
  sidecar = new Sidecar();
  const config = join(sidecar.workdir, "rules.toml");
  writeFileSync(config, RULES);
  sidecar.args.push("--config", config);
  await sidecar.start();
  client = new Client({ address: sidecar.address });
});

after(async () => {
  client?.close();
  await sidecar?.stop();
});

function plugin(config: Record<string, unknown>): TaskGuardPlugin {
  const settings = resolveSettings({ address: sidecar.address, taskguardBin: TASKGUARD, ...config }, { PATH: process.env.PATH });
  return new TaskGuardPlugin({ settings, logger: quiet });
}

/** `sh -c command` in the background: its stderr so far, and its end. */
function startShell(command: string): { err: () => string; done: Promise<number | null> } {
  const child = spawn("/bin/sh", ["-c", command], { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  child.stderr.on("data", (chunk: Buffer) => void (err += chunk.toString()));
  return { err: () => err, done: new Promise((resolve) => child.once("close", resolve)) };
}

/** Resolves once `taskKey` has a waiter in its queue. */
async function queued(taskKey: string): Promise<void> {
  for await (const event of client.watch({ keyPrefix: taskKey, startRevision: 1 })) {
    if (event.type === "QUEUED") return;
  }
}

describe("rules", () => {
  test("onConflict is checked, and supersede is for execs only", () => {
    assert.throws(
      () => resolveSettings({ rules: [{ match: "x", name: "x", onConflict: "wait" }] }),
      /rules\[0\]\.onConflict must be one of reject, queue, keep-newest, supersede \(got "wait"\)/,
    );
    assert.throws(
      () => resolveSettings({ rules: [{ match: "x", name: "x", onConflict: "supersede" }] }),
      /rules\[0\]\.onConflict "supersede" needs "tool": "exec"/,
    );
    const [rule] = resolveSettings({ rules: [{ match: "x", name: "x", onConflict: "keep-newest", maxWaitMs: 5000 }] }).rules;
    assert.deepEqual([rule?.onConflict, rule?.maxWaitMs], ["keep-newest", 5000]);
  });
});

describe("exec", () => {
  test("queue: the second exec runs under taskguard run after the first, told what it waits for", async () => {
    const guard = plugin({ rules: [{ tool: "exec", match: "^echo (queued-\\S+)", name: "$1", onConflict: "queue", maxWaitMs: 20_000 }] });
    const name = `queued-${label()}`;
    const command = `echo ${name}`;
    const key = `agent:main::${name}`;
    try {
      const first = await guard.beforeToolCall({ toolName: "exec", params: { command }, toolCallId: "q1" }, ctx("agent:main:a", "exec", "q1"));
      const held = await client.get(key);
      assert.equal(held.state, "RUNNING");
      assert.ok(String(first?.params?.command).includes(`--run-id ${held.runId} --`), "the first takes the guard itself");

      const second = await guard.beforeToolCall({ toolName: "exec", params: { command }, toolCallId: "q2" }, ctx("agent:main:b", "exec", "q2"));
      assert.notEqual(second?.block, true);
      const rewritten = String(second?.params?.command);
      assert.match(rewritten, / --on-conflict queue --max-wait 20s --holder .* -- /);

      const shell = startShell(rewritten);
      await within(queued(key), "the wrapped exec queued");
      // The first exec never started (another plugin blocked it): its guard is released and the queue served.
      await guard.afterToolCall(
        { toolName: "exec", params: {}, toolCallId: "q1", error: "blocked", result: { details: { status: "blocked" } } },
        ctx("agent:main:a", "exec", "q1"),
      );
      assert.equal(await within(shell.done, "the queued exec to run"), 0, shell.err());
      assert.match(shell.err(), new RegExp(`is already running as run ${held.runId} .*\\(position 1\\) and runs after that run ends`));
      assert.match(shell.err(), /queued, position 1/);
      const ended = await client.get(key);
      assert.equal(ended.state, "SUCCEEDED");
      assert.ok(ended.fencingToken > held.fencingToken);
      assert.match(ended.holder, / agent:main:b \(exec\)$/, "the queued run names the session it came from");
    } finally {
      guard.close();
    }
  });

  test("supersede: the second exec asks the running one to stop, and says so first", async () => {
    const guard = plugin({ rules: [{ tool: "exec", match: "^echo (redo-\\S+)", name: "$1", onConflict: "supersede" }] });
    const command = `echo redo-${label()}`;
    try {
      await guard.beforeToolCall({ toolName: "exec", params: { command }, toolCallId: "s1" }, ctx("agent:main:a", "exec", "s1"));
      const held = await client.get(`agent:main::${command.slice("echo ".length)}`);
      const second = await guard.beforeToolCall({ toolName: "exec", params: { command }, toolCallId: "s2" }, ctx("agent:main:b", "exec", "s2"));
      const rewritten = String(second?.params?.command);
      assert.match(rewritten, / --on-conflict supersede --holder /);
      assert.ok(rewritten.includes(`already running as run ${held.runId}`) && rewritten.includes("That run is asked to stop"), rewritten);
    } finally {
      guard.close();
    }
  });

  test("LOCK_DELAYED is blocked with when the task opens, not sent to an approval", async () => {
    const guard = plugin({ tools: { exec: { wrap: "never" } } });
    const command = `locked-${label()}`;
    const key = `agent:main::${command}`;
    try {
      await guard.beforeToolCall({ toolName: "exec", params: { command }, toolCallId: "l1" }, ctx("agent:main:a", "exec", "l1"));
      await client.forceRelease(key, { reason: "stuck" });
      const lost = await client.get(key);
      assert.ok(lost.lockDelayUntil instanceof Date);
      const again = await guard.beforeToolCall({ toolName: "exec", params: { command }, toolCallId: "l2" }, ctx("agent:main:a", "exec", "l2"));
      assert.equal(again?.block, true);
      assert.equal(again?.requireApproval, undefined);
      assert.ok(again?.blockReason?.includes(`stays closed until ${lost.lockDelayUntil.toISOString()}`), again?.blockReason);
      assert.match(again?.blockReason ?? "", /No approval is needed/);
    } finally {
      guard.close();
    }
  });
});

describe("sessions_spawn", () => {
  const rule = (extra: Record<string, unknown>) => ({
    rules: [{ tool: "sessions_spawn", match: "^follow-up", name: "reply", scope: "session", ...extra }],
  });

  test("keep-newest: a newer call replaces the waiting one, and the newest runs once the first ends", async () => {
    const guard = plugin(rule({ onConflict: "keep-newest" }));
    const session = `agent:main:discord:${label()}`;
    const key = `${session}::reply`;
    const call = (id: string) =>
      guard.beforeToolCall({ toolName: "sessions_spawn", params: { task: `answer ${id}`, label: `follow-up ${id}` }, toolCallId: id }, ctx(session, "sessions_spawn", id));
    try {
      assert.equal(await call("k1"), undefined);
      const held = await client.get(key);
      const second = call("k2");
      await within(queued(key), "the second call queued");
      const third = call("k3");
      const replaced = await within(second, "the second call's answer");
      assert.equal(replaced?.block, true);
      assert.match(replaced?.blockReason ?? "", new RegExp(`a newer request for the same task \\(run [0-9a-f-]+\\) took its place in the queue behind run ${held.runId}`));
      await client.forceRelease(key, { reason: "the first answer is done" });
      assert.equal(await within(third, "the newest call's turn"), undefined);
      const newest = await client.get(key);
      assert.equal(newest.state, "RUNNING");
      assert.ok(newest.fencingToken > held.fencingToken);
    } finally {
      guard.close();
    }
  });

  test("queue: a call whose turn does not come while it may wait is blocked with its place and the run ahead", async () => {
    const guard = plugin(rule({ onConflict: "queue", maxWaitMs: 300 }));
    const session = `agent:main:discord:${label()}`;
    const call = (id: string) =>
      guard.beforeToolCall({ toolName: "sessions_spawn", params: { task: id, label: "follow-up" }, toolCallId: id }, ctx(session, "sessions_spawn", id));
    try {
      assert.equal(await call("w1"), undefined);
      const held = await client.get(`${session}::reply`);
      const blocked = await call("w2");
      assert.equal(blocked?.block, true);
      assert.match(blocked?.blockReason ?? "", new RegExp(`already running as run ${held.runId} .*waited in the task's queue at position 1`));
      assert.deepEqual((await client.get(held.taskKey)).waiters, []);
    } finally {
      guard.close();
    }
  });
});
