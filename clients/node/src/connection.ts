/**
 * The channel to the sidecar: its options, its state, and the sidecar's health service. One grpc-js
 * channel carries every call and stream of a client.
 */

import * as grpc from "@grpc/grpc-js";
import { fromCallError } from "./errors.ts";
import * as pb from "./generated/taskguard/v1/taskguard.ts";
import { HEALTH_CHECK, decodeHealthCheckResponse, encodeHealthCheckRequest } from "./health.ts";
import type { Connectivity, HealthStatus } from "./models.ts";

const CHANNEL_OPTIONS: grpc.ChannelOptions = {
  // Notice a dead peer on a connection that carries only a quiet Hold stream (the sidecar allows pings every 5 s).
  "grpc.keepalive_time_ms": 10_000,
  "grpc.keepalive_timeout_ms": 5_000,
  "grpc.keepalive_permit_without_calls": 1,
  // The sidecar is local: reconnect quickly after it restarts rather than after grpc's default 1 s+. While the
  // channel waits out its backoff, calls fail at once, so the cap stays well inside the retries' backoff.
  "grpc.initial_reconnect_backoff_ms": 100,
  "grpc.max_reconnect_backoff_ms": 250,
};

const CONNECTIVITY: readonly Connectivity[] = ["IDLE", "CONNECTING", "READY", "TRANSIENT_FAILURE", "SHUTDOWN"];

/** The stub (and its channel) for `address`; `channelOptions` override the client's own. */
export function openChannel(address: string, channelOptions: grpc.ChannelOptions | undefined): pb.TaskGuardClient {
  return new pb.TaskGuardClient(address, grpc.credentials.createInsecure(), {
    ...CHANNEL_OPTIONS,
    ...channelOptions,
  });
}

/** The channel's state; `connect` makes an IDLE channel start connecting, as a call would. */
export function connectivity(stub: grpc.Client, connect: boolean): Connectivity {
  return CONNECTIVITY[stub.getChannel().getConnectivityState(connect)] ?? "SHUTDOWN";
}

/** True once the channel's state is no longer `from`; false when `deadline` (epoch ms) comes first or it is closed. */
export function connectivityChanged(stub: grpc.Client, from: Connectivity, deadline: number): Promise<boolean> {
  return new Promise((resolve) => {
    try {
      stub
        .getChannel()
        .watchConnectivityState(grpc.connectivityState[from], deadline, (error) => resolve(error === undefined));
    } catch {
      resolve(false); // the channel is closed
    }
  });
}

/** One grpc.health.v1 Check, not retried; a failure is the typed error of its status. */
export async function checkHealth(
  stub: grpc.Client,
  metadata: grpc.Metadata,
  service: string,
  deadline: number,
): Promise<HealthStatus> {
  try {
    return await new Promise<HealthStatus>((resolve, reject) => {
      stub.makeUnaryRequest(
        HEALTH_CHECK,
        (service: string) => encodeHealthCheckRequest(service),
        (bytes: Buffer) => decodeHealthCheckResponse(bytes),
        service,
        metadata,
        { deadline },
        (error, answer) => (error ? reject(error) : resolve(answer ?? "UNKNOWN")),
      );
    });
  } catch (error) {
    throw fromCallError(error);
  }
}
