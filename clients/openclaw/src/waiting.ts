/**
 * A rule's conflict policy as the Node client's options, and the refusals of a call that waited in the task's
 * queue as the Conflicts the plugin decides on: pure functions.
 *
 * A waiting acquisition ("queue", "keep-newest") throws what ends its wait; the plugin answers every refusal
 * the same way, from a Conflict, whichever policy the call had.
 */

import {
  AlreadyRunning,
  type Conflict,
  LockDelayed,
  QueueFull,
  RetryRequiresApproval,
  Superseded,
  WaitTimedOut,
} from "taskguard-sidecar-client";
import type { ConflictChoice } from "./config.ts";

/** How long before the decision's limit a sub-agent's wait in the queue ends, so that its refusal still counts. */
export const WAIT_MARGIN_MS = 1000;
const MIN_WAIT_MS = 100;

/** The Node client's onConflict for a sub-agent's Hold: a rule that waits waits, any other returns the conflict. */
export function holdConflict(choice: ConflictChoice): "return" | "queue" | "keep-newest" {
  return choice === "queue" || choice === "keep-newest" ? choice : "return";
}

/** How long a sub-agent may wait in the queue: its rule's bound, within what is left of the decision's limit. */
export function spawnWaitMs(ruleMaxWaitMs: number | undefined, leftMs: number): number {
  const left = Math.max(MIN_WAIT_MS, leftMs - WAIT_MARGIN_MS);
  return ruleMaxWaitMs === undefined ? left : Math.min(ruleMaxWaitMs, left);
}

/** A refusal the client threw, as the Conflict it would have returned; undefined for any other error. */
export function conflictOf(error: unknown): Conflict | undefined {
  const outcome =
    error instanceof AlreadyRunning
      ? "ALREADY_RUNNING"
      : error instanceof RetryRequiresApproval
        ? "RETRY_REQUIRES_APPROVAL"
        : error instanceof LockDelayed
          ? "LOCK_DELAYED"
          : error instanceof QueueFull
            ? "QUEUE_FULL"
            : error instanceof WaitTimedOut
              ? "WAIT_TIMED_OUT"
              : error instanceof Superseded
                ? "SUPERSEDED"
                : undefined;
  if (outcome === undefined) return undefined;
  const refusal = error as AlreadyRunning | RetryRequiresApproval | LockDelayed | QueueFull | WaitTimedOut | Superseded;
  const guard = refusal.guard;
  return {
    outcome,
    taskKey: guard.taskKey,
    runId: guard.runId,
    holder: guard.holder,
    startedAt: guard.startedAt,
    fencingToken: guard.fencingToken,
    guard,
    joined: false,
    supersededBy: refusal instanceof Superseded ? refusal.by : "",
    error: refusal,
  };
}
