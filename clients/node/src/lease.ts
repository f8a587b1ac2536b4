/**
 * A guard held over a Hold stream: heartbeats, the release (on the stream, else by a unary call), the
 * resume on a new stream after UNAVAILABLE, and the loss (`lost`, `signal`). The Python client's `_lease.py`.
 * hold.ts makes leases; the client gives them a `LeaseContext` to open streams and release through.
 */

import { setTimeout as sleep } from "node:timers/promises";
import { resumeVerdict } from "./answers.ts";
import { guardFromWire } from "./conversions.ts";
import {
  LeaseLostError,
  StopRequested,
  type TaskGuardError,
  UnavailableError,
  fromCallError,
  leaseLost,
  messageOf,
} from "./errors.ts";
import type * as pb from "./generated/taskguard/v1/taskguard.ts";
import type { Guard, LeaseState, RunStatus } from "./models.ts";
import { clipDetail, runStatusToWire } from "./requests.ts";
import { TIMED_OUT, backoffMs, beforeDeadline } from "./retry.ts";
import type { HoldCall, StreamEnd } from "./stream.ts";

export interface LeaseContext {
  openHold(): Promise<HoldCall>;
  releaseUnary(leaseId: string, status: RunStatus, detail: string, deadline: number): Promise<Guard>;
  /** The lease is over (released or lost): the client stops tracking it. */
  forget(lease: Lease): void;
  readonly deadlineMs: number;
  readonly resumeWindowMs: number;
}

/**
 * A guard held over a Hold stream, from `Client.openHold`. Release it exactly
 * once with `release()`; until then the sidecar keeps it for this run
 * (heartbeats are automatic) and ends it ABANDONED if this process goes away.
 * Not shared across processes: pass the lease id to `Client.release` for that.
 */
export class Lease {
  readonly outcome = "ACQUIRED" as const;
  readonly taskKey: string;
  readonly runId: string;
  /** The capability that renews and releases this lease. */
  readonly leaseId: string;
  readonly fencingToken: number;
  readonly startedAt: Date;
  /** Resolves (never rejects) with why, when the guard is taken away or cannot be resumed. */
  readonly lost: Promise<LeaseLostError>;
  /** Aborted, with the LeaseLostError as its reason, when `lost` resolves: hand it to the work the lease guards. */
  readonly signal: AbortSignal;
  /**
   * Resolves (never rejects) with the guard when a newer trigger superseded this run ("supersede"):
   * `guard.stopRequestedBy` names it, `guard.stopAt` says when the sidecar force-releases this run unless it
   * is released first. Stop the work and release (CANCELLED is the usual status).
   */
  readonly stopRequested: Promise<Guard>;
  /** Aborted, with a StopRequested as its reason, when `stopRequested` resolves. */
  readonly stopSignal: AbortSignal;

  #guard: Guard;
  #state: LeaseState = "held";
  #stream: HoldCall;
  readonly #context: LeaseContext;
  readonly #abort = new AbortController();
  readonly #stop = new AbortController();
  #resolveStop: (guard: Guard) => void = () => {};
  #resolveLost: (error: LeaseLostError) => void = () => {};
  #lostError: LeaseLostError | undefined;
  #lostGuard: Guard | undefined;
  #heartbeat: NodeJS.Timeout | undefined;
  #released: Promise<Guard> | undefined;
  #releaseAnswer: ((answer: Guard | StreamEnd) => void) | undefined;
  #stateChanged: (() => void)[] = [];

  /** @internal Made by `Client.openHold`. */
  constructor(context: LeaseContext, stream: HoldCall, answer: pb.HoldResponse) {
    const guard = guardFromWire(answer.guard);
    this.#context = context;
    this.#stream = stream;
    this.#guard = guard;
    this.taskKey = guard.taskKey;
    this.runId = guard.runId;
    this.leaseId = answer.leaseId;
    this.fencingToken = guard.fencingToken;
    this.startedAt = guard.startedAt;
    this.signal = this.#abort.signal;
    this.lost = new Promise((resolve) => {
      this.#resolveLost = resolve;
    });
    this.stopSignal = this.#stop.signal;
    this.stopRequested = new Promise((resolve) => {
      this.#resolveStop = resolve;
    });
    this.#noticeStop(guard);
    const ttlMs = guard.ttlMs;
    if (ttlMs !== undefined) {
      this.#heartbeat = setInterval(() => this.#beat(), Math.max(1, ttlMs / 3));
      this.#heartbeat.unref();
    }
    void this.#read(stream);
  }

  /** The latest snapshot: from the acquisition, the last heartbeat answer, a resume or the release. */
  get guard(): Guard {
    return this.#guard;
  }

  get state(): LeaseState {
    return this.#state;
  }

  /** The run that superseded this one ("" while none did). */
  get stopRequestedBy(): string {
    return this.#stop.signal.aborted ? (this.#stop.signal.reason as StopRequested).by : "";
  }

  /** A snapshot of this run that says it was asked to stop (a STOP_REQUESTED message, or any later snapshot). */
  #noticeStop(guard: Guard | undefined): void {
    if (guard === undefined || !guard.stopRequestedBy || guard.runId !== this.runId || this.#stop.signal.aborted) {
      return;
    }
    this.#resolveStop(guard);
    this.#stop.abort(new StopRequested(guard));
  }

  /**
   * End the run with `status` (and a detail of at most 4096 bytes; longer is
   * clipped). Returns the released guard; throws LeaseLostError when the lease
   * was lost first. Calling it again returns the first call's answer.
   */
  release(status: RunStatus = "SUCCEEDED", detail = ""): Promise<Guard> {
    this.#released ??= this.#release(status, clipDetail(detail));
    return this.#released;
  }

  async #release(status: RunStatus, detail: string): Promise<Guard> {
    const wireStatus = runStatusToWire(status);
    const deadline = Date.now() + this.#context.deadlineMs;
    while (this.#state === "resuming") {
      await this.#nextState();
    }
    if (this.#state === "lost") {
      throw this.#lostError;
    }
    this.#setState("releasing");
    this.#stopHeartbeats();
    const answer = new Promise<Guard | StreamEnd>((resolve) => {
      this.#releaseAnswer = resolve;
    });
    this.#stream.send({ request: { $case: "release", release: { status: wireStatus, detail } } });
    const result = await beforeDeadline(answer, deadline);
    if (result !== TIMED_OUT && !("end" in result)) {
      this.#guard = result;
      this.#setState("released");
      return result;
    }
    // The stream broke or went quiet before its answer. Release is idempotent by lease id, and also
    // reaches a run the sidecar keeps for its resume grace after a restart.
    this.#stream.cancel();
    try {
      const guard = await this.#context.releaseUnary(this.leaseId, status, detail, deadline);
      this.#guard = guard;
      this.#setState("released");
      return guard;
    } catch (error) {
      const lost =
        error instanceof LeaseLostError
          ? error
          : leaseLost(
              `${this.taskKey}: the release of run ${this.runId} was not confirmed: ${messageOf(error)}`,
              undefined,
              error,
            );
      this.#markLost(lost);
      throw lost;
    }
  }

  #beat(): void {
    if (this.#state === "held") {
      this.#stream.send({ request: { $case: "heartbeat", heartbeat: {} } });
    }
  }

  async #read(stream: HoldCall): Promise<void> {
    for (;;) {
      const message = await stream.next();
      if (message === TIMED_OUT) {
        continue; // no deadline was given; cannot happen
      }
      if (stream !== this.#stream) {
        return; // a stream this lease has moved on from
      }
      if ("end" in message) {
        this.#streamEnded(message);
        return;
      }
      const guard = message.guard === undefined ? undefined : guardFromWire(message.guard);
      this.#noticeStop(guard);
      switch (message.event) {
        case "HOLD_EVENT_HEARTBEAT_ACK":
        case "HOLD_EVENT_STOP_REQUESTED":
          if (guard !== undefined) this.#guard = guard;
          break;
        case "HOLD_EVENT_RELEASED":
          if (guard !== undefined) this.#releaseAnswer?.(guard);
          break;
        case "HOLD_EVENT_LOST":
          this.#lostGuard = guard;
          break;
      }
    }
  }

  #streamEnded(end: StreamEnd): void {
    const state = this.#state;
    if (state === "releasing") {
      this.#releaseAnswer?.(end);
      return;
    }
    if (state !== "held") {
      return;
    }
    if (end.error instanceof UnavailableError && this.#lostGuard === undefined) {
      void this.#resume(end.error);
      return;
    }
    const guard = this.#lostGuard;
    const why = end.error?.message ?? "the Hold stream ended without a release";
    this.#markLost(leaseLost(`${this.taskKey}: ${why}`, guard, end.error));
  }

  async #resume(cause: TaskGuardError): Promise<void> {
    this.#setState("resuming");
    const deadline = Date.now() + this.#context.resumeWindowMs;
    let last: TaskGuardError = cause;
    for (let attempt = 1; Date.now() < deadline && this.#state === "resuming"; attempt++) {
      let stream: HoldCall;
      try {
        stream = await this.#context.openHold();
      } catch (error) {
        last = fromCallError(error);
        await sleep(backoffMs(attempt));
        continue;
      }
      stream.send({ request: { $case: "resume", resume: { leaseId: this.leaseId } } });
      const answer = await stream.next(Math.min(deadline, Date.now() + this.#context.deadlineMs));
      if (this.#state !== "resuming") {
        stream.cancel(); // abandoned (the client closed) while we waited
        return;
      }
      const verdict = resumeVerdict(answer);
      if (verdict.do === "hold") {
        this.#guard = verdict.guard;
        this.#noticeStop(verdict.guard);
        this.#stream = stream;
        this.#setState("held");
        void this.#read(stream);
        return;
      }
      stream.cancel();
      if (verdict.do === "lose") {
        this.#markLost(leaseLost(`${this.taskKey}: could not resume: ${verdict.why}`, undefined, verdict.error));
        return;
      }
      last = verdict.error ?? last;
      await sleep(Math.min(backoffMs(attempt), Math.max(0, deadline - Date.now())));
    }
    this.#markLost(
      leaseLost(
        `${this.taskKey}: the Hold stream broke and could not be resumed ` +
          `within ${this.#context.resumeWindowMs} ms: ${last.message}`,
        undefined,
        last,
      ),
    );
  }

  #markLost(error: LeaseLostError): void {
    if (this.#state === "lost" || this.#state === "released") {
      return;
    }
    error.guard ??= this.#lostGuard;
    if (error.guard !== undefined) {
      this.#guard = error.guard;
    }
    this.#lostError = error;
    this.#stopHeartbeats();
    this.#stream.cancel();
    this.#setState("lost");
    this.#resolveLost(error);
    this.#abort.abort(error);
  }

  #stopHeartbeats(): void {
    clearInterval(this.#heartbeat);
    this.#heartbeat = undefined;
  }

  #setState(state: LeaseState): void {
    this.#state = state;
    if (state === "released" || state === "lost") {
      this.#context.forget(this);
    }
    const waiting = this.#stateChanged;
    this.#stateChanged = [];
    for (const wake of waiting) wake();
  }

  #nextState(): Promise<void> {
    return new Promise((resolve) => this.#stateChanged.push(resolve));
  }

  /** @internal Ends the stream without a release (the client is closing): the sidecar abandons the run. */
  abandon(): void {
    this.#markLost(leaseLost(`${this.taskKey}: the client was closed while it held the guard`));
  }
}
