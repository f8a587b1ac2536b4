/**
 * The Task Guard client: typed calls over @grpc/grpc-js, streaming leases
 * (`hold`, `openHold`), paging (`list`) and a resuming `watch`.
 *
 * Theory of operation
 * -------------------
 * Every unary call carries a deadline (`deadlineMs`, default 10 s) that
 * covers all of its attempts. Calls that are safe to repeat (acquire with a
 * run id fixed before the first attempt, renew, release, get, list,
 * checkFence) are retried with backoff while the sidecar answers UNAVAILABLE;
 * approveRetry and forceRelease are not, since a repeat of a call that did
 * land would be refused.
 *
 * A `Lease` lives on a Hold stream. It heartbeats every ttl/3 when it has a
 * TTL. When the stream breaks with UNAVAILABLE (the sidecar restarted or is
 * draining), it resumes on a new stream with its lease id for up to
 * `resumeWindowMs`; the sidecar keeps a stream-bound run for its resume grace
 * after a restart. A lease the sidecar takes away (force-release, expiry) or
 * that cannot be resumed is *lost*: `lost` resolves, `signal` aborts.
 *
 * Streams have no overall deadline (they last as long as the lease or the
 * watch); the deadline bounds each step that waits for an answer instead
 * (the acquisition, the release).
 *
 * Modules
 * -------
 * This file is the facade and the unary operations. Below it, each module has one job and imports only
 * modules further down: hold.ts (acquiring over a Hold stream), lease.ts (a held lease), watch.ts (the
 * resuming watch), answers.ts (verdicts on Hold answers), stream.ts (a Hold stream as a queue),
 * connection.ts and health.ts (the channel and the health service), call.ts (metadata and unary attempts),
 * retry.ts (backoff and retry verdicts), requests.ts and conversions.ts (to and from the wire),
 * address.ts (the default socket), errors.ts, and models.ts (the public types, importing no module of this package).
 */

import { hostname } from "node:os";
import type * as grpc from "@grpc/grpc-js";
import { checkDefaultSocket, defaultAddress } from "./address.ts";
import { type UnaryMethod, callMetadata, unaryCall } from "./call.ts";
import { checkHealth, connectivity, connectivityChanged, openChannel } from "./connection.ts";
import { type Conflict, acquiredFromWire, fenceFromWire, guardFromWire } from "./conversions.ts";
import type * as pb from "./generated/taskguard/v1/taskguard.ts";
import { type HoldContext, type QueueNews, acquireOverHold, queueNews, runHeld } from "./hold.ts";
import { Lease } from "./lease.ts";
import type {
  Acquired,
  AcquireOptions,
  ClientOptions,
  Connectivity,
  FenceCheck,
  Guard,
  GuardEvent,
  HealthStatus,
  HoldOptions,
  ListOptions,
  QueueOptions,
  RunStatus,
  Waiting,
  WatchOptions,
} from "./models.ts";
import { acquireRequest, clipDetail, listRequest, releaseRequest, ttlToWire } from "./requests.ts";
import { HoldCall } from "./stream.ts";
import { watchGuards } from "./watch.ts";

const DEFAULT_DEADLINE_MS = 10_000;
const DEFAULT_RESUME_WINDOW_MS = 15_000;

/**
 * A connection to one sidecar. Cheap to keep for the life of the process;
 * `close()` it to let the process exit. Leases opened through it end
 * (ABANDONED) when it closes.
 */
export class Client {
  readonly address: string;
  readonly deadlineMs: number;
  readonly resumeWindowMs: number;
  readonly holder: string;
  readonly #token: string | undefined;
  readonly #stub: pb.TaskGuardClient;
  readonly #leases = new Set<Lease>();
  /** What the leases of this client open streams and release through. */
  readonly #context: HoldContext;

  constructor(options: ClientOptions = {}) {
    this.address = options.address ?? defaultAddress();
    checkDefaultSocket(this.address);
    this.deadlineMs = options.deadlineMs ?? DEFAULT_DEADLINE_MS;
    this.resumeWindowMs = options.resumeWindowMs ?? DEFAULT_RESUME_WINDOW_MS;
    this.holder = options.holder ?? `${hostname()}:${process.pid}`;
    this.#token = options.token;
    this.#stub = openChannel(this.address, options.channelOptions);
    this.#context = {
      openHold: async () => new HoldCall(this.#stub.hold(await this.#metadata())),
      releaseUnary: (leaseId, status, detail, deadline) => this.#releaseUnary(leaseId, status, detail, deadline),
      track: (lease) => this.#leases.add(lease),
      forget: (lease) => this.#leases.delete(lease),
      deadlineMs: this.deadlineMs,
      resumeWindowMs: this.resumeWindowMs,
    };
  }

  close(): void {
    for (const lease of [...this.#leases]) lease.abandon();
    this.#stub.close();
  }

  // --- leases -------------------------------------------------------------------------------

  /**
   * Acquire with a TTL lease (the sidecar's default TTL when `ttlMs` is unset).
   * Conflicts throw AlreadyRunning / RetryRequiresApproval / LockDelayed, or with
   * `onConflict: "return"` come back as a Conflict. With "queue", "keep-newest"
   * or "supersede" the call waits in the key's queue for its turn, up to the
   * client's deadline (`deadlineMs`), and a wait that ends without the guard
   * throws (QueueFull, WaitTimedOut, Superseded, DeadlineExceededError).
   */
  acquire(
    taskKey: string,
    options?: AcquireOptions & QueueOptions & { onConflict?: "raise" | Waiting },
  ): Promise<Acquired>;
  acquire(taskKey: string, options: AcquireOptions & { onConflict: "return" }): Promise<Acquired | Conflict>;
  async acquire(
    taskKey: string,
    options: AcquireOptions & QueueOptions & { onConflict?: "raise" | "return" | Waiting } = {},
  ): Promise<Acquired | Conflict> {
    const request = acquireRequest(taskKey, options, options.onConflict ?? "raise", this.holder);
    const result = acquiredFromWire(await this.#unary(this.#stub.acquire, request, true));
    if (result.outcome === "ACQUIRED" || options.onConflict === "return") {
      return result;
    }
    throw result.error;
  }

  /** Extend a TTL lease (by its own TTL, or `ttlMs`). */
  async renew(leaseId: string, options: { ttlMs?: number } = {}): Promise<Guard> {
    const ttl = ttlToWire(options.ttlMs);
    const response = await this.#unary(this.#stub.renew, { leaseId, ttl }, true);
    return guardFromWire(response.guard);
  }

  /** End the run that holds `leaseId`. Repeating it with the same status answers the same guard. */
  async release(leaseId: string, status: RunStatus, detail = ""): Promise<Guard> {
    return this.#releaseUnary(leaseId, status, clipDetail(detail), Date.now() + this.deadlineMs);
  }

  async #releaseUnary(leaseId: string, status: RunStatus, detail: string, deadline: number): Promise<Guard> {
    const request = releaseRequest(leaseId, status, detail);
    const response = await this.#unary(this.#stub.release, request, true, deadline);
    return guardFromWire(response.guard);
  }

  /**
   * Acquire over a Hold stream and keep the guard until `lease.release()`: for
   * callers that acquire in one callback and release in another. Prefer `hold`
   * when one function does the work.
   */
  openHold(taskKey: string, options?: HoldOptions & { onConflict?: "raise" | Waiting }): Promise<Lease>;
  openHold(taskKey: string, options: HoldOptions & { onConflict: "return" | "join" }): Promise<Lease | Conflict>;
  openHold(taskKey: string, options?: HoldOptions): Promise<Lease | Conflict>;
  async openHold(taskKey: string, options: HoldOptions = {}): Promise<Lease | Conflict> {
    const onConflict = options.onConflict ?? "raise";
    const request = acquireRequest(taskKey, options, onConflict, this.holder);
    return acquireOverHold(this.#context, request, { onConflict, onQueued: options.onQueued, signal: options.signal });
  }

  /**
   * Run `fn` while holding the guard: acquire over a Hold stream, run, then
   * release SUCCEEDED, or FAILED with the error's message when `fn` throws
   * (the error is rethrown). When the lease is lost while `fn` runs,
   * `lease.signal` aborts and `hold` throws LeaseLostError after `fn` settles.
   * When a newer trigger supersedes the run, `lease.stopSignal` aborts; if
   * `fn` then throws its reason (a StopRequested), the run is released
   * CANCELLED and `hold` throws it.
   */
  hold<T>(
    taskKey: string,
    options: HoldOptions & { onConflict?: "raise" | Waiting },
    fn: (lease: Lease) => T | Promise<T>,
  ): Promise<T>;
  hold<T>(
    taskKey: string,
    options: HoldOptions & { onConflict: "return" | "join" },
    fn: (lease: Lease) => T | Promise<T>,
  ): Promise<T | Conflict>;
  hold<T>(taskKey: string, options: HoldOptions, fn: (lease: Lease) => T | Promise<T>): Promise<T | Conflict>;
  async hold<T>(taskKey: string, options: HoldOptions, fn: (lease: Lease) => T | Promise<T>): Promise<T | Conflict> {
    const lease = await this.openHold(taskKey, options);
    return lease instanceof Lease ? runHeld(lease, fn) : lease;
  }

  /**
   * `openHold` with a waiting policy ("queue" unless `onConflict` says "keep-newest" or "supersede"), as an async
   * iteration: each place in line as `{ position, guard }`, then `{ lease }` when the turn came (a free key
   * yields the lease at once). What ends the wait without the guard is thrown (QueueFull, WaitTimedOut,
   * Superseded, ...). Leaving the loop before the lease leaves the queue.
   */
  waitInLine(
    taskKey: string,
    options: Omit<HoldOptions, "onConflict"> & { onConflict?: Waiting } = {},
  ): AsyncGenerator<QueueNews, void, undefined> {
    const { onQueued, signal } = options;
    return queueNews(
      (heard, stop) =>
        this.openHold(taskKey, {
          ...options,
          onConflict: options.onConflict ?? "queue",
          signal: stop,
          onQueued: (position, guard) => {
            onQueued?.(position, guard);
            heard(position, guard);
          },
        }),
      signal,
    );
  }

  // --- operators ----------------------------------------------------------------------------

  /** Let a FAILED guard (or one the policy holds) be acquired exactly once more. Not retried. */
  async approveRetry(taskKey: string, options: { approver?: string; reason?: string } = {}): Promise<Guard> {
    const request = { taskKey, approver: options.approver ?? this.holder, reason: options.reason ?? "" };
    return guardFromWire((await this.#unary(this.#stub.approveRetry, request, false)).guard);
  }

  /** End a RUNNING guard's run as CANCELLED; its holder's lease stops working. Not retried. */
  async forceRelease(taskKey: string, options: { operator?: string; reason?: string } = {}): Promise<Guard> {
    const request = { taskKey, operator: options.operator ?? this.holder, reason: options.reason ?? "" };
    return guardFromWire((await this.#unary(this.#stub.forceRelease, request, false)).guard);
  }

  // --- the connection -----------------------------------------------------------------------

  /** The channel's state; `connect` makes an IDLE channel start connecting, as a call would. */
  connectivity(connect = false): Connectivity {
    return connectivity(this.#stub, connect);
  }

  /** True once the channel's state is no longer `from`; false when `deadline` (epoch ms) comes first or it is closed. */
  connectivityChanged(from: Connectivity, deadline: number): Promise<boolean> {
    return connectivityChanged(this.#stub, from, deadline);
  }

  /**
   * Ask the sidecar's grpc.health.v1 service about the whole server (or `service`). Not retried: an
   * unreachable sidecar throws UnavailableError, a silent one DeadlineExceededError at `deadline` (epoch ms;
   * default: the client's deadline from now).
   */
  async health(options: { service?: string; deadline?: number } = {}): Promise<HealthStatus> {
    const metadata = await this.#metadata();
    const deadline = options.deadline ?? Date.now() + this.deadlineMs;
    return checkHealth(this.#stub, metadata, options.service ?? "", deadline);
  }

  // --- reads --------------------------------------------------------------------------------

  /** The guard of `taskKey`; NotFoundError when no run ever acquired it. */
  async get(taskKey: string): Promise<Guard> {
    return guardFromWire(await this.#unary(this.#stub.getGuard, { taskKey }, true));
  }

  /** Every matching guard, in task key order, fetching page after page as the iteration goes. */
  async *list(options: ListOptions = {}): AsyncGenerator<Guard, void, undefined> {
    let pageToken = "";
    do {
      const page = await this.#unary(this.#stub.listGuards, listRequest(options, pageToken), true);
      for (const guard of page.guards) {
        yield guardFromWire(guard);
      }
      pageToken = page.nextPageToken;
    } while (pageToken);
  }

  /** Whether the run with `fencingToken` still holds `taskKey`'s guard. */
  async checkFence(taskKey: string, fencingToken: number): Promise<FenceCheck> {
    return fenceFromWire(await this.#unary(this.#stub.checkFence, { taskKey, fencingToken }, true));
  }

  /**
   * Guard events as they are committed. After UNAVAILABLE, a dropped
   * connection or RESOURCE_EXHAUSTED (fell behind), it reconnects by itself
   * from the revision after the last one it yielded, and never yields a
   * revision twice. Throws OutOfRangeError when that revision is older than
   * the sidecar's history. Runs until the loop breaks or `signal` aborts.
   *
   * A watch that starts "from now" and breaks before its first event resumes
   * "from now" again (there is no revision to resume from); one broken during
   * its snapshot takes a new snapshot and yields only the guards that are new
   * or changed.
   */
  async *watch(options: WatchOptions = {}): AsyncGenerator<GuardEvent, void, undefined> {
    yield* watchGuards(this.#stub, () => this.#metadata(), options);
  }

  // --- plumbing -----------------------------------------------------------------------------

  #metadata(): Promise<grpc.Metadata> {
    return callMetadata(this.#token);
  }

  /** One unary call under one deadline (epoch ms); `safe` calls are retried with backoff while UNAVAILABLE. */
  async #unary<Req, Res>(
    method: UnaryMethod<Req, Res>,
    request: Req,
    safe: boolean,
    deadline = Date.now() + this.deadlineMs,
  ): Promise<Res> {
    return unaryCall(this.#stub, method, request, await this.#metadata(), safe, deadline);
  }
}
