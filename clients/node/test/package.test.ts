import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { describe, test } from "node:test";
import { PACKAGE_DIR } from "./support.ts";

// Node strips types only outside node_modules: an installed package must ship JavaScript, which `npm pack` builds.
const NPM_CLI = join(dirname(process.execPath), "..", "lib", "node_modules", "npm", "bin", "npm-cli.js");
const TSC = join(PACKAGE_DIR, "node_modules", ".bin", "tsc");

function npm(cwd: string, ...args: string[]): string {
  return execFileSync(process.execPath, [NPM_CLI, ...args, "--no-audit", "--no-fund"], {
    cwd,
    encoding: "utf8",
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, npm_config_update_notifier: "false" },
  });
}

describe("the package as npm installs it", () => {
  test("npm pack builds JavaScript and types that a project imports from node_modules by the package's name", () => {
    const work = mkdtempSync(join(tmpdir(), "tg-pack-"));
    try {
      npm(PACKAGE_DIR, "pack", "--pack-destination", work, "--silent");
      const [tarball] = readdirSync(work).filter((name) => name.endsWith(".tgz"));
      assert.ok(tarball, "npm pack made no tarball");
      const project = join(work, "project");
      execFileSync("mkdir", [project]);
      writeFileSync(join(project, "package.json"), JSON.stringify({ type: "module", private: true }));
      // The dependencies come from npm's cache when the Node tests' own `npm ci` filled it.
      npm(project, "install", "--prefer-offline", "--ignore-scripts", "--no-package-lock", join(work, tarball));
      const loaded = execFileSync(
        process.execPath,
        [
          "--input-type=module",
          "-e",
          'import { Client, AlreadyRunning, defaultAddress } from "taskguard-sidecar-client";' +
            'const client = new Client("unix:/nonexistent/tg.sock"); client.close();' +
            "console.log(typeof AlreadyRunning, defaultAddress().startsWith('unix:'));",
        ],
        { cwd: project, encoding: "utf8" },
      );
      assert.equal(loaded.trim(), "function true");
      writeFileSync(
        join(project, "use.ts"),
        'import { type Acquired, Client } from "taskguard-sidecar-client";\n' +
          "export async function start(client: Client): Promise<number> {\n" +
          '  const acquired: Acquired = await client.acquire("s::t", { ttlMs: 1000 });\n' +
          "  return acquired.fencingToken;\n" +
          "}\n",
      );
      execFileSync(
        TSC,
        ["--noEmit", "--strict", "--module", "nodenext", "--moduleResolution", "nodenext", "--skipLibCheck", "use.ts"],
        { cwd: project, encoding: "utf8" },
      );
    } finally {
      rmSync(work, { recursive: true, force: true });
    }
  });
});
