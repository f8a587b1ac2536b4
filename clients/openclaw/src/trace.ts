/**
 * OpenClaw's trace context on every call to the sidecar, as `traceparent`.
 *
 * The Node client forwards the active OpenTelemetry context when the process
 * has registered an OTel propagator; the gateway usually has not, and a plugin
 * should not register process-wide OTel globals behind its host's back. So the
 * plugin runs each hook's sidecar calls inside an AsyncLocalStorage scope that
 * holds `ctx.trace`, and a grpc-js client interceptor (passed to the client
 * through `channelOptions.interceptors`) writes it into the call's metadata.
 * Calls made outside a scope (a Hold stream's later resume) carry none.
 */

import { AsyncLocalStorage } from "node:async_hooks";
import type { InterceptingCall, Interceptor, Metadata } from "@grpc/grpc-js";

/** OpenClaw's `DiagnosticTraceContext`. */
export interface TraceContext {
  readonly traceId: string;
  readonly spanId?: string;
  readonly traceFlags?: string;
}

const current = new AsyncLocalStorage<string>();

/** W3C `traceparent` for a trace context, or undefined when it lacks a valid trace or span id. */
export function traceparentOf(trace: TraceContext | undefined): string | undefined {
  if (trace === undefined || !/^[0-9a-f]{32}$/.test(trace.traceId) || !/^[0-9a-f]{16}$/.test(trace.spanId ?? "")) {
    return undefined;
  }
  if (/^0+$/.test(trace.traceId) || /^0+$/.test(trace.spanId ?? "")) {
    return undefined;
  }
  const flags = /^[0-9a-f]{2}$/.test(trace.traceFlags ?? "") ? trace.traceFlags : "01";
  return `00-${trace.traceId}-${trace.spanId}-${flags}`;
}

/** Run `fn` so that the sidecar calls it starts carry `trace`. */
export function withTrace<T>(trace: TraceContext | undefined, fn: () => T): T {
  const traceparent = traceparentOf(trace);
  return traceparent === undefined ? fn() : current.run(traceparent, fn);
}

/** The grpc-js interceptor; it needs the InterceptingCall class of the grpc-js the client uses. */
export function traceInterceptor(InterceptingCallClass: typeof InterceptingCall): Interceptor {
  return (options, nextCall) =>
    new InterceptingCallClass(nextCall(options), {
      start(metadata: Metadata, listener, next) {
        const traceparent = current.getStore();
        if (traceparent !== undefined) {
          metadata.set("traceparent", traceparent);
          metadata.remove("tracestate"); // it belonged to whatever context the client found, not to this trace
        }
        next(metadata, listener);
      },
    });
}
