/**
 * Public values into wire requests, checked the way the sidecar would check them: pure functions, no I/O
 * (a fresh run id and the process's retry-secret key are the only state). Replies go the other way in
 * conversions.ts.
 */

import { createHmac, randomBytes, randomUUID } from "node:crypto";
import { RUN_STATUSES } from "./conversions.ts";
import { invalidArgument } from "./errors.ts";
import type * as pb from "./generated/taskguard/v1/taskguard.ts";
import type { AcquireOptions, ListOptions, OnConflict, QueueOptions, RunStatus } from "./models.ts";

const MAX_DETAIL_BYTES = 4096;

function toDuration(ms: number, field: string): { seconds: number; nanos: number } {
  if (!Number.isFinite(ms) || ms <= 0) {
    throw invalidArgument(field, "must be a number of milliseconds > 0");
  }
  const seconds = Math.floor(ms / 1000);
  return { seconds, nanos: Math.round((ms - seconds * 1000) * 1e6) };
}

export function runStatusToWire(status: RunStatus): pb.RunStatus {
  if (!RUN_STATUSES.includes(status)) {
    throw invalidArgument("status", `must be SUCCEEDED, FAILED or CANCELLED (got ${String(status)})`);
  }
  return `RUN_STATUS_${status}`;
}

/**
 * The sidecar takes at most 4096 bytes of detail and no control characters (C0, DEL, C1: a terminal would act
 * on them); a long or multi-line error message must not make the release fail. Line breaks become spaces, other
 * control characters `\xNN`.
 */
export function clipDetail(raw: string): string {
  const detail = raw
    .replace(/[\t\n\v\f\r]+/g, " ")
    .replace(/[\x00-\x1f\x7f-\x9f]/g, (char) => `\\x${char.charCodeAt(0).toString(16).padStart(2, "0")}`);
  const bytes = Buffer.from(detail, "utf8");
  if (bytes.length <= MAX_DETAIL_BYTES) {
    return detail;
  }
  // Cut on a character boundary: decoding a cut sequence would add U+FFFD, so drop back to a lead byte.
  let end = MAX_DETAIL_BYTES - 3;
  while (end > 0 && ((bytes[end] ?? 0) & 0xc0) === 0x80) {
    end -= 1;
  }
  return `${bytes.subarray(0, end).toString("utf8")}...`;
}

// Where the sidecar cannot tell callers apart (they share a token, or have none), it hands a run's lease
// back only to a retry that carries the same retrySecret as the run's first attempt. The secret is an
// HMAC of the key and run id under a key this process draws once: every attempt, and every later acquire
// of the same run id from this process, sends the same secret, and nobody else can compute it.
const RETRY_SECRET_KEY = randomBytes(32);

function retrySecret(taskKey: string, runId: string): string {
  return createHmac("sha256", RETRY_SECRET_KEY).update(`${taskKey}\0${runId}`).digest("base64url");
}

// What each policy asks the sidecar for ("raise" and "return" differ only in what the client does with a refusal).
const ON_CONFLICT_WIRE: Readonly<Record<OnConflict, pb.OnConflict>> = {
  raise: "ON_CONFLICT_REJECT",
  return: "ON_CONFLICT_REJECT",
  join: "ON_CONFLICT_JOIN",
  queue: "ON_CONFLICT_QUEUE",
  "keep-newest": "ON_CONFLICT_KEEP_NEWEST",
  supersede: "ON_CONFLICT_SUPERSEDE",
};

/** Whether a caller with this policy waits in the key's queue (and its refusals are thrown). */
export function waits(onConflict: OnConflict): boolean {
  return onConflict === "queue" || onConflict === "keep-newest" || onConflict === "supersede";
}

/**
 * An acquisition, made before the first attempt so that every retry names the same run (and carries the same
 * secret): a retry of an acquisition that did land gets its lease back instead of a conflict with itself (and
 * a retry of a queued one keeps its place).
 */
export function acquireRequest(
  taskKey: string,
  options: AcquireOptions & QueueOptions,
  onConflict: OnConflict,
  holder: string,
): pb.AcquireRequest {
  if (!Object.hasOwn(ON_CONFLICT_WIRE, onConflict)) {
    const known = Object.keys(ON_CONFLICT_WIRE).join(", ");
    throw invalidArgument("on_conflict", `must be one of ${known} (got ${String(onConflict)})`);
  }
  const runId = options.runId ?? randomUUID();
  return {
    taskKey,
    runId,
    retrySecret: retrySecret(taskKey, runId),
    holder: options.holder ?? holder,
    ttl: ttlToWire(options.ttlMs),
    labels: { ...options.labels },
    onConflict: ON_CONFLICT_WIRE[onConflict],
    maxWait: options.maxWaitMs === undefined ? undefined : toDuration(options.maxWaitMs, "max_wait"),
  };
}

/** A TTL the caller may leave unset (the sidecar's default, or none on a Hold stream). */
export function ttlToWire(ttlMs: number | undefined): pb.AcquireRequest["ttl"] {
  return ttlMs === undefined ? undefined : toDuration(ttlMs, "ttl");
}

export function releaseRequest(leaseId: string, status: RunStatus, detail: string): pb.ReleaseRequest {
  return { leaseId, status: runStatusToWire(status), detail };
}

/** One page of `list`; `pageToken` is "" for the first. */
export function listRequest(options: ListOptions, pageToken: string): pb.ListGuardsRequest {
  return {
    keyPrefix: options.keyPrefix ?? "",
    states: (options.states ?? []).map((state): pb.GuardState => `GUARD_STATE_${state}`),
    staleOnly: options.staleOnly ?? false,
    pageSize: options.pageSize ?? 0,
    pageToken,
  };
}
