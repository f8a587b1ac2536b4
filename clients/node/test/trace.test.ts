import assert from "node:assert/strict";
import { AsyncLocalStorage } from "node:async_hooks";
import { randomBytes } from "node:crypto";
import { after, before, describe, test } from "node:test";
import {
  type Context,
  type ContextManager,
  ROOT_CONTEXT,
  type TextMapPropagator,
  TraceFlags,
  context,
  propagation,
  trace,
} from "@opentelemetry/api";
import { Client } from "taskguard-sidecar-client";
import { Sidecar, freshKey, within } from "./support.ts";

/** What an OTel SDK would register; small enough to write here rather than install one. */
class AsyncLocalContextManager implements ContextManager {
  readonly #storage = new AsyncLocalStorage<Context>();
  active(): Context {
    return this.#storage.getStore() ?? ROOT_CONTEXT;
  }
  with<A extends unknown[], F extends (...args: A) => ReturnType<F>>(
    context: Context,
    fn: F,
    thisArg?: ThisParameterType<F>,
    ...args: A
  ): ReturnType<F> {
    return this.#storage.run(context, () => fn.call(thisArg, ...args));
  }
  bind<T>(_context: Context, target: T): T {
    return target;
  }
  enable(): this {
    return this;
  }
  disable(): this {
    this.#storage.disable();
    return this;
  }
}

const traceparent: TextMapPropagator = {
  inject(active, carrier, setter) {
    const span = trace.getSpanContext(active);
    if (span !== undefined) {
      setter.set(carrier, "traceparent", `00-${span.traceId}-${span.spanId}-0${span.traceFlags}`);
    }
  },
  extract: (active) => active,
  fields: () => ["traceparent"],
};

let sidecar: Sidecar;
let client: Client;

before(async () => {
  context.setGlobalContextManager(new AsyncLocalContextManager());
  propagation.setGlobalPropagator(traceparent);
  // Spans printed to stdout, exported every 50 ms instead of every 5 s.
  sidecar = await Sidecar.start(["--telemetry-console"], { OTEL_BSP_SCHEDULE_DELAY: "50" });
  client = new Client({ address: sidecar.address });
});

after(async () => {
  client?.close();
  await sidecar?.stop();
  context.disable();
  propagation.disable();
});

describe("trace context", () => {
  test("the caller's span becomes the parent of the sidecar's span when @opentelemetry/api is present", async () => {
    const caller = {
      traceId: randomBytes(16).toString("hex"),
      spanId: randomBytes(8).toString("hex"),
      traceFlags: TraceFlags.SAMPLED,
    };
    const key = freshKey();
    await context.with(trace.setSpanContext(ROOT_CONTEXT, caller), () => client.acquire(key));
    await within(sidecar.waitFor(`"parent_id": "0x${caller.spanId}"`), "the sidecar's span for the acquire");
    assert.match(sidecar.stdout, new RegExp(`"trace_id": "0x${caller.traceId}"`));
  });
});
