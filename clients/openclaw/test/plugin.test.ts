/**
 * TaskGuardPlugin's hook handlers against a real sidecar, called the way
 * OpenClaw 2026.9.6 calls them (the gateway itself is in tests/openclaw/).
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { type Socket, createServer } from "node:net";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { resolveSettings } from "../src/config.ts";
import type { PluginLogger, ToolContext } from "../src/openclaw.ts";
import { TaskGuardPlugin } from "../src/plugin.ts";
import { Client } from "../../node/src/index.ts";
import { Sidecar, within } from "../../node/test/support.ts";

const ROOT = new URL("..", import.meta.url).pathname;
const NODE_CLIENT = new URL("../../node", import.meta.url).pathname;

class Logs implements PluginLogger {
  lines: string[] = [];
  info = (m: string) => void this.lines.push(`info ${m}`);
  warn = (m: string) => void this.lines.push(`warn ${m}`);
  error = (m: string) => void this.lines.push(`error ${m}`);
}

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
const label = () => `job-${process.pid}-${++counter}`;

before(async () => {
  sidecar = await Sidecar.start();
  client = new Client({ address: sidecar.address });
});

after(async () => {
  client?.close();
  await sidecar?.stop();
});

function plugin(config: Record<string, unknown> = {}): { plugin: TaskGuardPlugin; logs: Logs } {
  const logs = new Logs();
  const settings = resolveSettings({ address: sidecar.address, ...config }, ROOT, {});
  return { plugin: new TaskGuardPlugin({ settings, logger: logs, nodeClientRoot: NODE_CLIENT }), logs };
}

describe("sessions_spawn", () => {
  test("one sub-agent per task; the guard is released with the child's outcome at subagent_ended", async () => {
    const { plugin: guard } = plugin();
    const name = label();
    const params = { task: "research", label: name };
    try {
      const first = await guard.beforeToolCall({ toolName: "sessions_spawn", params, toolCallId: "c1" }, ctx("agent:main:a", "sessions_spawn", "c1"));
      assert.equal(first, undefined);
      const second = await guard.beforeToolCall({ toolName: "sessions_spawn", params, toolCallId: "c2" }, ctx("agent:main:b", "sessions_spawn", "c2"));
      assert.equal(second?.block, true);
      const held = await client.get(`agent:main::spawn:${name}`);
      assert.ok(second?.blockReason?.includes(held.runId) && second.blockReason.includes("agent:main:a"));

      // OpenClaw reports the accepted spawn, then (possibly much later) the child's end.
      await guard.afterToolCall(
        { toolName: "sessions_spawn", params, toolCallId: "c1", result: { details: { status: "accepted", runId: "child-1" } } },
        ctx("agent:main:a", "sessions_spawn", "c1"),
      );
      assert.equal((await client.get(held.taskKey)).state, "RUNNING");
      await guard.subagentEnded({ targetSessionKey: "s", targetKind: "subagent", reason: "subagent-complete", runId: "child-1", outcome: "error", error: "boom" }, {});
      const ended = await client.get(held.taskKey);
      assert.equal(ended.state, "FAILED");
      assert.match(ended.lastDetail, /boom/);
    } finally {
      guard.close();
    }
  });

  test("a child that ends before the spawn's after_tool_call is still matched", async () => {
    const { plugin: guard } = plugin();
    const name = label();
    const params = { task: "quick", label: name };
    try {
      await guard.beforeToolCall({ toolName: "sessions_spawn", params, toolCallId: "e1" }, ctx("agent:main:a", "sessions_spawn", "e1"));
      await guard.subagentEnded({ targetSessionKey: "s", targetKind: "subagent", reason: "done", runId: "child-e", outcome: "ok" }, {});
      await guard.afterToolCall(
        { toolName: "sessions_spawn", params, toolCallId: "e1", result: { details: { status: "accepted", runId: "child-e" } } },
        ctx("agent:main:a", "sessions_spawn", "e1"),
      );
      assert.equal((await client.get(`agent:main::spawn:${name}`)).state, "SUCCEEDED");
    } finally {
      guard.close();
    }
  });
});

describe("exec", () => {
  test("ACQUIRED rewrites the command; a blocked exec's lease is released CANCELLED", async () => {
    const { plugin: guard } = plugin({ taskguardBin: "/opt/tg" });
    const command = `echo ${label()}`;
    try {
      const answer = await guard.beforeToolCall({ toolName: "exec", params: { command, background: true }, toolCallId: "x1" }, ctx("agent:main:a", "exec", "x1"));
      const rewritten = String(answer?.params?.command);
      assert.match(rewritten, /^exec \/opt\/tg --addr unix:\S+ run 'agent:main::echo job-\d+-\d+' --run-id \S+ -- \/bin\/sh -c /);
      assert.equal(answer?.params?.background, true);
      await guard.afterToolCall({ toolName: "exec", params: {}, toolCallId: "x1", error: "blocked by another plugin", result: { details: { status: "blocked" } } }, ctx("agent:main:a", "exec", "x1"));
      const released = await client.get(`agent:main::${command}`);
      assert.equal(released.state, "CANCELLED");
    } finally {
      guard.close();
    }
  });

  test("RETRY_REQUIRES_APPROVAL asks, with the approval folded into the approved command", async () => {
    const { plugin: guard } = plugin({ taskguardBin: "tg" });
    const command = `false ${label()}`;
    const key = `agent:main::${command}`;
    const lease = await client.acquire(key);
    await client.release(lease.leaseId, "FAILED", "exit code 1");
    try {
      const answer = await guard.beforeToolCall({ toolName: "exec", params: { command }, toolCallId: "r1" }, ctx("agent:main:a", "exec", "r1"));
      assert.ok(answer?.requireApproval);
      assert.deepEqual(answer.requireApproval.allowedDecisions, ["allow-once", "deny"]);
      assert.match(String(answer.params?.command), /^tg --addr \S+ approve-retry .* --approver discord:u1 /);
      await answer.requireApproval.onResolution?.("allow-once");
      const approved = await client.get(key);
      assert.equal(approved.state, "RETRY_APPROVED");
      assert.equal(approved.approvedBy, "discord:u1");
    } finally {
      guard.close();
    }
  });
});

describe("exec without the wrapper (wrap: never)", () => {
  test("a foreground exec is released with its exit code", async () => {
    const { plugin: guard } = plugin({ tools: { exec: { wrap: "never" } } });
    const command = `make ${label()}`;
    try {
      const answer = await guard.beforeToolCall({ toolName: "exec", params: { command }, toolCallId: "f1" }, ctx("agent:main:a", "exec", "f1"));
      assert.equal(answer, undefined); // runs as it is
      assert.equal((await client.get(`agent:main::${command}`)).state, "RUNNING");
      await guard.afterToolCall(
        { toolName: "exec", params: { command }, toolCallId: "f1", result: { details: { status: "failed", exitCode: 3 } } },
        ctx("agent:main:a", "exec", "f1"),
      );
      const ended = await client.get(`agent:main::${command}`);
      assert.deepEqual([ended.state, ended.lastDetail], ["FAILED", "exit code 3"]);
    } finally {
      guard.close();
    }
  });

  test("a backgrounded exec keeps its lease until OpenClaw's process tool reports the end", async () => {
    const { plugin: guard } = plugin({ tools: { exec: { wrap: "never" } } });
    const command = `make ${label()}`;
    try {
      await guard.beforeToolCall({ toolName: "exec", params: { command }, toolCallId: "b1" }, ctx("agent:main:a", "exec", "b1"));
      await guard.afterToolCall(
        { toolName: "exec", params: { command }, toolCallId: "b1", result: { details: { status: "running", sessionId: "calm-reef" } } },
        ctx("agent:main:a", "exec", "b1"),
      );
      assert.equal((await client.get(`agent:main::${command}`)).state, "RUNNING");
      await guard.afterToolCall(
        { toolName: "process", params: { action: "poll", sessionId: "calm-reef" }, result: { details: { status: "completed", exitCode: 0 } } },
        ctx("agent:main:a", "process", "p1"),
      );
      assert.equal((await client.get(`agent:main::${command}`)).state, "SUCCEEDED");
    } finally {
      guard.close();
    }
  });
});

describe("trace context", () => {
  test("OpenClaw's ctx.trace reaches the sidecar as traceparent: its span is the tool call's child", async () => {
    const traced = await Sidecar.start(["--telemetry-console"], { OTEL_BSP_SCHEDULE_DELAY: "50" });
    const logs = new Logs();
    const settings = resolveSettings({ address: traced.address }, ROOT, {});
    const guard = new TaskGuardPlugin({ settings, logger: logs, nodeClientRoot: NODE_CLIENT });
    try {
      const call = ctx("agent:main:a", "exec", "t1");
      await guard.beforeToolCall({ toolName: "exec", params: { command: `echo ${label()}` }, toolCallId: "t1" }, call);
      await within(traced.waitFor(`"parent_id": "0x${call.trace?.spanId}"`), "the sidecar's span for the acquire");
      assert.match(traced.stdout, new RegExp(`"trace_id": "0x${call.trace?.traceId}"`));
    } finally {
      guard.close();
      await traced.stop();
    }
  });
});

describe("a sidecar that accepts connections and never answers", () => {
  test("the call is answered within the budget all the same", async () => {
    const dir = mkdtempSync("/tmp/tg-slow-");
    const path = join(dir, "slow.sock");
    const connections: Socket[] = [];
    const silent = createServer((socket) => void connections.push(socket)); // takes it, says nothing, not even HTTP/2's settings
    await new Promise<void>((resolve) => silent.listen(path, resolve));
    const logs = new Logs();
    const settings = resolveSettings({ address: `unix:${path}`, onUnavailable: "block", decisionTimeoutMs: 400 }, ROOT, {});
    const guard = new TaskGuardPlugin({ settings, logger: logs, nodeClientRoot: NODE_CLIENT });
    try {
      const started = performance.now();
      const answer = await guard.beforeToolCall({ toolName: "sessions_spawn", params: { task: "t", label: label() }, toolCallId: "s" }, ctx("agent:main:a", "sessions_spawn", "s"));
      assert.ok(performance.now() - started < 1000);
      assert.equal(answer?.block, true);
    } finally {
      guard.close();
      for (const socket of connections) socket.destroy();
      silent.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("an unreachable sidecar", () => {
  for (const policy of ["allow", "block"] as const) {
    test(`policy ${policy} answers within the budget`, async () => {
      const logs = new Logs();
      const settings = resolveSettings({ address: "unix:/tmp/no-such-taskguard.sock", onUnavailable: policy, decisionTimeoutMs: 300 }, ROOT, {});
      const guard = new TaskGuardPlugin({ settings, logger: logs, nodeClientRoot: NODE_CLIENT });
      try {
        const started = performance.now();
        const answer = await guard.beforeToolCall({ toolName: "exec", params: { command: "make deploy" }, toolCallId: "u" }, ctx("agent:main:a", "exec", "u"));
        const took = performance.now() - started;
        assert.ok(took < 1000, `${took} ms`);
        if (policy === "allow") {
          assert.equal(answer, undefined);
          assert.ok(logs.lines.some((line) => line.startsWith("warn") && line.includes("WITHOUT a guard")));
        } else {
          assert.equal(answer?.block, true);
          assert.match(String(answer?.blockReason), /could not confirm .* not started/);
        }
      } finally {
        guard.close();
      }
    });
  }
});
