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
  | "LOCK_DELAY_REFUSED"
  | "QUEUED"
  | "DEQUEUED"
  | "SUPERSEDED"
  | "QUEUE_FULL_REFUSED"
  | "STOP_REQUESTED";

/** A caller waiting in a key's queue (`Guard.waiters`), first in line first. */
export interface Waiter {
  runId: string;
  holder: string;
  queuedAt: Date | undefined;
  /** When its max wait ends; undefined without one. */
  waitUntil: Date | undefined;
  keepNewest: boolean;
  /** "supersede": first in line, for the run it asked to stop. */
  superseding: boolean;
}

/** What an acquisition with no `onConflict` of its own gets, as a key's rule says. */
export type ConflictPolicy = "UNSPECIFIED" | "REJECT" | "JOIN" | "QUEUE" | "KEEP_NEWEST" | "SUPERSEDE";

/** The rule a key follows on the sidecar (`get` fills it in): the first configured match, else "default". */
export interface KeyPolicy {
  rule: string;
  match: string;
  onConflict: ConflictPolicy;
  failure: "UNSPECIFIED" | "REQUIRE_APPROVAL" | "REOPEN";
  abandonedRequiresApproval: boolean;
  expiredRequiresApproval: boolean;
  /** Undefined: no lock-delay. */
  lockDelayMs: number | undefined;
  /** Undefined: no cap on how long a run may hold the key. */
  maxHoldMs: number | undefined;
  maxQueue: number;
  /** Undefined: a waiter waits as long as its own `maxWaitMs` (or call) allows. */
  maxWaitMs: number | undefined;
  allowSupersede: boolean;
  supersedeGraceMs: number | undefined;
  /** How many runs may hold the key at once (a semaphore); 1 for most keys (and from a sidecar older than that). */
  maxHolders: number;
}

/**
 * One of the runs holding a key that several may hold at once (`KeyPolicy.maxHolders` > 1), each with its own
 * lease and fencing token: an entry of `Guard.holders` and `Guard.runs`.
 */
export interface Holder {
  runId: string;
  holder: string;
  fencingToken: number;
  attempt: number;
  startedAt: Date;
  /** Undefined when its lease has no TTL. */
  expiresAt: Date | undefined;
  heartbeatAt: Date | undefined;
  streamBound: boolean;
  labels: Record<string, string>;
  /** Without a heartbeat or renewal for longer than the sidecar's stale threshold, or past its TTL. */
  stale: boolean;
}

/** A guard's snapshot, as the sidecar answered it (see `Guard` in taskguard.proto for each field). */
export interface Guard {
  taskKey: string;
  sessionKey: string;
  taskName: string;
  state: GuardState;
  /**
   * The current run (RUNNING) or the last one. A key several runs may hold at once lists its other running runs
   * in `holders`: these fields are then its newest run's, unless a run that ended needing an approval (FAILED)
   * speaks for the key while the others go on.
   */
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
  /** The key's rule; only `get` answers it. */
  policy: KeyPolicy | undefined;
  /** Callers waiting for the key ("queue", "keep-newest", "supersede"), first in line first. */
  waiters: Waiter[];
  /** RUNNING and asked to stop ("supersede"): the run that asked ("" when none did). */
  stopRequestedBy: string;
  /** When a run asked to stop is force-released unless it releases first. */
  stopAt: Date | undefined;
  /** A key several runs may hold at once (`KeyPolicy.maxHolders`): its other running runs, oldest first. */
  holders: Holder[];
  /**
   * Every run holding the key now, oldest first: `holders`, and the guard's own run when it is RUNNING (so one
   * entry for an ordinary running key, none for one that is not running).
   */
  runs: Holder[];
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
  /** QUEUED, DEQUEUED, SUPERSEDED, and an ACQUIRED that served the queue: the waiter's run ("" otherwise). */
  waiterRunId: string;
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

/**
 * What to do when another run holds the key. "raise", "return" and "join" are refused at once (or wait for the
 * winner to end); "queue", "keep-newest" and "supersede" wait for the key and hold it when their turn comes.
 */
export type OnConflict = "raise" | "return" | "join" | "queue" | "keep-newest" | "supersede";

/** The policies that wait in the key's queue: refusals (a full queue, a timed-out wait, a newer trigger) throw. */
export type Waiting = "queue" | "keep-newest" | "supersede";

export interface QueueOptions {
  /**
   * "queue", "keep-newest": leave the queue after this long (the key's rule's max wait, if shorter, applies),
   * with WaitTimedOut.
   */
  maxWaitMs?: number;
}

export interface HoldOptions extends AcquireOptions, QueueOptions {
  /**
   * "raise" (default): throw AlreadyRunning / RetryRequiresApproval / LockDelayed.
   * "return": return a Conflict. "join": wait until the winning run ends, then return a Conflict with its final
   * guard (a RETRY_REQUIRES_APPROVAL conflict comes back at once: there is no run to wait for).
   * "queue": wait in the key's FIFO queue (`onQueued` hears each change of place) and hold the key when its turn
   * comes, or throw QueueFull / WaitTimedOut. "keep-newest": the same, but a newer keep-newest trigger takes this
   * one's place (Superseded). "supersede": ask the running run to stop (where the key's rule allows it, else
   * PermissionDeniedError) and wait first in line. A held run that is superseded learns it from
   * `lease.stopRequested` / `lease.stopSignal`.
   */
  onConflict?: OnConflict;
  /** Told each place in the queue, from 1 ("queue", "keep-newest", "supersede"), and the guard it waits for. */
  onQueued?: (position: number, guard: Guard) => void;
  /** Stops a "join" or a queued wait (it then throws CancelledError; a queued caller leaves the queue). */
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
