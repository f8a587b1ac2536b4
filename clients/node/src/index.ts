/**
 * taskguard-sidecar-client: ask the Task Guard sidecar "may I start <sessionKey>::<taskName> now?".
 *
 * The whole public surface is exported here; `./generated/` (wire types) is not part of it.
 */

export { defaultAddress } from "./address.ts";
export { Client } from "./client.ts";
export type { Conflict, RefusalOutcome } from "./conversions.ts";
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
  LockDelayed,
  QueueFull,
  RetryRequiresApproval,
  StatusError,
  StopRequested,
  Superseded,
  TaskGuardError,
  UnavailableError,
  WaitTimedOut,
} from "./errors.ts";
export type { QueueNews } from "./hold.ts";
export { Lease } from "./lease.ts";
// models.ts holds the public data types and nothing else, so all of them are part of the surface.
export type * from "./models.ts";
