/**
 * The conflict policies that wait for the key, against a real sidecar: "queue" (FIFO, positions, a bound),
 * "keep-newest" (a newer trigger replaces the waiting one), "supersede" (the running run is asked to stop), and
 * the wait's bounds (maxWaitMs, a full queue, the caller's signal).
 */

import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import {
  CancelledError,
  Client,
  type Guard,
  type GuardEvent,
  Lease,
  PermissionDeniedError,
  QueueFull,
  StopRequested,
  Superseded,
  WaitTimedOut,
} from "taskguard-sidecar-client";
import { Sidecar, freshKey, within } from "./support.ts";

let sidecar: Sidecar;
let client: Client;

// Keys named "::small" have a queue of one; "::redo" keys may be superseded (the default rule may not).
const RULES = `
[[rules]]
name = "small"
match = "*::small"
max_queue = 1

[[rules]]
name = "redo"
match = "*::redo"
allow_supersede = true
supersede_grace = "30s"
`;

before(async () => {
  sidecar = new Sidecar();
  const config = join(sidecar.workdir, "rules.toml");
  writeFileSync(config, RULES);
  sidecar.args.push("--config", config);
  await sidecar.start();
  client = new Client({ address: sidecar.address, holder: "node-tests" });
});

after(async () => {
  client?.close();
  await sidecar?.stop();
});

/** Places in line, as `onQueued` hears them, with a way to wait for the next one. */
class Places {
  readonly heard: { position: number; guard: Guard }[] = [];
  #wake: (() => void) | undefined;

  readonly onQueued = (position: number, guard: Guard): void => {
    this.heard.push({ position, guard });
    this.#wake?.();
  };

  /** Resolves once `position` was heard. */
  async reach(position: number): Promise<void> {
    while (!this.heard.some((place) => place.position === position)) {
      await new Promise<void>((resolve) => {
        this.#wake = resolve;
      });
    }
  }
}

/** The first event on `taskKey` that satisfies `done`. */
async function firstEvent(taskKey: string, done: (event: GuardEvent) => boolean): Promise<GuardEvent> {
  for await (const event of client.watch({ keyPrefix: taskKey, startRevision: 1 })) {
    if (done(event)) return event;
  }
  throw new Error("the watch ended");
}

describe("queue", () => {
  test("three holds of one key run one after another, in the order they queued, each told its place", async () => {
    const key = freshKey();
    const order: string[] = [];
    const first = await client.openHold(key);
    const second = new Places();
    const third = new Places();
    const run = (name: string, places: Places) =>
      client.hold(key, { onConflict: "queue", runId: `${name}-${first.runId}`, onQueued: places.onQueued }, (lease) => {
        order.push(name);
        return lease.fencingToken;
      });
    const b = run("b", second);
    await within(second.reach(1), "b queued at position 1");
    const c = run("c", third);
    await within(third.reach(2), "c queued at position 2");

    const queued = await client.get(key);
    assert.deepEqual(
      queued.waiters.map((waiter) => waiter.runId),
      [`b-${first.runId}`, `c-${first.runId}`],
    );
    assert.equal(second.heard[0]?.guard.runId, first.runId, "the guard a waiter hears is the run it waits for");

    await first.release();
    const [bToken, cToken] = await within(Promise.all([b, c]), "both queued holds");
    assert.deepEqual(order, ["b", "c"]);
    assert.ok(first.fencingToken < bToken && bToken < cToken);
    assert.deepEqual(
      third.heard.map((place) => place.position),
      [2, 1],
      "c moved up when b's turn came",
    );
    const done = await client.get(key);
    assert.equal(done.state, "SUCCEEDED");
    assert.deepEqual(done.waiters, []);
    const event = await within(
      firstEvent(key, (e) => e.type === "QUEUED"),
      "a QUEUED event",
    );
    assert.equal(event.waiterRunId, `b-${first.runId}`);
  });

  test("a unary acquire with onConflict queue waits for its turn", async () => {
    const key = freshKey();
    const first = await client.openHold(key);
    const watching = firstEvent(key, (e) => e.type === "QUEUED");
    const waiting = client.acquire(key, { onConflict: "queue" });
    await within(watching, "the unary waiter queued");
    await first.release();
    const acquired = await within(waiting, "the unary waiter's turn");
    assert.equal(acquired.outcome, "ACQUIRED");
    assert.ok(acquired.fencingToken > first.fencingToken);
    await client.release(acquired.leaseId, "SUCCEEDED");
  });

  test("maxWaitMs ends the wait with WaitTimedOut and the waiter leaves the queue", async () => {
    const key = freshKey();
    const first = await client.openHold(key);
    const began = performance.now();
    await assert.rejects(client.openHold(key, { onConflict: "queue", maxWaitMs: 300 }), (error) => {
      assert.ok(error instanceof WaitTimedOut, String(error));
      assert.equal(error.taskKey, key);
      assert.equal(error.runId, first.runId);
      return true;
    });
    assert.ok(performance.now() - began >= 250, "it waited about its max wait");
    assert.deepEqual((await client.get(key)).waiters, []);
    await first.release();
  });

  test("a full queue refuses with QueueFull, naming its length", async () => {
    const key = freshKey("small");
    const first = await client.openHold(key);
    const places = new Places();
    const waiting = client.openHold(key, { onConflict: "queue", onQueued: places.onQueued });
    await within(places.reach(1), "the first waiter queued");
    await assert.rejects(client.openHold(key, { onConflict: "queue" }), (error) => {
      assert.ok(error instanceof QueueFull, String(error));
      assert.equal(error.queueLength, 1);
      return true;
    });
    await first.release();
    const lease = await within(waiting, "the waiter's turn");
    assert.ok(lease instanceof Lease);
    await lease.release();
  });

  test("aborting the signal takes a waiter out of the queue with CancelledError", async () => {
    const key = freshKey();
    const first = await client.openHold(key);
    const places = new Places();
    const abort = new AbortController();
    const waiting = client.openHold(key, { onConflict: "queue", onQueued: places.onQueued, signal: abort.signal });
    await within(places.reach(1), "queued");
    const left = firstEvent(key, (e) => e.type === "DEQUEUED");
    abort.abort();
    await assert.rejects(waiting, CancelledError);
    await within(left, "the DEQUEUED event");
    assert.deepEqual((await client.get(key)).waiters, []);
    await first.release();
  });
});

describe("waitInLine", () => {
  test("yields each place in line, then the lease when the turn comes", async () => {
    const key = freshKey();
    const first = await client.openHold(key);
    const news: (number | string)[] = [];
    for await (const step of client.waitInLine(key)) {
      if (step.lease === undefined) {
        news.push(step.position);
        assert.equal(step.guard.runId, first.runId);
        await first.release();
        continue;
      }
      news.push("lease");
      assert.ok(step.lease.fencingToken > first.fencingToken);
      await step.lease.release();
    }
    assert.deepEqual(news, [1, "lease"]);
    assert.equal((await client.get(key)).state, "SUCCEEDED");
  });

  test("leaving the loop before the turn takes the caller out of the queue", async () => {
    const key = freshKey();
    const first = await client.openHold(key);
    const left = firstEvent(key, (e) => e.type === "DEQUEUED");
    for await (const step of client.waitInLine(key, { onConflict: "keep-newest" })) {
      assert.equal(step.position, 1);
      break;
    }
    await within(left, "the DEQUEUED event");
    assert.deepEqual((await client.get(key)).waiters, []);
    await first.release();
  });
});

describe("keep-newest", () => {
  test("a newer trigger replaces the waiting one, which is told Superseded by it; the newest runs", async () => {
    const key = freshKey();
    const first = await client.openHold(key);
    const older = new Places();
    const olderHold = client.openHold(key, { onConflict: "keep-newest", onQueued: older.onQueued });
    await within(older.reach(1), "the older trigger queued");
    const newer = new Places();
    const newerHold = client.openHold(key, { onConflict: "keep-newest", onQueued: newer.onQueued, runId: "newest" });
    await assert.rejects(olderHold, (error) => {
      assert.ok(error instanceof Superseded, String(error));
      assert.equal(error.by, "newest");
      assert.match(error.message, /superseded by run newest/);
      return true;
    });
    assert.deepEqual(
      newer.heard.map((place) => place.position),
      [1],
    );
    assert.deepEqual(
      (await client.get(key)).waiters.map((waiter) => [waiter.runId, waiter.keepNewest]),
      [["newest", true]],
    );
    await first.release();
    const lease = await within(newerHold, "the newest trigger's turn");
    assert.equal(lease.runId, "newest");
    await lease.release();
  });
});

describe("supersede", () => {
  test("the running run is asked to stop, releases CANCELLED, and the superseding run holds the key next", async () => {
    const key = freshKey("redo");
    let stopped: Guard | undefined;
    const old = client.hold(key, { runId: "old" }, async (lease) => {
      stopped = await lease.stopRequested;
      assert.equal(lease.stopRequestedBy, "new");
      assert.ok(lease.stopSignal.aborted);
      throw lease.stopSignal.reason;
    });
    await within(
      firstEvent(key, (e) => e.type === "ACQUIRED"),
      "the old run holding the key",
    );
    const places = new Places();
    const superseding = client.openHold(key, { onConflict: "supersede", runId: "new", onQueued: places.onQueued });
    await assert.rejects(within(old, "the old run to stop"), (error) => {
      assert.ok(error instanceof StopRequested, String(error));
      assert.equal(error.by, "new");
      return true;
    });
    assert.equal(stopped?.stopRequestedBy, "new");
    assert.ok(stopped?.stopAt instanceof Date, "the guard says when the old run is force-released");
    const lease = await within(superseding, "the superseding run's turn");
    assert.equal(lease.runId, "new");
    assert.deepEqual(
      places.heard.map((place) => place.position),
      [1],
    );
    const events: GuardEvent[] = [];
    for await (const event of client.watch({ keyPrefix: key, startRevision: 1 })) {
      events.push(event);
      if (event.type === "ACQUIRED" && event.guard.runId === "new") break;
    }
    const released = events.find((event) => event.type === "RELEASED");
    assert.equal(released?.guard.lastStatus, "CANCELLED");
    assert.ok(events.some((event) => event.type === "STOP_REQUESTED" && event.triggerRunId === "new"));
    await lease.release();
  });

  test("a unary holder asked to stop sees it on its next renew", async () => {
    const key = freshKey("redo");
    const old = await client.acquire(key, { ttlMs: 30_000 });
    const stopAsked = firstEvent(key, (e) => e.type === "STOP_REQUESTED");
    const superseding = client.openHold(key, { onConflict: "supersede", runId: `new-${old.runId}` });
    await within(stopAsked, "the STOP_REQUESTED event");
    const renewed = await client.renew(old.leaseId);
    assert.equal(renewed.stopRequestedBy, `new-${old.runId}`);
    assert.ok(renewed.stopAt instanceof Date);
    await client.release(old.leaseId, "CANCELLED", "superseded");
    const lease = await within(superseding, "the superseding run's turn");
    await lease.release();
  });

  test("where the key's rule does not allow it, supersede is refused with PermissionDeniedError", async () => {
    const key = freshKey();
    const first = await client.openHold(key);
    await assert.rejects(client.openHold(key, { onConflict: "supersede" }), PermissionDeniedError);
    assert.equal((await client.get(key)).stopRequestedBy, "");
    await first.release();
  });
});
