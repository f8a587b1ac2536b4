/**
 * The connection itself: its state, waiting for it to change, and the
 * sidecar's grpc.health.v1 answer, against a real sidecar (and no sidecar).
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { Client, UnavailableError } from "taskguard-sidecar-client";
import { Sidecar, within } from "./support.ts";

let sidecar: Sidecar;

before(async () => {
  sidecar = await Sidecar.start();
});

after(async () => {
  await sidecar?.stop();
});

describe("the connection", () => {
  test("a new client is IDLE until asked to connect, then READY, and the sidecar says SERVING", async () => {
    const client = new Client({ address: sidecar.address });
    try {
      assert.equal(client.connectivity(), "IDLE");
      let state = client.connectivity(true);
      while (state !== "READY") {
        assert.ok(await within(client.connectivityChanged(state, Date.now() + 10_000), `a change from ${state}`));
        state = client.connectivity();
        assert.notEqual(state, "TRANSIENT_FAILURE");
      }
      assert.equal(await client.health(), "SERVING");
      assert.equal(await client.health({ service: "taskguard.v1.TaskGuard" }), "SERVING");
    } finally {
      client.close();
    }
  });

  test("no sidecar at the address: the channel fails to connect and the health check is UNAVAILABLE", async () => {
    const client = new Client({ address: "unix:/tmp/no-such-taskguard-node.sock" });
    try {
      let state = client.connectivity(true);
      while (state !== "TRANSIENT_FAILURE") {
        assert.ok(await within(client.connectivityChanged(state, Date.now() + 10_000), `a change from ${state}`));
        state = client.connectivity();
        assert.notEqual(state, "READY");
      }
      await assert.rejects(client.health({ deadline: Date.now() + 5_000 }), UnavailableError);
    } finally {
      client.close();
    }
  });

  test("waiting for a change ends at the deadline when nothing changes, and at once on a closed client", async () => {
    const client = new Client({ address: sidecar.address });
    assert.equal(await client.connectivityChanged("IDLE", Date.now() + 50), false); // nobody asked it to connect
    client.close();
    assert.equal(await client.connectivityChanged("IDLE", Date.now() + 10_000), false);
  });
});
