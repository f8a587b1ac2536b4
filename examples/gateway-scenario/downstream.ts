/**
 * The "downstream script": what a gateway's task really launches (a report
 * builder, an inventory sync), and the journal that records what it saw.
 *
 * Like most such scripts it protects itself with an exclusive lock file
 * (`open(path, "wx")`, the same O_CREAT|O_EXCL trick as `flock -n`): a
 * launch that finds the lock file taken records a *lock conflict* and exits
 * 75 (EX_TEMPFAIL) without doing the work. That lock file is the script's own
 * last line of defence, not the Task Guard: the point of the scenario is that
 * with the guard in front, the script never gets there.
 */

import { open, unlink } from "node:fs/promises";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";

export const TASK_NAMES = ["nightly-report", "sync-inventory", "weekly-digest"] as const;
export type TaskName = (typeof TASK_NAMES)[number];

export const EXIT_OK = 0;
export const EXIT_FAILED = 1;
/** EX_TEMPFAIL from sysexits.h: "try again later", what lock-guarded scripts commonly exit with. */
export const EXIT_LOCK_TAKEN = 75;

/** One start of the downstream script. `seq` numbers order everything the journal records. */
export interface LaunchRecord {
  task: TaskName;
  runId: string;
  /** The trigger message that caused the launch. */
  trigger: string;
  startSeq: number;
  /** Set when the script exits. */
  endSeq: number | undefined;
  exitCode: number | undefined;
  /** False when the lock file was taken (a lock conflict). */
  gotLock: boolean;
  /** With the guard: the lease's start time and fencing token, as the sidecar answered them. */
  startedAt: string | undefined;
  fencingToken: number | undefined;
  detail: string;
}

export interface LockConflict {
  seq: number;
  task: TaskName;
  runId: string;
}

export interface Mark {
  seq: number;
  what: string;
}

/** Everything the downstream script and the gateway saw, in one order (`seq`). */
export class Journal {
  readonly launches: LaunchRecord[] = [];
  readonly conflicts: LockConflict[] = [];
  readonly marks: Mark[] = [];
  #seq = 0;

  next(): number {
    this.#seq += 1;
    return this.#seq;
  }

  mark(what: string): number {
    const seq = this.next();
    this.marks.push({ seq, what });
    return seq;
  }
}

/**
 * When a run's work may end: after its simulated duration *and* after the
 * scenario opened its task's gate. The scenario opens a gate only once every
 * trigger of the wave meant to overlap the run has been answered, so "the
 * duplicates arrive while the first run is still going" is a fact of the
 * script, not a hope about timer precision on a busy CI machine.
 */
export class WorkGates {
  #gates = new Map<TaskName, { opened: Promise<void>; open: () => void }>();

  current(task: TaskName): Promise<void> {
    return this.#gate(task).opened;
  }

  /** Lets the runs that are waiting on `tasks` finish; later runs wait on a new gate. */
  open(tasks: readonly TaskName[]): void {
    for (const task of tasks) {
      this.#gate(task).open();
      this.#gates.delete(task);
    }
  }

  #gate(task: TaskName): { opened: Promise<void>; open: () => void } {
    let gate = this.#gates.get(task);
    if (gate === undefined) {
      let open = () => {};
      const opened = new Promise<void>((resolve) => {
        open = resolve;
      });
      gate = { opened, open };
      this.#gates.set(task, gate);
    }
    return gate;
  }
}

export interface DownstreamPlan {
  /** Simulated duration of one run's work. */
  workMs: Record<TaskName, number>;
  /** This task's first run that gets to work exits 1 (its upstream API is down); later runs succeed. */
  failsOnce: TaskName;
  failureDetail: string;
}

/** A started script: `lockTried` once it took the lock file or found it taken, `exited` with its exit code. */
export interface ScriptRun {
  record: LaunchRecord;
  lockTried: Promise<void>;
  exited: Promise<number>;
}

export class DownstreamScript {
  readonly #dir: string;
  readonly #journal: Journal;
  readonly #gates: WorkGates;
  readonly #plan: DownstreamPlan;
  #failed = false;

  constructor(dir: string, journal: Journal, gates: WorkGates, plan: DownstreamPlan) {
    this.#dir = dir;
    this.#journal = journal;
    this.#gates = gates;
    this.#plan = plan;
  }

  launch(task: TaskName, runId: string, trigger: string, lease?: { startedAt: Date; fencingToken: number }): ScriptRun {
    const record: LaunchRecord = {
      task,
      runId,
      trigger,
      startSeq: this.#journal.next(),
      endSeq: undefined,
      exitCode: undefined,
      gotLock: false,
      startedAt: lease?.startedAt.toISOString(),
      fencingToken: lease?.fencingToken,
      detail: "",
    };
    this.#journal.launches.push(record);
    let lockTried = () => {};
    const tried = new Promise<void>((resolve) => {
      lockTried = resolve;
    });
    const exited = this.#run(record, lockTried).then((code) => {
      record.exitCode = code;
      record.endSeq = this.#journal.next();
      return code;
    });
    return { record, lockTried: tried, exited };
  }

  async #run(record: LaunchRecord, lockTried: () => void): Promise<number> {
    const path = join(this.#dir, `${record.task}.lock`);
    let file: Awaited<ReturnType<typeof open>>;
    try {
      file = await open(path, "wx");
    } catch (error) {
      lockTried();
      if ((error as NodeJS.ErrnoException).code !== "EEXIST") {
        throw error;
      }
      this.#journal.conflicts.push({ seq: this.#journal.next(), task: record.task, runId: record.runId });
      record.detail = `lock file ${record.task}.lock is taken`;
      return EXIT_LOCK_TAKEN;
    }
    record.gotLock = true;
    // Take the gate before anyone hears that the lock was tried: the wave may settle, and its gate open, right after.
    const gate = this.#gates.current(record.task);
    lockTried();
    try {
      await file.writeFile(`${record.runId}\n`);
      await Promise.all([sleep(this.#plan.workMs[record.task]), gate]);
      if (record.task === this.#plan.failsOnce && !this.#failed) {
        this.#failed = true;
        record.detail = this.#plan.failureDetail;
        return EXIT_FAILED;
      }
      return EXIT_OK;
    } finally {
      await file.close();
      await unlink(path);
    }
  }
}
