/**
 * Keys several runs may hold at once (a semaphore, the sidecar's `--max-holders`), against a real sidecar: each
 * run has its own lease and fencing token, a caller that finds every place taken is told all the runs in the way,
 * and each run renews and releases by itself while the others go on.
 */

import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { type Acquired, AlreadyRunning, Client, type Guard, type Holder, Lease } from "taskguard-sidecar-client";
import { Sidecar, freshKey } from "./support.ts";

let sidecar: Sidecar;
let client: Client;

// Every key may be held by three runs at once (the default rule), except those named "::one".
const RULES = `
[[rules]]
name = "one"
match = "*::one"
max_holders = 1
`;

before(async () => {
  sidecar = new Sidecar(["--max-holders", "3"]);
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

function runIds(runs: readonly Holder[]): string[] {
  return runs.map((run) => run.runId);
}

/** The AlreadyRunning that `attempt` rejects with. */
async function refusal(attempt: Promise<unknown>): Promise<AlreadyRunning> {
  const error = await attempt.then(
    () => assert.fail("the acquisition was not refused"),
    (thrown: unknown) => thrown,
  );
  assert.ok(error instanceof AlreadyRunning, `${String(error)}`);
  return error;
}

/** Every run holding `guard`'s key, by run id and fencing token. */
function tokens(guard: Guard): [string, number][] {
  return guard.runs.map((run) => [run.runId, run.fencingToken]);
}

describe("a key three runs may hold at once", () => {
  test("three acquisitions hold it together, each with its own lease and token; a fourth is told all three", async () => {
    const key = freshKey();
    const held: Acquired[] = [];
    for (const i of [0, 1, 2]) {
      held.push(await client.acquire(key, { runId: `run-${i}`, ttlMs: 60_000, labels: { n: String(i) } }));
    }
    assert.deepEqual(
      held.map((acquired) => acquired.fencingToken),
      [1, 2, 3],
    );
    assert.deepEqual(
      held.map((acquired) => acquired.runId),
      ["run-0", "run-1", "run-2"],
    );
    assert.equal(new Set(held.map((acquired) => acquired.leaseId)).size, 3);
    // The third acquisition's snapshot already lists the two before it, oldest first.
    assert.deepEqual(runIds(held[2]?.guard.holders ?? []), ["run-0", "run-1"]);

    const refused = await refusal(client.acquire(key, { runId: "run-3", ttlMs: 60_000 }));
    assert.equal(
      refused.message,
      `${key} is already running as often as it may at once: run run-0 (fencing token 1), ` +
        "run run-1 (fencing token 2), run run-2 (fencing token 3)",
    );
    assert.equal(refused.runId, "run-2", "the refusal's own facts are the newest run's");
    assert.deepEqual(tokens(refused.guard), [
      ["run-0", 1],
      ["run-1", 2],
      ["run-2", 3],
    ]);
    assert.deepEqual(runIds(refused.guard.holders), ["run-0", "run-1"]);
    const [oldest] = refused.guard.holders;
    assert.ok(oldest !== undefined);
    assert.equal(oldest.holder, "node-tests");
    assert.equal(oldest.attempt, 1);
    assert.deepEqual(oldest.labels, { n: "0" });
    assert.ok(oldest.startedAt instanceof Date && oldest.startedAt.getTime() > 0);
    assert.ok(oldest.expiresAt instanceof Date && oldest.expiresAt > oldest.startedAt);
    assert.equal(oldest.streamBound, false);
    assert.equal(oldest.stale, false);
    // "return" hands back the same refusal as a Conflict.
    const conflict = await client.acquire(key, { runId: "run-3", onConflict: "return" });
    assert.equal(conflict.outcome, "ALREADY_RUNNING");
    assert.deepEqual(runIds(conflict.guard.runs), ["run-0", "run-1", "run-2"]);
    assert.equal(conflict.error.message, refused.message);

    const guard = await client.get(key);
    assert.equal(guard.state, "RUNNING");
    assert.equal(guard.policy?.rule, "default");
    assert.equal(guard.policy?.maxHolders, 3);
    assert.equal(guard.runId, "run-2");
    assert.deepEqual(runIds(guard.holders), ["run-0", "run-1"]);
    assert.deepEqual(runIds(guard.runs), ["run-0", "run-1", "run-2"]);
    for (const acquired of held) {
      assert.equal((await client.checkFence(key, acquired.fencingToken)).valid, true);
    }

    // Each run renews by its own lease, and the answer is that run's.
    for (const [i, acquired] of held.entries()) {
      const renewed = await client.renew(acquired.leaseId, { ttlMs: 120_000 });
      assert.equal(renewed.runId, `run-${i}`);
      assert.equal(renewed.fencingToken, i + 1);
      assert.ok(renewed.expiresAt !== undefined && acquired.expiresAt !== undefined);
      assert.ok(renewed.expiresAt > acquired.expiresAt, `run-${i}'s lease was extended`);
    }

    // One run ends; the others go on holding the key, and its place is free for a new run.
    const [first, second, third] = held;
    assert.ok(first !== undefined && second !== undefined && third !== undefined);
    const released = await client.release(second.leaseId, "SUCCEEDED", "done");
    assert.equal(released.runId, "run-1");
    assert.equal(released.state, "SUCCEEDED");
    assert.equal((await client.checkFence(key, second.fencingToken)).valid, false);
    assert.equal((await client.checkFence(key, first.fencingToken)).valid, true);
    assert.deepEqual(runIds((await client.get(key)).runs), ["run-0", "run-2"]);

    const fourth = await client.acquire(key, { runId: "run-4", ttlMs: 60_000 });
    assert.equal(fourth.fencingToken, 4);
    assert.notEqual(fourth.leaseId, second.leaseId);
    assert.deepEqual(tokens(await client.get(key)), [
      ["run-0", 1],
      ["run-2", 3],
      ["run-4", 4],
    ]);
    await refusal(client.acquire(key, { runId: "run-5" }));

    for (const acquired of [third, first, fourth]) {
      assert.equal((await client.release(acquired.leaseId, "SUCCEEDED")).runId, acquired.runId);
    }
    const done = await client.get(key);
    assert.equal(done.state, "SUCCEEDED");
    assert.deepEqual(done.holders, []);
    assert.deepEqual(done.runs, []);
  });

  test("Hold streams share the key with a unary lease, and each is released by itself", async () => {
    const key = freshKey();
    const streamed: Lease[] = [];
    for (const runId of ["hold-0", "hold-1"]) {
      streamed.push(await client.openHold(key, { runId }));
    }
    assert.ok(streamed.every((lease) => lease instanceof Lease));
    assert.deepEqual(
      streamed.map((lease) => lease.fencingToken),
      [1, 2],
    );
    const unary = await client.acquire(key, { runId: "unary-2", ttlMs: 60_000 });
    assert.equal(unary.fencingToken, 3);

    const refused = await refusal(client.openHold(key, { runId: "hold-3" }));
    assert.deepEqual(tokens(refused.guard), [
      ["hold-0", 1],
      ["hold-1", 2],
      ["unary-2", 3],
    ]);
    assert.deepEqual(
      refused.guard.runs.map((run) => run.streamBound),
      [true, true, false],
    );

    const [zero, one] = streamed;
    assert.ok(zero !== undefined && one !== undefined);
    const released = await zero.release("FAILED", "exit 1");
    assert.equal(released.runId, "hold-0");
    assert.equal(zero.state, "released");
    assert.equal(one.state, "held");
    assert.equal((await client.checkFence(key, one.fencingToken)).valid, true);
    // The failed run speaks for the key (a new run needs an approval) while the other two go on.
    const failed = await client.get(key);
    assert.equal(failed.state, "FAILED");
    assert.equal(failed.runId, "hold-0");
    assert.deepEqual(runIds(failed.runs), ["hold-1", "unary-2"]);

    assert.equal((await one.release()).runId, "hold-1");
    assert.equal((await client.release(unary.leaseId, "SUCCEEDED")).runId, "unary-2");
  });
});

describe("a key one run may hold at a time", () => {
  test("its policy says 1, its one run is its runs, and the refusal names that run as before", async () => {
    const key = freshKey("one");
    const winner = await client.acquire(key, { runId: "only", ttlMs: 60_000 });
    const guard = await client.get(key);
    assert.equal(guard.policy?.rule, "one");
    assert.equal(guard.policy?.maxHolders, 1);
    assert.deepEqual(guard.holders, []);
    assert.deepEqual(tokens(guard), [["only", 1]]);

    const refused = await refusal(client.acquire(key, { runId: "second" }));
    assert.equal(
      refused.message,
      `${key} is already running: run only, started ${winner.startedAt.toISOString()} by node-tests (fencing token 1)`,
    );
    await client.release(winner.leaseId, "SUCCEEDED");
    assert.deepEqual((await client.get(key)).runs, []);
  });
});
