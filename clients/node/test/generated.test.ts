import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { describe, test } from "node:test";
import { PACKAGE_DIR, PYTHON, ROOT } from "./support.ts";

const COMMITTED = join(PACKAGE_DIR, "src", "generated");

function files(dir: string): string[] {
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((entry) => entry.isFile())
    .map((entry) => relative(dir, join(entry.parentPath, entry.name)))
    .sort();
}

describe("generated code and types", () => {
  test("the committed generated types are exactly what proto/generate.py makes from the proto", () => {
    const fresh = mkdtempSync(join(tmpdir(), "tg-generated-"));
    try {
      execFileSync(PYTHON, [join(ROOT, "proto", "generate.py"), "--lang", "node", "--node-out", fresh], {
        cwd: ROOT,
        stdio: ["ignore", "ignore", "pipe"],
      });
      assert.deepEqual(files(COMMITTED), files(fresh), "run python proto/generate.py and commit the result");
      const stale = files(fresh).filter(
        (name) => !readFileSync(join(fresh, name)).equals(readFileSync(join(COMMITTED, name))),
      );
      assert.deepEqual(stale, [], "stale generated code: run python proto/generate.py and commit the result");
    } finally {
      rmSync(fresh, { recursive: true, force: true });
    }
  });

  test("tsc --noEmit finds no type errors in the package and its tests", () => {
    const tsc = join(PACKAGE_DIR, "node_modules", "typescript", "bin", "tsc");
    const result = spawnSync(process.execPath, [tsc, "--noEmit", "-p", join(PACKAGE_DIR, "tsconfig.json")], {
      cwd: PACKAGE_DIR,
      encoding: "utf8",
    });
    assert.equal(result.status, 0, `tsc --noEmit:\n${result.stdout}${result.stderr}`);
  });
});
