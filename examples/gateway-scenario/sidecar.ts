/**
 * A real sidecar process for the guarded run: `python -m taskguard serve` on a
 * unix socket in a temporary folder, ready when it prints "listening on".
 */

import { type ChildProcessByStdio, spawn } from "node:child_process";
import { createWriteStream } from "node:fs";
import { dirname, join, resolve } from "node:path";
import type { Readable } from "node:stream";
import { fileURLToPath } from "node:url";

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
/** The project's venv Python (made by `python3 .ci/dev.py setup`); TASKGUARD_PYTHON overrides it. */
export const PYTHON = process.env.TASKGUARD_PYTHON ?? join(ROOT, ".venv", "bin", "python");
const START_TIMEOUT_MS = 20_000;
const STOP_TIMEOUT_MS = 10_000;

/** Rejects with `what` unless `promise` settles within `ms`. */
export async function within<T>(promise: Promise<T>, what: string, ms: number): Promise<T> {
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

export class SidecarProcess {
  readonly address: string;
  readonly logPath: string;
  readonly #child: ChildProcessByStdio<null, Readable, Readable>;
  readonly #exited: Promise<void>;

  private constructor(workdir: string) {
    this.address = `unix:${join(workdir, "tg.sock")}`;
    this.logPath = join(workdir, "sidecar.log");
    const child = spawn(
      PYTHON,
      ["-m", "taskguard", "serve", "--listen", this.address, "--db", join(workdir, "tg.db")],
      { cwd: ROOT, stdio: ["ignore", "pipe", "pipe"] },
    );
    this.#child = child;
    this.#exited = new Promise((resolve) => child.once("exit", () => resolve()));
    // Should this process die before stop() (an error, a timeout), the sidecar goes with it.
    const orphaned = () => child.kill("SIGKILL");
    process.once("exit", orphaned);
    child.once("exit", () => process.removeListener("exit", orphaned));
    child.stderr.pipe(createWriteStream(this.logPath));
  }

  /** Starts `python -m taskguard serve --listen unix:<workdir>/tg.sock --db <workdir>/tg.db`. */
  static async start(workdir: string): Promise<SidecarProcess> {
    const sidecar = new SidecarProcess(workdir);
    await within(sidecar.#listening(), "the sidecar's 'listening on' line", START_TIMEOUT_MS);
    return sidecar;
  }

  #listening(): Promise<void> {
    const child = this.#child;
    return new Promise((resolve, reject) => {
      let stdout = "";
      child.stdout.setEncoding("utf8");
      child.stdout.on("data", (chunk: string) => {
        stdout += chunk;
        if (stdout.includes("listening on")) resolve();
      });
      child.once("exit", (code, signal) => {
        reject(new Error(`the sidecar exited (${code ?? signal}) before listening; see ${this.logPath}`));
      });
    });
  }

  /** SIGTERM (the sidecar drains and stops), SIGKILL if it takes too long. */
  async stop(): Promise<void> {
    if (this.#child.exitCode !== null || this.#child.signalCode !== null) {
      return;
    }
    this.#child.kill("SIGTERM");
    try {
      await within(this.#exited, "the sidecar to stop", STOP_TIMEOUT_MS);
    } catch {
      this.#child.kill("SIGKILL");
      await this.#exited;
    }
  }
}
