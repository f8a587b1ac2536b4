/**
 * grpc.health.v1 by hand: two one-field messages do not need generated code. Encoding and decoding only;
 * connection.ts makes the call.
 */

import { protocolError } from "./errors.ts";
import type { HealthStatus } from "./models.ts";

export const HEALTH_CHECK = "/grpc.health.v1.Health/Check";
const HEALTH_STATUSES: readonly HealthStatus[] = ["UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"];

/** HealthCheckRequest { string service = 1; } */
export function encodeHealthCheckRequest(service: string): Buffer {
  const bytes = Buffer.from(service, "utf8");
  if (bytes.length === 0) {
    return Buffer.alloc(0);
  }
  const length: number[] = [];
  for (let left = bytes.length; ; left >>>= 7) {
    if (left < 0x80) {
      length.push(left);
      break;
    }
    length.push((left & 0x7f) | 0x80);
  }
  return Buffer.concat([Buffer.from([0x0a, ...length]), bytes]);
}

/** HealthCheckResponse { ServingStatus status = 1; }: the status, skipping any field it does not know. */
export function decodeHealthCheckResponse(bytes: Buffer): HealthStatus {
  let status = 0;
  let at = 0;
  const varint = (): number => {
    let value = 0;
    for (let shift = 0; at < bytes.length && shift < 35; shift += 7) {
      const byte = bytes[at++] ?? 0;
      value += (byte & 0x7f) * 2 ** shift;
      if (byte < 0x80) break;
    }
    return value;
  };
  while (at < bytes.length) {
    const tag = varint();
    const wireType = tag & 7;
    if (tag >>> 3 === 1 && wireType === 0) {
      status = varint();
    } else if (wireType === 0) {
      varint();
    } else if (wireType === 2) {
      at += varint();
    } else if (wireType === 1) {
      at += 8;
    } else if (wireType === 5) {
      at += 4;
    } else {
      throw protocolError(`the health check answer has a field of wire type ${wireType}`);
    }
  }
  return HEALTH_STATUSES[status] ?? "UNKNOWN";
}
