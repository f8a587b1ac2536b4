/**
 * Wire messages into the public types, and the verdicts on the sidecar's replies (an acquisition or a
 * refusal), like the Python client's `guard_from_pb`: pure functions, no I/O. What goes the other way
 * (public values into requests) is in requests.ts.
 */

import { type Refused, conflictError, protocolError } from "./errors.ts";
import type * as pb from "./generated/taskguard/v1/taskguard.ts";
import type {
  Acquired,
  ConflictPolicy,
  FenceCheck,
  Guard,
  GuardEvent,
  GuardEventType,
  GuardState,
  Holder,
  KeyPolicy,
  RunStatus,
  Waiter,
} from "./models.ts";

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
export const RUN_STATUSES: readonly RunStatus[] = ["SUCCEEDED", "FAILED", "CANCELLED"];
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
  "LOCK_DELAY_REFUSED",
  "QUEUED",
  "DEQUEUED",
  "SUPERSEDED",
  "QUEUE_FULL_REFUSED",
  "STOP_REQUESTED",
];
const CONFLICT_POLICIES: readonly ConflictPolicy[] = ["REJECT", "JOIN", "QUEUE", "KEEP_NEWEST", "SUPERSEDE"];

function durationMs(duration: pb.Guard["ttl"]): number | undefined {
  return duration === undefined ? undefined : duration.seconds * 1000 + duration.nanos / 1e6;
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
  const state = stripPrefix(guard.state, "GUARD_STATE_", GUARD_STATES, "UNSPECIFIED");
  const holders = guard.holders.map(holderFromWire);
  const converted: Omit<Guard, "runs"> = {
    taskKey: guard.taskKey,
    sessionKey: guard.sessionKey,
    taskName: guard.taskName,
    state,
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
    lockDelayUntil: guard.lockDelayUntil,
    holdUntil: guard.holdUntil,
    policy: guard.policy === undefined ? undefined : policyFromWire(guard.policy),
    waiters: guard.waiters.map(waiterFromWire),
    stopRequestedBy: guard.stopRequestedBy,
    stopAt: guard.stopAt,
    holders,
  };
  return { ...converted, runs: state === "RUNNING" ? [...holders, ownRun(converted)] : [...holders] };
}

/** The guard's own run as one of the runs holding its key (`Guard.runs`, like the Python client's `Guard.runs`). */
function ownRun(guard: Omit<Guard, "runs">): Holder {
  return {
    runId: guard.runId,
    holder: guard.holder,
    fencingToken: guard.fencingToken,
    attempt: guard.attempt,
    startedAt: guard.startedAt,
    expiresAt: guard.expiresAt,
    heartbeatAt: guard.heartbeatAt,
    streamBound: guard.streamBound,
    labels: { ...guard.labels },
    stale: guard.stale,
  };
}

function holderFromWire(holder: pb.Holder): Holder {
  return {
    runId: holder.runId,
    holder: holder.holder,
    fencingToken: holder.fencingToken,
    attempt: holder.attempt,
    startedAt: holder.startedAt ?? new Date(0),
    expiresAt: holder.expiresAt,
    heartbeatAt: holder.heartbeatAt,
    streamBound: holder.streamBound,
    labels: { ...holder.labels },
    stale: holder.stale,
  };
}

function waiterFromWire(waiter: pb.Waiter): Waiter {
  return {
    runId: waiter.runId,
    holder: waiter.holder,
    queuedAt: waiter.queuedAt,
    waitUntil: waiter.waitUntil,
    keepNewest: waiter.keepNewest,
    superseding: waiter.superseding,
  };
}

function policyFromWire(policy: pb.KeyPolicy): KeyPolicy {
  return {
    rule: policy.rule,
    match: policy.match,
    onConflict: stripPrefix(policy.onConflict, "ON_CONFLICT_", CONFLICT_POLICIES, "UNSPECIFIED"),
    failure: stripPrefix(policy.failure, "FAILURE_HANDLING_", ["REQUIRE_APPROVAL", "REOPEN"] as const, "UNSPECIFIED"),
    abandonedRequiresApproval: policy.abandonedRequiresApproval,
    expiredRequiresApproval: policy.expiredRequiresApproval,
    lockDelayMs: durationMs(policy.lockDelay),
    maxHoldMs: durationMs(policy.maxHold),
    maxQueue: policy.maxQueue,
    maxWaitMs: durationMs(policy.maxWait),
    allowSupersede: policy.allowSupersede,
    supersedeGraceMs: durationMs(policy.supersedeGrace),
    // A sidecar older than semaphores leaves it unset: one holder.
    maxHolders: policy.maxHolders || 1,
  };
}

export function eventFromWire(event: pb.GuardEvent): GuardEvent {
  return {
    revision: event.revision,
    type: stripPrefix(event.type, "GUARD_EVENT_TYPE_", EVENT_TYPES, "UNSPECIFIED"),
    guard: guardFromWire(event.guard),
    triggerRunId: event.triggerRunId,
    triggerHolder: event.triggerHolder,
    occurredAt: event.occurredAt,
    actor: event.actor,
    reason: event.reason,
    waiterRunId: event.waiterRunId,
  };
}

/**
 * A refused acquisition, which `acquire`, `hold` and `openHold` return
 * instead of throwing when `onConflict` is "return" or "join": the run in the
 * way. `guard` is the winner's snapshot (ALREADY_RUNNING), the failed run's
 * (RETRY_REQUIRES_APPROVAL) or the lost run's (LOCK_DELAYED: see
 * `guard.lockDelayUntil`); after a join (`joined`), the winner's final
 * snapshot, whose `state` says how that run ended. A queued caller's refusals
 * (QUEUE_FULL, WAIT_TIMED_OUT, SUPERSEDED) are thrown, as `error`.
 */
export interface Conflict {
  outcome: RefusalOutcome;
  taskKey: string;
  runId: string;
  holder: string;
  startedAt: Date;
  fencingToken: number;
  guard: Guard;
  joined: boolean;
  /** SUPERSEDED: the run of the newer trigger that took this waiter's place ("" otherwise). */
  supersededBy: string;
  /** The error "raise" would have thrown. */
  error: Refused;
}

export type RefusalOutcome =
  | "ALREADY_RUNNING"
  | "RETRY_REQUIRES_APPROVAL"
  | "LOCK_DELAYED"
  | "QUEUE_FULL"
  | "WAIT_TIMED_OUT"
  | "SUPERSEDED";

const REFUSALS: Readonly<Record<string, RefusalOutcome>> = {
  ACQUIRE_OUTCOME_ALREADY_RUNNING: "ALREADY_RUNNING",
  ACQUIRE_OUTCOME_LOCK_DELAYED: "LOCK_DELAYED",
  ACQUIRE_OUTCOME_QUEUE_FULL: "QUEUE_FULL",
  ACQUIRE_OUTCOME_WAIT_TIMED_OUT: "WAIT_TIMED_OUT",
  ACQUIRE_OUTCOME_SUPERSEDED: "SUPERSEDED",
};

export function conflict(outcome: pb.AcquireOutcome, guard: Guard, joined = false, supersededBy = ""): Conflict {
  const kind = REFUSALS[outcome] ?? "RETRY_REQUIRES_APPROVAL";
  return {
    outcome: kind,
    taskKey: guard.taskKey,
    runId: guard.runId,
    holder: guard.holder,
    startedAt: guard.startedAt,
    fencingToken: guard.fencingToken,
    guard,
    joined,
    supersededBy,
    error: conflictError(kind, guard, supersededBy),
  };
}

/** A unary acquisition's reply: the lease, or the conflict in its way. */
export function acquiredFromWire(response: pb.AcquireResponse): Acquired | Conflict {
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
  return conflict(response.outcome, guard);
}

export function fenceFromWire(response: pb.CheckFenceResponse): FenceCheck {
  return { valid: response.valid, guard: response.guard === undefined ? undefined : guardFromWire(response.guard) };
}
