/**
 * What the Node tests share: a real sidecar process on a unix socket in a
 * temporary folder (`python -m taskguard serve`, ready when it prints
 * "listening on"), fresh task keys, and waiting under a timeout.
 */

import { type ChildProcessByStdio, spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import { createWriteStream, mkdtempSync, rmSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import type { Readable } from "node:stream";
import { fileURLToPath } from "node:url";

export const PACKAGE_DIR = resolve(dirname(fileURLToPath(import.meta.url)), "..");
export const ROOT = resolve(PACKAGE_DIR, "..", "..");
/** The project's venv Python (the one `.ci/dev.py setup` makes); TASKGUARD_PYTHON overrides it. */
export const PYTHON = process.env.TASKGUARD_PYTHON ?? join(ROOT, ".venv", "bin", "python");
export const TIMEOUT_MS = 10_000;
const START_TIMEOUT_MS = 20_000;

/** Fail with `what` unless `promise` settles within `ms`. */
export async function within<T>(promise: Promise<T>, what: string, ms = TIMEOUT_MS): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

export function freshKey(name = "job"): string {
  return `t-${randomUUID().replaceAll("-", "")}::${name}`;
}

/** `python -m taskguard serve` on `<tmp>/tg.sock` with `<tmp>/tg.db`, restartable on the same files. */
export class Sidecar {
  readonly workdir: string;
  readonly args: string[];
  readonly env: NodeJS.ProcessEnv;
  #process: ChildProcessByStdio<null, Readable, Readable> | undefined;
  #stdout = "";
  #waiters: (() => void)[] = [];
  #starts = 0;

  constructor(args: string[] = [], env: NodeJS.ProcessEnv = {}) {
    // Short: a unix socket path must fit in 108 bytes.
    this.workdir = mkdtempSync("/tmp/tg-node-");
    this.args = args;
    this.env = env;
  }

  get address(): string {
    return `unix:${join(this.workdir, "tg.sock")}`;
  }

  /** Everything the current process printed on stdout so far. */
  get stdout(): string {
    return this.#stdout;
  }

  static async start(args: string[] = [], env: NodeJS.ProcessEnv = {}): Promise<Sidecar> {
    const sidecar = new Sidecar(args, env);
    await sidecar.start();
    return sidecar;
  }

  async start(): Promise<void> {
    this.#starts += 1;
    this.#stdout = "";
    const log = createWriteStream(join(this.workdir, `sidecar-${this.#starts}.log`));
    const child = spawn(
      PYTHON,
      ["-m", "taskguard", "serve", "--listen", this.address, "--db", join(this.workdir, "tg.db"), ...this.args],
      { cwd: ROOT, stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...this.env } },
    );
    this.#process = child;
    // Even when the test process dies without its teardown (a timeout, an uncaught error), the sidecar goes too.
    const orphaned = () => child.kill("SIGKILL");
    process.once("exit", orphaned);
    child.once("exit", () => process.removeListener("exit", orphaned));
    child.stderr.pipe(log);
    child.stdout.setEncoding("utf8");
    child.stdout.on("data", (chunk: string) => {
      this.#stdout += chunk;
      for (const wake of this.#waiters.splice(0)) wake();
    });
    const exited = new Promise<never>((_, reject) => {
      child.once("exit", (code, signal) => {
        reject(new Error(`sidecar exited (${code ?? signal}); see ${this.workdir}`));
      });
    });
    exited.catch(() => {}); // only a failure while we wait for the line below
    const listening = Promise.race([this.waitFor(/listening on/), exited]);
    await within(listening, "the sidecar's 'listening on' line", START_TIMEOUT_MS);
  }

  /** Resolves once stdout (of the current process) matches `pattern`. */
  async waitFor(pattern: RegExp | string): Promise<void> {
    const matches = () => (typeof pattern === "string" ? this.#stdout.includes(pattern) : pattern.test(this.#stdout));
    while (!matches()) {
      await new Promise<void>((wake) => this.#waiters.push(wake));
    }
  }

  /** SIGKILL: no flush, no goodbye; resolves when the process is gone. */
  async kill(): Promise<void> {
    const child = this.#process;
    if (child === undefined || child.exitCode !== null || child.signalCode !== null) {
      return;
    }
    const gone = new Promise((resolve) => child.once("exit", resolve));
    child.kill("SIGKILL");
    await within(gone, "the sidecar to exit");
  }

  async stop(): Promise<void> {
    await this.kill();
    rmSync(this.workdir, { recursive: true, force: true });
  }
}
