/**
 * Time and the retry verdicts: the backoff between attempts, whether a failure is worth another attempt
 * before the deadline, and a race against a deadline. The verdicts are pure (the caller sleeps and calls
 * again); like the Python client's `RetryPolicy`, only UNAVAILABLE is retried, and only for safe calls.
 */

import { status } from "@grpc/grpc-js";
import { StatusError, type TaskGuardError, UnavailableError } from "./errors.ts";

const BACKOFF_FIRST_MS = 50;
const BACKOFF_MAX_MS = 2_000;

export function backoffMs(attempt: number): number {
  const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** (attempt - 1));
  return ceiling / 2 + Math.random() * (ceiling / 2);
}

export const TIMED_OUT = Symbol("timed out");

/** `promise`'s value, or TIMED_OUT once `deadline` (epoch ms) passed; the timer never outlives the race. */
export async function beforeDeadline<T>(promise: Promise<T>, deadline: number): Promise<T | typeof TIMED_OUT> {
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

/**
 * How long to wait before another attempt after `failure`, or undefined when there is to be none: the
 * sidecar did not answer UNAVAILABLE, or the pause would reach past `deadline` (epoch ms).
 */
export function retryPause(
  failure: TaskGuardError | undefined,
  attempt: number,
  deadline: number,
  now = Date.now(),
): number | undefined {
  const pause = backoffMs(attempt);
  return failure instanceof UnavailableError && now + pause < deadline ? pause : undefined;
}

/** Whether a watch that broke with `error` reconnects (from where it was) rather than throwing. */
export function isResumable(error: TaskGuardError): boolean {
  if (!(error instanceof StatusError)) {
    return false;
  }
  return (
    error instanceof UnavailableError ||
    error.code === status.RESOURCE_EXHAUSTED ||
    // A connection reset can surface as INTERNAL ("RST_STREAM") or UNKNOWN before grpc-js sees the socket close.
    (error.code === status.INTERNAL && /RST_STREAM|Connection dropped/i.test(error.message))
  );
}
