import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { test } from "node:test";

test("the plugin type-checks (tsc --noEmit, with the Node client's compiler)", () => {
  const root = new URL("..", import.meta.url).pathname;
  const tsc = new URL("../../node/node_modules/.bin/tsc", import.meta.url).pathname;
  const done = spawnSync(tsc, ["--noEmit", "-p", "tsconfig.json"], { cwd: root, encoding: "utf8" });
  assert.equal(done.status, 0, `${done.stdout}${done.stderr}`);
});
