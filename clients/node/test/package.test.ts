import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative, sep } from "node:path";
import { after, before, describe, test } from "node:test";
import { PACKAGE_DIR } from "./support.ts";

// Node strips types only outside node_modules: an installed package must ship JavaScript, which `npm pack` builds.
// The other tests import the client from test/node_modules, where .ci/dev.py installs the tarball; this one packs
// again, to check a fresh project's install and that the installed copy is what the sources make now.
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

/** Every file under `dir` (relative paths), leaving out nested node_modules. */
function tree(dir: string): string[] {
  return readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((entry) => entry.isFile())
    .map((entry) => relative(dir, join(entry.parentPath, entry.name)))
    .filter((name) => !name.split(sep).includes("node_modules"))
    .sort();
}

describe("the package as npm installs it", () => {
  let work = "";
  let tarball = "";

  before(() => {
    work = mkdtempSync(join(tmpdir(), "tg-pack-"));
    npm(PACKAGE_DIR, "pack", "--pack-destination", work, "--silent");
    const [name] = readdirSync(work).filter((entry) => entry.endsWith(".tgz"));
    assert.ok(name, "npm pack made no tarball");
    tarball = join(work, name);
  });

  after(() => {
    rmSync(work, { recursive: true, force: true });
  });

  test("npm pack builds JavaScript and types that a project imports from node_modules by the package's name", () => {
    const project = join(work, "project");
    mkdirSync(project);
    writeFileSync(join(project, "package.json"), JSON.stringify({ type: "module", private: true }));
    // The dependencies come from npm's cache when the Node tests' own `npm ci` filled it.
    npm(project, "install", "--prefer-offline", "--ignore-scripts", "--no-package-lock", tarball);
    const loaded = execFileSync(
      process.execPath,
      [
        // Plain JavaScript: nothing of the package may need Node's type stripping (which node_modules never gets).
        "--no-experimental-strip-types",
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
  });

  test("the client these tests import is the tarball npm pack makes of the checkout's sources, installed", () => {
    assert.match(import.meta.resolve("taskguard-sidecar-client"), /\/test\/node_modules\/taskguard-sidecar-client\/dist\//);
    const unpacked = join(work, "unpacked");
    mkdirSync(unpacked);
    execFileSync("tar", ["-xzf", tarball, "-C", unpacked]);
    const packed = join(unpacked, "package");
    const installed = join(PACKAGE_DIR, "test", "node_modules", "taskguard-sidecar-client");
    const stale = "the installed client is not what the sources make: run python3 .ci/dev.py setup";
    assert.deepEqual(tree(installed), tree(packed), stale);
    const differing = tree(packed).filter((name) => !readFileSync(join(packed, name)).equals(readFileSync(join(installed, name))));
    assert.deepEqual(differing, [], stale);
  });
});
