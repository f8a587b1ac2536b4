/**
 * The public data types: what the client answers (guards, events, acquisitions) and the options it takes,
 * like the Python client's `_models.py`. Types only, importing no module of this package, so that every
 * other module (errors.ts first) can use them without a circle. `Conflict`, which carries an error, is in
 * conversions.ts, above errors.ts.
 */

import type { ChannelOptions } from "@grpc/grpc-js";

export type GuardState =
  | "UNSPECIFIED"
  | "RUNNING"
  | "SUCCEEDED"
  | "FAILED"
  | "CANCELLED"
  | "ABANDONED"
  | "EXPIRED"
  | "RETRY_APPROVED";

export type RunStatus = "SUCCEEDED" | "FAILED" | "CANCELLED";

/** The channel's state, as grpc-js names it. */
export type Connectivity = "IDLE" | "CONNECTING" | "READY" | "TRANSIENT_FAILURE" | "SHUTDOWN";

/** What the sidecar's grpc.health.v1 service answered. */
export type HealthStatus = "UNKNOWN" | "SERVING" | "NOT_SERVING" | "SERVICE_UNKNOWN";

export type GuardEventType =
  | "UNSPECIFIED"
  | "SNAPSHOT"
  | "ACQUIRED"
  | "DUPLICATE_REFUSED"
  | "RETRY_REFUSED"
  | "RENEWED"
  | "RELEASED"
  | "EXPIRED"
  | "ABANDONED"
  | "RETRY_APPROVED"
  | "FORCE_RELEASED"
  | "RESUMED"
  | "LOCK_DELAY_REFUSED";

/** A guard's snapshot, as the sidecar answered it (see `Guard` in taskguard.proto for each field). */
export interface Guard {
  taskKey: string;
  sessionKey: string;
  taskName: string;
  state: GuardState;
  /** The current run (RUNNING) or the last one. */
  runId: string;
  holder: string;
  startedAt: Date;
  /** Undefined when the lease has no TTL. */
  expiresAt: Date | undefined;
  fencingToken: number;
  attempt: number;
  /** How the last run was released; undefined while running or when it ended otherwise. */
  lastStatus: RunStatus | undefined;
  lastDetail: string;
  releasedAt: Date | undefined;
  duplicateCount: number;
  streamBound: boolean;
  labels: Record<string, string>;
  revision: number;
  heartbeatAt: Date;
  stale: boolean;
  approvedBy: string;
  approvalReason: string;
  /** The TTL of the current lease in milliseconds; undefined when it has none. */
  ttlMs: number | undefined;
  releasedBy: string;
  /** After a lost run, when the key's lock-delay ends (acquisitions are refused with LockDelayed until then). */
  lockDelayUntil: Date | undefined;
  /** When the key's max hold ends the run, however often it renews. */
  holdUntil: Date | undefined;
}

export interface GuardEvent {
  /** Strictly rising, except that SNAPSHOT events share the revision the snapshot was taken at. */
  revision: number;
  type: GuardEventType;
  guard: Guard;
  triggerRunId: string;
  triggerHolder: string;
  occurredAt: Date | undefined;
  actor: string;
  reason: string;
}

/** A unary acquisition: the lease id renews and releases it. */
export interface Acquired {
  outcome: "ACQUIRED";
  taskKey: string;
  runId: string;
  leaseId: string;
  fencingToken: number;
  startedAt: Date;
  expiresAt: Date | undefined;
  guard: Guard;
}

export interface AcquireOptions {
  /** Defaults to a UUID made once, before the first attempt, so that retries are idempotent. */
  runId?: string;
  /** Unary leases always have one (the sidecar's default when unset); Hold leases only when set. */
  ttlMs?: number;
  labels?: Record<string, string>;
  /** Shown to the runs this one refuses. Defaults to the client's holder (`host:pid`). */
  holder?: string;
}

export type OnConflict = "raise" | "return" | "join";

export interface HoldOptions extends AcquireOptions {
  /**
   * "raise" (default): throw AlreadyRunning / RetryRequiresApproval.
   * "return": return a Conflict. "join": wait until the winning run ends, then return a Conflict with its final
   * guard (a RETRY_REQUIRES_APPROVAL conflict comes back at once: there is no run to wait for).
   */
  onConflict?: OnConflict;
  /** Stops a "join" wait (it then throws CancelledError). */
  signal?: AbortSignal;
}

export interface ListOptions {
  keyPrefix?: string;
  states?: GuardState[];
  staleOnly?: boolean;
  /** Guards per call, 1..1000 (the sidecar's default 100 when unset). */
  pageSize?: number;
}

export interface WatchOptions {
  keyPrefix?: string;
  /** The first revision to receive; unset: changes from now on. */
  startRevision?: number;
  /** First the current guards as SNAPSHOT events. */
  includeSnapshot?: boolean;
  /** Ends the iteration (quietly) when aborted. */
  signal?: AbortSignal;
}

export interface FenceCheck {
  /** True only while the run with this token still holds the guard. */
  valid: boolean;
  /** Undefined when no guard has this key. */
  guard: Guard | undefined;
}

export interface ClientOptions {
  /** `unix:/path` or `host:port`; default `defaultAddress()`. */
  address?: string;
  /** Bounds every call (all attempts of it) and every answer a stream waits for. Default 10 000. */
  deadlineMs?: number;
  /** How long a lease whose stream broke keeps trying to resume. Default 15 000 (the sidecar's resume grace). */
  resumeWindowMs?: number;
  /** The default holder; `host:pid` when unset. */
  holder?: string;
  /** Sent as `authorization: Bearer <token>` when the sidecar asks for a holder or operator token. */
  token?: string;
  /** Extra grpc-js channel options. */
  channelOptions?: ChannelOptions;
}

/** Where a `Lease` is in its life; `Lease.state`. */
export type LeaseState = "held" | "resuming" | "releasing" | "released" | "lost";
