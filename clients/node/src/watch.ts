/**
 * A resuming watch of guard events. `WatchPosition` is the pure part (what to ask for after a break, and
 * which events to yield so that none comes twice); `watchGuards` runs the streams.
 */

import { setTimeout as sleep } from "node:timers/promises";
import type * as grpc from "@grpc/grpc-js";
import { eventFromWire } from "./conversions.ts";
import { type TaskGuardError, fromCallError } from "./errors.ts";
import type * as pb from "./generated/taskguard/v1/taskguard.ts";
import type { GuardEvent, WatchOptions } from "./models.ts";
import { backoffMs, isResumable } from "./retry.ts";

/** Where a watch is: the revision to ask for next, and the guards its snapshot yielded so far. */
export class WatchPosition {
  readonly #keyPrefix: string;
  // The revision to ask for next; 0 asks for "from now", before anything was seen.
  #from: number;
  #snapshotting: boolean;
  readonly #snapshot = new Map<string, number>(); // task key -> revision of the guard yielded in the snapshot

  constructor(options: WatchOptions) {
    this.#keyPrefix = options.keyPrefix ?? "";
    this.#from = options.startRevision ?? 0;
    this.#snapshotting = options.includeSnapshot ?? false;
  }

  /** The request of the next stream: a new snapshot while the last one was not finished, else from `from`. */
  request(): pb.WatchGuardsRequest {
    return {
      keyPrefix: this.#keyPrefix,
      startRevision: this.#snapshotting ? 0 : this.#from,
      includeSnapshot: this.#snapshotting,
    };
  }

  /** Whether to yield `event`; when so, the position moves past it. */
  admit(event: pb.GuardEvent): boolean {
    if (event.type === "GUARD_EVENT_TYPE_SNAPSHOT") {
      const guard = event.guard;
      if (guard === undefined || this.#snapshot.get(guard.taskKey) === guard.revision) {
        return false; // yielded before the stream broke, and unchanged since
      }
      this.#snapshot.set(guard.taskKey, guard.revision);
      this.#from = Math.max(this.#from, event.revision + 1);
      return true;
    }
    if (this.#snapshotting) {
      this.#snapshotting = false;
      this.#snapshot.clear();
    }
    if (event.revision < this.#from) {
      return false;
    }
    this.#from = event.revision + 1;
    return true;
  }
}

/** `Client.watch`: streams one after another, each from where the last one broke, until `signal` aborts. */
export async function* watchGuards(
  stub: pb.TaskGuardClient,
  metadata: () => Promise<grpc.Metadata>,
  options: WatchOptions,
): AsyncGenerator<GuardEvent, void, undefined> {
  const { signal } = options;
  const position = new WatchPosition(options);
  let attempt = 0;
  while (!signal?.aborted) {
    // Batches: a busy sidecar sends many events a message, which is what lets a watcher keep up.
    const call = stub.watchGuardBatches(position.request(), await metadata());
    const stop = () => call.cancel();
    signal?.addEventListener("abort", stop, { once: true });
    if (signal?.aborted) {
      stop();
    }
    let failure: TaskGuardError | undefined;
    try {
      for await (const message of call) {
        attempt = 0;
        for (const event of (message as pb.GuardEventBatch).events) {
          if (position.admit(event)) {
            yield eventFromWire(event);
          }
        }
      }
    } catch (error) {
      failure = fromCallError(error);
    } finally {
      signal?.removeEventListener("abort", stop);
      call.cancel();
    }
    if (signal?.aborted) {
      return;
    }
    if (failure !== undefined && !isResumable(failure)) {
      throw failure;
    }
    attempt += 1;
    await sleep(backoffMs(attempt), undefined, { signal }).catch(() => {});
  }
}
