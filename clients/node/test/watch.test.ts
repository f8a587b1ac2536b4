import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { Client, type GuardEvent, OutOfRangeError } from "taskguard-sidecar-client";
import { Sidecar, freshKey, within } from "./support.ts";

let sidecar: Sidecar;
let client: Client;

before(async () => {
  // A one-event buffer: any batch of two or more events cuts a live watcher off (RESOURCE_EXHAUSTED).
  sidecar = await Sidecar.start(["--watch-buffer", "1"]);
  client = new Client({ address: sidecar.address });
});

after(async () => {
  client?.close();
  await sidecar?.stop();
});

/** Pull `count` events from `events` under a timeout. */
async function take(events: AsyncIterator<GuardEvent>, count: number): Promise<GuardEvent[]> {
  const taken: GuardEvent[] = [];
  while (taken.length < count) {
    const next = await within(events.next(), `event ${taken.length + 1} of ${count}`);
    assert.ok(!next.done, "the watch ended");
    taken.push(next.value);
  }
  return taken;
}

function assertStrictlyRising(revisions: number[]): void {
  for (let i = 1; i < revisions.length; i++) {
    assert.ok(revisions[i]! > revisions[i - 1]!, `revision ${revisions[i]} after ${revisions[i - 1]}: ${revisions}`);
  }
}

describe("watch", () => {
  test("a watch resumes across a sidecar SIGKILL and restart without gaps or repeats", async () => {
    const key = freshKey();
    const first = await client.acquire(`${key}/0`);
    const watch = client.watch({ keyPrefix: key, startRevision: first.guard.revision });
    const seen = await take(watch, 1);
    for (let i = 1; i < 5; i++) {
      await client.acquire(`${key}/${i}`);
    }
    seen.push(...(await take(watch, 2))); // two read before the crash, two left in flight
    await sidecar.kill();
    await sidecar.start();
    for (let i = 5; i < 10; i++) {
      await client.acquire(`${key}/${i}`); // retried while the channel reconnects
    }
    seen.push(...(await take(watch, 7)));
    await watch.return?.();
    assert.deepEqual(
      seen.map((event) => event.guard.taskKey),
      Array.from({ length: 10 }, (_, i) => `${key}/${i}`),
    );
    assert.ok(seen.every((event) => event.type === "ACQUIRED"));
    assertStrictlyRising(seen.map((event) => event.revision));
  });

  test("a watcher cut off for falling behind (RESOURCE_EXHAUSTED) resumes from its last revision", async () => {
    const key = freshKey();
    const start = (await client.acquire(`${key}/start`)).guard.revision;
    const watch = client.watch({ keyPrefix: key, startRevision: start });
    await take(watch, 1);
    const keys = Array.from({ length: 30 }, (_, i) => `${key}/${String(i).padStart(2, "0")}`);
    const acquired = await Promise.all(keys.map((each) => client.acquire(each)));
    const events = await take(watch, keys.length);
    await watch.return?.();
    assertStrictlyRising(events.map((event) => event.revision));
    assert.deepEqual(
      events.map((event) => event.revision),
      acquired.map((each) => each.guard.revision).sort((a, b) => a - b),
    );
  });

  test("a snapshot comes first, then live events", async () => {
    const key = freshKey();
    for (const name of ["a", "b", "c"]) {
      await client.acquire(`${key}/${name}`);
    }
    const watch = client.watch({ keyPrefix: key, includeSnapshot: true });
    const snapshot = await take(watch, 3);
    assert.deepEqual(
      snapshot.map((event) => [event.type, event.guard.taskKey]),
      ["a", "b", "c"].map((name) => ["SNAPSHOT", `${key}/${name}`]),
    );
    const live = await client.acquire(`${key}/d`);
    const [event] = await take(watch, 1);
    await watch.return?.();
    assert.equal(event?.type, "ACQUIRED");
    assert.equal(event?.revision, live.guard.revision);
    assert.ok(live.guard.revision > snapshot[0]!.revision);
  });

  test("an aborted signal ends the watch quietly", async () => {
    const stop = new AbortController();
    const watch = client.watch({ keyPrefix: freshKey(), signal: stop.signal });
    const next = watch.next();
    stop.abort();
    assert.deepEqual(await within(next, "the watch to end"), { done: true, value: undefined });
  });
});

describe("watch with a short history", () => {
  test("a start revision older than the sidecar keeps throws OutOfRangeError", async () => {
    const small = await Sidecar.start(["--event-retention-count", "3"]);
    const smallClient = new Client({ address: small.address });
    try {
      const key = freshKey();
      for (let i = 0; i < 8; i++) {
        await smallClient.acquire(`${key}/${i}`);
      }
      // The log is trimmed to its retention when the sidecar opens it.
      await small.kill();
      await small.start();
      const error = await within(
        (async () => {
          for await (const _ of smallClient.watch({ startRevision: 1 })) {
            assert.fail("an event older than the retention");
          }
        })().catch((thrown: unknown) => thrown),
        "OUT_OF_RANGE",
      );
      assert.ok(error instanceof OutOfRangeError, String(error));
      assert.equal(error.field, "start_revision");
    } finally {
      smallClient.close();
      await small.stop();
    }
  });
});
