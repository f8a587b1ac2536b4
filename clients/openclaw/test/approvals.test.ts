/**
 * Who approved (OpenClaw's approval records, as `approval.history` returns
 * them), and the gate an approved exec waits at, against another OS user.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { statSync } from "node:fs";
import { dirname } from "node:path";
import { describe, test } from "node:test";
import { findApproval, resolverName } from "../src/approvals.ts";
import { ApprovalGate } from "../src/gate.ts";

// An approval.history page as OpenClaw 2026.9.6 returned it (trimmed), newest first.
const page = {
  items: [
    {
      id: "plugin:other-plugin",
      presentation: { kind: "plugin", pluginId: "someone-else", description: "run r-42 please" },
      source: { agentId: "main", sessionKey: "agent:main:web" },
      resolver: { kind: "runtime", id: "cli" },
    },
    {
      id: "plugin:other-session",
      presentation: { kind: "plugin", pluginId: "taskguard", description: "Allow once to run it (as run r-42)" },
      source: { agentId: "main", sessionKey: "agent:main:elsewhere" },
      resolver: { kind: "runtime", id: "cli" },
    },
    {
      id: "plugin:ours",
      status: "allowed",
      decision: "allow-once",
      presentation: { kind: "plugin", pluginId: "taskguard", description: "Allow once to run it (as run r-42)" },
      source: { agentId: "main", sessionKey: "agent:main:web" },
      resolver: { kind: "runtime", id: "Chat approval (webchat:gateway-client)" },
    },
  ],
};

describe("who approved", () => {
  test("the approval is ours only by plugin id, the retry's run id and the session it was asked from", () => {
    assert.deepEqual(findApproval(page, { pluginId: "taskguard", marker: "r-42", sessionKey: "agent:main:web" }), {
      id: "plugin:ours",
      approver: "runtime:Chat approval (webchat:gateway-client)",
    });
    assert.equal(findApproval(page, { pluginId: "taskguard", marker: "r-43", sessionKey: "agent:main:web" }), undefined);
    assert.equal(findApproval({ items: "nonsense" }, { pluginId: "taskguard", marker: "r-42", sessionKey: undefined }), undefined);
    assert.equal(findApproval(undefined, { pluginId: "taskguard", marker: "r-42", sessionKey: undefined }), undefined);
  });

  test("a resolver is named as `openclaw approvals` prints it", () => {
    assert.equal(resolverName({ kind: "runtime", id: "cli" }), "runtime:cli");
    assert.equal(resolverName({ kind: "device", id: "d-1" }), "device:d-1");
    assert.equal(resolverName({ kind: "system", id: null }), "system");
    assert.equal(resolverName({}), undefined);
  });
});

describe("the approved exec's gate", () => {
  test("only its owner can open it: another user cannot tell the waiting command to go", async (t) => {
    const gate = await ApprovalGate.open(60_000);
    try {
      assert.equal(statSync(dirname(gate.path)).mode & 0o777, 0o700);
      assert.equal(statSync(gate.path).mode & 0o777, 0o600);
      if (process.getuid?.() !== 0) {
        t.skip("needs root to act as another user (nobody)");
        return;
      }
      const spoof = spawnSync("runuser", ["-u", "nobody", "--", "/bin/sh", "-c", `echo go > '${gate.path}'`], { encoding: "utf8" });
      assert.notEqual(spoof.status, 0, "nobody wrote into the gate");
      assert.match(spoof.stderr, /Permission denied/);
    } finally {
      gate.close();
    }
  });

  test("what the plugin says waits in the gate until the command reads it; a closed gate leaves no FIFO", async () => {
    const gate = await ApprovalGate.open(60_000);
    gate.say("go"); // before the command even opened it
    const read = spawnSync("/bin/sh", ["-c", `IFS= read -r word < '${gate.path}'; echo "$word"`], { encoding: "utf8", timeout: 10_000 });
    assert.equal(read.stdout, "go\n");
    gate.close();
    const late = spawnSync("/bin/sh", ["-c", `IFS= read -r word < '${gate.path}'; echo "[$word]"`], { encoding: "utf8", timeout: 10_000 });
    assert.equal(late.stdout, "[]\n"); // no FIFO any more: the open fails at once instead of blocking
  });
});
