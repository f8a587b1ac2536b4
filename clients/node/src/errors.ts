/**
 * Every error the client throws, and the one place that turns a gRPC status
 * or a refused acquisition into one of them, like the Python client's
 * `_errors.py` (same classes, same rules).
 *
 * Refusals are outcomes, not failures, and carry the run in the way:
 * `AlreadyRunning`, `RetryRequiresApproval` and `LockDelayed`, and for a caller
 * that waited in the key's queue `QueueFull`, `WaitTimedOut` and `Superseded`.
 * Everything else is a
 * `StatusError` subclass named for its status code, carrying the code and the
 * sidecar's message (which names the field and the rule it broke). All share
 * `TaskGuardError`. No other module looks at a status code to pick an error.
 */

import { status } from "@grpc/grpc-js";
import type { Guard } from "./models.ts";

/** The base of every error this client throws. */
export class TaskGuardError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** What the refusals share: the key and the run in the way (each refusal adds its own facts). */
abstract class Refusal extends TaskGuardError {
  readonly taskKey: string;
  /** The run in the way: the winner's (AlreadyRunning), or the one that ended (RetryRequiresApproval). */
  readonly runId: string;

  constructor(message: string, guard: Guard) {
    super(message);
    this.taskKey = guard.taskKey;
    this.runId = guard.runId;
  }
}

/**
 * Another run holds the guard: its facts, so the caller can point at it instead of starting a duplicate. A key
 * several runs may hold at once is refused when all of its places are taken: `guard.runs` lists every run in the
 * way (oldest first), and the message names each; the facts here are then the guard's own run's.
 */
export class AlreadyRunning extends Refusal {
  readonly startedAt: Date;
  readonly holder: string;
  readonly fencingToken: number;
  /** The whole snapshot the sidecar answered. */
  readonly guard: Guard;

  constructor(guard: Guard) {
    const by = guard.holder ? ` by ${guard.holder}` : "";
    let message =
      `${guard.taskKey} is already running: run ${guard.runId}, started ${guard.startedAt.toISOString()}${by} ` +
      `(fencing token ${guard.fencingToken})`;
    if (guard.holders.length > 0) {
      const runs = guard.runs.map((run) => `run ${run.runId} (fencing token ${run.fencingToken})`).join(", ");
      message = `${guard.taskKey} is already running as often as it may at once: ${runs}`;
    }
    super(message, guard);
    this.startedAt = guard.startedAt;
    this.holder = guard.holder;
    this.fencingToken = guard.fencingToken;
    this.guard = guard;
  }
}

/** The last run ended in a way (FAILED, or by policy ABANDONED/EXPIRED) that needs `approveRetry` first. */
export class RetryRequiresApproval extends Refusal {
  readonly releasedAt: Date | undefined;
  /** How that run ended, in its own words. */
  readonly detail: string;
  readonly guard: Guard;

  constructor(guard: Guard) {
    const when = guard.releasedAt ? ` at ${guard.releasedAt.toISOString()}` : "";
    const why = guard.lastDetail ? `: ${guard.lastDetail}` : "";
    super(
      `${guard.taskKey}: run ${guard.runId} ended ${guard.state}${when}${why}; a retry needs approval (approveRetry)`,
      guard,
    );
    this.releasedAt = guard.releasedAt;
    this.detail = guard.lastDetail;
    this.guard = guard;
  }
}

/** The last run was lost (abandoned, expired, force-released) and the key's lock-delay holds it closed until `until`. */
export class LockDelayed extends Refusal {
  readonly until: Date | undefined;
  readonly guard: Guard;

  constructor(guard: Guard) {
    const why = guard.lastDetail ? ` (${guard.lastDetail})` : "";
    const opens = guard.lockDelayUntil ? `; the key opens at ${guard.lockDelayUntil.toISOString()}` : "";
    super(`${guard.taskKey}: run ${guard.runId} was lost${why} and the key's lock-delay holds it closed${opens}`, guard);
    this.until = guard.lockDelayUntil;
    this.guard = guard;
  }
}

/** The key's queue already holds as many waiters as its rule allows (its `max_queue`). */
export class QueueFull extends Refusal {
  /** How many wait in the queue. */
  readonly queueLength: number;
  readonly guard: Guard;

  constructor(guard: Guard) {
    super(`${guard.taskKey}: its queue is full (${guard.waiters.length} waiting behind run ${guard.runId})`, guard);
    this.queueLength = guard.waiters.length;
    this.guard = guard;
  }
}

/** The caller's `maxWaitMs` (or its key's max wait) passed before its turn came; it is no longer queued. */
export class WaitTimedOut extends Refusal {
  readonly guard: Guard;

  constructor(guard: Guard) {
    super(`${guard.taskKey}: its wait in the queue ran out before its turn came (behind run ${guard.runId})`, guard);
    this.guard = guard;
  }
}

/** "keep-newest" (or "supersede"): a newer trigger of the key took this waiter's place; `by` is its run. */
export class Superseded extends Refusal {
  /** The run of the newer trigger ("" when the sidecar did not say). */
  readonly by: string;
  readonly guard: Guard;

  constructor(guard: Guard, by: string) {
    const newer = by ? ` by run ${by}` : "";
    super(`${guard.taskKey}: superseded${newer}, a newer trigger that waits in its place`, guard);
    this.by = by;
    this.guard = guard;
  }
}

export type Refused = AlreadyRunning | RetryRequiresApproval | LockDelayed | QueueFull | WaitTimedOut | Superseded;

/**
 * Why a held run should stop (`Lease.stopSignal`'s reason): a newer trigger superseded it ("supersede"). The
 * lease still holds the guard until it is released, or until `stopAt`, when the sidecar force-releases it.
 */
export class StopRequested extends TaskGuardError {
  readonly taskKey: string;
  /** The superseding run. */
  readonly by: string;
  readonly stopAt: Date | undefined;
  readonly guard: Guard;

  constructor(guard: Guard) {
    const deadline = guard.stopAt ? `; it is force-released at ${guard.stopAt.toISOString()} unless it ends first` : "";
    super(`${guard.taskKey}: run ${guard.runId} was asked to stop for run ${guard.stopRequestedBy}${deadline}`);
    this.taskKey = guard.taskKey;
    this.by = guard.stopRequestedBy;
    this.stopAt = guard.stopAt;
    this.guard = guard;
  }
}

/** A call ended with a gRPC status other than OK; `message` is the sidecar's (`field: rule`). */
export class StatusError extends TaskGuardError {
  /** The gRPC status code (`status.NOT_FOUND`, ...). */
  readonly code: number;
  /** The request field the message names, e.g. "task_key" or "lease_id". */
  readonly field: string | undefined;

  constructor(code: number, message: string, options?: { cause?: unknown }) {
    super(message || status[code] || `status ${code}`, options);
    this.code = code;
    this.field = FIELD.exec(message)?.[1];
  }
}

/** The sidecar refused an argument (INVALID_ARGUMENT); the message names the field and the rule. */
export class InvalidArgumentError extends StatusError {}
/** No guard has this key, or no lease has this id (NOT_FOUND). */
export class NotFoundError extends StatusError {}
/** No lease has this id (NOT_FOUND on lease_id): it never existed, or its guard's history is gone. */
export class LeaseNotFoundError extends NotFoundError {}
/** The guard is not in a state that allows the call (FAILED_PRECONDITION), e.g. approving a RUNNING guard. */
export class FailedPreconditionError extends StatusError {}

/**
 * The lease no longer holds its guard: force-released, expired, abandoned,
 * already released, or its Hold stream could not be resumed. `guard` is the
 * snapshot that shows how, when the sidecar sent one. (Python: `LeaseLost`.)
 */
export class LeaseLostError extends FailedPreconditionError {
  guard: Guard | undefined;

  constructor(code: number, message: string, options: { cause?: unknown; guard?: Guard | undefined } = {}) {
    super(code, message, options);
    this.guard = options.guard;
  }
}

/** PERMISSION_DENIED or UNAUTHENTICATED, or the sidecar's socket refused us (EACCES). */
export class PermissionDeniedError extends StatusError {}
/** The sidecar is not reachable, shutting down, or its store is unavailable (UNAVAILABLE); safe calls were retried. */
export class UnavailableError extends StatusError {}
/** No answer within the client's deadline (DEADLINE_EXCEEDED). */
export class DeadlineExceededError extends StatusError {}

/** A watch asked for revisions the sidecar no longer keeps (OUT_OF_RANGE): re-list and watch from the present. */
export class OutOfRangeError extends StatusError {
  /** The oldest revision the sidecar still has, when it said. */
  readonly oldestRevision: number | undefined;

  constructor(code: number, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
    const oldest = OLDEST.exec(message)?.[1];
    this.oldestRevision = oldest === undefined ? undefined : Number(oldest);
  }
}

/** Too many watchers, or a watcher fell behind (RESOURCE_EXHAUSTED). */
export class ResourceExhaustedError extends StatusError {}
/** The call was cancelled (CANCELLED): by the caller's AbortSignal, or by the client closing. */
export class CancelledError extends StatusError {}
/** The sidecar failed unexpectedly (INTERNAL); its log says why. */
export class InternalError extends StatusError {}

type StatusErrorClass = new (code: number, message: string, options?: { cause?: unknown }) => StatusError;

const BY_CODE: ReadonlyMap<number, StatusErrorClass> = new Map<number, StatusErrorClass>([
  [status.INVALID_ARGUMENT, InvalidArgumentError],
  [status.NOT_FOUND, NotFoundError],
  [status.FAILED_PRECONDITION, FailedPreconditionError],
  [status.PERMISSION_DENIED, PermissionDeniedError],
  [status.UNAUTHENTICATED, PermissionDeniedError],
  [status.UNAVAILABLE, UnavailableError],
  [status.DEADLINE_EXCEEDED, DeadlineExceededError],
  [status.OUT_OF_RANGE, OutOfRangeError],
  [status.RESOURCE_EXHAUSTED, ResourceExhaustedError],
  [status.CANCELLED, CancelledError],
  [status.INTERNAL, InternalError],
]);

// The sidecar's rejections read "<field>: <rule>"; a lease that lost its guard is reported on lease_id.
const FIELD = /^([a-z_][a-z0-9_.]*(?:\[[^\]]*\])?): /;
const LEASE_LOST = /^lease_id: lease lost/;
const LEASE_NOT_FOUND = /^(resume\.)?lease_id: /;
const OLDEST = /oldest available is (\d+)/;
// gRPC reports a unix socket we may not open as UNAVAILABLE, with the errno text in the details.
const SOCKET_DENIED = "Permission denied";

/** The typed error for a status: the one status -> error table. `guard` is attached to LeaseLostError. */
export function fromStatus(code: number, message: string, guard?: Guard, cause?: unknown): StatusError {
  const options = { cause };
  if (code === status.FAILED_PRECONDITION && LEASE_LOST.test(message)) {
    return new LeaseLostError(code, message, { ...options, guard });
  }
  if (code === status.NOT_FOUND && LEASE_NOT_FOUND.test(message)) {
    return new LeaseNotFoundError(code, message, options);
  }
  if (code === status.UNAVAILABLE && message.includes(SOCKET_DENIED)) {
    return new PermissionDeniedError(code, message, options);
  }
  const Class = BY_CODE.get(code) ?? StatusError;
  return new Class(code, message, options);
}

/** The typed error for whatever a grpc-js call rejected with (a ServiceError, or anything else). */
export function fromCallError(error: unknown): TaskGuardError {
  if (error instanceof TaskGuardError) {
    return error;
  }
  if (error instanceof Error && typeof (error as { code?: unknown }).code === "number") {
    const { code, details } = error as Error & { code: number; details?: string };
    return fromStatus(code, details ?? error.message, undefined, error);
  }
  return new StatusError(status.UNKNOWN, error instanceof Error ? error.message : String(error), { cause: error });
}

/** A Hold stream was told LOST, or could not be resumed. */
export function leaseLost(message: string, guard?: Guard, cause?: unknown): LeaseLostError {
  return new LeaseLostError(status.FAILED_PRECONDITION, message, { guard, cause });
}

export function deadlineExceeded(message: string): DeadlineExceededError {
  return new DeadlineExceededError(status.DEADLINE_EXCEEDED, message);
}

export function cancelled(message: string, cause?: unknown): CancelledError {
  return new CancelledError(status.CANCELLED, message, { cause });
}

/** A value the client refuses before sending it, worded as the sidecar would. */
export function invalidArgument(field: string, rule: string): InvalidArgumentError {
  return new InvalidArgumentError(status.INVALID_ARGUMENT, `${field}: ${rule}`);
}

/** The sidecar broke the Hold protocol (an answer missing or out of place). */
export function protocolError(message: string): StatusError {
  return new StatusError(status.UNKNOWN, message);
}

/** The error for a refused acquisition; `supersededBy` names the newer trigger of a SUPERSEDED one. */
export function conflictError(
  outcome: "ALREADY_RUNNING" | "RETRY_REQUIRES_APPROVAL" | "LOCK_DELAYED" | "QUEUE_FULL" | "WAIT_TIMED_OUT" | "SUPERSEDED",
  guard: Guard,
  supersededBy = "",
): Refused {
  switch (outcome) {
    case "ALREADY_RUNNING":
      return new AlreadyRunning(guard);
    case "LOCK_DELAYED":
      return new LockDelayed(guard);
    case "QUEUE_FULL":
      return new QueueFull(guard);
    case "WAIT_TIMED_OUT":
      return new WaitTimedOut(guard);
    case "SUPERSEDED":
      return new Superseded(guard, supersededBy);
    default:
      return new RetryRequiresApproval(guard);
  }
}

/** What to say about whatever was thrown: its message (or its class's name), or the value itself. */
export function messageOf(error: unknown): string {
  return error instanceof Error ? error.message || error.name : String(error);
}
