import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  AlreadyRunning,
  Client,
  FailedPreconditionError,
  InvalidArgumentError,
  LeaseLostError,
  LeaseNotFoundError,
  NotFoundError,
  RetryRequiresApproval,
  StatusError,
  TaskGuardError,
  defaultAddress,
} from "taskguard-sidecar-client";
import { Sidecar, freshKey } from "./support.ts";

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

describe("unary calls", () => {
  test("acquire, renew and release a TTL lease", async () => {
    const key = freshKey();
    const acquired = await client.acquire(key, { ttlMs: 30_000, labels: { session: "s1" } });
    assert.equal(acquired.outcome, "ACQUIRED");
    assert.equal(acquired.taskKey, key);
    assert.match(acquired.runId, /^[0-9a-f-]{36}$/);
    assert.ok(acquired.leaseId);
    assert.ok(acquired.expiresAt instanceof Date);
    assert.equal(acquired.guard.state, "RUNNING");
    assert.equal(acquired.guard.ttlMs, 30_000);
    assert.equal(acquired.guard.sessionKey, key.split("::")[0]);
    assert.equal(acquired.guard.taskName, "job");

    const renewed = await client.renew(acquired.leaseId, { ttlMs: 60_000 });
    assert.equal(renewed.ttlMs, 60_000);
    assert.ok(renewed.expiresAt && acquired.expiresAt && renewed.expiresAt > acquired.expiresAt);

    const released = await client.release(acquired.leaseId, "SUCCEEDED", "done");
    assert.equal(released.state, "SUCCEEDED");
    assert.equal(released.lastDetail, "done");
    assert.ok(released.releasedAt instanceof Date);
    // Release is idempotent by lease id, which is what makes retrying it safe.
    assert.equal((await client.release(acquired.leaseId, "SUCCEEDED")).revision, released.revision);
    await assert.rejects(client.renew(acquired.leaseId), LeaseLostError);
  });

  test("acquire with the run id that holds the guard returns the same lease", async () => {
    const key = freshKey();
    const first = await client.acquire(key, { runId: "run-1" });
    const again = await client.acquire(key, { runId: "run-1" });
    assert.equal(again.leaseId, first.leaseId);
    assert.equal(again.fencingToken, first.fencingToken);
    await client.release(first.leaseId, "SUCCEEDED");
  });

  test("a conflicting acquire throws AlreadyRunning, or returns it when asked to", async () => {
    const key = freshKey();
    const winner = await client.acquire(key, { runId: "winner", holder: "gw-1" });
    const error = await client.acquire(key, { runId: "dup" }).catch((thrown: unknown) => thrown);
    assert.ok(error instanceof AlreadyRunning);
    assert.ok(error instanceof TaskGuardError);
    assert.equal(error.runId, "winner");
    assert.equal(error.holder, "gw-1");
    assert.equal(error.fencingToken, winner.fencingToken);
    assert.equal(error.startedAt.getTime(), winner.startedAt.getTime());
    assert.ok(!(error instanceof StatusError));

    const refused = await client.acquire(key, { onConflict: "return" });
    assert.equal(refused.outcome, "ALREADY_RUNNING");
    assert.equal(refused.guard.runId, "winner");
    assert.equal(refused.guard.duplicateCount, 2);
    await client.release(winner.leaseId, "SUCCEEDED");
  });

  test("a failed run needs approveRetry, and then exactly one more run may start", async () => {
    const key = freshKey();
    const failed = await client.acquire(key);
    await client.release(failed.leaseId, "FAILED", "exit 1");
    const error = await client.acquire(key).catch((thrown: unknown) => thrown);
    assert.ok(error instanceof RetryRequiresApproval);
    assert.equal(error.runId, failed.runId);
    assert.equal(error.detail, "exit 1");
    assert.ok(error.releasedAt instanceof Date);
    assert.equal(error.guard.state, "FAILED");

    const approved = await client.approveRetry(key, { approver: "ops", reason: "fixed the disk" });
    assert.equal(approved.state, "RETRY_APPROVED");
    assert.equal(approved.approvedBy, "ops");
    const retried = await client.acquire(key);
    assert.equal(retried.fencingToken, failed.fencingToken + 1);
    assert.equal(retried.guard.approvalReason, "fixed the disk");
    await assert.rejects(client.acquire(key), AlreadyRunning);
    // Approving a running guard is a precondition failure, not a lost lease.
    const notWaiting = await client.approveRetry(key).catch((thrown: unknown) => thrown);
    assert.ok(notWaiting instanceof FailedPreconditionError && !(notWaiting instanceof LeaseLostError));
    assert.equal(notWaiting.field, "task_key");
    await client.release(retried.leaseId, "SUCCEEDED");
  });

  test("checkFence is valid only while the run with that token holds the guard", async () => {
    const key = freshKey();
    const first = await client.acquire(key);
    assert.deepEqual((await client.checkFence(key, first.fencingToken)).valid, true);
    assert.equal((await client.checkFence(key, first.fencingToken + 1)).valid, false);
    await client.forceRelease(key, { operator: "ops", reason: "stuck" });
    const after = await client.checkFence(key, first.fencingToken);
    assert.equal(after.valid, false);
    assert.equal(after.guard?.state, "CANCELLED");
    assert.equal(after.guard?.releasedBy, "ops");
    const second = await client.acquire(key);
    assert.equal((await client.checkFence(key, second.fencingToken)).valid, true);
    assert.equal((await client.checkFence(freshKey(), 1)).guard, undefined);
    await assert.rejects(client.release(first.leaseId, "SUCCEEDED"), LeaseLostError);
    await client.release(second.leaseId, "SUCCEEDED");
  });

  test("list iterates over every page in task key order", async () => {
    const prefix = freshKey("batch");
    const keys = Array.from({ length: 25 }, (_, i) => `${prefix}/${String(i).padStart(2, "0")}`);
    for (const key of keys) {
      await client.acquire(key);
    }
    const listed: string[] = [];
    for await (const guard of client.list({ keyPrefix: prefix, pageSize: 4 })) {
      listed.push(guard.taskKey);
      assert.equal(guard.state, "RUNNING");
    }
    assert.deepEqual(listed, keys);
    const none: string[] = [];
    for await (const guard of client.list({ keyPrefix: prefix, states: ["FAILED"] })) none.push(guard.taskKey);
    assert.deepEqual(none, []);
  });

  test("status codes become typed errors that name the field", async () => {
    await assert.rejects(client.get(freshKey()), NotFoundError);
    const invalid = await client.acquire("").catch((thrown: unknown) => thrown);
    assert.ok(invalid instanceof InvalidArgumentError);
    assert.equal(invalid.field, "task_key");
    assert.equal(invalid.code, 3);
    await assert.rejects(client.acquire(freshKey(), { ttlMs: -1 }), InvalidArgumentError);
    const unknownLease = await client.release("no-such-lease", "SUCCEEDED").catch((thrown: unknown) => thrown);
    assert.ok(unknownLease instanceof LeaseNotFoundError && unknownLease instanceof NotFoundError);
    assert.equal(unknownLease.field, "lease_id");
  });

  test("the default address comes from TASKGUARD_ADDR, else the runtime dir, else /tmp", () => {
    const explicit = { TASKGUARD_ADDR: "127.0.0.1:7070", XDG_RUNTIME_DIR: "/run/user/1" };
    assert.equal(defaultAddress(explicit), "127.0.0.1:7070");
    assert.equal(defaultAddress({ XDG_RUNTIME_DIR: "/run/user/1" }), "unix:/run/user/1/taskguard/taskguard.sock");
    assert.equal(defaultAddress({}), `unix:/tmp/taskguard-${process.getuid?.()}/taskguard.sock`);
  });

  test("a call to a sidecar that is not there fails with UnavailableError within its deadline", async () => {
    const nowhere = new Client({ address: `unix:${sidecar.workdir}/missing.sock`, deadlineMs: 500 });
    try {
      const started = Date.now();
      const error = await nowhere.get(freshKey()).catch((thrown: unknown) => thrown);
      assert.ok(error instanceof TaskGuardError, String(error));
      assert.ok(["UnavailableError", "DeadlineExceededError"].includes(error.name), error.name);
      assert.ok(Date.now() - started < 5_000);
    } finally {
      nowhere.close();
    }
  });
});
