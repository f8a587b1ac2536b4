/**
 * When the plugin may stop waiting for the sidecar, and what it may conclude then.
 *
 * Theory of operation
 * -------------------
 * A tool call waits for the sidecar's answer from the moment the call reached
 * the plugin. The gateway runs everything on one event loop, and that loop
 * stalls: a synchronous SQLite pass of the gateway's own held it for 7.9 s in
 * one start. After a stall Node runs the timers that fell due before it reads
 * the sockets, so a timer on its own "times out" while the answer sits unread
 * in the socket. No timer decides on its own here:
 *
 * 1. Wait up to the budget (`decisionTimeoutMs`). When the timer fires, let
 *    the loop read whatever already arrived (two turns of the event loop)
 *    before looking at the answer again.
 * 2. Still nothing: is the sidecar reachable? A channel that failed to
 *    connect (connection refused, no socket) is unreachable at once; one that
 *    is still connecting gets `probeMs` to become ready; on a ready
 *    connection, a health check gets `probeMs` to be answered. Only
 *    "unreachable" lets the caller's policy (allow or block) decide.
 * 3. Reachable: wait for the answer up to the limit (`maxDecisionMs`, below
 *    OpenClaw's 15 s hook timeout). Nothing even then is "unanswered", which
 *    the caller must not treat as unreachable: the sidecar is up and may still
 *    grant the run.
 *
 * An answer that comes at any point wins, however late the timers ran. The
 * sidecar answering with an error (it is up, but refused the call) is
 * "refused"; the client giving up (UNAVAILABLE or its own deadline, after its
 * retries) is no answer, judged like silence.
 */

import {
  type Connectivity,
  DeadlineExceededError,
  type HealthStatus,
  UnavailableError,
} from "taskguard-sidecar-client";

/** The slice of the Node client the decision needs: the channel and the health check on it. */
export interface Reachable {
  readonly address: string;
  connectivity(connect?: boolean): Connectivity;
  connectivityChanged(from: Connectivity, deadline: number): Promise<boolean>;
  health(options?: { deadline?: number }): Promise<HealthStatus>;
}

export interface Timing {
  /** How long to wait before asking whether the sidecar is reachable at all. */
  budgetMs: number;
  /** How long the reachability check may take (becoming ready, answering a health check). */
  probeMs: number;
  /** How long a reachable sidecar is waited for, in all. */
  limitMs: number;
}

export type Verdict<T> =
  | { kind: "answer"; value: T }
  /** The sidecar answered with an error: it is up, and refused this call. */
  | { kind: "refused"; error: unknown }
  | { kind: "unreachable"; why: string }
  /** Up (it answered its health check), but no answer to this call within the limit. */
  | { kind: "unanswered"; why: string };

export interface Decided<T> {
  verdict: Verdict<T>;
  /** From the call reaching the plugin to the verdict. */
  tookMs: number;
  /** How late the latest timer fired: how long the event loop was blocked while this call waited. */
  stalledMs: number;
}

type Settled<T> = { ok: true; value: T } | { ok: false; error: unknown };

/** A promise whose outcome can be looked at synchronously once it settled. */
export class Pending<T> {
  settled: Settled<T> | undefined;
  readonly done: Promise<void>;

  constructor(work: Promise<T>) {
    this.done = work.then(
      (value) => {
        this.settled = { ok: true, value };
      },
      (error: unknown) => {
        this.settled = { ok: false, error };
      },
    );
  }
}

/** Two turns of the event loop: an answer that reached the socket while the loop was blocked is read and settled. */
export async function drain(): Promise<void> {
  for (let turn = 0; turn < 2; turn++) {
    await new Promise<void>((resolve) => setImmediate(resolve));
  }
}

/** The client gave up without an answer from the sidecar (its retries ran out, or its own deadline passed). */
export function isNoAnswer(error: unknown): boolean {
  return error instanceof UnavailableError || error instanceof DeadlineExceededError;
}

export async function decide<T>(
  work: Promise<T>,
  arrivedAt: number,
  sidecar: Reachable,
  timing: Timing,
): Promise<Decided<T>> {
  const pending = new Pending(work);
  const lag = { ms: 0 };
  const verdict = await judge(pending, arrivedAt, sidecar, timing, lag);
  return { verdict, tookMs: performance.now() - arrivedAt, stalledMs: lag.ms };
}

async function judge<T>(
  pending: Pending<T>,
  arrivedAt: number,
  sidecar: Reachable,
  timing: Timing,
  lag: { ms: number },
): Promise<Verdict<T>> {
  await settledBy(pending, arrivedAt + timing.budgetMs, lag);
  const early = answered(pending);
  if (early !== undefined) return early;
  const unreachable = await reachability(sidecar, pending, timing.probeMs, lag);
  const meanwhile = answered(pending);
  if (meanwhile !== undefined) return meanwhile;
  if (unreachable !== undefined) return { kind: "unreachable", why: unreachable };
  await settledBy(pending, arrivedAt + timing.limitMs, lag);
  const late = answered(pending);
  if (late !== undefined) return late;
  return {
    kind: "unanswered",
    why: `the sidecar answers its health check but did not answer this call within ${timing.limitMs} ms`,
  };
}

/** The verdict if the sidecar answered (a value, or an error of its own); undefined while there is no answer. */
function answered<T>(pending: Pending<T>): Verdict<T> | undefined {
  const settled = pending.settled;
  if (settled === undefined) return undefined;
  if (settled.ok) return { kind: "answer", value: settled.value };
  return isNoAnswer(settled.error) ? undefined : { kind: "refused", error: settled.error };
}

/** Waits until `pending` settles (or `also` does) or `deadline` passes; a timer that fired first lets the loop read what came. */
async function settledBy(
  pending: Pending<unknown>,
  deadline: number,
  lag: { ms: number },
  also?: Promise<unknown>,
): Promise<void> {
  if (pending.settled !== undefined) return;
  let timer: NodeJS.Timeout | undefined;
  let fired = false;
  const due = new Promise<void>((resolve) => {
    timer = setTimeout(
      () => {
        fired = true;
        lag.ms = Math.max(lag.ms, performance.now() - deadline);
        resolve();
      },
      Math.max(0, deadline - performance.now()),
    );
  });
  try {
    await Promise.race(also === undefined ? [due, pending.done] : [due, pending.done, also]);
  } finally {
    clearTimeout(timer);
  }
  if (fired && pending.settled === undefined) {
    await drain();
  }
}

/** Why the sidecar is unreachable, or undefined when it is reachable (or `pending` got its answer meanwhile). */
async function reachability(
  sidecar: Reachable,
  pending: Pending<unknown>,
  probeMs: number,
  lag: { ms: number },
): Promise<string | undefined> {
  const deadline = performance.now() + probeMs;
  let state = sidecar.connectivity(true);
  while (state !== "READY") {
    if (state === "TRANSIENT_FAILURE" || state === "SHUTDOWN") {
      return `cannot connect to ${sidecar.address} (connection refused, or no socket there)`;
    }
    const changed = sidecar.connectivityChanged(state, Date.now() + Math.max(0, deadline - performance.now()));
    await settledBy(new Pending(changed), deadline, lag, pending.done);
    if (answered(pending) !== undefined) return undefined;
    state = sidecar.connectivity(true);
    if (state !== "READY" && state !== "TRANSIENT_FAILURE" && performance.now() >= deadline) {
      return `no connection to ${sidecar.address} within ${probeMs} ms (${state.toLowerCase()})`;
    }
  }
  const health = new Pending(sidecar.health({ deadline: Date.now() + probeMs + 10_000 })); // the timer below decides
  await settledBy(health, deadline, lag, pending.done);
  if (answered(pending) !== undefined) return undefined;
  const settled = health.settled;
  if (settled === undefined) {
    return `no answer to a health check from ${sidecar.address} within ${probeMs} ms`;
  }
  if (!settled.ok) {
    return `the health check of ${sidecar.address} failed: ${messageOf(settled.error)}`;
  }
  return settled.value === "SERVING" ? undefined : `the sidecar at ${sidecar.address} is ${settled.value}`;
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
