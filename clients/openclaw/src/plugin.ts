/**
 * Task Guard in front of OpenClaw's `exec` and `sessions_spawn`.
 *
 * Theory of operation
 * -------------------
 * In the gateway the plugin connects to the sidecar as it registers (`start`)
 * and keeps that channel connected, so the first tool call after a gateway
 * start finds a ready connection. `before_tool_call` names the task
 * (`naming.ts`) and asks the sidecar for its guard with a fresh run id;
 * `decision.ts` says how long to wait, counted from when the call reached the
 * plugin, and what silence means:
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
 *   `#fallbackAfterExec`.
 * - ACQUIRED, sessions_spawn: a Hold stream from the gateway process, released
 *   at `subagent_ended` with the child's outcome. The child run is matched by
 *   the run id `after_tool_call` reports for the accepted spawn. If the gateway
 *   dies, the stream drops and the guard is ABANDONED.
 * - ALREADY_RUNNING: the call is blocked with a reason naming the winner,
 *   unless the task's rule chooses another conflict policy. An exec under
 *   "queue", "keep-newest" or "supersede" is let through wrapped in
 *   `taskguard run --on-conflict ...`, which waits in the task's queue (or
 *   asks the running run to stop) and runs the command when its turn comes;
 *   its output starts with a notice naming the run it waits for. A
 *   sessions_spawn under "queue" or "keep-newest" waits in the queue as long as
 *   the tool call may wait (`maxDecisionMs`, less a margin), and is blocked
 *   with what happened when its turn did not come (`waiting.ts`).
 * - LOCK_DELAYED: blocked with when the task opens again (no approval).
 * - RETRY_REQUIRES_APPROVAL: `requireApproval` (see `#askToRetry`); in a run
 *   that cannot show an approval, blocked with how to approve instead.
 * - Unreachable (connection refused, no socket, no answer to a health check):
 *   the configured policy. `allow` runs it with a warning, and keeps asking for
 *   the guard while the task runs: a grant that comes later is adopted, so the
 *   task holds the guard until it ends and the next trigger is refused ("guarded
 *   late" in the log). `block` blocks it; a later grant is released CANCELLED.
 * - Reachable, but the sidecar refused the call or did not answer it within
 *   `maxDecisionMs`: blocked whatever the policy (the sidecar is up and may
 *   still grant the run, so running it could start it twice).
 */

import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { hostname } from "node:os";
import {
  type Acquired,
  Client,
  type Conflict,
  type Guard,
  Lease,
  type RunStatus,
} from "taskguard-sidecar-client";
import type { ApprovalLedger } from "./approvals.ts";
import { type GuardedTool, PROBE_MS, type Settings, type UnavailablePolicy } from "./config.ts";
import { type Decided, type Timing, decide, isNoAnswer } from "./decision.ts";
import { ApprovalGate } from "./gate.ts";
import {
  LABELS,
  alreadyRunningReason,
  approvalPrompt,
  approvalReason,
  approvalUnavailableReason,
  lockDelayedReason,
  notConfirmedReason,
  queueFullReason,
  queuedExecNotice,
  supersededReason,
  unavailableReason,
  waitEndedReason,
} from "./messages.ts";
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
import { conflictOf, holdConflict, spawnWaitMs } from "./waiting.ts";

/** How many sub-agent endings to remember when they come before the spawn's after_tool_call. */
const EARLY_ENDINGS_KEPT = 256;
/** A task let through without a guard stops asking for one after this long (a long-lost sidecar). */
const LATE_GRANT_WINDOW_MS = 60 * 60 * 1000;
/** How long the approved exec's gate stays open once its exec went to the background (it read its line long before). */
const GATE_LINGER_MS = 10 * 60 * 1000;
/** How long the approver lookup in OpenClaw's ledger may take before the approval is recorded without one. */
const APPROVER_LOOKUP_MS = 5000;
/** The approver recorded when OpenClaw's ledger does not say who approved. */
export const UNKNOWN_APPROVER = "openclaw:unknown";
/** How long one watch of the channel's state lasts before it is renewed. */
const CHANNEL_WATCH_MS = 60 * 60 * 1000;

type ExecEnding = [RunStatus, string];

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

/** An exec let through without a guard (the sidecar was unreachable), for as long as the plugin still asks for one. */
interface UnguardedExec {
  identity: TaskIdentity;
  runId: string;
  letThroughAt: number;
  /** after_tool_call's report, once it came. */
  after?: { status: string; details: Record<string, unknown>; error: string | undefined };
  /** Backgrounded on the gateway host: the process whose life the guard would follow. */
  pid?: number;
  processSession?: string;
  /** The exec is over, and how it ended. */
  ended?: ExecEnding;
}

/** A sessions_spawn's guard: held, or still to come (an approval, a late grant), until its sub-agent ends. */
interface SpawnRun {
  identity: TaskIdentity;
  runId: string;
  lease: Lease | undefined;
  /** The spawn or its sub-agent is over: a lease that comes now is released with this. */
  ending: ExecEnding | undefined;
}

export interface PluginOptions {
  settings: Settings;
  logger: PluginLogger;
  /** OpenClaw's approval records, to learn who approved a retry (`approvals.ts`). */
  ledger?: ApprovalLedger;
  /** For tests: a ready client instead of one made from the settings. */
  client?: Client;
  now?: () => Date;
}

export class TaskGuardPlugin {
  readonly settings: Settings;
  readonly #logger: PluginLogger;
  readonly #ledger: ApprovalLedger | undefined;
  readonly #now: () => Date;
  readonly #timing: Timing;
  #client: Client | undefined;
  #started = false;
  #closed = false;
  readonly #holderBase = `openclaw@${hostname()}:${process.pid}`;
  /** sessions_spawn calls by tool call id, until after_tool_call reports the sub-agent. */
  readonly #spawns = new Map<string, SpawnRun>();
  /** Accepted sub-agents by child run id (and `session:<child session key>`). */
  readonly #children = new Map<string, SpawnRun>();
  readonly #earlyEndings = new Map<string, SubagentEndedEvent>();
  readonly #execs = new Map<string, ExecRun>();
  readonly #unguarded = new Map<string, UnguardedExec>();
  /** Approved execs' gates by tool call id, until after_tool_call. */
  readonly #gates = new Map<string, ApprovalGate>();

  constructor(options: PluginOptions) {
    this.settings = options.settings;
    this.#logger = options.logger;
    this.#ledger = options.ledger;
    this.#client = options.client;
    this.#now = options.now ?? (() => new Date());
    this.#timing = {
      budgetMs: this.settings.decisionTimeoutMs,
      probeMs: PROBE_MS,
      limitMs: this.settings.maxDecisionMs,
    };
  }

  get client(): Client {
    this.#client ??= this.#makeClient();
    return this.#client;
  }

  #makeClient(): Client {
    // The interceptor must be built from the grpc-js the client itself loads: the one its module resolves.
    const fromClient = createRequire(createRequire(import.meta.url).resolve("taskguard-sidecar-client"));
    const grpc = fromClient("@grpc/grpc-js") as typeof import("@grpc/grpc-js");
    const token = this.settings.tokenFile ? readFileSync(this.settings.tokenFile, "utf8").trim() : undefined;
    return new Client({
      address: this.settings.address,
      holder: this.#holderBase,
      token,
      // Lease lifetimes (releases, resumes) and acquisitions alike; decision.ts decides when to stop waiting.
      deadlineMs: this.settings.maxDecisionMs,
      channelOptions: { interceptors: [traceInterceptor(grpc.InterceptingCall)] },
    });
  }

  /**
   * In the gateway: connect to the sidecar now rather than at the first tool call, and keep the channel
   * connected. A first call made on a fresh channel needs several turns of the gateway's event loop to
   * connect, and the loop is at its busiest (and stalls) while the gateway starts.
   */
  start(): void {
    if (this.#started || this.#closed) return;
    this.#started = true;
    const client = this.client;
    const began = performance.now();
    void this.#keepConnected(client);
    // Also the first call's one-time work (loading code paths, the optional OpenTelemetry import), done now.
    client.health({ deadline: Date.now() + this.settings.maxDecisionMs }).then(
      (status) => {
        this.#logger.info(
          `taskguard: connected to the sidecar at ${client.address} (health ${status}, ` +
            `${Math.round(performance.now() - began)} ms)`,
        );
      },
      (error: unknown) => {
        if (!this.#closed) {
          this.#logger.warn(
            `taskguard: the sidecar at ${client.address} is not reachable yet (${oneLine(messageOf(error))}); ` +
              `the plugin keeps connecting`,
          );
        }
      },
    );
  }

  /** Reconnects whenever the channel goes idle (the sidecar restarted, or grpc-js's idle timer), and says so. */
  async #keepConnected(client: Client): Promise<void> {
    let state = client.connectivity(true);
    let ready = state === "READY";
    while (!this.#closed) {
      await client.connectivityChanged(state, Date.now() + CHANNEL_WATCH_MS);
      if (this.#closed) return;
      state = client.connectivity(true);
      if (state === "SHUTDOWN") return;
      if (ready && state !== "READY") {
        this.#logger.warn(`taskguard: lost the connection to the sidecar at ${client.address}; reconnecting`);
      } else if (!ready && state === "READY") {
        this.#logger.info(`taskguard: connected to the sidecar at ${client.address}`);
      }
      ready = state === "READY";
    }
  }

  close(): void {
    this.#closed = true;
    for (const run of this.#execs.values()) clearInterval(run.renewal);
    this.#execs.clear();
    this.#unguarded.clear();
    for (const gate of this.#gates.values()) gate.close();
    this.#gates.clear();
    // Held sub-agent guards end ABANDONED: the sidecar sees their streams close.
    this.#client?.close();
  }

  // --- before_tool_call ---------------------------------------------------------------------

  async beforeToolCall(event: BeforeToolCallEvent, ctx: ToolContext): Promise<BeforeToolCallResult | undefined> {
    const arrivedAt = performance.now();
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
        ? this.#beforeExec(event, ctx, identity, toolCallId, runId, arrivedAt)
        : this.#beforeSpawn(ctx, identity, toolCallId, runId, arrivedAt),
    );
  }

  async #beforeExec(
    event: BeforeToolCallEvent,
    ctx: ToolContext,
    identity: TaskIdentity,
    toolCallId: string,
    runId: string,
    arrivedAt: number,
  ): Promise<BeforeToolCallResult | undefined> {
    const command = typeof event.params.command === "string" ? event.params.command : "";
    if (command.trim() === "") {
      return undefined; // OpenClaw refuses it itself
    }
    const wrapped = this.#wraps(event.params);
    const acquire = () =>
      this.client.acquire(identity.taskKey, {
        runId,
        ttlMs: this.settings.exec.leaseTtlMs,
        labels: this.#labels(ctx, "exec", toolCallId),
        holder: this.#holder(ctx, "exec"),
        onConflict: "return",
      });
    const acquisition = acquire();
    const decided = await decide(acquisition, arrivedAt, this.client, this.#timing);
    const verdict = decided.verdict;
    if (verdict.kind !== "answer") {
      const policy = this.#policyFor(identity);
      if (verdict.kind === "unreachable" && policy === "allow") {
        this.#logDecision(identity, decided, `${verdict.why}; policy allow: running it WITHOUT a guard`, "warn");
        this.#letExecThrough(identity, toolCallId, runId, acquisition, acquire);
        return undefined;
      }
      void this.#releaseIfGranted(identity, acquisition);
      return this.#blocked(identity, decided, policy);
    }
    const answer = verdict.value;
    if (answer.outcome === "ACQUIRED") {
      this.#trackExec(toolCallId, { identity, runId, leaseId: answer.leaseId, wrapped, renewal: undefined });
      this.#logDecision(
        identity,
        decided,
        `acquired run ${runId} for exec${wrapped ? " (wrapped in taskguard run)" : " (TTL lease, no wrapper)"}; ` +
          `session ${ctx.sessionKey ?? "-"}`,
      );
      return wrapped ? { params: { ...event.params, command: this.#wrap(identity, runId, command) } } : undefined;
    }
    if (answer.outcome === "ALREADY_RUNNING" && identity.onConflict !== "reject") {
      if (wrapped) {
        return this.#queueExec(identity, answer, ctx, event.params, command, runId, decided);
      }
      this.#logDecision(
        identity,
        decided,
        `its rule says ${identity.onConflict}, but only an exec wrapped in taskguard run can wait: blocked`,
      );
    }
    if (answer.outcome !== "RETRY_REQUIRES_APPROVAL") {
      return this.#refused(identity, answer, ctx, decided);
    }
    return this.#askToRetry(identity, answer.guard, ctx, toolCallId, runId, { tool: "exec", command, wrapped, params: event.params });
  }

  /**
   * The task runs and its rule waits: the exec goes through wrapped in `taskguard run --on-conflict ...`, which
   * waits in the task's queue on its own Hold stream, for as long as OpenClaw keeps the process.
   */
  #queueExec(
    identity: TaskIdentity,
    winner: Conflict,
    ctx: ToolContext,
    params: Record<string, unknown>,
    command: string,
    runId: string,
    decided: Decided<unknown>,
  ): BeforeToolCallResult {
    const choice = identity.onConflict === "reject" ? "queue" : identity.onConflict;
    this.#logDecision(
      identity,
      decided,
      `already running as run ${winner.runId}; rule ${choice}: run ${runId} waits in taskguard run`,
    );
    const notice = queuedExecNotice(identity.taskName, winner.guard, choice);
    const holder = this.#holder(ctx, "exec");
    return { params: { ...params, command: this.#wrap(identity, runId, command, undefined, { choice, notice, holder }) } };
  }

  /** Any refusal but RETRY_REQUIRES_APPROVAL: the call is blocked with what happened and what happens next. */
  #refused(identity: TaskIdentity, conflict: Conflict, ctx: ToolContext, decided: Decided<unknown>, waited?: { position: number; ms: number }): BeforeToolCallResult {
    const name = identity.taskName;
    switch (conflict.outcome) {
      case "LOCK_DELAYED":
        this.#logDecision(identity, decided, `lock-delayed after run ${conflict.runId} was lost, until ${conflict.guard.lockDelayUntil?.toISOString() ?? "?"}: blocked`);
        return { block: true, blockReason: lockDelayedReason(name, conflict.guard, this.#now()) };
      case "SUPERSEDED":
        this.#logDecision(identity, decided, `superseded in the queue by run ${conflict.supersededBy || "?"}: blocked`);
        return { block: true, blockReason: supersededReason(name, conflict.supersededBy, conflict.guard) };
      case "QUEUE_FULL":
        this.#logDecision(identity, decided, `the queue behind run ${conflict.runId} is full: blocked`);
        return { block: true, blockReason: queueFullReason(name, conflict.guard) };
      case "WAIT_TIMED_OUT":
        this.#logDecision(identity, decided, `waited in the queue behind run ${conflict.runId} until the call could wait no longer: blocked`);
        return { block: true, blockReason: waitEndedReason(name, conflict.guard, waited?.position ?? 0, waited?.ms ?? decided.tookMs) };
      default:
        return this.#alreadyRunning(identity, conflict, ctx, decided);
    }
  }

  async #beforeSpawn(
    ctx: ToolContext,
    identity: TaskIdentity,
    toolCallId: string,
    runId: string,
    arrivedAt: number,
  ): Promise<BeforeToolCallResult | undefined> {
    const place = { position: 0, since: performance.now() };
    const onConflict = holdConflict(identity.onConflict);
    const hold = (): Promise<Lease | Conflict> =>
      this.client
        .openHold(identity.taskKey, {
          runId,
          labels: this.#labels(ctx, "sessions_spawn", toolCallId),
          holder: this.#holder(ctx, "sessions_spawn"),
          onConflict,
          maxWaitMs:
            onConflict === "return"
              ? undefined
              : spawnWaitMs(identity.maxWaitMs, this.#timing.limitMs - (performance.now() - arrivedAt)),
          onQueued: (position) => {
            place.position = position;
          },
        })
        .catch((error: unknown) => {
          // A call that waited throws what ended its wait: decided on like any other conflict.
          const conflict = conflictOf(error);
          if (conflict === undefined) throw error;
          return conflict;
        });
    const holding = hold();
    const decided = await decide(holding, arrivedAt, this.client, this.#timing);
    const verdict = decided.verdict;
    if (verdict.kind !== "answer") {
      const policy = this.#policyFor(identity);
      if (verdict.kind === "unreachable" && policy === "allow") {
        this.#logDecision(identity, decided, `${verdict.why}; policy allow: running it WITHOUT a guard`, "warn");
        const run: SpawnRun = { identity, runId, lease: undefined, ending: undefined };
        this.#spawns.set(toolCallId, run);
        void this.#adoptSpawnLate(run, holding, hold);
        return undefined;
      }
      void holding.then(
        (late) => {
          if (late instanceof Lease) void this.#end(late, "CANCELLED", "the call was blocked before the sidecar's grant came");
        },
        () => {},
      );
      return this.#blocked(identity, decided, policy);
    }
    const answer = verdict.value;
    if (answer instanceof Lease) {
      this.#spawns.set(toolCallId, { identity, runId, lease: answer, ending: undefined });
      this.#watchLost(identity, answer);
      this.#logDecision(
        identity,
        decided,
        `acquired run ${runId} for sessions_spawn, held until subagent_ended; session ${ctx.sessionKey ?? "-"}`,
      );
      return undefined;
    }
    if (answer.outcome !== "RETRY_REQUIRES_APPROVAL") {
      return this.#refused(identity, answer, ctx, decided, { position: place.position, ms: performance.now() - place.since });
    }
    return this.#askToRetry(identity, answer.guard, ctx, toolCallId, runId, { tool: "sessions_spawn" });
  }

  #policyFor(identity: TaskIdentity): UnavailablePolicy {
    return identity.onUnavailable ?? this.settings.onUnavailable;
  }

  /** The call is blocked: the sidecar is unreachable under policy block, or it is up and did not grant it. */
  #blocked(identity: TaskIdentity, decided: Decided<unknown>, policy: UnavailablePolicy): BeforeToolCallResult {
    const verdict = decided.verdict;
    if (verdict.kind === "unreachable") {
      this.#logDecision(identity, decided, `${verdict.why}; policy ${policy}: the call is blocked`, "warn");
      return { block: true, blockReason: unavailableReason(identity.taskName, verdict.why) };
    }
    const why =
      verdict.kind === "refused"
        ? `the sidecar refused the call: ${oneLine(messageOf(verdict.error))}`
        : verdict.kind === "unanswered"
          ? verdict.why
          : "no answer";
    this.#logDecision(identity, decided, `${why}; the sidecar is up, so the call is blocked`, "warn");
    return { block: true, blockReason: notConfirmedReason(identity.taskName, why) };
  }

  #logDecision(identity: TaskIdentity, decided: Decided<unknown>, what: string, level: "info" | "warn" = "info"): void {
    const stalled =
      decided.stalledMs >= 50 ? `; the gateway's event loop was blocked ${Math.round(decided.stalledMs)} ms meanwhile` : "";
    this.#logger[level](`taskguard: ${identity.taskKey}: ${what} (decided in ${Math.round(decided.tookMs)} ms${stalled})`);
  }

  #alreadyRunning(identity: TaskIdentity, conflict: Conflict, ctx: ToolContext, decided: Decided<unknown>): BeforeToolCallResult {
    this.#logDecision(
      identity,
      decided,
      `already running as run ${conflict.runId}; blocked the call from session ${ctx.sessionKey ?? "-"}`,
    );
    return { block: true, blockReason: alreadyRunningReason(identity.taskName, conflict.guard, this.#now()) };
  }

  // --- late grants: a task let through without a guard takes one that comes while it runs ------

  #letExecThrough(
    identity: TaskIdentity,
    toolCallId: string,
    runId: string,
    acquisition: Promise<Acquired | Conflict>,
    acquire: () => Promise<Acquired | Conflict>,
  ): void {
    const unguarded: UnguardedExec = { identity, runId, letThroughAt: performance.now() };
    this.#unguarded.set(toolCallId, unguarded);
    void this.#adoptExecLate(toolCallId, unguarded, acquisition, acquire);
  }

  async #adoptExecLate(
    toolCallId: string,
    unguarded: UnguardedExec,
    first: Promise<Acquired | Conflict>,
    again: () => Promise<Acquired | Conflict>,
  ): Promise<void> {
    const { identity, runId } = unguarded;
    const answer = await this.#askWhileRunning(identity, first, again, () => this.#execStillRuns(unguarded));
    this.#unguarded.delete(toolCallId);
    if (answer === undefined) return;
    const after = Math.round(performance.now() - unguarded.letThroughAt);
    if (answer.outcome !== "ACQUIRED") {
      this.#logger.warn(
        `taskguard: ${identity.taskKey}: the exec let through WITHOUT a guard is a second run: the sidecar ` +
          `answered ${answer.outcome} ${after} ms later (run ${answer.runId}, holder ${answer.holder})`,
      );
      return;
    }
    const run: ExecRun = { identity, runId, leaseId: answer.leaseId, wrapped: false, renewal: undefined };
    if (this.#closed) return;
    if (unguarded.ended !== undefined) {
      this.#logger.warn(
        `taskguard: ${identity.taskKey}: the sidecar granted run ${runId} ${after} ms after the exec was let ` +
          `through WITHOUT a guard, once the exec had ended; releasing it as the exec ended`,
      );
      this.#execs.set(toolCallId, run);
      await this.#endFallback(toolCallId, ...unguarded.ended);
      return;
    }
    this.#logger.warn(
      `taskguard: ${identity.taskKey}: guarded late: the sidecar granted run ${runId} ${after} ms after the exec ` +
        `was let through WITHOUT a guard; the plugin holds the guard until the exec ends`,
    );
    this.#trackExec(toolCallId, run);
    if (unguarded.after !== undefined) {
      // after_tool_call came first: the exec went to the background.
      const { status, details, error } = unguarded.after;
      await this.#fallbackAfterExec(toolCallId, run, status, details, error);
    }
  }

  #execStillRuns(unguarded: UnguardedExec): boolean {
    if (unguarded.ended === undefined && unguarded.pid !== undefined && !alive(unguarded.pid)) {
      unguarded.ended = ["SUCCEEDED", "the process is gone; its exit status was not observed"];
    }
    return unguarded.ended === undefined;
  }

  async #adoptSpawnLate(
    run: SpawnRun,
    first: Promise<Lease | Conflict>,
    again: () => Promise<Lease | Conflict>,
  ): Promise<void> {
    const letThroughAt = performance.now();
    const answer = await this.#askWhileRunning(run.identity, first, again, () => run.ending === undefined);
    if (answer === undefined) return;
    const after = Math.round(performance.now() - letThroughAt);
    if (!(answer instanceof Lease)) {
      this.#logger.warn(
        `taskguard: ${run.identity.taskKey}: the sub-agent let through WITHOUT a guard is a second run: the ` +
          `sidecar answered ${answer.outcome} ${after} ms later (run ${answer.runId}, holder ${answer.holder})`,
      );
      return;
    }
    this.#logger.warn(
      run.ending === undefined
        ? `taskguard: ${run.identity.taskKey}: guarded late: the sidecar granted run ${run.runId} ${after} ms ` +
            `after the sub-agent was let through WITHOUT a guard; held until subagent_ended`
        : `taskguard: ${run.identity.taskKey}: the sidecar granted run ${run.runId} ${after} ms after the ` +
            `sub-agent was let through WITHOUT a guard, once it had ended; releasing it as it ended`,
    );
    this.#attach(run, answer);
  }

  /**
   * The sidecar's answer to a call let through without a guard, asking again (same run id, so never two
   * runs) each time the client gives up without one, for as long as the task runs; undefined if none came.
   */
  async #askWhileRunning<T>(
    identity: TaskIdentity,
    first: Promise<T>,
    again: () => Promise<T>,
    running: () => boolean,
  ): Promise<T | undefined> {
    const giveUpAt = performance.now() + LATE_GRANT_WINDOW_MS;
    let attempt = first;
    for (;;) {
      try {
        return await attempt;
      } catch (error) {
        if (!isNoAnswer(error) || this.#closed || !running() || performance.now() > giveUpAt) {
          if (!this.#closed) {
            this.#logger.warn(
              `taskguard: ${identity.taskKey}: ran WITHOUT a guard to the end: ${oneLine(messageOf(error))}`,
            );
          }
          return undefined;
        }
        attempt = again();
      }
    }
  }

  async #releaseIfGranted(identity: TaskIdentity, acquisition: Promise<Acquired | Conflict>): Promise<void> {
    let answer: Acquired | Conflict;
    try {
      answer = await acquisition;
    } catch {
      return;
    }
    if (answer.outcome !== "ACQUIRED") return;
    await this.client
      .release(answer.leaseId, "CANCELLED", "the call was blocked before the sidecar's grant came")
      .catch(() => {});
    this.#logger.warn(`taskguard: ${identity.taskKey}: a grant that came after the call was blocked was released CANCELLED`);
  }

  // --- retries that need an approval ----------------------------------------------------------

  /**
   * The last run failed: ask a person through OpenClaw's plugin approval (`/approve <id> allow-once` in a
   * chat, `openclaw approvals resolve`, the Control UI).
   *
   * OpenClaw calls `onResolution` without awaiting it and runs the tool right after an allow. There the
   * plugin looks up who approved in OpenClaw's ledger (`approvals.ts`), approves the retry with that
   * approver, and acquires the run. A wrapped exec waits for that at its gate (`gate.ts`): the approved
   * command runs `taskguard run` only once the plugin says `go`. A sub-agent cannot wait: OpenClaw starts
   * it while the plugin approves and acquires, and its guard comes a moment later.
   *
   * A run that cannot show an approval (no chat: `openclaw agent` from a command line, a scheduled run)
   * would only get OpenClaw's "Plugin approval unavailable"; it is blocked with what to do instead.
   */
  async #askToRetry(
    identity: TaskIdentity,
    failed: Guard,
    ctx: ToolContext,
    toolCallId: string,
    runId: string,
    call: { tool: "exec"; command: string; wrapped: boolean; params: Record<string, unknown> } | { tool: "sessions_spawn" },
  ): Promise<BeforeToolCallResult> {
    if (cannotShowApprovals(ctx)) {
      this.#logger.info(
        `taskguard: ${identity.taskKey}: run ${failed.runId} ended ${failed.state}; session ` +
          `${ctx.sessionKey ?? "-"} cannot show an approval (no chat), so the call is blocked with how to approve`,
      );
      return { block: true, blockReason: approvalUnavailableReason(identity.taskName, identity.taskKey, failed) };
    }
    let gate: ApprovalGate | undefined;
    if (call.tool === "exec" && call.wrapped) {
      try {
        gate = await ApprovalGate.open(this.settings.approval.timeoutMs + GATE_LINGER_MS);
      } catch (error) {
        this.#logger.warn(`taskguard: ${identity.taskKey}: cannot prepare the approved run's gate: ${messageOf(error)}`);
        return { block: true, blockReason: approvalUnavailableReason(identity.taskName, identity.taskKey, failed) };
      }
      this.#gates.set(toolCallId, gate);
    }
    this.#ledger?.prepare();
    const { title, description } = approvalPrompt(identity.taskName, failed, runId);
    this.#logger.info(
      `taskguard: ${identity.taskKey}: run ${failed.runId} ended ${failed.state}; asking for an approval ` +
        `(session ${ctx.sessionKey ?? "-"}; the retry would be run ${runId})`,
    );
    // Returns a promise of its follow-up work for whoever waits (OpenClaw does not).
    const onResolution = (decision: string): Promise<void> => {
      if (decision !== "allow-once" && decision !== "allow-always") {
        gate?.say(`not approved (${decision})`);
        gate?.close();
        this.#gates.delete(toolCallId);
        this.#logger.info(`taskguard: ${identity.taskKey}: retry not approved (${decision}); it stays blocked`);
        return Promise.resolve();
      }
      if (call.tool === "sessions_spawn") {
        // Synchronously, before OpenClaw starts the tool: after_tool_call must find this entry.
        const run: SpawnRun = { identity, runId, lease: undefined, ending: undefined };
        this.#spawns.set(toolCallId, run);
        return this.#approve(identity, ctx, runId).then(() => this.#holdAfterApproval(run, ctx, toolCallId));
      }
      return this.#approve(identity, ctx, runId).then(() =>
        this.#acquireAfterApproval(identity, ctx, toolCallId, runId, call.wrapped, gate),
      );
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
    if (call.tool === "exec" && call.wrapped && gate !== undefined) {
      result.params = { ...call.params, command: this.#wrap(identity, runId, call.command, gate.path) };
    }
    return result;
  }

  async #approve(identity: TaskIdentity, ctx: ToolContext, retryRunId: string): Promise<void> {
    const { approver, reason } = await this.#whoApproved(identity, ctx, retryRunId);
    try {
      await this.client.approveRetry(identity.taskKey, { approver, reason });
      this.#logger.info(`taskguard: ${identity.taskKey}: retry approved by ${approver}`);
    } catch (error) {
      // FAILED_PRECONDITION: someone approved it already (`taskguard approve-retry`), or it is running again.
      this.#logger.info(`taskguard: ${identity.taskKey}: approve-retry: ${messageOf(error)}`);
    }
  }

  /** The approver as OpenClaw recorded it, found by the retry's run id in the approval's description. */
  async #whoApproved(
    identity: TaskIdentity,
    ctx: ToolContext,
    retryRunId: string,
  ): Promise<{ approver: string; reason: string }> {
    const asked = { taskName: identity.taskName, requester: requesterOf(ctx), sessionKey: ctx.sessionKey };
    let why = "OpenClaw's approval records are not available to the plugin here";
    if (this.#ledger !== undefined) {
      try {
        const found = await withTimeout(
          this.#ledger.find(retryRunId, ctx.sessionKey),
          APPROVER_LOOKUP_MS,
          "the lookup timed out",
        );
        if (found !== undefined) {
          return { approver: found.approver, reason: approvalReason({ ...asked, approvalId: found.id }) };
        }
        why = "the approval is not in OpenClaw's approval history";
      } catch (error) {
        why = oneLine(messageOf(error));
      }
    }
    this.#logger.warn(`taskguard: ${identity.taskKey}: cannot tell who approved the retry (${why}); recorded as ${UNKNOWN_APPROVER}`);
    return { approver: UNKNOWN_APPROVER, reason: approvalReason({ ...asked, approvalId: undefined, unknownBecause: why }) };
  }

  async #holdAfterApproval(run: SpawnRun, ctx: ToolContext, toolCallId: string): Promise<void> {
    const { identity } = run;
    try {
      const answer = await this.client.openHold(identity.taskKey, {
        runId: run.runId,
        labels: this.#labels(ctx, "sessions_spawn", toolCallId),
        holder: this.#holder(ctx, "sessions_spawn"),
        onConflict: "return",
      });
      if (answer instanceof Lease) {
        this.#attach(run, answer);
        return;
      }
      this.#logger.warn(
        `taskguard: ${identity.taskKey}: after the approval, ${answer.outcome} (run ${answer.runId}); ` +
          `the approved sub-agent started without the guard`,
      );
    } catch (error) {
      this.#logger.warn(`taskguard: ${identity.taskKey}: after the approval: ${messageOf(error)}`);
    }
  }

  /** The approved exec's run; a wrapped exec waiting at its gate is told `go` once the run is the plugin's. */
  async #acquireAfterApproval(
    identity: TaskIdentity,
    ctx: ToolContext,
    toolCallId: string,
    runId: string,
    wrapped: boolean,
    gate: ApprovalGate | undefined,
  ): Promise<void> {
    let word = "the sidecar did not answer";
    try {
      const answer = await this.client.acquire(identity.taskKey, {
        runId,
        ttlMs: this.settings.exec.leaseTtlMs,
        labels: this.#labels(ctx, "exec", toolCallId),
        holder: this.#holder(ctx, "exec"),
        onConflict: "return",
      });
      if (answer.outcome === "ACQUIRED") {
        this.#trackExec(toolCallId, { identity, runId, leaseId: answer.leaseId, wrapped, renewal: undefined });
        word = "go";
        return;
      }
      word = `${answer.outcome.toLowerCase().replaceAll("_", " ")} (run ${answer.runId})`;
      this.#logger.warn(`taskguard: ${identity.taskKey}: after the approval, ${answer.outcome} (run ${answer.runId})`);
    } catch (error) {
      word = `the sidecar did not grant it: ${oneLine(messageOf(error))}`;
      this.#logger.warn(`taskguard: ${identity.taskKey}: after the approval: ${messageOf(error)}`);
    } finally {
      gate?.say(word);
    }
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
    const status = typeof details.status === "string" ? details.status : error ? "error" : "unknown";
    const gate = this.#gates.get(toolCallId);
    if (gate !== undefined) {
      this.#gates.delete(toolCallId);
      if (status === "running") gate.closeAfter(GATE_LINGER_MS);
      else gate.close();
    }
    const unguarded = this.#unguarded.get(toolCallId);
    if (unguarded !== undefined) {
      unguarded.after = { status, details, error };
      if (status === "running") {
        unguarded.pid = typeof details.pid === "number" ? details.pid : undefined;
        unguarded.processSession = typeof details.sessionId === "string" ? details.sessionId : undefined;
      } else {
        unguarded.ended = endingOf(status, details, error);
      }
    }
    const run = this.#execs.get(toolCallId);
    if (run === undefined) {
      return;
    }
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
    for (const unguarded of this.#unguarded.values()) {
      if (unguarded.processSession === session) unguarded.ended ??= endingOf(status, details, undefined);
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
    const run = this.#spawns.get(toolCallId);
    if (run === undefined) {
      return;
    }
    this.#spawns.delete(toolCallId);
    const childRunId = typeof details.runId === "string" ? details.runId : undefined;
    if (details.status !== "accepted" || childRunId === undefined) {
      const why = error ?? (typeof details.error === "string" ? details.error : String(details.status ?? "unknown"));
      await this.#finishSpawn(run, ["CANCELLED", `sessions_spawn did not start a sub-agent: ${why}`]);
      return;
    }
    this.#children.set(childRunId, run);
    if (typeof details.childSessionKey === "string") {
      this.#children.set(`session:${details.childSessionKey}`, run); // when an ending names only the session
    }
    this.#logger.info(`taskguard: ${run.identity.taskKey}: run ${run.runId} is sub-agent run ${childRunId}`);
    const early = this.#earlyEndings.get(childRunId);
    if (early !== undefined) {
      this.#earlyEndings.delete(childRunId);
      await this.subagentEnded(early, { runId: childRunId });
    }
  }

  async subagentEnded(event: SubagentEndedEvent, ctx: SubagentContext): Promise<void> {
    const childRunId = event.runId ?? ctx.runId;
    const bySession = `session:${event.targetSessionKey}`;
    const run = (childRunId === undefined ? undefined : this.#children.get(childRunId)) ?? this.#children.get(bySession);
    if (run === undefined) {
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
      if (held === run) this.#children.delete(key);
    }
    await this.#finishSpawn(run, subagentEnding(event));
  }

  /** The spawn or its sub-agent is over: its guard is released now, or as soon as it comes. */
  async #finishSpawn(run: SpawnRun, ending: ExecEnding): Promise<void> {
    run.ending = ending;
    const lease = run.lease;
    run.lease = undefined;
    if (lease !== undefined) {
      await this.#end(lease, ...ending);
    }
  }

  /** A sub-agent's guard that came after the call (an approval, a late grant). */
  #attach(run: SpawnRun, lease: Lease): void {
    if (run.ending !== undefined) {
      void this.#end(lease, ...run.ending);
      return;
    }
    run.lease = lease;
    this.#watchLost(run.identity, lease);
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

  #watchLost(identity: TaskIdentity, lease: Lease): void {
    void lease.lost.then((lost) => {
      if (!this.#closed) {
        this.#logger.warn(`taskguard: ${identity.taskKey}: lost the guard of run ${lease.runId}: ${lost.message}`);
      }
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
    if (this.settings.taskguardBin === undefined) return false; // the gateway log said so at the start
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

  #wrap(
    identity: TaskIdentity,
    runId: string,
    command: string,
    gate?: string,
    waiting?: { choice: "queue" | "keep-newest" | "supersede"; notice: string; holder: string },
  ): string {
    return wrapCommand({
      taskguardBin: this.settings.taskguardBin ?? "taskguard",
      address: this.settings.address,
      tokenFile: this.settings.tokenFile,
      taskKey: identity.taskKey,
      runId,
      command,
      gate,
      onConflict: waiting?.choice,
      maxWaitMs: waiting === undefined ? undefined : identity.maxWaitMs,
      notice: waiting?.notice,
      holder: waiting?.holder,
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
}

// --- small pure helpers ---------------------------------------------------------------------------

export function guardedTool(toolName: string, settings: Settings): GuardedTool | undefined {
  if (toolName === "exec" && settings.exec.enabled) return "exec";
  if (toolName === "sessions_spawn" && settings.sessionsSpawn.enabled) return "sessions_spawn";
  return undefined;
}

/** Who asked for the retry: `<channel>:<sender>` (recorded in the approval's reason, not as its approver). */
export function requesterOf(ctx: ToolContext): string {
  const requester = ctx.requester;
  const channel = requester?.channel ?? ctx.channelId ?? "openclaw";
  const sender = requester?.senderId ?? (requester?.senderIsOwner ? "owner" : "unknown-sender");
  const account = requester?.accountId ? `${requester.accountId}/` : "";
  return `${channel}:${account}${sender}`;
}

/**
 * A run OpenClaw cannot show a plugin approval in: no chat it came from (OpenClaw 2026.9.6 refuses those with
 * "Plugin approval unavailable": `openclaw agent` from a command line, cron and heartbeat runs). OpenClaw
 * gives hooks the turn's message requester only for message runs.
 */
export function cannotShowApprovals(ctx: ToolContext): boolean {
  return ctx.requester?.channel === undefined && ctx.channelId === undefined;
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

async function withTimeout<T>(work: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(what)), ms);
  });
  try {
    return await Promise.race([work, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

function oneLine(text: string): string {
  return text.replace(/\s+/g, " ").slice(0, 300);
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
