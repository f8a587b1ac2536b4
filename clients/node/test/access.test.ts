import assert from "node:assert/strict";
import { chmodSync, chownSync, lstatSync, mkdirSync, mkdtempSync, rmSync, symlinkSync } from "node:fs";
import { networkInterfaces } from "node:os";
import { join } from "node:path";
import { after, afterEach, before, describe, test } from "node:test";
import * as grpc from "@grpc/grpc-js";
import * as pb from "../src/generated/taskguard/v1/taskguard.ts";
import { Client, PermissionDeniedError } from "taskguard-sidecar-client";
import { Sidecar, freshKey, within } from "./support.ts";

describe("the default socket folder", () => {
  let parent: string;
  const saved = { xdg: process.env.XDG_RUNTIME_DIR, addr: process.env.TASKGUARD_ADDR };

  before(() => {
    // Like /tmp: sticky, and anyone may make a folder in it.
    parent = mkdtempSync("/tmp/tg-node-xdg-");
    chmodSync(parent, 0o1777);
    process.env.XDG_RUNTIME_DIR = parent;
    delete process.env.TASKGUARD_ADDR;
  });

  afterEach(() => {
    rmSync(join(parent, "taskguard"), { recursive: true, force: true });
  });

  after(() => {
    rmSync(parent, { recursive: true, force: true });
    for (const [name, value] of [["XDG_RUNTIME_DIR", saved.xdg], ["TASKGUARD_ADDR", saved.addr]] as const) {
      if (value === undefined) delete process.env[name];
      else process.env[name] = value;
    }
  });

  test("is refused when others may write in it", () => {
    const folder = join(parent, "taskguard");
    mkdirSync(folder);
    chmodSync(folder, 0o777); // after mkdir: the umask narrows the mode mkdir is given
    assert.throws(() => new Client(), (error: unknown) => {
      assert.ok(error instanceof PermissionDeniedError);
      assert.match(error.message, /the socket folder .*taskguard has mode 0777: other users may write in it/);
      return true;
    });
  });

  test("is refused when another user made it", { skip: process.geteuid?.() !== 0 && "needs root" }, () => {
    const folder = join(parent, "taskguard");
    mkdirSync(folder, { mode: 0o700 });
    chownSync(folder, 65534, 65534);
    assert.throws(() => new Client(), /belongs to uid 65534, not to this user \(uid 0\)/);
  });

  test("is refused when it is a symlink", () => {
    const elsewhere = mkdtempSync("/tmp/tg-node-elsewhere-");
    try {
      symlinkSync(elsewhere, join(parent, "taskguard"));
      assert.throws(() => new Client(), /is not a folder \(a symbolic link\?\)/);
    } finally {
      rmSync(elsewhere, { recursive: true, force: true });
    }
  });

  test("is made 0700 when missing, and then used", () => {
    const client = new Client();
    try {
      const made = lstatSync(join(parent, "taskguard"));
      assert.ok(made.isDirectory());
      assert.equal(made.mode & 0o777, 0o700);
    } finally {
      client.close();
    }
  });

  test("is not checked for an address the caller chose", () => {
    const folder = join(parent, "taskguard");
    mkdirSync(folder);
    chmodSync(folder, 0o777);
    new Client({ address: "127.0.0.1:1" }).close();
    new Client({ address: `unix:${parent}/elsewhere.sock` }).close();
  });
});

function localAddress(): string | undefined {
  for (const addresses of Object.values(networkInterfaces())) {
    for (const address of addresses ?? []) {
      if (address.family === "IPv4" && !address.internal) return address.address;
    }
  }
  return undefined;
}

describe("retries over TCP where the sidecar cannot tell callers apart", { skip: !localAddress() }, () => {
  let sidecar: Sidecar;
  let address: string;

  before(async () => {
    sidecar = await Sidecar.start(["--listen", `${localAddress()}:0`, "--allow-remote"]);
    address = /listening on (\S+)/.exec(sidecar.stdout)?.[1] ?? "";
  });

  after(async () => {
    await sidecar?.stop();
  });

  test("get the run's lease back with the client's retry secret, and only with it", async () => {
    const key = freshKey();
    const client = new Client({ address });
    const again = new Client({ address });
    // From the service definition with the grpc-js these tests (and the packed client) load: the generated
    // pb.TaskGuardClient is bound to the checkout's own grpc-js, whose credentials class is another one.
    const Raw = grpc.makeGenericClientConstructor(pb.TaskGuardService, "TaskGuard");
    const raw = new Raw(address, grpc.credentials.createInsecure()) as unknown as pb.TaskGuardClient;
    try {
      const first = await client.acquire(key, { runId: "node-run" });
      assert.equal(first.outcome, "ACQUIRED");
      assert.equal((await client.acquire(key, { runId: "node-run" })).leaseId, first.leaseId);
      assert.equal((await again.acquire(key, { runId: "node-run" })).leaseId, first.leaseId);
      const bare = await within(
        new Promise<pb.AcquireResponse>((resolve, reject) => {
          raw.acquire(
            pb.AcquireRequest.fromPartial({ taskKey: key, runId: "node-run" }),
            (error: grpc.ServiceError | null, response?: pb.AcquireResponse) =>
              error || !response ? reject(error) : resolve(response),
          );
        }),
        "a bare Acquire",
      );
      assert.equal(bare.outcome, "ACQUIRE_OUTCOME_ALREADY_RUNNING");
      assert.equal(bare.leaseId, "");
    } finally {
      raw.close();
      again.close();
      client.close();
    }
  });
});
