import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  AlreadyRunning,
  CancelledError,
  Client,
  Lease,
  LeaseLostError,
  RetryRequiresApproval,
  type GuardEvent,
} from "taskguard-sidecar-client";
import { Sidecar, freshKey, within } from "./support.ts";

let sidecar: Sidecar;
let client: Client;

before(async () => {
  sidecar = await Sidecar.start();
  client = new Client({ address: sidecar.address, holder: "node-tests" });
});

after(async () => {
  client?.close();
  await sidecar?.stop();
});

/** The first event on `taskKey` that satisfies `done`, from `startRevision` on. */
async function firstEvent(
  taskKey: string,
  startRevision: number,
  done: (event: GuardEvent) => boolean,
): Promise<GuardEvent> {
  return within(
    (async () => {
      for await (const event of client.watch({ keyPrefix: taskKey, startRevision })) {
        if (event.guard.taskKey === taskKey && done(event)) return event;
      }
      throw new Error("the watch ended");
    })(),
    `an event on ${taskKey}`,
  );
}

describe("hold", () => {
  test("hold runs the function while holding the guard and releases SUCCEEDED", async () => {
    const key = freshKey();
    const result = await client.hold(key, { labels: { channel: "discord" } }, async (lease) => {
      assert.equal(lease.taskKey, key);
      assert.ok(lease.leaseId);
      assert.ok(lease.startedAt instanceof Date);
      assert.ok(lease.fencingToken >= 1);
      const during = await client.get(key);
      assert.equal(during.state, "RUNNING");
      assert.equal(during.runId, lease.runId);
      assert.equal(during.holder, "node-tests");
      assert.deepEqual(during.labels, { channel: "discord" });
      assert.ok(during.streamBound);
      return 42;
    });
    assert.equal(result, 42);
    const guard = await client.get(key);
    assert.equal(guard.state, "SUCCEEDED");
    assert.equal(guard.lastStatus, "SUCCEEDED");
  });

  test("hold releases FAILED with the error's message when the function throws, and rethrows it", async () => {
    const key = freshKey();
    const boom = new Error("exit status 2: disk full");
    await assert.rejects(
      client.hold(key, {}, () => {
        throw boom;
      }),
      (error) => error === boom,
    );
    const guard = await client.get(key);
    assert.equal(guard.state, "FAILED");
    assert.equal(guard.lastStatus, "FAILED");
    assert.equal(guard.lastDetail, "exit status 2: disk full");
    // A failed task is never retried without an approval.
    await assert.rejects(client.hold(key, {}, () => "again"), RetryRequiresApproval);
  });

  test("a multi-line error message or one with escape sequences still releases FAILED, on one inert line", async () => {
    const key = freshKey();
    const boom = new Error("exit status 2\n  at step\u001b[2J\u009b");
    await assert.rejects(
      client.hold(key, {}, () => {
        throw boom;
      }),
      (error) => error === boom,
    );
    const guard = await client.get(key);
    assert.equal(guard.state, "FAILED");
    assert.equal(guard.lastDetail, "exit status 2   at step\\x1b[2J\\x9b");
  });

  test("a second holder gets AlreadyRunning with the winner's run, start, holder and fencing token", async () => {
    const key = freshKey();
    const winner = await client.openHold(key, { runId: "winner-run", holder: "gateway-a" });
    try {
      const ran: string[] = [];
      const error = await client
        .hold(key, { runId: "late-run", holder: "cron" }, () => ran.push("duplicate"))
        .then(
          () => assert.fail("a duplicate ran"),
          (thrown: unknown) => thrown,
        );
      assert.ok(error instanceof AlreadyRunning, String(error));
      assert.deepEqual(ran, []);
      assert.equal(error.taskKey, key);
      assert.equal(error.runId, "winner-run");
      assert.equal(error.holder, "gateway-a");
      assert.equal(error.fencingToken, winner.fencingToken);
      assert.equal(error.startedAt.getTime(), winner.startedAt.getTime());
      assert.equal(error.guard.state, "RUNNING");
      assert.match(error.message, /already running: run winner-run, started .* by gateway-a \(fencing token \d+\)/);
    } finally {
      await winner.release("SUCCEEDED");
    }
  });

  test('onConflict "return" gives the refusal as a value and does not run the function', async () => {
    const key = freshKey();
    const winner = await client.openHold(key, { runId: "winner-run" });
    try {
      const outcome = await client.hold(key, { onConflict: "return" }, () => "ran");
      assert.notEqual(outcome, "ran");
      assert.ok(typeof outcome === "object" && outcome.outcome === "ALREADY_RUNNING");
      assert.equal(outcome.guard.runId, "winner-run");
      assert.equal(outcome.joined, false);
      assert.ok(outcome.error instanceof AlreadyRunning);
    } finally {
      await winner.release();
    }
  });

  test('onConflict "join" waits for the winner and returns its final guard', async () => {
    const key = freshKey();
    const winner = await client.openHold(key, { runId: "winner-run" });
    const joined = client.openHold(key, { onConflict: "join", runId: "dup-run" });
    // The join is registered once the sidecar counted the refused duplicate.
    await firstEvent(key, winner.guard.revision, (event) => event.type === "DUPLICATE_REFUSED");
    const released = await winner.release("FAILED", "exit 3");
    const outcome = await within(joined, "the joined hold to hear the winner finish");
    assert.ok(!(outcome instanceof Lease));
    assert.equal(outcome.outcome, "ALREADY_RUNNING");
    assert.equal(outcome.joined, true);
    assert.equal(outcome.guard.runId, "winner-run");
    assert.equal(outcome.guard.state, "FAILED");
    assert.equal(outcome.guard.lastDetail, "exit 3");
    assert.equal(outcome.guard.fencingToken, released.fencingToken);
  });

  test("a joined hold stops waiting when its signal aborts", async () => {
    const key = freshKey();
    const winner = await client.openHold(key);
    const stop = new AbortController();
    const joined = client.openHold(key, { onConflict: "join", signal: stop.signal });
    await firstEvent(key, winner.guard.revision, (event) => event.type === "DUPLICATE_REFUSED");
    stop.abort();
    await assert.rejects(within(joined, "the join to stop"), CancelledError);
    await winner.release();
  });

  test("closing the client ends its leases: they are lost here and ABANDONED at the sidecar", async () => {
    const key = freshKey();
    const other = new Client({ address: sidecar.address });
    const lease = await other.openHold(key);
    other.close();
    assert.match((await within(lease.lost, "the lease to be lost")).message, /client was closed/);
    const abandoned = await firstEvent(key, lease.guard.revision, (event) => event.type === "ABANDONED");
    assert.equal(abandoned.guard.runId, lease.runId);
  });

  test("openHold holds across calls until release, and a second release answers the same", async () => {
    const key = freshKey();
    const lease = await client.openHold(key, { holder: "before-hook" });
    assert.equal((await client.checkFence(key, lease.fencingToken)).valid, true);
    await assert.rejects(client.openHold(key), AlreadyRunning);
    // ...later, in another callback:
    const guard = await lease.release("CANCELLED", "user stopped it");
    assert.equal(guard.state, "CANCELLED");
    assert.equal(guard.lastDetail, "user stopped it");
    assert.equal(lease.state, "released");
    assert.equal(await lease.release("CANCELLED", "again"), guard);
    assert.equal((await client.checkFence(key, lease.fencingToken)).valid, false);
  });

  test("a force-release loses the lease: lost resolves, signal aborts, release throws LeaseLostError", async () => {
    const key = freshKey();
    const lease = await client.openHold(key);
    await client.forceRelease(key, { operator: "ops", reason: "stuck" });
    const lost = await within(lease.lost, "the lease to be lost");
    assert.ok(lost instanceof LeaseLostError);
    assert.match(lost.message, /force-released by ops: stuck/);
    assert.equal(lost.guard?.state, "CANCELLED");
    assert.equal(lost.guard?.releasedBy, "ops");
    assert.ok(lease.signal.aborted);
    assert.equal(lease.signal.reason, lost);
    assert.equal(lease.state, "lost");
    await assert.rejects(lease.release(), LeaseLostError);
  });

  test("hold throws LeaseLostError when the guard is taken away while the function runs", async () => {
    const key = freshKey();
    await assert.rejects(
      client.hold(key, {}, async (lease) => {
        await client.forceRelease(key, { operator: "ops" });
        await within(lease.lost, "the lease to be lost");
        return "finished anyway";
      }),
      LeaseLostError,
    );
  });

  test("a hold with a TTL heartbeats by itself and outlives a lease that does not", async () => {
    const key = freshKey();
    const lease = await client.openHold(key, { ttlMs: 600 });
    // A unary lease with the same TTL that nobody renews marks the time: once it expired, so would an unbeaten hold.
    const control = await client.acquire(freshKey("control"), { ttlMs: 600 });
    await firstEvent(control.taskKey, control.guard.revision, (event) => event.type === "EXPIRED");
    assert.ok(Date.now() - lease.startedAt.getTime() > 600);
    assert.equal((await client.checkFence(key, lease.fencingToken)).valid, true);
    assert.ok(lease.guard.heartbeatAt.getTime() > lease.startedAt.getTime());
    assert.equal((await lease.release()).state, "SUCCEEDED");
  });
});
