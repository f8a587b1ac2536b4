/**
 * Where an approved exec waits until the plugin has approved its retry and acquired its run.
 *
 * OpenClaw starts an approved tool right after the allow and does not await
 * `requireApproval.onResolution`, where the plugin learns who approved
 * (`approvals.ts`), approves the retry and acquires the run. A `taskguard run`
 * started at once would ask before that and be refused. So the approved command
 * first reads one line from a FIFO the plugin made when it asked
 * (`shell.ts`), and runs only when the line is `go`.
 *
 * The plugin holds the FIFO open read-write from the start: the command's open
 * never blocks while the plugin lives (a FIFO with a writer opens at once), what
 * the plugin writes waits in the pipe until the command reads it, and if the
 * gateway dies the command reads end-of-file and stops. Closing removes the
 * FIFO before it closes the descriptor, so a command that starts later still
 * cannot block: it finds no FIFO and stops. Node has no mkfifo, hence mkfifo(1).
 */

import { execFile } from "node:child_process";
import { closeSync, constants, mkdtempSync, openSync, rmSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";

const run = promisify(execFile);

export class ApprovalGate {
  readonly path: string;
  readonly #folder: string;
  #fd: number | undefined;
  #closing: NodeJS.Timeout | undefined;
  #closesAt = Number.POSITIVE_INFINITY;

  private constructor(folder: string, path: string, fd: number) {
    this.#folder = folder;
    this.path = path;
    this.#fd = fd;
  }

  /** A new FIFO in a private folder (0700) under `parent`; closed by itself after `lifetimeMs` at the latest. */
  static async open(lifetimeMs: number, parent: string = tmpdir()): Promise<ApprovalGate> {
    const folder = mkdtempSync(join(parent, "taskguard-approval-"));
    const path = join(folder, "gate");
    try {
      await run("mkfifo", ["-m", "600", path]);
      // O_RDWR: never blocks on a FIFO (Linux, macOS), and makes the plugin the writer the command's open needs.
      const gate = new ApprovalGate(folder, path, openSync(path, constants.O_RDWR));
      gate.closeAfter(lifetimeMs);
      return gate;
    } catch (error) {
      rmSync(folder, { recursive: true, force: true });
      throw error;
    }
  }

  get closed(): boolean {
    return this.#fd === undefined;
  }

  /** Tells the waiting command `word` (one line: `go`, or why not), if the gate is still open. */
  say(word: string): void {
    if (this.#fd !== undefined) {
      writeSync(this.#fd, `${word.replace(/\s+/g, " ").trim()}\n`);
    }
  }

  /** Closes in `ms`, unless it was already due to close sooner. */
  closeAfter(ms: number): void {
    const at = performance.now() + ms;
    if (at >= this.#closesAt) return;
    this.#closesAt = at;
    clearTimeout(this.#closing);
    this.#closing = setTimeout(() => this.close(), ms);
    this.#closing.unref();
  }

  close(): void {
    clearTimeout(this.#closing);
    const fd = this.#fd;
    if (fd === undefined) return;
    this.#fd = undefined;
    rmSync(this.#folder, { recursive: true, force: true }); // first: a late command must not find a FIFO with no writer
    closeSync(fd);
  }
}
