/**
 * Acquiring over a Hold stream: the attempts under one deadline, the wait of a "join" for the winner to
 * finish, the wait of a queued caller for its turn, and running a function while the lease is held. What
 * each answer means is answers.ts's verdict.
 */

import { setTimeout as sleep } from "node:timers/promises";
import { type AcquisitionVerdict, acquisitionVerdict, queueVerdict } from "./answers.ts";
import { type Conflict, conflict, guardFromWire } from "./conversions.ts";
import { StopRequested, cancelled, messageOf, protocolError } from "./errors.ts";
import type * as pb from "./generated/taskguard/v1/taskguard.ts";
import { Lease, type LeaseContext } from "./lease.ts";
import type { Guard, OnConflict } from "./models.ts";
import { TIMED_OUT } from "./retry.ts";
import type { HoldCall } from "./stream.ts";

export interface HoldContext extends LeaseContext {
  /** A lease was made: the client keeps it until it is over, to abandon it when the client closes. */
  track(lease: Lease): void;
}

export interface Waiting {
  onConflict: OnConflict;
  onQueued: ((position: number, guard: Guard) => void) | undefined;
  signal: AbortSignal | undefined;
}

/** Send `request` on a Hold stream (a new one per attempt) and make the lease, or the conflict, of its answer. */
export async function acquireOverHold(
  context: HoldContext,
  request: pb.AcquireRequest,
  { onConflict, onQueued, signal }: Waiting,
): Promise<Lease | Conflict> {
  const { taskKey } = request;
  const deadline = Date.now() + context.deadlineMs;
  for (let attempt = 1; ; attempt++) {
    const stream = await context.openHold();
    stream.send({ request: { $case: "acquire", acquire: request } });
    const answer = await stream.next(deadline);
    let verdict = acquisitionVerdict(answer, {
      taskKey,
      onConflict,
      attempt,
      deadline,
      deadlineMs: context.deadlineMs,
    });
    if (verdict.do === "queued") {
      verdict = await waitInQueue(stream, verdict, { onConflict, onQueued, signal }, taskKey);
    }
    switch (verdict.do) {
      case "queued":
        throw protocolError(`${taskKey}: the queued wait ended without an answer`); // waitInQueue never returns it
      case "retry":
        await sleep(verdict.pause);
        continue;
      case "fail":
        if (verdict.cancel) stream.cancel();
        throw verdict.error;
      case "hold": {
        const lease = new Lease(context, stream, verdict.answer);
        context.track(lease);
        return lease;
      }
      case "join":
        return join(stream, verdict.guard, signal);
      case "refuse":
        stream.cancel();
        if (verdict.raise) {
          throw verdict.conflict.error;
        }
        return verdict.conflict;
    }
  }
}

/**
 * Wait on `stream` while the caller is queued, telling `onQueued` each place, until its turn comes or its wait
 * ends; `signal` ends the stream (the sidecar takes the caller out of the queue) and throws CancelledError.
 */
async function waitInQueue(
  stream: HoldCall,
  queued: Extract<AcquisitionVerdict, { do: "queued" }>,
  { onConflict, onQueued, signal }: Waiting,
  taskKey: string,
): Promise<AcquisitionVerdict> {
  const stop = () => stream.cancel();
  signal?.addEventListener("abort", stop, { once: true });
  try {
    let verdict: AcquisitionVerdict = queued;
    while (verdict.do === "queued") {
      if (signal?.aborted) {
        stream.cancel();
        throw cancelled(`${taskKey}: stopped waiting in the queue behind run ${verdict.guard.runId}`, signal.reason);
      }
      onQueued?.(verdict.position, verdict.guard);
      verdict = queueVerdict(await stream.next(), taskKey, onConflict);
    }
    if (verdict.do === "fail" && signal?.aborted) {
      throw cancelled(`${taskKey}: stopped waiting in the queue`, signal.reason);
    }
    return verdict;
  } catch (error) {
    stream.cancel(); // whatever ends the wait (onQueued threw, too) takes the caller out of the queue
    throw error;
  } finally {
    signal?.removeEventListener("abort", stop);
  }
}

/** Wait on `stream` until the winner's run ends; its final snapshot comes back as a joined Conflict. */
async function join(stream: HoldCall, guard: Guard, signal: AbortSignal | undefined): Promise<Conflict> {
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
        throw message.error ?? protocolError(`${guard.taskKey}: the joined Hold stream ended before the winner did`);
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

/** Whether `error` is the work giving up because the run was superseded: `stopSignal`'s reason, or an abort by it. */
function stoppedBySupersede(lease: Lease, error: unknown): boolean {
  const reason: unknown = lease.stopSignal.reason;
  return (
    lease.stopSignal.aborted &&
    (error === reason || (error instanceof Error && error.cause === reason) || error instanceof StopRequested)
  );
}

/**
 * Run `fn` while `lease` holds the guard, then release SUCCEEDED, or FAILED with the error's message when
 * `fn` throws (the error is rethrown); CANCELLED when it threw because the run was superseded (`stopSignal`).
 */
export async function runHeld<T>(lease: Lease, fn: (lease: Lease) => T | Promise<T>): Promise<T> {
  let result: T;
  try {
    result = await fn(lease);
  } catch (error) {
    // The work's own error is what the caller needs; a failed release (lost lease) must not hide it.
    await lease.release(stoppedBySupersede(lease, error) ? "CANCELLED" : "FAILED", messageOf(error)).catch(() => {});
    throw error;
  }
  await lease.release("SUCCEEDED");
  return result;
}

/** What `Client.waitInLine` yields: each place in line (from 1) and the guard waited for, then the lease. */
export type QueueNews =
  | { position: number; guard: Guard; lease?: undefined }
  | { lease: Lease; position?: undefined; guard?: undefined };

/**
 * A queued acquisition as an async iteration of its news: `open` acquires with the `onQueued` and `signal` given
 * (the latter aborted when the loop is left early, which takes the caller out of the queue). A lease that came
 * after the loop was left is released CANCELLED: nobody is there to hold it.
 */
export async function* queueNews(
  open: (onQueued: (position: number, guard: Guard) => void, signal: AbortSignal) => Promise<Lease>,
  signal: AbortSignal | undefined,
): AsyncGenerator<QueueNews, void, undefined> {
  const leave = new AbortController();
  const places: QueueNews[] = [];
  let wake: (() => void) | undefined;
  let settled = false;
  let handedOut = false;
  const acquiring = open(
    (position, guard) => {
      places.push({ position, guard });
      wake?.();
    },
    signal === undefined ? leave.signal : AbortSignal.any([signal, leave.signal]),
  );
  acquiring.then(
    () => {
      settled = true;
      wake?.();
    },
    () => {
      settled = true;
      wake?.();
    },
  );
  try {
    for (;;) {
      const place = places.shift();
      if (place !== undefined) {
        yield place;
        continue;
      }
      if (settled) break;
      await new Promise<void>((resolve) => {
        wake = resolve;
      });
      wake = undefined;
    }
    const lease = await acquiring;
    handedOut = true;
    yield { lease };
  } finally {
    if (!handedOut) {
      leave.abort();
      acquiring.then(
        (lease) => lease.release("CANCELLED", "the caller stopped waiting for its turn").catch(() => {}),
        () => {},
      );
    }
  }
}
