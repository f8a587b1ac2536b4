/**
 * The Task Guard client: typed calls over @grpc/grpc-js, streaming leases
 * (`hold`, `openHold`), paging (`list`) and a resuming `watch`.
 *
 * Theory of operation
 * -------------------
 * Every unary call carries a deadline (`deadlineMs`, default 10 s) that
 * covers all of its attempts. Calls that are safe to repeat (acquire with a
 * run id fixed before the first attempt, renew, release, get, list,
 * checkFence) are retried with backoff while the sidecar answers UNAVAILABLE;
 * approveRetry and forceRelease are not, since a repeat of a call that did
 * land would be refused.
 *
 * A `Lease` lives on a Hold stream. It heartbeats every ttl/3 when it has a
 * TTL. When the stream breaks with UNAVAILABLE (the sidecar restarted or is
 * draining), it resumes on a new stream with its lease id for up to
 * `resumeWindowMs`; the sidecar keeps a stream-bound run for its resume grace
 * after a restart. A lease the sidecar takes away (force-release, expiry) or
 * that cannot be resumed is *lost*: `lost` resolves, `signal` aborts.
 *
 * Streams have no overall deadline (they last as long as the lease or the
 * watch); the deadline bounds each step that waits for an answer instead
 * (the acquisition, the release).
 */

import { createHmac, randomBytes, randomUUID } from "node:crypto";
import { lstatSync, mkdirSync } from "node:fs";
import { hostname } from "node:os";
import { dirname, resolve } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import * as grpc from "@grpc/grpc-js";
import * as pb from "./generated/taskguard/v1/taskguard.ts";
import {
  type AlreadyRunning,
  LeaseLostError,
  PermissionDeniedError,
  type RetryRequiresApproval,
  StatusError,
  type TaskGuardError,
  UnavailableError,
  cancelled,
  conflictError,
  deadlineExceeded,
  fromCallError,
  invalidArgument,
  leaseLost,
  protocolError,
} from "./errors.ts";
import type {
  Acquired,
  AcquireOptions,
  ClientOptions,
  Connectivity,
  FenceCheck,
  Guard,
  GuardEvent,
  GuardEventType,
  GuardState,
  HealthStatus,
  HoldOptions,
  LeaseState,
  ListOptions,
  RunStatus,
  WatchOptions,
} from "./models.ts";

// --- the conflict (it carries an error: every other public type is in models.ts, below errors.ts) --------

/**
 * A refused acquisition, which `acquire`, `hold` and `openHold` return
 * instead of throwing when `onConflict` is "return" or "join": the run in the
 * way. `guard` is the winner's snapshot (ALREADY_RUNNING) or the failed run's
 * (RETRY_REQUIRES_APPROVAL); after a join (`joined`), the winner's final
 * snapshot, whose `state` says how that run ended.
 */
export interface Conflict {
  outcome: "ALREADY_RUNNING" | "RETRY_REQUIRES_APPROVAL";
  taskKey: string;
  runId: string;
  holder: string;
  startedAt: Date;
  fencingToken: number;
  guard: Guard;
  joined: boolean;
  /** The error "raise" would have thrown. */
  error: AlreadyRunning | RetryRequiresApproval;
}


// --- addresses -----------------------------------------------------------------------------

/** TASKGUARD_ADDR, else the sidecar's own default socket: `$XDG_RUNTIME_DIR/taskguard/` or `/tmp/taskguard-<uid>/`. */
export function defaultAddress(env: NodeJS.ProcessEnv = process.env): string {
  if (env.TASKGUARD_ADDR) {
    return env.TASKGUARD_ADDR;
  }
  return `unix:${defaultFolder(env)}/taskguard.sock`;
}

function defaultFolder(env: NodeJS.ProcessEnv): string {
  return env.XDG_RUNTIME_DIR ? `${env.XDG_RUNTIME_DIR}/taskguard` : `/tmp/taskguard-${process.getuid?.() ?? 0}`;
}

/**
 * Refuse (PermissionDeniedError) to talk to the default socket when its folder is not this user's own.
 *
 * The default folder has a well-known name, so another user could make it first and put a socket of
 * theirs in it, to receive this client's calls and tokens. As the sidecar does, the client uses it only
 * when it is a real folder (not a symlink) of this user's that no one else may write; when it is missing,
 * the client makes it (0700), so that nobody else can take the name before the sidecar starts. Other
 * addresses are the caller's choice and are not checked. (The Python client's `check_default_socket`.)
 */
function checkDefaultSocket(address: string, env: NodeJS.ProcessEnv = process.env): void {
  const folder = resolve(defaultFolder(env));
  if (!address.startsWith("unix:") || dirname(resolve(address.slice(5).replace(/^\/\//, ""))) !== folder) {
    return;
  }
  try {
    mkdirSync(folder, { mode: 0o700 }); // never follows a symlink: one at `folder` is EEXIST
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "EEXIST") {
      return; // its parent is missing or not writable: nobody else can make it there either
    }
  }
  const me = process.geteuid?.() ?? 0;
  const found = lstatSync(folder);
  let problem: string;
  if (!found.isDirectory()) {
    problem = "is not a folder (a symbolic link?)";
  } else if (found.uid !== me) {
    problem = `belongs to uid ${found.uid}, not to this user (uid ${me})`;
  } else if (found.mode & 0o022) {
    problem = `has mode ${(found.mode & 0o7777).toString(8).padStart(4, "0")}: other users may write in it`;
  } else {
    return;
  }
  throw new PermissionDeniedError(
    grpc.status.PERMISSION_DENIED,
    `not connecting to ${address}: the socket folder ${folder} ${problem}, so another user may be listening there; ` +
      "remove it, or set TASKGUARD_ADDR",
  );
}

// Where the sidecar cannot tell callers apart (they share a token, or have none), it hands a run's lease
// back only to a retry that carries the same retrySecret as the run's first attempt. The secret is an
// HMAC of the key and run id under a key this process draws once: every attempt, and every later acquire
// of the same run id from this process, sends the same secret, and nobody else can compute it.
const RETRY_SECRET_KEY = randomBytes(32);

function retrySecret(taskKey: string, runId: string): string {
  return createHmac("sha256", RETRY_SECRET_KEY).update(`${taskKey}\0${runId}`).digest("base64url");
}

// --- wire conversion -------------------------------------------------------------------------

const MAX_DETAIL_BYTES = 4096;
const DEFAULT_DEADLINE_MS = 10_000;
const DEFAULT_RESUME_WINDOW_MS = 15_000;
const BACKOFF_FIRST_MS = 50;
const BACKOFF_MAX_MS = 2_000;

const CHANNEL_OPTIONS: grpc.ChannelOptions = {
  // Notice a dead peer on a connection that carries only a quiet Hold stream (the sidecar allows pings every 5 s).
  "grpc.keepalive_time_ms": 10_000,
  "grpc.keepalive_timeout_ms": 5_000,
  "grpc.keepalive_permit_without_calls": 1,
  // The sidecar is local: reconnect quickly after it restarts rather than after grpc's default 1 s+. While the
  // channel waits out its backoff, calls fail at once, so the cap stays well inside the retries' backoff.
  "grpc.initial_reconnect_backoff_ms": 100,
  "grpc.max_reconnect_backoff_ms": 250,
};

function stripPrefix<T extends string>(value: string, prefix: string, known: readonly T[], fallback: T): T {
  const name = value.startsWith(prefix) ? value.slice(prefix.length) : value;
  return (known as readonly string[]).includes(name) ? (name as T) : fallback;
}

const GUARD_STATES: readonly GuardState[] = [
  "RUNNING",
  "SUCCEEDED",
  "FAILED",
  "CANCELLED",
  "ABANDONED",
  "EXPIRED",
  "RETRY_APPROVED",
];
const RUN_STATUSES: readonly RunStatus[] = ["SUCCEEDED", "FAILED", "CANCELLED"];
const EVENT_TYPES: readonly GuardEventType[] = [
  "SNAPSHOT",
  "ACQUIRED",
  "DUPLICATE_REFUSED",
  "RETRY_REFUSED",
  "RENEWED",
  "RELEASED",
  "EXPIRED",
  "ABANDONED",
  "RETRY_APPROVED",
  "FORCE_RELEASED",
  "RESUMED",
];

function durationMs(duration: pb.Guard["ttl"]): number | undefined {
  return duration === undefined ? undefined : duration.seconds * 1000 + duration.nanos / 1e6;
}

function toDuration(ms: number, field: string): { seconds: number; nanos: number } {
  if (!Number.isFinite(ms) || ms <= 0) {
    throw invalidArgument(field, "must be a number of milliseconds > 0");
  }
  const seconds = Math.floor(ms / 1000);
  return { seconds, nanos: Math.round((ms - seconds * 1000) * 1e6) };
}

export function guardFromWire(guard: pb.Guard | undefined): Guard {
  if (guard === undefined) {
    throw protocolError("the sidecar answered without a guard");
  }
  const lastStatus = stripPrefix<RunStatus | "UNSPECIFIED">(
    guard.lastStatus,
    "RUN_STATUS_",
    RUN_STATUSES,
    "UNSPECIFIED",
  );
  return {
    taskKey: guard.taskKey,
    sessionKey: guard.sessionKey,
    taskName: guard.taskName,
    state: stripPrefix(guard.state, "GUARD_STATE_", GUARD_STATES, "UNSPECIFIED"),
    runId: guard.runId,
    holder: guard.holder,
    startedAt: guard.startedAt ?? new Date(0),
    expiresAt: guard.expiresAt,
    fencingToken: guard.fencingToken,
    attempt: guard.attempt,
    lastStatus: lastStatus === "UNSPECIFIED" ? undefined : lastStatus,
    lastDetail: guard.lastDetail,
    releasedAt: guard.releasedAt,
    duplicateCount: guard.duplicateCount,
    streamBound: guard.streamBound,
    labels: { ...guard.labels },
    revision: guard.revision,
    heartbeatAt: guard.heartbeatAt ?? new Date(0),
    stale: guard.stale,
    approvedBy: guard.approvedBy,
    approvalReason: guard.approvalReason,
    ttlMs: durationMs(guard.ttl),
    releasedBy: guard.releasedBy,
  };
}

function eventFromWire(event: pb.GuardEvent): GuardEvent {
  return {
    revision: event.revision,
    type: stripPrefix(event.type, "GUARD_EVENT_TYPE_", EVENT_TYPES, "UNSPECIFIED"),
    guard: guardFromWire(event.guard),
    triggerRunId: event.triggerRunId,
    triggerHolder: event.triggerHolder,
    occurredAt: event.occurredAt,
    actor: event.actor,
    reason: event.reason,
  };
}

function runStatusToWire(status: RunStatus): pb.RunStatus {
  if (!RUN_STATUSES.includes(status)) {
    throw invalidArgument("status", `must be SUCCEEDED, FAILED or CANCELLED (got ${String(status)})`);
  }
  return `RUN_STATUS_${status}`;
}

/**
 * The sidecar takes at most 4096 bytes of detail and no control characters (C0, DEL, C1: a terminal would act
 * on them); a long or multi-line error message must not make the release fail. Line breaks become spaces, other
 * control characters `\xNN`.
 */
function clipDetail(raw: string): string {
  const detail = raw
    .replace(/[\t\n\v\f\r]+/g, " ")
    .replace(/[\x00-\x1f\x7f-\x9f]/g, (char) => `\\x${char.charCodeAt(0).toString(16).padStart(2, "0")}`);
  const bytes = Buffer.from(detail, "utf8");
  if (bytes.length <= MAX_DETAIL_BYTES) {
    return detail;
  }
  // Cut on a character boundary: decoding a cut sequence would add U+FFFD, so drop back to a lead byte.
  let end = MAX_DETAIL_BYTES - 3;
  while (end > 0 && ((bytes[end] ?? 0) & 0xc0) === 0x80) {
    end -= 1;
  }
  return `${bytes.subarray(0, end).toString("utf8")}...`;
}

function conflict(outcome: pb.AcquireOutcome, guard: Guard, joined = false): Conflict {
  const kind = outcome === "ACQUIRE_OUTCOME_ALREADY_RUNNING" ? "ALREADY_RUNNING" : "RETRY_REQUIRES_APPROVAL";
  return {
    outcome: kind,
    taskKey: guard.taskKey,
    runId: guard.runId,
    holder: guard.holder,
    startedAt: guard.startedAt,
    fencingToken: guard.fencingToken,
    guard,
    joined,
    error: conflictError(kind, guard),
  };
}

function backoffMs(attempt: number): number {
  const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** (attempt - 1));
  return ceiling / 2 + Math.random() * (ceiling / 2);
}

const TIMED_OUT = Symbol("timed out");

/** `promise`'s value, or TIMED_OUT once `deadline` (epoch ms) passed; the timer never outlives the race. */
async function beforeDeadline<T>(promise: Promise<T>, deadline: number): Promise<T | typeof TIMED_OUT> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<typeof TIMED_OUT>((resolve) => {
    timer = setTimeout(resolve, Math.max(0, deadline - Date.now()), TIMED_OUT);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message || error.name : String(error);
}

// --- grpc.health.v1, by hand: two one-field messages do not need generated code --------------------------

const HEALTH_CHECK = "/grpc.health.v1.Health/Check";
const HEALTH_STATUSES: readonly HealthStatus[] = ["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"];
const CONNECTIVITY: readonly Connectivity[] = ["IDLE", "CONNECTING", "READY", "TRANSIENT_FAILURE", "SHUTDOWN"];

/** HealthCheckRequest { string service = 1; } */
function encodeHealthCheckRequest(service: string): Buffer {
  const bytes = Buffer.from(service, "utf8");
  if (bytes.length === 0) {
    return Buffer.alloc(0);
  }
  const length: number[] = [];
  for (let left = bytes.length; ; left >>>= 7) {
    if (left < 0x80) {
      length.push(left);
      break;
    }
    length.push((left & 0x7f) | 0x80);
  }
  return Buffer.concat([Buffer.from([0x0a, ...length]), bytes]);
}

/** HealthCheckResponse { ServingStatus status = 1; }: the status, skipping any field it does not know. */
function decodeHealthCheckResponse(bytes: Buffer): HealthStatus {
  let status = 0;
  let at = 0;
  const varint = (): number => {
    let value = 0;
    for (let shift = 0; at < bytes.length && shift < 35; shift += 7) {
      const byte = bytes[at++] ?? 0;
      value += (byte & 0x7f) * 2 ** shift;
      if (byte < 0x80) break;
    }
    return value;
  };
  while (at < bytes.length) {
    const tag = varint();
    const wireType = tag & 7;
    if (tag >>> 3 === 1 && wireType === 0) {
      status = varint();
    } else if (wireType === 0) {
      varint();
    } else if (wireType === 2) {
      at += varint();
    } else if (wireType === 1) {
      at += 8;
    } else if (wireType === 5) {
      at += 4;
    } else {
      throw protocolError(`the health check answer has a field of wire type ${wireType}`);
    }
  }
  return HEALTH_STATUSES[status] ?? "UNKNOWN";
}

// --- trace context -------------------------------------------------------------------------

/** The part of @opentelemetry/api we use, typed here so the package type-checks without that optional peer. */
interface OpenTelemetry {
  context: { active(): unknown };
  propagation: { inject(context: unknown, carrier: Record<string, string>): void };
}

// A variable, not a literal: TypeScript then does not look for the module's types.
const OPENTELEMETRY_API = "@opentelemetry/api";
let openTelemetry: Promise<OpenTelemetry | undefined> | undefined;

/** @opentelemetry/api is an optional peer: present, it carries the caller's trace context to the sidecar. */
function loadOpenTelemetry(): Promise<OpenTelemetry | undefined> {
  openTelemetry ??= (async () => {
    try {
      return (await import(OPENTELEMETRY_API)) as OpenTelemetry;
    } catch {
      return undefined; // not installed: no trace context to carry
    }
  })();
  return openTelemetry;
}

// --- Hold streams ----------------------------------------------------------------------------

type HoldStream = grpc.ClientDuplexStream<pb.HoldRequest, pb.HoldResponse>;

interface StreamEnd {
  end: true;
  /** Undefined when the stream ended with OK. */
  error: TaskGuardError | undefined;
}

/**
 * One Hold call, read as a queue: `next()` gives messages in order and then
 * how the stream ended. Reading through the stream's async iterator yields
 * every buffered message before the call's error, which grpc-js's events
 * alone do not promise (it emits "error" as soon as the status arrives).
 */
class HoldCall {
  readonly #call: HoldStream;
  readonly #queue: (pb.HoldResponse | StreamEnd)[] = [];
  #wake: (() => void) | undefined;
  #ended = false;

  constructor(call: HoldStream) {
    this.#call = call;
    void this.#pump();
  }

  async #pump(): Promise<void> {
    let end: StreamEnd = { end: true, error: undefined };
    try {
      for await (const message of this.#call) {
        this.#push(message as pb.HoldResponse);
      }
    } catch (error) {
      end = { end: true, error: fromCallError(error) };
    }
    this.#ended = true;
    this.#push(end);
  }

  #push(item: pb.HoldResponse | StreamEnd): void {
    this.#queue.push(item);
    this.#wake?.();
  }

  /** The next message or the end; `TIMED_OUT` when nothing came before `deadline` (epoch ms). */
  async next(deadline?: number): Promise<pb.HoldResponse | StreamEnd | typeof TIMED_OUT> {
    for (;;) {
      const item = this.#queue.shift();
      if (item !== undefined) {
        if ("end" in item) {
          this.#queue.unshift(item); // the end stays the answer to every later call
        }
        return item;
      }
      const left = deadline === undefined ? undefined : deadline - Date.now();
      if (left !== undefined && left <= 0) {
        return TIMED_OUT;
      }
      await new Promise<void>((resolve) => {
        const timer = left === undefined ? undefined : setTimeout(resolve, left);
        this.#wake = () => {
          clearTimeout(timer);
          this.#wake = undefined;
          resolve();
        };
      });
    }
  }

  send(request: pb.HoldRequest): void {
    if (this.#ended || this.#call.writableEnded || this.#call.destroyed) {
      return; // the end is already queued; the reader learns it there
    }
    this.#call.write(request, () => {});
  }

  cancel(): void {
    this.#call.cancel();
  }
}

// --- the lease ---------------------------------------------------------------------------------

interface LeaseContext {
  openHold(): Promise<HoldCall>;
  releaseUnary(leaseId: string, status: RunStatus, detail: string, deadline: number): Promise<Guard>;
  /** The lease is over (released or lost): the client stops tracking it. */
  forget(lease: Lease): void;
  readonly deadlineMs: number;
  readonly resumeWindowMs: number;
}

/**
 * A guard held over a Hold stream, from `Client.openHold`. Release it exactly
 * once with `release()`; until then the sidecar keeps it for this run
 * (heartbeats are automatic) and ends it ABANDONED if this process goes away.
 * Not shared across processes: pass the lease id to `Client.release` for that.
 */
export class Lease {
  readonly outcome = "ACQUIRED" as const;
  readonly taskKey: string;
  readonly runId: string;
  /** The capability that renews and releases this lease. */
  readonly leaseId: string;
  readonly fencingToken: number;
  readonly startedAt: Date;
  /** Resolves (never rejects) with why, when the guard is taken away or cannot be resumed. */
  readonly lost: Promise<LeaseLostError>;
  /** Aborted, with the LeaseLostError as its reason, when `lost` resolves: hand it to the work the lease guards. */
  readonly signal: AbortSignal;

  #guard: Guard;
  #state: LeaseState = "held";
  #stream: HoldCall;
  readonly #context: LeaseContext;
  readonly #abort = new AbortController();
  #resolveLost: (error: LeaseLostError) => void = () => {};
  #lostError: LeaseLostError | undefined;
  #lostGuard: Guard | undefined;
  #heartbeat: NodeJS.Timeout | undefined;
  #released: Promise<Guard> | undefined;
  #releaseAnswer: ((answer: Guard | StreamEnd) => void) | undefined;
  #stateChanged: (() => void)[] = [];

  /** @internal Made by `Client.openHold`. */
  constructor(context: LeaseContext, stream: HoldCall, answer: pb.HoldResponse) {
    const guard = guardFromWire(answer.guard);
    this.#context = context;
    this.#stream = stream;
    this.#guard = guard;
    this.taskKey = guard.taskKey;
    this.runId = guard.runId;
    this.leaseId = answer.leaseId;
    this.fencingToken = guard.fencingToken;
    this.startedAt = guard.startedAt;
    this.signal = this.#abort.signal;
    this.lost = new Promise((resolve) => {
      this.#resolveLost = resolve;
    });
    const ttlMs = guard.ttlMs;
    if (ttlMs !== undefined) {
      this.#heartbeat = setInterval(() => this.#beat(), Math.max(1, ttlMs / 3));
      this.#heartbeat.unref();
    }
    void this.#read(stream);
  }

  /** The latest snapshot: from the acquisition, the last heartbeat answer, a resume or the release. */
  get guard(): Guard {
    return this.#guard;
  }

  get state(): LeaseState {
    return this.#state;
  }

  /**
   * End the run with `status` (and a detail of at most 4096 bytes; longer is
   * clipped). Returns the released guard; throws LeaseLostError when the lease
   * was lost first. Calling it again returns the first call's answer.
   */
  release(status: RunStatus = "SUCCEEDED", detail = ""): Promise<Guard> {
    this.#released ??= this.#release(status, clipDetail(detail));
    return this.#released;
  }

  async #release(status: RunStatus, detail: string): Promise<Guard> {
    const wireStatus = runStatusToWire(status);
    const deadline = Date.now() + this.#context.deadlineMs;
    while (this.#state === "resuming") {
      await this.#nextState();
    }
    if (this.#state === "lost") {
      throw this.#lostError;
    }
    this.#setState("releasing");
    this.#stopHeartbeats();
    const answer = new Promise<Guard | StreamEnd>((resolve) => {
      this.#releaseAnswer = resolve;
    });
    this.#stream.send({ request: { $case: "release", release: { status: wireStatus, detail } } });
    const result = await beforeDeadline(answer, deadline);
    if (result !== TIMED_OUT && !("end" in result)) {
      this.#guard = result;
      this.#setState("released");
      return result;
    }
    // The stream broke or went quiet before its answer. Release is idempotent by lease id, and also
    // reaches a run the sidecar keeps for its resume grace after a restart.
    this.#stream.cancel();
    try {
      const guard = await this.#context.releaseUnary(this.leaseId, status, detail, deadline);
      this.#guard = guard;
      this.#setState("released");
      return guard;
    } catch (error) {
      const lost =
        error instanceof LeaseLostError
          ? error
          : leaseLost(
              `${this.taskKey}: the release of run ${this.runId} was not confirmed: ${messageOf(error)}`,
              undefined,
              error,
            );
      this.#markLost(lost);
      throw lost;
    }
  }

  #beat(): void {
    if (this.#state === "held") {
      this.#stream.send({ request: { $case: "heartbeat", heartbeat: {} } });
    }
  }

  async #read(stream: HoldCall): Promise<void> {
    for (;;) {
      const message = await stream.next();
      if (message === TIMED_OUT) {
        continue; // no deadline was given; cannot happen
      }
      if (stream !== this.#stream) {
        return; // a stream this lease has moved on from
      }
      if ("end" in message) {
        this.#streamEnded(message);
        return;
      }
      const guard = message.guard === undefined ? undefined : guardFromWire(message.guard);
      switch (message.event) {
        case "HOLD_EVENT_HEARTBEAT_ACK":
          if (guard !== undefined) this.#guard = guard;
          break;
        case "HOLD_EVENT_RELEASED":
          if (guard !== undefined) this.#releaseAnswer?.(guard);
          break;
        case "HOLD_EVENT_LOST":
          this.#lostGuard = guard;
          break;
      }
    }
  }

  #streamEnded(end: StreamEnd): void {
    const state = this.#state;
    if (state === "releasing") {
      this.#releaseAnswer?.(end);
      return;
    }
    if (state !== "held") {
      return;
    }
    if (end.error instanceof UnavailableError && this.#lostGuard === undefined) {
      void this.#resume(end.error);
      return;
    }
    const guard = this.#lostGuard;
    const why = end.error?.message ?? "the Hold stream ended without a release";
    this.#markLost(leaseLost(`${this.taskKey}: ${why}`, guard, end.error));
  }

  async #resume(cause: TaskGuardError): Promise<void> {
    this.#setState("resuming");
    const deadline = Date.now() + this.#context.resumeWindowMs;
    let last: TaskGuardError = cause;
    for (let attempt = 1; Date.now() < deadline && this.#state === "resuming"; attempt++) {
      let stream: HoldCall;
      try {
        stream = await this.#context.openHold();
      } catch (error) {
        last = fromCallError(error);
        await sleep(backoffMs(attempt));
        continue;
      }
      stream.send({ request: { $case: "resume", resume: { leaseId: this.leaseId } } });
      const answer = await stream.next(Math.min(deadline, Date.now() + this.#context.deadlineMs));
      if (this.#state !== "resuming") {
        stream.cancel(); // abandoned (the client closed) while we waited
        return;
      }
      if (answer !== TIMED_OUT && !("end" in answer) && answer.outcome === "ACQUIRE_OUTCOME_ACQUIRED") {
        this.#guard = guardFromWire(answer.guard);
        this.#stream = stream;
        this.#setState("held");
        void this.#read(stream);
        return;
      }
      stream.cancel();
      if (answer !== TIMED_OUT && !("end" in answer && answer.error instanceof UnavailableError)) {
        // NOT_FOUND or FAILED_PRECONDITION (or an answer that is no lease): the sidecar no longer has this run for us.
        const error = "end" in answer ? answer.error : undefined;
        const why = error?.message ?? `the sidecar answered ${"end" in answer ? "nothing" : answer.outcome}`;
        this.#markLost(leaseLost(`${this.taskKey}: could not resume: ${why}`, undefined, error));
        return;
      }
      if (answer !== TIMED_OUT && "end" in answer && answer.error !== undefined) {
        last = answer.error;
      }
      await sleep(Math.min(backoffMs(attempt), Math.max(0, deadline - Date.now())));
    }
    this.#markLost(
      leaseLost(
        `${this.taskKey}: the Hold stream broke and could not be resumed ` +
          `within ${this.#context.resumeWindowMs} ms: ${last.message}`,
        undefined,
        last,
      ),
    );
  }

  #markLost(error: LeaseLostError): void {
    if (this.#state === "lost" || this.#state === "released") {
      return;
    }
    error.guard ??= this.#lostGuard;
    if (error.guard !== undefined) {
      this.#guard = error.guard;
    }
    this.#lostError = error;
    this.#stopHeartbeats();
    this.#stream.cancel();
    this.#setState("lost");
    this.#resolveLost(error);
    this.#abort.abort(error);
  }

  #stopHeartbeats(): void {
    clearInterval(this.#heartbeat);
    this.#heartbeat = undefined;
  }

  #setState(state: LeaseState): void {
    this.#state = state;
    if (state === "released" || state === "lost") {
      this.#context.forget(this);
    }
    const waiting = this.#stateChanged;
    this.#stateChanged = [];
    for (const wake of waiting) wake();
  }

  #nextState(): Promise<void> {
    return new Promise((resolve) => this.#stateChanged.push(resolve));
  }

  /** @internal Ends the stream without a release (the client is closing): the sidecar abandons the run. */
  abandon(): void {
    this.#markLost(leaseLost(`${this.taskKey}: the client was closed while it held the guard`));
  }
}

// --- the client ------------------------------------------------------------------------------

type Callback<Res> = (error: grpc.ServiceError | null, response: Res) => void;
type UnaryMethod<Req, Res> = (
  request: Req,
  metadata: grpc.Metadata,
  options: Partial<grpc.CallOptions>,
  callback: Callback<Res>,
) => grpc.ClientUnaryCall;

/**
 * A connection to one sidecar. Cheap to keep for the life of the process;
 * `close()` it to let the process exit. Leases opened through it end
 * (ABANDONED) when it closes.
 */
export class Client {
  readonly address: string;
  readonly deadlineMs: number;
  readonly resumeWindowMs: number;
  readonly holder: string;
  readonly #token: string | undefined;
  readonly #stub: pb.TaskGuardClient;
  readonly #leases = new Set<Lease>();

  constructor(options: ClientOptions = {}) {
    this.address = options.address ?? defaultAddress();
    checkDefaultSocket(this.address);
    this.deadlineMs = options.deadlineMs ?? DEFAULT_DEADLINE_MS;
    this.resumeWindowMs = options.resumeWindowMs ?? DEFAULT_RESUME_WINDOW_MS;
    this.holder = options.holder ?? `${hostname()}:${process.pid}`;
    this.#token = options.token;
    this.#stub = new pb.TaskGuardClient(this.address, grpc.credentials.createInsecure(), {
      ...CHANNEL_OPTIONS,
      ...options.channelOptions,
    });
  }

  close(): void {
    for (const lease of [...this.#leases]) lease.abandon();
    this.#stub.close();
  }

  // --- leases -------------------------------------------------------------------------------

  /**
   * Acquire with a TTL lease (the sidecar's default TTL when `ttlMs` is unset).
   * Conflicts throw AlreadyRunning / RetryRequiresApproval, or with
   * `onConflict: "return"` come back as a Conflict.
   */
  acquire(taskKey: string, options?: AcquireOptions & { onConflict?: "raise" }): Promise<Acquired>;
  acquire(taskKey: string, options: AcquireOptions & { onConflict: "return" }): Promise<Acquired | Conflict>;
  async acquire(
    taskKey: string,
    options: AcquireOptions & { onConflict?: "raise" | "return" } = {},
  ): Promise<Acquired | Conflict> {
    const request = this.#acquireRequest(taskKey, options, "ON_CONFLICT_REJECT");
    const response = await this.#unary(this.#stub.acquire, request, true);
    const guard = guardFromWire(response.guard);
    if (response.outcome === "ACQUIRE_OUTCOME_ACQUIRED") {
      return {
        outcome: "ACQUIRED",
        taskKey: guard.taskKey,
        runId: guard.runId,
        leaseId: response.leaseId,
        fencingToken: guard.fencingToken,
        startedAt: guard.startedAt,
        expiresAt: guard.expiresAt,
        guard,
      };
    }
    const refused = conflict(response.outcome, guard);
    if (options.onConflict === "return") {
      return refused;
    }
    throw refused.error;
  }

  /** Extend a TTL lease (by its own TTL, or `ttlMs`). */
  async renew(leaseId: string, options: { ttlMs?: number } = {}): Promise<Guard> {
    const ttl = options.ttlMs === undefined ? undefined : toDuration(options.ttlMs, "ttl");
    const response = await this.#unary(this.#stub.renew, { leaseId, ttl }, true);
    return guardFromWire(response.guard);
  }

  /** End the run that holds `leaseId`. Repeating it with the same status answers the same guard. */
  async release(leaseId: string, status: RunStatus, detail = ""): Promise<Guard> {
    return this.#releaseUnary(leaseId, status, clipDetail(detail), Date.now() + this.deadlineMs);
  }

  async #releaseUnary(leaseId: string, status: RunStatus, detail: string, deadline: number): Promise<Guard> {
    const request = { leaseId, status: runStatusToWire(status), detail };
    const response = await this.#unary(this.#stub.release, request, true, deadline);
    return guardFromWire(response.guard);
  }

  /**
   * Acquire over a Hold stream and keep the guard until `lease.release()`: for
   * callers that acquire in one callback and release in another. Prefer `hold`
   * when one function does the work.
   */
  openHold(taskKey: string, options?: HoldOptions & { onConflict?: "raise" }): Promise<Lease>;
  openHold(taskKey: string, options: HoldOptions & { onConflict: "return" | "join" }): Promise<Lease | Conflict>;
  openHold(taskKey: string, options?: HoldOptions): Promise<Lease | Conflict>;
  async openHold(taskKey: string, options: HoldOptions = {}): Promise<Lease | Conflict> {
    const onConflict = options.onConflict ?? "raise";
    const wireConflict = onConflict === "join" ? "ON_CONFLICT_JOIN" : "ON_CONFLICT_REJECT";
    const request = this.#acquireRequest(taskKey, options, wireConflict);
    const deadline = Date.now() + this.deadlineMs;
    for (let attempt = 1; ; attempt++) {
      const stream = await this.#openHold();
      stream.send({ request: { $case: "acquire", acquire: request } });
      const answer = await stream.next(deadline);
      if (answer === TIMED_OUT) {
        stream.cancel();
        throw deadlineExceeded(`${taskKey}: no answer to the acquisition within ${this.deadlineMs} ms`);
      }
      if ("end" in answer) {
        const pause = backoffMs(attempt);
        // Nothing was answered, and the run id is fixed: trying again cannot start a second run.
        if (answer.error instanceof UnavailableError && Date.now() + pause < deadline) {
          await sleep(pause);
          continue;
        }
        throw answer.error ?? protocolError(`${taskKey}: the Hold stream ended without an answer`);
      }
      if (answer.outcome === "ACQUIRE_OUTCOME_ACQUIRED") {
        const lease = new Lease(this.#leaseContext(), stream, answer);
        this.#leases.add(lease);
        return lease;
      }
      const guard = guardFromWire(answer.guard);
      if (onConflict === "join" && answer.outcome === "ACQUIRE_OUTCOME_ALREADY_RUNNING") {
        return this.#join(stream, guard, options.signal);
      }
      stream.cancel();
      const refused = conflict(answer.outcome, guard);
      if (onConflict === "raise") {
        throw refused.error;
      }
      return refused;
    }
  }

  async #join(stream: HoldCall, guard: Guard, signal: AbortSignal | undefined): Promise<Conflict> {
    const stop = () => stream.cancel();
    signal?.addEventListener("abort", stop, { once: true });
    try {
      for (;;) {
        const message = await stream.next();
        if (message === TIMED_OUT) continue;
        if ("end" in message) {
          if (signal?.aborted) {
            throw cancelled(`${guard.taskKey}: stopped waiting for run ${guard.runId}`, signal.reason);
          }
          throw (
            message.error ?? protocolError(`${guard.taskKey}: the joined Hold stream ended before the winner did`)
          );
        }
        if (message.event === "HOLD_EVENT_WINNER_FINISHED") {
          stream.cancel();
          return conflict("ACQUIRE_OUTCOME_ALREADY_RUNNING", guardFromWire(message.guard), true);
        }
      }
    } finally {
      signal?.removeEventListener("abort", stop);
    }
  }

  /**
   * Run `fn` while holding the guard: acquire over a Hold stream, run, then
   * release SUCCEEDED, or FAILED with the error's message when `fn` throws
   * (the error is rethrown). When the lease is lost while `fn` runs,
   * `lease.signal` aborts and `hold` throws LeaseLostError after `fn` settles.
   */
  hold<T>(
    taskKey: string,
    options: HoldOptions & { onConflict?: "raise" },
    fn: (lease: Lease) => T | Promise<T>,
  ): Promise<T>;
  hold<T>(
    taskKey: string,
    options: HoldOptions & { onConflict: "return" | "join" },
    fn: (lease: Lease) => T | Promise<T>,
  ): Promise<T | Conflict>;
  hold<T>(taskKey: string, options: HoldOptions, fn: (lease: Lease) => T | Promise<T>): Promise<T | Conflict>;
  async hold<T>(taskKey: string, options: HoldOptions, fn: (lease: Lease) => T | Promise<T>): Promise<T | Conflict> {
    const lease = await this.openHold(taskKey, options);
    if (!(lease instanceof Lease)) {
      return lease;
    }
    let result: T;
    try {
      result = await fn(lease);
    } catch (error) {
      // The work's own error is what the caller needs; a failed release (lost lease) must not hide it.
      await lease.release("FAILED", messageOf(error)).catch(() => {});
      throw error;
    }
    await lease.release("SUCCEEDED");
    return result;
  }

  // --- operators ----------------------------------------------------------------------------

  /** Let a FAILED guard (or one the policy holds) be acquired exactly once more. Not retried. */
  async approveRetry(taskKey: string, options: { approver?: string; reason?: string } = {}): Promise<Guard> {
    const request = { taskKey, approver: options.approver ?? this.holder, reason: options.reason ?? "" };
    return guardFromWire((await this.#unary(this.#stub.approveRetry, request, false)).guard);
  }

  /** End a RUNNING guard's run as CANCELLED; its holder's lease stops working. Not retried. */
  async forceRelease(taskKey: string, options: { operator?: string; reason?: string } = {}): Promise<Guard> {
    const request = { taskKey, operator: options.operator ?? this.holder, reason: options.reason ?? "" };
    return guardFromWire((await this.#unary(this.#stub.forceRelease, request, false)).guard);
  }

  // --- the connection -----------------------------------------------------------------------

  /** The channel's state; `connect` makes an IDLE channel start connecting, as a call would. */
  connectivity(connect = false): Connectivity {
    return CONNECTIVITY[this.#stub.getChannel().getConnectivityState(connect)] ?? "SHUTDOWN";
  }

  /** True once the channel's state is no longer `from`; false when `deadline` (epoch ms) comes first or it is closed. */
  connectivityChanged(from: Connectivity, deadline: number): Promise<boolean> {
    return new Promise((resolve) => {
      try {
        this.#stub
          .getChannel()
          .watchConnectivityState(grpc.connectivityState[from], deadline, (error) => resolve(error === undefined));
      } catch {
        resolve(false); // the channel is closed
      }
    });
  }

  /**
   * Ask the sidecar's grpc.health.v1 service about the whole server (or `service`). Not retried: an
   * unreachable sidecar throws UnavailableError, a silent one DeadlineExceededError at `deadline` (epoch ms;
   * default: the client's deadline from now).
   */
  async health(options: { service?: string; deadline?: number } = {}): Promise<HealthStatus> {
    const metadata = await this.#metadata();
    const deadline = options.deadline ?? Date.now() + this.deadlineMs;
    try {
      return await new Promise<HealthStatus>((resolve, reject) => {
        this.#stub.makeUnaryRequest(
          HEALTH_CHECK,
          (service: string) => encodeHealthCheckRequest(service),
          (bytes: Buffer) => decodeHealthCheckResponse(bytes),
          options.service ?? "",
          metadata,
          { deadline },
          (error, answer) => (error ? reject(error) : resolve(answer ?? "UNKNOWN")),
        );
      });
    } catch (error) {
      throw fromCallError(error);
    }
  }

  // --- reads --------------------------------------------------------------------------------

  /** The guard of `taskKey`; NotFoundError when no run ever acquired it. */
  async get(taskKey: string): Promise<Guard> {
    return guardFromWire(await this.#unary(this.#stub.getGuard, { taskKey }, true));
  }

  /** Every matching guard, in task key order, fetching page after page as the iteration goes. */
  async *list(options: ListOptions = {}): AsyncGenerator<Guard, void, undefined> {
    let pageToken = "";
    do {
      const request: pb.ListGuardsRequest = {
        keyPrefix: options.keyPrefix ?? "",
        states: (options.states ?? []).map((state): pb.GuardState => `GUARD_STATE_${state}`),
        staleOnly: options.staleOnly ?? false,
        pageSize: options.pageSize ?? 0,
        pageToken,
      };
      const page = await this.#unary(this.#stub.listGuards, request, true);
      for (const guard of page.guards) {
        yield guardFromWire(guard);
      }
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  /** Whether the run with `fencingToken` still holds `taskKey`'s guard. */
  async checkFence(taskKey: string, fencingToken: number): Promise<FenceCheck> {
    const response = await this.#unary(this.#stub.checkFence, { taskKey, fencingToken }, true);
    return { valid: response.valid, guard: response.guard === undefined ? undefined : guardFromWire(response.guard) };
  }

  /**
   * Guard events as they are committed. After UNAVAILABLE, a dropped
   * connection or RESOURCE_EXHAUSTED (fell behind), it reconnects by itself
   * from the revision after the last one it yielded, and never yields a
   * revision twice. Throws OutOfRangeError when that revision is older than
   * the sidecar's history. Runs until the loop breaks or `signal` aborts.
   *
   * A watch that starts "from now" and breaks before its first event resumes
   * "from now" again (there is no revision to resume from); one broken during
   * its snapshot takes a new snapshot and yields only the guards that are new
   * or changed.
   */
  async *watch(options: WatchOptions = {}): AsyncGenerator<GuardEvent, void, undefined> {
    const { signal } = options;
    // The revision to ask for next; 0 asks for "from now", before anything was seen.
    let from = options.startRevision ?? 0;
    let snapshotting = options.includeSnapshot ?? false;
    const snapshot = new Map<string, number>(); // task key -> revision of the guard yielded in the snapshot
    let attempt = 0;
    while (!signal?.aborted) {
      const request: pb.WatchGuardsRequest = {
        keyPrefix: options.keyPrefix ?? "",
        startRevision: snapshotting ? 0 : from,
        includeSnapshot: snapshotting,
      };
      // Batches: a busy sidecar sends many events a message, which is what lets a watcher keep up.
      const call = this.#stub.watchGuardBatches(request, await this.#metadata());
      const stop = () => call.cancel();
      signal?.addEventListener("abort", stop, { once: true });
      if (signal?.aborted) {
        stop();
      }
      let failure: TaskGuardError | undefined;
      try {
        for await (const message of call) {
          attempt = 0;
          for (const event of (message as pb.GuardEventBatch).events) {
            if (event.type === "GUARD_EVENT_TYPE_SNAPSHOT") {
              const guard = event.guard;
              if (guard === undefined || snapshot.get(guard.taskKey) === guard.revision) {
                continue; // yielded before the stream broke, and unchanged since
              }
              snapshot.set(guard.taskKey, guard.revision);
              from = Math.max(from, event.revision + 1);
              yield eventFromWire(event);
              continue;
            }
            if (snapshotting) {
              snapshotting = false;
              snapshot.clear();
            }
            if (event.revision < from) {
              continue;
            }
            from = event.revision + 1;
            yield eventFromWire(event);
          }
        }
      } catch (error) {
        failure = fromCallError(error);
      } finally {
        signal?.removeEventListener("abort", stop);
        call.cancel();
      }
      if (signal?.aborted) {
        return;
      }
      if (failure !== undefined && !isResumable(failure)) {
        throw failure;
      }
      attempt += 1;
      await sleep(backoffMs(attempt), undefined, { signal }).catch(() => {});
    }
  }

  // --- plumbing -----------------------------------------------------------------------------

  #acquireRequest(taskKey: string, options: AcquireOptions, onConflict: pb.OnConflict): pb.AcquireRequest {
    // Made before the first attempt, so that every retry names the same run (and carries the same secret).
    const runId = options.runId ?? randomUUID();
    return {
      taskKey,
      runId,
      retrySecret: retrySecret(taskKey, runId),
      holder: options.holder ?? this.holder,
      ttl: options.ttlMs === undefined ? undefined : toDuration(options.ttlMs, "ttl"),
      labels: { ...options.labels },
      onConflict,
    };
  }

  async #metadata(): Promise<grpc.Metadata> {
    const metadata = new grpc.Metadata();
    if (this.#token) {
      metadata.set("authorization", `Bearer ${this.#token}`);
    }
    const otel = await loadOpenTelemetry();
    if (otel !== undefined) {
      const carrier: Record<string, string> = {};
      otel.propagation.inject(otel.context.active(), carrier);
      for (const [key, value] of Object.entries(carrier)) {
        metadata.set(key, value);
      }
    }
    return metadata;
  }

  async #openHold(): Promise<HoldCall> {
    return new HoldCall(this.#stub.hold(await this.#metadata()));
  }

  #leaseContext(): LeaseContext {
    return {
      openHold: () => this.#openHold(),
      releaseUnary: (leaseId, status, detail, deadline) => this.#releaseUnary(leaseId, status, detail, deadline),
      forget: (lease) => this.#leases.delete(lease),
      deadlineMs: this.deadlineMs,
      resumeWindowMs: this.resumeWindowMs,
    };
  }

  /** One unary call under one deadline; `safe` calls are retried with backoff while UNAVAILABLE. */
  async #unary<Req, Res>(
    method: UnaryMethod<Req, Res>,
    request: Req,
    safe: boolean,
    deadline = Date.now() + this.deadlineMs,
  ): Promise<Res> {
    const metadata = await this.#metadata();
    for (let attempt = 1; ; attempt++) {
      try {
        return await new Promise<Res>((resolve, reject) => {
          method.call(this.#stub, request, metadata, { deadline }, (error, response) =>
            error ? reject(error) : resolve(response),
          );
        });
      } catch (error) {
        const failure = fromCallError(error);
        const pause = backoffMs(attempt);
        if (safe && failure instanceof UnavailableError && Date.now() + pause < deadline) {
          await sleep(pause);
          continue;
        }
        throw failure;
      }
    }
  }
}

function isResumable(error: TaskGuardError): boolean {
  if (!(error instanceof StatusError)) {
    return false;
  }
  return (
    error instanceof UnavailableError ||
    error.code === grpc.status.RESOURCE_EXHAUSTED ||
    // A connection reset can surface as INTERNAL ("RST_STREAM") or UNKNOWN before grpc-js sees the socket close.
    (error.code === grpc.status.INTERNAL && /RST_STREAM|Connection dropped/i.test(error.message))
  );
}
