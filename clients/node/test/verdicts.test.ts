/**
 * The sans-I/O parts of the client, without a sidecar: the verdicts on Hold answers, the retry verdict,
 * the watch position that keeps a resumed watch from yielding an event twice, and the runs of a snapshot.
 */

import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { acquisitionVerdict, resumeVerdict } from "../src/answers.ts";
import { guardFromWire } from "../src/conversions.ts";
import {
  AlreadyRunning,
  DeadlineExceededError,
  LeaseLostError,
  LockDelayed,
  NotFoundError,
  RetryRequiresApproval,
  UnavailableError,
} from "../src/errors.ts";
import * as pb from "../src/generated/taskguard/v1/taskguard.ts";
import { TIMED_OUT, retryPause } from "../src/retry.ts";
import { WatchPosition } from "../src/watch.ts";

const unavailable = new UnavailableError(14, "the sidecar is restarting");
const notFound = new NotFoundError(5, "resume.lease_id: no such lease");

function guard(revision: number, taskKey = "s::t"): pb.Guard {
  return pb.Guard.fromPartial({ taskKey, runId: "r1", state: "GUARD_STATE_RUNNING", revision });
}

function reply(outcome: pb.AcquireOutcome): pb.HoldResponse {
  return pb.HoldResponse.fromPartial({ outcome, guard: guard(1), leaseId: "lease", event: "HOLD_EVENT_UNSPECIFIED" });
}

function event(type: pb.GuardEventType, revision: number, taskKey = "s::t"): pb.GuardEvent {
  return pb.GuardEvent.fromPartial({ type, revision, guard: guard(revision, taskKey) });
}

describe("verdicts", () => {
  const far = Date.now() + 60_000;
  const acquisition = { taskKey: "s::t", onConflict: "raise" as const, attempt: 1, deadline: far, deadlineMs: 10 };

  test("an acquisition is held, joined, refused, retried or failed by its answer", () => {
    assert.equal(acquisitionVerdict(reply("ACQUIRE_OUTCOME_ACQUIRED"), acquisition).do, "hold");
    const refused = acquisitionVerdict(reply("ACQUIRE_OUTCOME_ALREADY_RUNNING"), acquisition);
    assert.ok(refused.do === "refuse" && refused.raise && refused.conflict.error instanceof AlreadyRunning);
    const joined = acquisitionVerdict(reply("ACQUIRE_OUTCOME_ALREADY_RUNNING"), { ...acquisition, onConflict: "join" });
    assert.equal(joined.do, "join");
    // There is no run to wait for: a join returns a RETRY_REQUIRES_APPROVAL conflict at once.
    const approval = acquisitionVerdict(reply("ACQUIRE_OUTCOME_RETRY_REQUIRES_APPROVAL"), {
      ...acquisition,
      onConflict: "join",
    });
    assert.ok(approval.do === "refuse" && !approval.raise && approval.conflict.error instanceof RetryRequiresApproval);
    assert.equal(acquisitionVerdict({ end: true, error: unavailable }, acquisition).do, "retry");
    const late = acquisitionVerdict({ end: true, error: unavailable }, { ...acquisition, deadline: Date.now() });
    assert.ok(late.do === "fail" && late.error === unavailable && !late.cancel);
    const silent = acquisitionVerdict(TIMED_OUT, acquisition);
    assert.ok(silent.do === "fail" && silent.error instanceof DeadlineExceededError && silent.cancel);
  });

  test("a lock-delayed acquisition is refused with LockDelayed, naming when the key opens, even when asked to join", () => {
    const opens = new Date("2026-12-03T10:00:30Z");
    const delayed: pb.HoldResponse = {
      ...reply("ACQUIRE_OUTCOME_LOCK_DELAYED"),
      guard: pb.Guard.fromPartial({ taskKey: "s::t", runId: "r1", state: "GUARD_STATE_ABANDONED", lockDelayUntil: opens }),
    };
    for (const onConflict of ["raise", "join"] as const) {
      const refused = acquisitionVerdict(delayed, { ...acquisition, onConflict });
      assert.ok(refused.do === "refuse" && refused.conflict.outcome === "LOCK_DELAYED");
      assert.ok(refused.conflict.error instanceof LockDelayed);
      assert.deepEqual(refused.conflict.error.until, opens);
      assert.match(refused.conflict.error.message, /lock-delay holds it closed; the key opens at 2026-12-03T10:00:30.000Z/);
    }
  });

  test("a resume is held, lost, or tried again", () => {
    assert.equal(resumeVerdict(reply("ACQUIRE_OUTCOME_ACQUIRED")).do, "hold");
    assert.deepEqual(resumeVerdict({ end: true, error: unavailable }), { do: "retry", error: unavailable });
    assert.deepEqual(resumeVerdict(TIMED_OUT), { do: "retry", error: undefined });
    const gone = resumeVerdict({ end: true, error: notFound });
    assert.deepEqual(gone, { do: "lose", why: notFound.message, error: notFound });
    const other = resumeVerdict(reply("ACQUIRE_OUTCOME_ALREADY_RUNNING"));
    const why = "the sidecar answered ACQUIRE_OUTCOME_ALREADY_RUNNING";
    assert.deepEqual(other, { do: "lose", why, error: undefined });
  });

  test("only UNAVAILABLE is retried, and only while the pause ends before the deadline", () => {
    assert.ok((retryPause(unavailable, 1, far) ?? 0) > 0);
    assert.equal(retryPause(unavailable, 1, Date.now()), undefined);
    assert.equal(retryPause(new LeaseLostError(9, "lease_id: lease lost"), 1, far), undefined);
    assert.equal(retryPause(undefined, 1, far), undefined);
  });
});

describe("the watch position", () => {
  test("after a break it asks from the revision after the last one yielded, and skips what came before", () => {
    const position = new WatchPosition({ keyPrefix: "s::" });
    assert.deepEqual(position.request(), { keyPrefix: "s::", startRevision: 0, includeSnapshot: false });
    assert.equal(position.admit(event("GUARD_EVENT_TYPE_ACQUIRED", 7)), true);
    assert.deepEqual(position.request(), { keyPrefix: "s::", startRevision: 8, includeSnapshot: false });
    assert.equal(position.admit(event("GUARD_EVENT_TYPE_RENEWED", 7)), false);
    assert.equal(position.admit(event("GUARD_EVENT_TYPE_RELEASED", 8)), true);
  });

  test("a snapshot broken halfway is taken again, yielding only the guards that are new or changed", () => {
    const position = new WatchPosition({ includeSnapshot: true });
    assert.equal(position.admit(event("GUARD_EVENT_TYPE_SNAPSHOT", 5, "a::t")), true);
    assert.deepEqual(position.request(), { keyPrefix: "", startRevision: 0, includeSnapshot: true });
    assert.equal(position.admit(event("GUARD_EVENT_TYPE_SNAPSHOT", 5, "a::t")), false);
    assert.equal(position.admit(event("GUARD_EVENT_TYPE_SNAPSHOT", 6, "b::t")), true);
    assert.equal(position.admit(event("GUARD_EVENT_TYPE_ACQUIRED", 6)), false); // the snapshot already covered it
    assert.equal(position.admit(event("GUARD_EVENT_TYPE_ACQUIRED", 7)), true);
    assert.deepEqual(position.request(), { keyPrefix: "", startRevision: 8, includeSnapshot: false });
  });
});

describe("the runs of a snapshot", () => {
  const started = new Date("2026-12-04T10:00:00Z");
  const other = pb.Holder.fromPartial({ runId: "r0", holder: "h0", fencingToken: 1, attempt: 1, startedAt: started });

  test("a running key's runs are its holders, oldest first, and its own run last", () => {
    const wire = { taskKey: "s::t", runId: "r1", fencingToken: 2, state: "GUARD_STATE_RUNNING" as const };
    const running = guardFromWire(pb.Guard.fromPartial({ ...wire, holders: [other] }));
    assert.deepEqual(
      running.runs.map((run) => [run.runId, run.fencingToken]),
      [
        ["r0", 1],
        ["r1", 2],
      ],
    );
    assert.deepEqual(running.runs[0], running.holders[0]);
    const error = new AlreadyRunning(running);
    assert.equal(
      error.message,
      "s::t is already running as often as it may at once: run r0 (fencing token 1), run r1 (fencing token 2)",
    );
  });

  test("a failed run that speaks for the key is not one of its runs; the others are", () => {
    const failed = guardFromWire(
      pb.Guard.fromPartial({ taskKey: "s::t", runId: "r1", state: "GUARD_STATE_FAILED", holders: [other] }),
    );
    assert.deepEqual(
      failed.runs.map((run) => run.runId),
      ["r0"],
    );
    assert.deepEqual(guardFromWire(pb.Guard.fromPartial({ state: "GUARD_STATE_SUCCEEDED" })).runs, []);
  });

  test("a policy from a sidecar older than semaphores (max_holders unset) allows one holder", () => {
    const policy = (maxHolders: number) =>
      guardFromWire(pb.Guard.fromPartial({ taskKey: "s::t", policy: pb.KeyPolicy.fromPartial({ maxHolders }) })).policy;
    assert.equal(policy(0)?.maxHolders, 1);
    assert.equal(policy(4)?.maxHolders, 4);
  });
});
