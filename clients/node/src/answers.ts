/**
 * What the answers on a Hold stream mean: the verdict on the answer to an acquisition, on each message to a
 * caller waiting in the key's queue, and on the answer to a resume. Pure functions: hold.ts and lease.ts do
 * what they say (cancel, sleep, keep the lease).
 */

import { type Conflict, conflict, guardFromWire } from "./conversions.ts";
import { type TaskGuardError, UnavailableError, deadlineExceeded, protocolError } from "./errors.ts";
import type * as pb from "./generated/taskguard/v1/taskguard.ts";
import type { Guard, OnConflict } from "./models.ts";
import { waits } from "./requests.ts";
import { TIMED_OUT, retryPause } from "./retry.ts";
import type { StreamEnd } from "./stream.ts";

/** What `HoldCall.next` answers. */
export type HoldAnswer = pb.HoldResponse | StreamEnd | typeof TIMED_OUT;

export type AcquisitionVerdict =
  /** Acquired: the lease lives on this stream; `answer` made it. */
  | { do: "hold"; answer: pb.HoldResponse }
  /** The stream ended before any answer: open a new one after `pause` ms. */
  | { do: "retry"; pause: number }
  /** Wait on this stream for the winner (`guard`) to finish. */
  | { do: "join"; guard: Guard }
  /** Queued at `position` (from 1) behind `guard`'s run: wait on this stream for the turn (see `queueVerdict`). */
  | { do: "queued"; position: number; guard: Guard }
  /** Refused: end the stream, then throw the conflict's error or return the conflict. */
  | { do: "refuse"; conflict: Conflict; raise: boolean }
  /** Throw `error`, first ending the stream when `cancel`. */
  | { do: "fail"; error: TaskGuardError; cancel: boolean };

export interface Acquisition {
  taskKey: string;
  onConflict: OnConflict;
  /** 1 for the first stream. */
  attempt: number;
  /** Epoch ms: bounds all attempts. */
  deadline: number;
  /** For the message of a timeout. */
  deadlineMs: number;
}

/** The verdict on the answer to an acquisition sent on a Hold stream. */
export function acquisitionVerdict(answer: HoldAnswer, acquisition: Acquisition): AcquisitionVerdict {
  const { taskKey, onConflict } = acquisition;
  if (answer === TIMED_OUT) {
    const error = deadlineExceeded(`${taskKey}: no answer to the acquisition within ${acquisition.deadlineMs} ms`);
    return { do: "fail", error, cancel: true };
  }
  if ("end" in answer) {
    // Nothing was answered, and the run id is fixed: trying again cannot start a second run.
    const pause = retryPause(answer.error, acquisition.attempt, acquisition.deadline);
    if (pause !== undefined) {
      return { do: "retry", pause };
    }
    const error = answer.error ?? protocolError(`${taskKey}: the Hold stream ended without an answer`);
    return { do: "fail", error, cancel: false };
  }
  if (onConflict === "join" && answer.outcome === "ACQUIRE_OUTCOME_ALREADY_RUNNING") {
    return { do: "join", guard: guardFromWire(answer.guard) };
  }
  return answered(answer, onConflict);
}

function answered(answer: pb.HoldResponse, onConflict: OnConflict): AcquisitionVerdict {
  if (answer.outcome === "ACQUIRE_OUTCOME_ACQUIRED") {
    return { do: "hold", answer };
  }
  const guard = guardFromWire(answer.guard);
  if (answer.outcome === "ACQUIRE_OUTCOME_QUEUED") {
    return { do: "queued", position: answer.position, guard };
  }
  // A caller that chose to wait did not choose a Conflict as its answer: what ends its wait is thrown.
  const raise = onConflict === "raise" || waits(onConflict);
  return { do: "refuse", conflict: conflict(answer.outcome, guard, false, answer.supersededBy), raise };
}

/**
 * The verdict on a message to a queued caller: another place in line, its turn (ACQUIRED: the lease lives on
 * this stream), or the end of its wait. A stream that ends is not retried: the waiter left the queue with it,
 * and a new stream would queue at the end.
 */
export function queueVerdict(answer: HoldAnswer, taskKey: string, onConflict: OnConflict): AcquisitionVerdict {
  if (answer === TIMED_OUT) {
    return { do: "fail", error: protocolError(`${taskKey}: a queued wait timed out without a deadline`), cancel: true };
  }
  if ("end" in answer) {
    const error = answer.error ?? protocolError(`${taskKey}: the Hold stream ended while the caller was queued`);
    return { do: "fail", error, cancel: false };
  }
  return answered(answer, onConflict);
}

export type ResumeVerdict =
  /** Resumed: the lease moves to this stream, with this snapshot. */
  | { do: "hold"; guard: Guard }
  /** The sidecar no longer has the run for this lease: it is lost. */
  | { do: "lose"; why: string; error: TaskGuardError | undefined }
  /** Not reached (UNAVAILABLE, or no answer in time): try again; `error` is the latest failure, if one came. */
  | { do: "retry"; error: TaskGuardError | undefined };

/** The verdict on the answer to a resume sent on a new Hold stream. */
export function resumeVerdict(answer: HoldAnswer): ResumeVerdict {
  if (answer === TIMED_OUT) {
    return { do: "retry", error: undefined };
  }
  if (!("end" in answer)) {
    if (answer.outcome === "ACQUIRE_OUTCOME_ACQUIRED") {
      return { do: "hold", guard: guardFromWire(answer.guard) };
    }
    // An answer that is no lease: the sidecar no longer has this run for us.
    return { do: "lose", why: `the sidecar answered ${answer.outcome}`, error: undefined };
  }
  if (answer.error instanceof UnavailableError) {
    return { do: "retry", error: answer.error };
  }
  // NOT_FOUND or FAILED_PRECONDITION (or an end without a status): the sidecar no longer has this run for us.
  return { do: "lose", why: answer.error?.message ?? "the sidecar answered nothing", error: answer.error };
}
