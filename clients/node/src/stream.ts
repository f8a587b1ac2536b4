/**
 * One Hold stream, read as a queue of its answers and then its end. Knows nothing of leases: lease.ts and
 * hold.ts decide what the answers mean (through the verdicts of answers.ts).
 */

import type * as grpc from "@grpc/grpc-js";
import { type TaskGuardError, fromCallError } from "./errors.ts";
import type * as pb from "./generated/taskguard/v1/taskguard.ts";
import { TIMED_OUT } from "./retry.ts";

type HoldStream = grpc.ClientDuplexStream<pb.HoldRequest, pb.HoldResponse>;

export interface StreamEnd {
  end: true;
  /** Undefined when the stream ended with OK. */
  error: TaskGuardError | undefined;
}

/**
 * One Hold call, read as a queue: `next()` gives messages in order and then
 * how the stream ended. Reading through the stream's async iterator yields
 * every buffered message before the call's error, which grpc-js's events
 * alone do not promise (it emits "error" as soon as the status arrives).
 */
export class HoldCall {
  readonly #call: HoldStream;
  readonly #queue: (pb.HoldResponse | StreamEnd)[] = [];
  #wake: (() => void) | undefined;
  #ended = false;

  constructor(call: HoldStream) {
    this.#call = call;
    void this.#pump();
  }

  async #pump(): Promise<void> {
    let end: StreamEnd = { end: true, error: undefined };
    try {
      for await (const message of this.#call) {
        this.#push(message as pb.HoldResponse);
      }
    } catch (error) {
      end = { end: true, error: fromCallError(error) };
    }
    this.#ended = true;
    this.#push(end);
  }

  #push(item: pb.HoldResponse | StreamEnd): void {
    this.#queue.push(item);
    this.#wake?.();
  }

  /** The next message or the end; `TIMED_OUT` when nothing came before `deadline` (epoch ms). */
  async next(deadline?: number): Promise<pb.HoldResponse | StreamEnd | typeof TIMED_OUT> {
    for (;;) {
      const item = this.#queue.shift();
      if (item !== undefined) {
        if ("end" in item) {
          this.#queue.unshift(item); // the end stays the answer to every later call
        }
        return item;
      }
      const left = deadline === undefined ? undefined : deadline - Date.now();
      if (left !== undefined && left <= 0) {
        return TIMED_OUT;
      }
      await new Promise<void>((resolve) => {
        const timer = left === undefined ? undefined : setTimeout(resolve, left);
        this.#wake = () => {
          clearTimeout(timer);
          this.#wake = undefined;
          resolve();
        };
      });
    }
  }

  send(request: pb.HoldRequest): void {
    if (this.#ended || this.#call.writableEnded || this.#call.destroyed) {
      return; // the end is already queued; the reader learns it there
    }
    this.#call.write(request, () => {});
  }

  cancel(): void {
    this.#call.cancel();
  }
}
