import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { Client, UnavailableError } from "taskguard-sidecar-client";
import { Sidecar, freshKey, within } from "./support.ts";

let sidecar: Sidecar;
let client: Client;

before(async () => {
  sidecar = await Sidecar.start();
  client = new Client({ address: sidecar.address });
});

after(async () => {
  client?.close();
  await sidecar?.stop();
});

describe("a sidecar restart", () => {
  test("an open lease resumes on a new stream after a sidecar SIGKILL and keeps its fencing token", async () => {
    const key = freshKey();
    const lease = await client.openHold(key, { ttlMs: 5_000 });
    await sidecar.kill();
    await sidecar.start();
    // The sidecar records the re-attachment as a RESUMED event.
    const resumed = await within(
      (async () => {
        for await (const event of client.watch({ keyPrefix: key, startRevision: lease.guard.revision })) {
          if (event.type === "RESUMED") return event;
        }
        throw new Error("the watch ended");
      })(),
      "the lease to resume",
    );
    assert.equal(resumed.guard.runId, lease.runId);
    assert.equal(resumed.guard.fencingToken, lease.fencingToken);
    assert.equal((await client.checkFence(key, lease.fencingToken)).valid, true);
    const released = await lease.release("SUCCEEDED", "after the restart");
    assert.equal(released.state, "SUCCEEDED");
    assert.equal(lease.signal.aborted, false);
  });

  test("an acquire made while the sidecar is down is retried until it is back, as one run", async () => {
    const key = freshKey();
    const before = await client.acquire(freshKey("marker"));
    await sidecar.kill();
    const pending = client.acquire(key);
    await sidecar.start();
    const acquired = await within(pending, "the retried acquire");
    assert.equal(acquired.guard.runId, acquired.runId);
    assert.equal(acquired.guard.attempt, 1);
    const events = await within(
      (async () => {
        const types: string[] = [];
        for await (const event of client.watch({ keyPrefix: key, startRevision: before.guard.revision })) {
          types.push(event.type);
          if (event.revision >= acquired.guard.revision) return types;
        }
        return types;
      })(),
      "the acquire's events",
    );
    assert.deepEqual(events, ["ACQUIRED"]);
  });

  test("a queued hold does not outlive the sidecar: it throws UnavailableError, and the holder resumes", async () => {
    const key = freshKey();
    const lease = await client.openHold(key);
    let queued: () => void = () => {};
    const inLine = new Promise<void>((resolve) => {
      queued = resolve;
    });
    const waiting = client.openHold(key, { onConflict: "queue", onQueued: () => queued() });
    await within(inLine, "the hold queued");
    // Handled from now: the end may come while the kill is still being awaited.
    const ended = assert.rejects(within(waiting, "the queued hold's end"), UnavailableError);
    await sidecar.kill();
    await ended;
    await sidecar.start();
    const released = await lease.release();
    assert.equal(released.state, "SUCCEEDED");
    assert.deepEqual(released.waiters, []);
  });

  test("hold finishes its function and releases across a restart in the middle", async () => {
    const key = freshKey();
    const result = await client.hold(key, {}, async () => {
      await sidecar.kill();
      await sidecar.start();
      return "done";
    });
    assert.equal(result, "done");
    const guard = await client.get(key);
    assert.equal(guard.state, "SUCCEEDED");
  });
});
