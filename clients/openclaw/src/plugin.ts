/**
 * Task Guard in front of OpenClaw's `exec` and `sessions_spawn`.
 *
 * Theory of operation
 * -------------------
 * `before_tool_call` names the task (`naming.ts`) and asks the sidecar for its
 * guard, with a fresh run id, under a budget (`decisionTimeoutMs`, 1.5 s by
 * default) that no sidecar trouble can stretch:
 *
 * - ACQUIRED, exec: a TTL lease, and the command rewritten to run under
 *   `taskguard run KEY --run-id RUN` (`shell.ts`), which takes the lease over
 *   on its own Hold stream: the guard then lives exactly as long as the
 *   process, however long OpenClaw keeps it in the background, and ends
 *   SUCCEEDED, FAILED (exit code) or ABANDONED (the wrapper was killed). Until
 *   `after_tool_call` the plugin renews the lease (an exec can wait in
 *   OpenClaw's own exec approval); after it, a lease the wrapper never took
 *   over (the exec was blocked, or never started) is released CANCELLED. Where
 *   the wrapper cannot run (`exec.wrap: "never"`, or an exec routed to a
 *   sandbox or a node host), the plugin keeps a TTL lease itself instead: see
 *   `#fallback`.
 * - ACQUIRED, sessions_spawn: a Hold stream from the gateway process, released
 *   at `subagent_ended` with the child's outcome. The child run is matched by
 *   the run id `after_tool_call` reports for the accepted spawn. If the gateway
 *   dies, the stream drops and the guard is ABANDONED.
 * - ALREADY_RUNNING: the call is blocked with a reason naming the winner.
 * - RETRY_REQUIRES_APPROVAL: `requireApproval`; on allow-once, ApproveRetry
 *   with the requester as approver, then the run (see `#askToRetry`).
 * - No answer in time, or an error: the configured policy, `allow` (with a
 *   warning in the log) or `block`. A lease that is granted after the plugin
 *   stopped waiting is released at once (CANCELLED), so it cannot linger.
 */

import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { hostname } from "node:os";
import { join } from "node:path";
import { Client, type Conflict, type Guard, Lease, type RunStatus } from "../../node/src/index.ts";
import type { GuardedTool, Settings, UnavailablePolicy } from "./config.ts";
import { LABELS, alreadyRunningReason, approvalPrompt, approvalReason, unavailableReason } from "./messages.ts";
import { type TaskIdentity, identify } from "./naming.ts";
import type {
  AfterToolCallEvent,
  BeforeToolCallEvent,
  BeforeToolCallResult,
  PluginLogger,
  SubagentContext,
  SubagentEndedEvent,
  ToolContext,
} from "./openclaw.ts";
import { wrapCommand } from "./shell.ts";
import { traceInterceptor, withTrace } from "./trace.ts";

/** How many sub-agent endings to remember when they come before the spawn's after_tool_call. */
const EARLY_ENDINGS_KEPT = 256;

type Decision<T> = { kind: "answer"; value: T } | { kind: "error"; error: unknown } | { kind: "timeout" };

/** An exec the plugin acquired for and is waiting to see start (or, on the fallback, end). */
interface ExecRun {
  identity: TaskIdentity;
  runId: string;
  leaseId: string;
  wrapped: boolean;
  renewal: NodeJS.Timeout | undefined;
  /** Fallback only: OpenClaw's background process session, once the exec went to the background. */
  processSession?: string;
}

export interface PluginOptions {
  settings: Settings;
  logger: PluginLogger;
  /** Where the Node client sits; its @grpc/grpc-js is the one the interceptor must come from. */
  nodeClientRoot: string;
  /** For tests: a ready client instead of one made from the settings. */
  client?: Client;
  now?: () => Date;
}

export class TaskGuardPlugin {
  readonly settings: Settings;
  readonly #logger: PluginLogger;
  readonly #nodeClientRoot: string;
  readonly #now: () => Date;
  #client: Client | undefined;
  readonly #holderBase = `openclaw@${hostname()}:${process.pid}`;
  /** sessions_spawn calls by tool call id: the lease being acquired or held for the sub-agent to come. */
  readonly #spawns = new Map<string, Promise<Lease | undefined>>();
  /** Accepted sub-agents by child run id. */
  readonly #children = new Map<string, Lease>();
  readonly #earlyEndings = new Map<string, SubagentEndedEvent>();
  readonly #execs = new Map<string, ExecRun>();

  constructor(options: PluginOptions) {
    this.settings = options.settings;
    this.#logger = options.logger;
    this.#nodeClientRoot = options.nodeClientRoot;
    this.#client = options.client;
    this.#now = options.now ?? (() => new Date());
  }

  get client(): Client {
    this.#client ??= this.#makeClient();
    return this.#client;
  }

  #makeClient(): Client {
    // The interceptor must be built from the grpc-js the client itself loads, next to it.
    const grpc = createRequire(join(this.#nodeClientRoot, "package.json"))("@grpc/grpc-js") as typeof import("@grpc/grpc-js");
    const token = this.settings.tokenFile ? readFileSync(this.settings.tokenFile, "utf8").trim() : undefined;
    return new Client({
      address: this.settings.address,
      holder: this.#holderBase,
      token,
      // Lease lifetimes (releases, resumes) get the client's ordinary deadline; decisions get the plugin's budget.
      deadlineMs: 10_000,
      channelOptions: { interceptors: [traceInterceptor(grpc.InterceptingCall)] },
    });
  }

  close(): void {
    for (const run of this.#execs.values()) clearInterval(run.renewal);
    this.#execs.clear();
    // Held sub-agent guards end ABANDONED: the sidecar sees their streams close.
    this.#client?.close();
  }

  // --- before_tool_call ---------------------------------------------------------------------

  async beforeToolCall(event: BeforeToolCallEvent, ctx: ToolContext): Promise<BeforeToolCallResult | undefined> {
    const tool = guardedTool(event.toolName, this.settings);
    if (tool === undefined) {
      return undefined;
    }
    const identity = identify(
      tool,
      event.params,
      { agentId: ctx.agentId, sessionKey: ctx.sessionKey },
      tool === "exec" ? this.settings.exec.scope : this.settings.sessionsSpawn.scope,
      this.settings.rules,
    );
    const toolCallId = event.toolCallId ?? ctx.toolCallId ?? randomUUID();
    const runId = randomUUID();
    return withTrace(ctx.trace, () =>
      tool === "exec"
        ? this.#beforeExec(event, ctx, identity, toolCallId, runId)
        : this.#beforeSpawn(ctx, identity, toolCallId, runId),
    );
  }

  async #beforeExec(
    event: BeforeToolCallEvent,
    ctx: ToolContext,
    identity: TaskIdentity,
    toolCallId: string,
    runId: string,
  ): Promise<BeforeToolCallResult | undefined> {
    const command = typeof event.params.command === "string" ? event.params.command : "";
    if (command.trim() === "") {
      return undefined; // OpenClaw refuses it itself
    }
    const wrapped = this.#wraps(event.params);
    const started = performance.now();
    const acquisition = this.client.acquire(identity.taskKey, {
      runId,
      ttlMs: this.settings.exec.leaseTtlMs,
      labels: this.#labels(ctx, "exec", toolCallId),
      holder: this.#holder(ctx, "exec"),
      onConflict: "return",
    });
    const decision = await this.#within(acquisition, (late) => {
      if (late.outcome === "ACQUIRED") void this.#cancelLate(identity, late.leaseId);
    });
    if (decision.kind !== "answer") {
      return this.#unavailable(identity, decision, started);
    }
    const answer = decision.value;
    if (answer.outcome === "ACQUIRED") {
      this.#trackExec(toolCallId, { identity, runId, leaseId: answer.leaseId, wrapped, renewal: undefined });
      this.#logger.info(
        `taskguard: ${identity.taskKey}: acquired run ${runId} for exec` +
          `${wrapped ? " (wrapped in taskguard run)" : " (TTL lease, no wrapper)"}; session ${ctx.sessionKey ?? "-"}`,
      );
      return wrapped ? { params: { ...event.params, command: this.#wrap(identity, runId, command) } } : undefined;
    }
    if (answer.outcome === "ALREADY_RUNNING") {
      return this.#alreadyRunning(identity, answer, ctx);
    }
    return this.#askToRetry(identity, answer.guard, ctx, toolCallId, runId, { tool: "exec", command, wrapped, params: event.params });
  }

  async #beforeSpawn(
    ctx: ToolContext,
    identity: TaskIdentity,
    toolCallId: string,
    runId: string,
  ): Promise<BeforeToolCallResult | undefined> {
    const started = performance.now();
    const holding = this.client.openHold(identity.taskKey, {
      runId,
      labels: this.#labels(ctx, "sessions_spawn", toolCallId),
      holder: this.#holder(ctx, "sessions_spawn"),
      onConflict: "return",
    });
    const decision = await this.#within(holding, (late) => {
      if (late instanceof Lease) void late.release("CANCELLED", "the OpenClaw plugin stopped waiting for this answer");
    });
    if (decision.kind !== "answer") {
      return this.#unavailable(identity, decision, started);
    }
    const answer = decision.value;
    if (answer instanceof Lease) {
      this.#holdForSpawn(toolCallId, identity, Promise.resolve(answer));
      this.#logger.info(
        `taskguard: ${identity.taskKey}: acquired run ${runId} for sessions_spawn, held until subagent_ended; ` +
          `session ${ctx.sessionKey ?? "-"}`,
      );
      return undefined;
    }
    if (answer.outcome === "ALREADY_RUNNING") {
      return this.#alreadyRunning(identity, answer, ctx);
    }
    return this.#askToRetry(identity, answer.guard, ctx, toolCallId, runId, { tool: "sessions_spawn" });
  }

  #alreadyRunning(identity: TaskIdentity, conflict: Conflict, ctx: ToolContext): BeforeToolCallResult {
    this.#logger.info(
      `taskguard: ${identity.taskKey}: already running as run ${conflict.runId}; blocked the call from ` +
        `session ${ctx.sessionKey ?? "-"}`,
    );
    return { block: true, blockReason: alreadyRunningReason(identity.taskName, conflict.guard, this.#now()) };
  }

  /**
   * The last run failed: ask the person through OpenClaw's plugin approval
   * (answered in a chat with `/approve <id> allow-once`, or in the Control UI).
   *
   * OpenClaw calls `onResolution` without awaiting it and runs the tool right
   * after an allow, so the plugin cannot make the tool wait for its
   * ApproveRetry. For a wrapped exec the approval is therefore also part of the
   * approved command itself (`taskguard approve-retry ...; exec taskguard run ...`,
   * the parameters OpenClaw applies only once allowed), which orders it before
   * the run; whichever of the two lands first approves, the other is refused
   * harmlessly. For sessions_spawn the plugin approves and acquires from
   * `onResolution` while OpenClaw starts the sub-agent.
   */
  #askToRetry(
    identity: TaskIdentity,
    failed: Guard,
    ctx: ToolContext,
    toolCallId: string,
    runId: string,
    call: { tool: "exec"; command: string; wrapped: boolean; params: Record<string, unknown> } | { tool: "sessions_spawn" },
  ): BeforeToolCallResult {
    const approver = approverOf(ctx);
    const channel = ctx.requester?.channel ?? ctx.channelId;
    const reason = approvalReason(approver, channel, identity.taskName);
    const { title, description } = approvalPrompt(identity.taskName, failed);
    this.#logger.info(
      `taskguard: ${identity.taskKey}: run ${failed.runId} ended ${failed.state}; asking for an approval ` +
        `(session ${ctx.sessionKey ?? "-"})`,
    );
    // Returns a promise of its follow-up work for whoever waits (OpenClaw does not).
    const onResolution = (decision: string): Promise<void> => {
      if (decision !== "allow-once" && decision !== "allow-always") {
        this.#logger.info(`taskguard: ${identity.taskKey}: retry not approved (${decision}); it stays blocked`);
        return Promise.resolve();
      }
      const approved = this.#approve(identity, approver, reason);
      if (call.tool === "sessions_spawn") {
        // Synchronously, before OpenClaw starts the tool: after_tool_call must find this entry.
        const lease = approved.then(() => this.#holdAfterApproval(identity, ctx, toolCallId, runId));
        this.#holdForSpawn(toolCallId, identity, lease);
        return lease.then(() => {});
      }
      if (!call.wrapped) {
        return approved.then(() => this.#fallbackAfterApproval(identity, ctx, toolCallId, runId));
      }
      return approved;
    };
    const result: BeforeToolCallResult = {
      requireApproval: {
        title,
        description,
        severity: this.settings.approval.severity,
        timeoutMs: this.settings.approval.timeoutMs,
        // allow-always would promise something the guard does not do: every failure asks again.
        allowedDecisions: ["allow-once", "deny"],
        onResolution,
      },
    };
    if (call.tool === "exec" && call.wrapped) {
      const command = this.#wrap(identity, runId, call.command, { approver, reason });
      result.params = { ...call.params, command };
    }
    return result;
  }

  async #approve(identity: TaskIdentity, approver: string, reason: string): Promise<void> {
    try {
      await this.client.approveRetry(identity.taskKey, { approver, reason });
      this.#logger.info(`taskguard: ${identity.taskKey}: retry approved by ${approver}`);
    } catch (error) {
      // FAILED_PRECONDITION when the wrapped command's own approve-retry came first.
      this.#logger.info(`taskguard: ${identity.taskKey}: approve-retry: ${messageOf(error)}`);
    }
  }

  async #holdAfterApproval(
    identity: TaskIdentity,
    ctx: ToolContext,
    toolCallId: string,
    runId: string,
  ): Promise<Lease | undefined> {
    try {
      const answer = await this.client.openHold(identity.taskKey, {
        runId,
        labels: this.#labels(ctx, "sessions_spawn", toolCallId),
        holder: this.#holder(ctx, "sessions_spawn"),
        onConflict: "return",
      });
      if (answer instanceof Lease) return answer;
      this.#logger.warn(
        `taskguard: ${identity.taskKey}: after the approval, ${answer.outcome} (run ${answer.runId}); ` +
          `the approved sub-agent started without the guard`,
      );
    } catch (error) {
      this.#logger.warn(`taskguard: ${identity.taskKey}: after the approval: ${messageOf(error)}`);
    }
    return undefined;
  }

  async #fallbackAfterApproval(identity: TaskIdentity, ctx: ToolContext, toolCallId: string, runId: string): Promise<void> {
    try {
      const answer = await this.client.acquire(identity.taskKey, {
        runId,
        ttlMs: this.settings.exec.leaseTtlMs,
        labels: this.#labels(ctx, "exec", toolCallId),
        holder: this.#holder(ctx, "exec"),
        onConflict: "return",
      });
      if (answer.outcome === "ACQUIRED") {
        this.#trackExec(toolCallId, { identity, runId, leaseId: answer.leaseId, wrapped: false, renewal: undefined });
        return;
      }
      this.#logger.warn(`taskguard: ${identity.taskKey}: after the approval, ${answer.outcome} (run ${answer.runId})`);
    } catch (error) {
      this.#logger.warn(`taskguard: ${identity.taskKey}: after the approval: ${messageOf(error)}`);
    }
  }

  #unavailable(
    identity: TaskIdentity,
    decision: { kind: "error"; error: unknown } | { kind: "timeout" },
    started: number,
  ): BeforeToolCallResult | undefined {
    const policy: UnavailablePolicy = identity.onUnavailable ?? this.settings.onUnavailable;
    const budget = this.settings.decisionTimeoutMs;
    const why = decision.kind === "timeout" ? "the sidecar did not answer" : oneLine(messageOf(decision.error));
    const took = `decided in ${Math.round(performance.now() - started)} ms`;
    if (policy === "block") {
      this.#logger.warn(`taskguard: ${identity.taskKey}: ${why}; policy block: the call is blocked (${took})`);
      return { block: true, blockReason: unavailableReason(identity.taskName, why, budget) };
    }
    this.#logger.warn(`taskguard: ${identity.taskKey}: ${why}; policy allow: running it WITHOUT a guard (${took})`);
    return undefined;
  }

  // --- after_tool_call, subagent_ended -----------------------------------------------------

  async afterToolCall(event: AfterToolCallEvent, ctx: ToolContext): Promise<void> {
    const toolCallId = event.toolCallId ?? ctx.toolCallId;
    const details = detailsOf(event.result);
    if (event.toolName === "process") {
      await this.#observeProcess(event.params, details);
      return;
    }
    if (toolCallId === undefined) {
      return;
    }
    if (event.toolName === "exec") {
      await this.#afterExec(toolCallId, details, event.error);
    } else if (event.toolName === "sessions_spawn") {
      await this.#afterSpawn(toolCallId, details, event.error);
    }
  }

  async #afterExec(toolCallId: string, details: Record<string, unknown>, error: string | undefined): Promise<void> {
    const run = this.#execs.get(toolCallId);
    if (run === undefined) {
      return;
    }
    const status = typeof details.status === "string" ? details.status : error ? "error" : "unknown";
    if (run.wrapped) {
      this.#forgetExec(toolCallId);
      // Backgrounded: the wrapper may still be starting; the lease's TTL covers that, and an exec that
      // never reaches the wrapper lets it expire. Otherwise the process is over: if the wrapper never took
      // the lease (the exec was blocked, failed to start, or the wrapper is missing), nobody else will.
      if (status !== "running") {
        await this.#releaseIfNotTakenOver(run, `the exec ended before taskguard run held the guard (${error ?? status})`);
      }
      return;
    }
    await this.#fallbackAfterExec(toolCallId, run, status, details, error);
  }

  /** Releases the plugin's own lease, unless `taskguard run` bound it to its stream (then it is the wrapper's). */
  async #releaseIfNotTakenOver(run: ExecRun, detail: string): Promise<void> {
    try {
      const guard = await this.client.get(run.identity.taskKey);
      if (guard.runId !== run.runId || guard.state !== "RUNNING" || guard.streamBound) {
        return;
      }
      await this.client.release(run.leaseId, "CANCELLED", detail);
      this.#logger.info(`taskguard: ${run.identity.taskKey}: released run ${run.runId} CANCELLED: ${detail}`);
    } catch (failure) {
      this.#logger.warn(`taskguard: ${run.identity.taskKey}: releasing run ${run.runId}: ${messageOf(failure)}`);
    }
  }

  /**
   * No wrapper: the plugin's TTL lease is the guard. A foreground exec is
   * released with its exit code. A backgrounded one keeps its lease renewed for
   * as long as OpenClaw reports the process alive: its `process` tool results
   * (poll, list, kill) for that session, and, on the gateway host, the pid.
   * When nothing reports it any more, the TTL runs out and the guard EXPIRES.
   */
  async #fallbackAfterExec(
    toolCallId: string,
    run: ExecRun,
    status: string,
    details: Record<string, unknown>,
    error: string | undefined,
  ): Promise<void> {
    if (status === "running" && typeof details.sessionId === "string") {
      run.processSession = details.sessionId;
      const pid = typeof details.pid === "number" ? details.pid : undefined;
      clearInterval(run.renewal);
      run.renewal = setInterval(() => {
        if (pid !== undefined && !alive(pid)) {
          void this.#endFallback(toolCallId, "SUCCEEDED", "the process is gone; its exit status was not observed");
          return;
        }
        void this.client.renew(run.leaseId).catch((failure: unknown) => {
          this.#logger.warn(`taskguard: ${run.identity.taskKey}: renewing run ${run.runId}: ${messageOf(failure)}`);
        });
      }, Math.max(1000, this.settings.exec.leaseTtlMs / 3));
      run.renewal.unref();
      return;
    }
    const [runStatus, detail] = endingOf(status, details, error);
    await this.#endFallback(toolCallId, runStatus, detail);
  }

  async #observeProcess(params: Record<string, unknown>, details: Record<string, unknown>): Promise<void> {
    const session = typeof params.sessionId === "string" ? params.sessionId : undefined;
    const status = typeof details.status === "string" ? details.status : undefined;
    if (session === undefined || status === undefined || status === "running") {
      return;
    }
    const ended = [...this.#execs].filter(([, run]) => !run.wrapped && run.processSession === session);
    await Promise.all(
      ended.map(([toolCallId]) => this.#endFallback(toolCallId, ...endingOf(status, details, undefined))),
    );
  }

  async #endFallback(toolCallId: string, status: RunStatus, detail: string): Promise<void> {
    const run = this.#forgetExec(toolCallId);
    if (run === undefined) return;
    try {
      await this.client.release(run.leaseId, status, detail);
      this.#logger.info(`taskguard: ${run.identity.taskKey}: released run ${run.runId} ${status} ${detail}`);
    } catch (failure) {
      this.#logger.warn(`taskguard: ${run.identity.taskKey}: releasing run ${run.runId}: ${messageOf(failure)}`);
    }
  }

  async #afterSpawn(toolCallId: string, details: Record<string, unknown>, error: string | undefined): Promise<void> {
    const pending = this.#spawns.get(toolCallId);
    if (pending === undefined) {
      return;
    }
    this.#spawns.delete(toolCallId);
    const lease = await pending;
    if (lease === undefined) {
      return;
    }
    const childRunId = typeof details.runId === "string" ? details.runId : undefined;
    if (details.status !== "accepted" || childRunId === undefined) {
      const why = error ?? (typeof details.error === "string" ? details.error : String(details.status ?? "unknown"));
      await this.#end(lease, "CANCELLED", `sessions_spawn did not start a sub-agent: ${why}`);
      return;
    }
    this.#children.set(childRunId, lease);
    if (typeof details.childSessionKey === "string") {
      this.#children.set(`session:${details.childSessionKey}`, lease); // when an ending names only the session
    }
    this.#logger.info(`taskguard: ${lease.taskKey}: run ${lease.runId} is sub-agent run ${childRunId}`);
    const early = this.#earlyEndings.get(childRunId);
    if (early !== undefined) {
      this.#earlyEndings.delete(childRunId);
      await this.subagentEnded(early, { runId: childRunId });
    }
  }

  async subagentEnded(event: SubagentEndedEvent, ctx: SubagentContext): Promise<void> {
    const childRunId = event.runId ?? ctx.runId;
    const bySession = `session:${event.targetSessionKey}`;
    const lease = (childRunId === undefined ? undefined : this.#children.get(childRunId)) ?? this.#children.get(bySession);
    if (lease === undefined) {
      if (childRunId === undefined) {
        return;
      }
      // Can come before the spawn's after_tool_call maps the child; kept briefly for it.
      this.#earlyEndings.set(childRunId, event);
      if (this.#earlyEndings.size > EARLY_ENDINGS_KEPT) {
        this.#earlyEndings.delete(this.#earlyEndings.keys().next().value as string);
      }
      return;
    }
    for (const [key, held] of this.#children) {
      if (held === lease) this.#children.delete(key);
    }
    const [status, detail] = subagentEnding(event);
    await this.#end(lease, status, detail);
  }

  async #end(lease: Lease, status: RunStatus, detail: string): Promise<void> {
    try {
      await lease.release(status, detail);
      this.#logger.info(`taskguard: ${lease.taskKey}: released run ${lease.runId} ${status}${detail ? `: ${detail}` : ""}`);
    } catch (error) {
      this.#logger.warn(`taskguard: ${lease.taskKey}: releasing run ${lease.runId}: ${messageOf(error)}`);
    }
  }

  // --- plumbing -----------------------------------------------------------------------------

  #holdForSpawn(toolCallId: string, identity: TaskIdentity, lease: Promise<Lease | undefined>): void {
    this.#spawns.set(toolCallId, lease);
    void lease.then((held) => {
      void held?.lost.then((lost) => {
        this.#logger.warn(`taskguard: ${identity.taskKey}: lost the guard of run ${held.runId}: ${lost.message}`);
      });
    });
  }

  #trackExec(toolCallId: string, run: ExecRun): void {
    // Until after_tool_call: an exec can wait a long time for OpenClaw's own exec approval.
    run.renewal = setInterval(() => {
      void this.client.renew(run.leaseId).catch(() => {});
    }, Math.max(1000, this.settings.exec.leaseTtlMs / 3));
    run.renewal.unref();
    this.#execs.set(toolCallId, run);
  }

  #forgetExec(toolCallId: string): ExecRun | undefined {
    const run = this.#execs.get(toolCallId);
    if (run !== undefined) {
      clearInterval(run.renewal);
      this.#execs.delete(toolCallId);
    }
    return run;
  }

  #wraps(params: Record<string, unknown>): boolean {
    switch (this.settings.exec.wrap) {
      case "always":
        return true;
      case "never":
        return false;
      default:
        // An exec routed elsewhere than the gateway host cannot find the wrapper there.
        return params.host === undefined || params.host === "gateway" || params.host === "auto";
    }
  }

  #wrap(identity: TaskIdentity, runId: string, command: string, approve?: { approver: string; reason: string }): string {
    return wrapCommand({
      taskguardBin: this.settings.taskguardBin,
      address: this.settings.address,
      tokenFile: this.settings.tokenFile,
      taskKey: identity.taskKey,
      runId,
      command,
      approve,
    });
  }

  #labels(ctx: ToolContext, tool: GuardedTool, toolCallId: string): Record<string, string> {
    const labels: Record<string, string> = { [LABELS.tool]: tool, [LABELS.toolCallId]: toolCallId };
    if (ctx.sessionKey) labels[LABELS.sessionKey] = ctx.sessionKey;
    if (ctx.agentId) labels[LABELS.agentId] = ctx.agentId;
    if (ctx.runId) labels[LABELS.agentRunId] = ctx.runId;
    const channel = ctx.requester?.channel ?? ctx.channelId;
    if (channel) labels[LABELS.channel] = channel;
    return labels;
  }

  #holder(ctx: ToolContext, tool: GuardedTool): string {
    return `${this.#holderBase} ${ctx.sessionKey ?? "-"} (${tool})`;
  }

  /** The work's answer, an error, or "timeout" after the budget; `late` gets an answer that came after. */
  async #within<T>(work: Promise<T>, late: (value: T) => void): Promise<Decision<T>> {
    let timer: NodeJS.Timeout | undefined;
    let timedOut = false;
    const budget = new Promise<Decision<T>>((resolve) => {
      timer = setTimeout(() => {
        timedOut = true;
        resolve({ kind: "timeout" });
      }, this.settings.decisionTimeoutMs);
    });
    const answer = work.then(
      (value): Decision<T> => {
        if (timedOut) late(value);
        return { kind: "answer", value };
      },
      (error: unknown): Decision<T> => ({ kind: "error", error }),
    );
    try {
      return await Promise.race([answer, budget]);
    } finally {
      clearTimeout(timer);
    }
  }

  async #cancelLate(identity: TaskIdentity, leaseId: string): Promise<void> {
    await this.client.release(leaseId, "CANCELLED", "the OpenClaw plugin stopped waiting for this answer").catch(() => {});
    this.#logger.warn(`taskguard: ${identity.taskKey}: a late acquisition was released CANCELLED`);
  }
}

// --- small pure helpers ---------------------------------------------------------------------------

export function guardedTool(toolName: string, settings: Settings): GuardedTool | undefined {
  if (toolName === "exec" && settings.exec.enabled) return "exec";
  if (toolName === "sessions_spawn" && settings.sessionsSpawn.enabled) return "sessions_spawn";
  return undefined;
}

/** Who asked, as the approver of a retry: `<channel>:<sender>`. */
export function approverOf(ctx: ToolContext): string {
  const requester = ctx.requester;
  const channel = requester?.channel ?? ctx.channelId ?? "openclaw";
  const sender = requester?.senderId ?? (requester?.senderIsOwner ? "owner" : "unknown-sender");
  const account = requester?.accountId ? `${requester.accountId}/` : "";
  return `${channel}:${account}${sender}`;
}

export function subagentEnding(event: SubagentEndedEvent): [RunStatus, string] {
  const detail = [event.outcome ?? "no outcome", event.reason, event.error].filter(Boolean).join(": ");
  switch (event.outcome) {
    case "ok":
      return ["SUCCEEDED", ""];
    case "error":
    case "timeout":
      return ["FAILED", `sub-agent ${detail}`];
    default:
      return ["CANCELLED", `sub-agent ${detail}`];
  }
}

function endingOf(status: string, details: Record<string, unknown>, error: string | undefined): [RunStatus, string] {
  const exitCode = typeof details.exitCode === "number" ? details.exitCode : undefined;
  if (exitCode === 0 && status !== "error") return ["SUCCEEDED", ""];
  if (exitCode !== undefined) return ["FAILED", `exit code ${exitCode}`];
  if (status === "completed") return ["SUCCEEDED", ""];
  return ["CANCELLED", `exec ${status}${error ? `: ${error}` : ""}`];
}

function detailsOf(result: unknown): Record<string, unknown> {
  if (typeof result === "object" && result !== null && "details" in result) {
    const details = (result as { details: unknown }).details;
    if (typeof details === "object" && details !== null) return details as Record<string, unknown>;
  }
  return {};
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
}

function oneLine(text: string): string {
  return text.replace(/\s+/g, " ").slice(0, 300);
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
