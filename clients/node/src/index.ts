/**
 * taskguard-sidecar-client: ask the Task Guard sidecar "may I start <sessionKey>::<taskName> now?".
 *
 * The whole public surface is exported here; `./generated/` (wire types) is not part of it.
 */

export {
  Client,
  Lease,
  defaultAddress,
  type Acquired,
  type AcquireOptions,
  type ClientOptions,
  type Connectivity,
  type Conflict,
  type FenceCheck,
  type Guard,
  type GuardEvent,
  type GuardEventType,
  type GuardState,
  type HealthStatus,
  type HoldOptions,
  type LeaseState,
  type ListOptions,
  type OnConflict,
  type RunStatus,
  type WatchOptions,
} from "./client.ts";
export {
  AlreadyRunning,
  CancelledError,
  DeadlineExceededError,
  FailedPreconditionError,
  InternalError,
  InvalidArgumentError,
  LeaseLostError,
  LeaseNotFoundError,
  NotFoundError,
  OutOfRangeError,
  PermissionDeniedError,
  ResourceExhaustedError,
  RetryRequiresApproval,
  StatusError,
  TaskGuardError,
  UnavailableError,
} from "./errors.ts";
