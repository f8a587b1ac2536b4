/**
 * TaskGuardPlugin's hook handlers against a real sidecar, called the way
 * OpenClaw 2026.9.6 calls them (the gateway itself is in tests/openclaw/).
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { spawn } from "node:child_process";
import { createRequire } from "node:module";
import { type Socket, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import type { ApprovalLedger } from "../src/approvals.ts";
import { resolveSettings } from "../src/config.ts";
import type { PluginLogger, ToolContext } from "../src/openclaw.ts";
import { TaskGuardPlugin } from "../src/plugin.ts";
import { Client } from "taskguard-sidecar-client";
import { TaskGuardService } from "../../node/src/generated/taskguard/v1/taskguard.ts";
import { Sidecar, within } from "../../node/test/support.ts";

const ROOT = new URL("..", import.meta.url).pathname;

class Logs implements PluginLogger {
  lines: string[] = [];
  #waiters: (() => void)[] = [];
  info = (m: string) => this.#add(`info ${m}`);
  warn = (m: string) => this.#add(`warn ${m}`);
  error = (m: string) => this.#add(`error ${m}`);

  #add(line: string): void {
    this.lines.push(line);
    for (const wake of this.#waiters.splice(0)) wake();
  }

  /** The first line matching `pattern`, once it is logged. */
  async waitFor(pattern: RegExp): Promise<string> {
    for (;;) {
      const line = this.lines.find((candidate) => pattern.test(candidate));
      if (line !== undefined) return line;
      await new Promise<void>((wake) => this.#waiters.push(wake));
    }
  }
}

/** Blocks this process's event loop, as a synchronous SQLite pass blocks the gateway's. */
function blockEventLoop(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
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

let fakeBin: string | undefined;

/** An executable file for taskguardBin, made once (the wrapper is only named in rewritten commands, never run). */
function fakeTaskguard(): string {
  if (fakeBin === undefined) {
    const folder = mkdtempSync(join(tmpdir(), "tg-fake-bin-"));
    process.once("exit", () => rmSync(folder, { recursive: true, force: true }));
    fakeBin = join(folder, "taskguard");
    writeFileSync(fakeBin, "#!/bin/sh\nexit 0\n", { mode: 0o755 });
  }
  return fakeBin;
}

function plugin(
  config: Record<string, unknown> = {},
  ledger?: ApprovalLedger,
): { plugin: TaskGuardPlugin; logs: Logs } {
  const logs = new Logs();
  const settings = resolveSettings({ address: sidecar.address, taskguardBin: fakeTaskguard(), ...config }, { PATH: process.env.PATH });
  return { plugin: new TaskGuardPlugin({ settings, logger: logs, ledger }), logs };
}

/** A run with no chat to ask in (`openclaw agent` from a command line): OpenClaw gives no requester channel. */
function cliCtx(sessionKey: string, toolName: string, toolCallId: string): ToolContext {
  return { agentId: "main", sessionKey, toolName, toolCallId, requester: { senderIsOwner: true } };
}

/** `sh -c command`, its output and exit code. */
function runShell(command: string): Promise<{ code: number | null; out: string; err: string }> {
  const child = spawn("/bin/sh", ["-c", command], { stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  let err = "";
  child.stdout.on("data", (chunk: Buffer) => void (out += chunk.toString()));
  child.stderr.on("data", (chunk: Buffer) => void (err += chunk.toString()));
  return new Promise((resolve) => child.once("close", (code) => resolve({ code, out, err })));
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
    const tg = fakeTaskguard();
    const { plugin: guard } = plugin({ taskguardBin: tg });
    const command = `echo ${label()}`;
    try {
      const answer = await guard.beforeToolCall({ toolName: "exec", params: { command, background: true }, toolCallId: "x1" }, ctx("agent:main:a", "exec", "x1"));
      const rewritten = String(answer?.params?.command);
      assert.ok(rewritten.startsWith(`exec ${tg} --addr unix:`), rewritten);
      assert.match(rewritten, / run 'agent:main::echo job-\d+-\d+' --run-id \S+ -- \/bin\/sh -c /);
      assert.equal(answer?.params?.background, true);
      await guard.afterToolCall({ toolName: "exec", params: {}, toolCallId: "x1", error: "blocked by another plugin", result: { details: { status: "blocked" } } }, ctx("agent:main:a", "exec", "x1"));
      const released = await client.get(`agent:main::${command}`);
      assert.equal(released.state, "CANCELLED");
    } finally {
      guard.close();
    }
  });

  test("RETRY_REQUIRES_APPROVAL asks; on allow the approver is OpenClaw's, and the approved command waits for the run", async () => {
    const lookedUp: string[] = [];
    const ledger: ApprovalLedger = {
      prepare: () => {},
      find: async (marker, sessionKey) => {
        lookedUp.push(`${marker} ${sessionKey}`);
        return { id: "plugin:0f0f", approver: "runtime:cli" };
      },
    };
    const { plugin: guard } = plugin({ taskguardBin: "echo" }, ledger); // the "wrapper" prints what it was asked
    const command = `false ${label()}`;
    const key = `agent:main::${command}`;
    const lease = await client.acquire(key);
    await client.release(lease.leaseId, "FAILED", "exit code 1");
    try {
      const answer = await guard.beforeToolCall({ toolName: "exec", params: { command }, toolCallId: "r1" }, ctx("agent:main:a", "exec", "r1"));
      assert.ok(answer?.requireApproval);
      assert.deepEqual(answer.requireApproval.allowedDecisions, ["allow-once", "deny"]);
      const approved = String(answer.params?.command);
      assert.doesNotMatch(approved, /approve-retry/);
      const shell = runShell(approved); // as OpenClaw would run it, right after the allow
      await answer.requireApproval.onResolution?.("allow-once");
      const ran = await within(shell, "the approved command");
      assert.equal(ran.code, 0, ran.err);
      const runId = /--run-id (\S+)/.exec(ran.out)?.[1];
      assert.ok(runId && answer.requireApproval.description.includes(runId), ran.out);
      assert.deepEqual(lookedUp, [`${runId} agent:main:a`]); // found by the retry's run id and its session
      const guarded = await client.get(key);
      assert.deepEqual([guarded.state, guarded.runId, guarded.attempt], ["RUNNING", runId, 2]); // acquired before "go"
      assert.equal(guarded.approvedBy, "runtime:cli");
      assert.match(guarded.approvalReason, /approval plugin:0f0f.*asked by discord:u1 from session agent:main:a/);
    } finally {
      guard.close();
    }
  });

  test("a denied retry's approved command never reaches the wrapper: it reads the refusal at its gate", async () => {
    const { plugin: guard } = plugin({ taskguardBin: "echo" });
    const command = `false ${label()}`;
    const key = `agent:main::${command}`;
    const lease = await client.acquire(key);
    await client.release(lease.leaseId, "FAILED", "exit code 1");
    try {
      const answer = await guard.beforeToolCall({ toolName: "exec", params: { command }, toolCallId: "d1" }, ctx("agent:main:a", "exec", "d1"));
      const shell = runShell(String(answer?.params?.command));
      await answer?.requireApproval?.onResolution?.("deny");
      const ran = await within(shell, "the approved command");
      assert.equal(ran.code, 76);
      assert.match(ran.err, /the approved retry was not started/);
      assert.equal(ran.out, ""); // echo (the wrapper) never ran
      assert.equal((await client.get(key)).state, "FAILED");
    } finally {
      guard.close();
    }
  });

  test("the approver is not the requester when OpenClaw's ledger cannot say who approved", async () => {
    const ledger: ApprovalLedger = { prepare: () => {}, find: async () => undefined };
    const { plugin: guard, logs } = plugin({ taskguardBin: "echo" }, ledger);
    const command = `false ${label()}`;
    const key = `agent:main::${command}`;
    const lease = await client.acquire(key);
    await client.release(lease.leaseId, "FAILED", "exit code 1");
    try {
      const answer = await guard.beforeToolCall({ toolName: "exec", params: { command }, toolCallId: "u1" }, ctx("agent:main:a", "exec", "u1"));
      await answer?.requireApproval?.onResolution?.("allow-once");
      const approved = await client.get(key);
      assert.equal(approved.approvedBy, "openclaw:unknown");
      assert.match(approved.approvalReason, /asked by discord:u1 .*who approved is unknown/);
      assert.ok(logs.lines.some((line) => line.includes("cannot tell who approved")));
    } finally {
      guard.close();
    }
  });

  test("a run that cannot show an approval is blocked with when and how the last run failed, and how to approve", async () => {
    const { plugin: guard } = plugin();
    const command = `false ${label()}`;
    const key = `agent:main::${command}`;
    const lease = await client.acquire(key);
    const failed = await client.release(lease.leaseId, "FAILED", "exit code 3");
    try {
      const answer = await guard.beforeToolCall({ toolName: "exec", params: { command }, toolCallId: "c1" }, cliCtx("agent:main:cli", "exec", "c1"));
      assert.equal(answer?.requireApproval, undefined); // OpenClaw would refuse it: "Plugin approval unavailable"
      assert.equal(answer?.block, true);
      const reason = String(answer?.blockReason);
      for (const part of [failed.runId, failed.releasedAt?.toISOString() ?? "?", "exit code 3", `taskguard approve-retry '${key}'`, "/approve"]) {
        assert.ok(reason.includes(part), `${part} in ${reason}`);
      }
      assert.equal((await client.get(key)).state, "FAILED");
    } finally {
      guard.close();
    }
  });
});

describe("exec without the wrapper (wrap: never, or no taskguard command)", () => {
  test("with no taskguard command to wrap in, an exec still takes the guard, as a TTL lease the plugin holds", async () => {
    const { plugin: guard } = plugin({ taskguardBin: "/nonexistent/taskguard" });
    assert.equal(guard.settings.taskguardBin, undefined);
    assert.match(guard.settings.taskguardMissing ?? "", /taskguardBin "\/nonexistent\/taskguard" is not an executable file/);
    const command = `make ${label()}`;
    try {
      const answer = await guard.beforeToolCall({ toolName: "exec", params: { command }, toolCallId: "m1" }, ctx("agent:main:a", "exec", "m1"));
      assert.equal(answer, undefined); // not rewritten to a wrapper that is not there
      assert.equal((await client.get(`agent:main::${command}`)).state, "RUNNING");
      const again = await guard.beforeToolCall({ toolName: "exec", params: { command }, toolCallId: "m2" }, ctx("agent:main:b", "exec", "m2"));
      assert.equal(again?.block, true);
    } finally {
      guard.close();
    }
  });

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
    const settings = resolveSettings({ address: traced.address }, {});
    const guard = new TaskGuardPlugin({ settings, logger: logs });
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
  test("the call is answered within the budget and the reachability check all the same", async () => {
    const dir = mkdtempSync("/tmp/tg-slow-");
    const path = join(dir, "slow.sock");
    const connections: Socket[] = [];
    const silent = createServer((socket) => void connections.push(socket)); // takes it, says nothing, not even HTTP/2's settings
    await new Promise<void>((resolve) => silent.listen(path, resolve));
    const logs = new Logs();
    const settings = resolveSettings({ address: `unix:${path}`, onUnavailable: "block", decisionTimeoutMs: 400 }, {});
    const guard = new TaskGuardPlugin({ settings, logger: logs });
    try {
      const started = performance.now();
      const answer = await guard.beforeToolCall({ toolName: "sessions_spawn", params: { task: "t", label: label() }, toolCallId: "s" }, ctx("agent:main:a", "sessions_spawn", "s"));
      // 400 ms of budget, then at most PROBE_MS (1 s) to connect: the socket never speaks HTTP/2.
      const took = performance.now() - started;
      assert.ok(took < 400 + 1000 + 500, `${took} ms`);
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
      const settings = resolveSettings({ address: "unix:/tmp/no-such-taskguard.sock", onUnavailable: policy, decisionTimeoutMs: 300 }, {});
      const guard = new TaskGuardPlugin({ settings, logger: logs });
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

describe("the connection is made when the plugin starts, not at the first call", () => {
  test("start() connects and warms the channel before any tool call", async () => {
    const { plugin: guard, logs } = plugin();
    try {
      guard.start();
      await within(logs.waitFor(/connected to the sidecar at .* \(health SERVING/), "the plugin's connection");
      assert.equal(guard.client.connectivity(), "READY");
    } finally {
      guard.close();
    }
  });
});

describe("the event loop blocked while a call waits (as the gateway's own SQLite passes block it)", () => {
  for (const started of [true, false]) {
    test(`an answer that came during the stall is taken, not a timeout (channel ${started ? "warmed at start" : "cold"})`, async () => {
      const { plugin: guard, logs } = plugin({ decisionTimeoutMs: 200 });
      const command = `make ${label()}`;
      try {
        if (started) {
          guard.start();
          await within(logs.waitFor(/connected to the sidecar/), "the plugin's connection");
        }
        const call = guard.beforeToolCall({ toolName: "exec", params: { command }, toolCallId: "s1" }, ctx("agent:main:a", "exec", "s1"));
        setImmediate(() => blockEventLoop(1500)); // once the request is on its way; far past the 200 ms budget
        const answer = await call;
        assert.match(String(answer?.params?.command), /run 'agent:main::make /, logs.lines.join("\n"));
        assert.ok(!logs.lines.some((line) => line.includes("WITHOUT a guard")), logs.lines.join("\n"));
        const decided = await logs.waitFor(/acquired run .* \(decided in \d+ ms/);
        assert.match(decided, /event loop was blocked \d+ ms/);
        assert.equal((await client.get(`agent:main::${command}`)).state, "RUNNING");
      } finally {
        guard.close();
      }
    });
  }
});

describe("a late grant after an allow decision", () => {
  let flaky: Sidecar;
  let flakyClient: Client;

  before(async () => {
    flaky = await Sidecar.start();
    flakyClient = new Client({ address: flaky.address });
  });

  after(async () => {
    flakyClient?.close();
    await flaky?.stop();
  });

  test("an exec let through while the sidecar was down takes the grant that comes later, and keeps it until it ends", async () => {
    const { plugin: guard, logs } = plugin({ address: flaky.address, decisionTimeoutMs: 200 });
    const command = `make ${label()}`;
    const key = `agent:main::${command}`;
    try {
      await flaky.kill();
      const first = await guard.beforeToolCall({ toolName: "exec", params: { command }, toolCallId: "l1" }, ctx("agent:main:a", "exec", "l1"));
      assert.equal(first, undefined); // policy allow: it runs as it is
      assert.ok(logs.lines.some((line) => /cannot connect .*policy allow: running it WITHOUT a guard/.test(line)), logs.lines.join("\n"));
      // The exec went to the background before the sidecar came back.
      await guard.afterToolCall(
        { toolName: "exec", params: { command }, toolCallId: "l1", result: { details: { status: "running", sessionId: "late-reef", pid: process.pid } } },
        ctx("agent:main:a", "exec", "l1"),
      );
      await flaky.start();
      await within(logs.waitFor(/guarded late: the sidecar granted run/), "the late grant", 30_000);
      const held = await flakyClient.get(key);
      assert.equal(held.state, "RUNNING");
      assert.equal(held.labels["openclaw.session_key"], "agent:main:a");

      const second = await guard.beforeToolCall({ toolName: "exec", params: { command }, toolCallId: "l2" }, ctx("agent:main:b", "exec", "l2"));
      assert.equal(second?.block, true);
      assert.ok(String(second?.blockReason).includes(held.runId), second?.blockReason);

      // The process ends (OpenClaw's process tool says so): only now is the guard released.
      await guard.afterToolCall(
        { toolName: "process", params: { action: "poll", sessionId: "late-reef" }, result: { details: { status: "completed", exitCode: 0 } } },
        ctx("agent:main:a", "process", "p1"),
      );
      const ended = await flakyClient.get(key);
      assert.deepEqual([ended.state, ended.runId], ["SUCCEEDED", held.runId]);
    } finally {
      guard.close();
    }
  });

  test("a sub-agent let through while the sidecar was down keeps the late grant until subagent_ended", async () => {
    const { plugin: guard, logs } = plugin({ address: flaky.address, decisionTimeoutMs: 200 });
    const name = label();
    const params = { task: "research", label: name };
    const key = `agent:main::spawn:${name}`;
    try {
      await flaky.kill();
      const first = await guard.beforeToolCall({ toolName: "sessions_spawn", params, toolCallId: "ls1" }, ctx("agent:main:a", "sessions_spawn", "ls1"));
      assert.equal(first, undefined);
      await guard.afterToolCall(
        { toolName: "sessions_spawn", params, toolCallId: "ls1", result: { details: { status: "accepted", runId: "child-late" } } },
        ctx("agent:main:a", "sessions_spawn", "ls1"),
      );
      await flaky.start();
      await within(logs.waitFor(/guarded late: the sidecar granted run .* held until subagent_ended/), "the late grant", 30_000);
      const held = await flakyClient.get(key);
      assert.deepEqual([held.state, held.streamBound], ["RUNNING", true]);
      const second = await guard.beforeToolCall({ toolName: "sessions_spawn", params, toolCallId: "ls2" }, ctx("agent:main:b", "sessions_spawn", "ls2"));
      assert.equal(second?.block, true);
      await guard.subagentEnded({ targetSessionKey: "s", targetKind: "subagent", reason: "subagent-complete", runId: "child-late", outcome: "ok" }, {});
      const ended = await flakyClient.get(key);
      assert.deepEqual([ended.state, ended.runId], ["SUCCEEDED", held.runId]);
    } finally {
      guard.close();
    }
  });
});

describe("a sidecar that is up but does not grant the call", () => {
  const grpc = createRequire(join(ROOT, "package.json"))("@grpc/grpc-js") as typeof import("@grpc/grpc-js");
  const bytes = { requestSerialize: (x: Buffer) => x, requestDeserialize: (x: Buffer) => x, responseSerialize: (x: Buffer) => x, responseDeserialize: (x: Buffer) => x };
  const health = { check: { path: "/grpc.health.v1.Health/Check", requestStream: false, responseStream: false, ...bytes } };
  let server: InstanceType<typeof grpc.Server>;
  let dir: string;
  let address: string;

  before(async () => {
    dir = mkdtempSync("/tmp/tg-up-");
    address = `unix:${join(dir, "up.sock")}`;
    server = new grpc.Server();
    server.addService(health, { check: (_call: unknown, done: (error: null, answer: Buffer) => void) => done(null, Buffer.from([0x08, 0x01])) }); // SERVING
    server.addService(TaskGuardService, {
      // A refusal for "refused-..." tasks; silence (a stuck store) for the rest.
      acquire: (call: { request: { taskKey: string } }, done: (error: object) => void) => {
        if (call.request.taskKey.includes("refused-")) done({ code: grpc.status.PERMISSION_DENIED, details: "holder: not allowed here" });
      },
    });
    await new Promise<void>((resolve, reject) =>
      server.bindAsync(address, grpc.ServerCredentials.createInsecure(), (error) => (error ? reject(error) : resolve())),
    );
  });

  after(() => {
    server?.forceShutdown();
    rmSync(dir, { recursive: true, force: true });
  });

  test("no answer within maxDecisionMs from a sidecar that answers its health check: blocked, even under policy allow", async () => {
    const { plugin: guard, logs } = plugin({ address, decisionTimeoutMs: 200, maxDecisionMs: 1500, onUnavailable: "allow" });
    try {
      const answer = await guard.beforeToolCall({ toolName: "exec", params: { command: `make ${label()}` }, toolCallId: "q1" }, ctx("agent:main:a", "exec", "q1"));
      assert.equal(answer?.block, true, logs.lines.join("\n"));
      assert.match(String(answer?.blockReason), /could not confirm .* service is up, so running it anyway could start it twice/);
      assert.ok(logs.lines.some((line) => /answers its health check but did not answer this call within 1500 ms; the sidecar is up, so the call is blocked/.test(line)), logs.lines.join("\n"));
    } finally {
      guard.close();
    }
  });

  test("an error answer (the sidecar refused the call) is blocked, not taken for unreachable", async () => {
    const { plugin: guard, logs } = plugin({ address, decisionTimeoutMs: 200, onUnavailable: "allow" });
    try {
      const answer = await guard.beforeToolCall({ toolName: "exec", params: { command: `refused-${label()}` }, toolCallId: "q2" }, ctx("agent:main:a", "exec", "q2"));
      assert.equal(answer?.block, true, logs.lines.join("\n"));
      assert.match(String(answer?.blockReason), /not allowed here/);
      assert.ok(!logs.lines.some((line) => line.includes("WITHOUT a guard")));
    } finally {
      guard.close();
    }
  });
});
