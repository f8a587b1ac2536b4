/**
 * How one call goes out: its metadata (the bearer token, and the caller's trace context when
 * @opentelemetry/api is installed) and, for unary calls, the attempts under one deadline with the retry
 * verdicts of retry.ts (the Python client's `_call.py`).
 */

import { setTimeout as sleep } from "node:timers/promises";
import * as grpc from "@grpc/grpc-js";
import { fromCallError } from "./errors.ts";
import { retryPause } from "./retry.ts";

/** The part of @opentelemetry/api we use, typed here so the package type-checks without that optional peer. */
interface OpenTelemetry {
  context: { active(): unknown };
  propagation: { inject(context: unknown, carrier: Record<string, string>): void };
}

// A variable, not a literal: TypeScript then does not look for the module's types.
const OPENTELEMETRY_API = "@opentelemetry/api";
let openTelemetry: Promise<OpenTelemetry | undefined> | undefined;

/** @opentelemetry/api is an optional peer: present, it carries the caller's trace context to the sidecar. */
function loadOpenTelemetry(): Promise<OpenTelemetry | undefined> {
  openTelemetry ??= (async () => {
    try {
      return (await import(OPENTELEMETRY_API)) as OpenTelemetry;
    } catch {
      return undefined; // not installed: no trace context to carry
    }
  })();
  return openTelemetry;
}

/** What every call sends: `authorization` when there is a token, and the active trace context. */
export async function callMetadata(token: string | undefined): Promise<grpc.Metadata> {
  const metadata = new grpc.Metadata();
  if (token) {
    metadata.set("authorization", `Bearer ${token}`);
  }
  const otel = await loadOpenTelemetry();
  if (otel !== undefined) {
    const carrier: Record<string, string> = {};
    otel.propagation.inject(otel.context.active(), carrier);
    for (const [key, value] of Object.entries(carrier)) {
      metadata.set(key, value);
    }
  }
  return metadata;
}

type Callback<Res> = (error: grpc.ServiceError | null, response: Res) => void;
export type UnaryMethod<Req, Res> = (
  request: Req,
  metadata: grpc.Metadata,
  options: Partial<grpc.CallOptions>,
  callback: Callback<Res>,
) => grpc.ClientUnaryCall;

/** One unary call under one deadline (epoch ms); `safe` calls are retried with backoff while UNAVAILABLE. */
export async function unaryCall<Req, Res>(
  stub: grpc.Client,
  method: UnaryMethod<Req, Res>,
  request: Req,
  metadata: grpc.Metadata,
  safe: boolean,
  deadline: number,
): Promise<Res> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await new Promise<Res>((resolve, reject) => {
        method.call(stub, request, metadata, { deadline }, (error, response) =>
          error ? reject(error) : resolve(response),
        );
      });
    } catch (error) {
      const failure = fromCallError(error);
      const pause = safe ? retryPause(failure, attempt, deadline) : undefined;
      if (pause === undefined) {
        throw failure;
      }
      await sleep(pause);
    }
  }
}
