/**
 * The gateway problem, runnable: one agent answering on discord, telegram and
 * a cron lane; a long `nightly-report` started from discord; while it runs,
 * the user repeats the trigger, other sessions ask for it too, and cron fires
 * it; meanwhile `sync-inventory` fails (exit 1) and is re-triggered by cron
 * and by users. The same seeded trigger sequence is played twice: without a
 * guard (every trigger launches the downstream script) and with the Task Guard
 * sidecar, through the Node client, in front of every launch.
 *
 *     node examples/gateway-scenario/scenario.ts [--json] [--seed N]
 *
 * The order of events is fixed by the script: the duplicates of a wave are all
 * answered before that wave's runs may finish (see `WorkGates`), and the seed
 * only moves arrival times and agent turns within a wave. So the counts are the
 * same on every machine; only which of two simultaneous triggers wins can vary.
 */

import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { parseArgs } from "node:util";
import { Client } from "taskguard-sidecar-client";
import {
  type DownstreamPlan,
  DownstreamScript,
  EXIT_FAILED,
  Journal,
  type LaunchRecord,
  type LockConflict,
  TASK_NAMES,
  type TaskName,
  WorkGates,
} from "./downstream.ts";
import { type Channel, Gateway, type ReplyRecord, type Trigger } from "./gateway.ts";
import { SidecarProcess } from "./sidecar.ts";

export const DEFAULT_SEED = 7;

/**
 * The `<scope>` of every task key, `<scope>::<taskName>`: the agent, not the
 * session. The convention is `<sessionKey>::<taskName>`, but here one
 * agent's `nightly-report` is one piece of work whichever session asks for it,
 * and the triggers come from four sessions (a discord channel, a thread in it,
 * a telegram DM, the cron lane). Keyed per session, the guard would only stop
 * repeats inside one session and would let the telegram, thread and cron
 * duplicates each start "their" run; keyed per agent, every channel's trigger
 * for the same task meets the same guard.
 */
export const SCOPE = "agent:ops";
export const OPERATOR = "operator:carol";
export const APPROVAL_REASON = "upstream inventory API is back";

export const PLAN: DownstreamPlan = {
  workMs: { "nightly-report": 400, "sync-inventory": 150, "weekly-digest": 250 },
  failsOnce: "sync-inventory",
  failureDetail: "upstream inventory API answered 503",
};

const SESSIONS = {
  ops: "discord:#ops",
  thread: "discord:#ops/thread-nightly",
  dm: "telegram:dm-bob",
  cron: "cron:scheduler",
} as const;

const CHANNEL_OF: Record<keyof typeof SESSIONS, Channel> = {
  ops: "discord",
  thread: "discord",
  dm: "telegram",
  cron: "cron",
};

/** The waves, in order. Kickoff triggers arrive one by one; the others all at once, through the session lanes. */
export const WAVES = ["kickoff", "while-running", "after-failure", "after-approval"] as const;
type Wave = (typeof WAVES)[number];

type TriggerSpec = [Wave, keyof typeof SESSIONS, Trigger["source"], TaskName, string];

const SCRIPT: readonly TriggerSpec[] = [
  ["kickoff", "ops", "user", "nightly-report", "@ops run the nightly-report"],
  ["kickoff", "cron", "automation", "sync-inventory", "cron */15: sync-inventory"],
  ["kickoff", "dm", "user", "weekly-digest", "can you make the weekly-digest?"],
  ["while-running", "ops", "user", "nightly-report", "@ops nightly-report?? run it again"],
  ["while-running", "ops", "user", "nightly-report", "hello? nightly-report please"],
  ["while-running", "thread", "follow-up", "nightly-report", "also rerun nightly-report with yesterday's data"],
  ["while-running", "dm", "user", "nightly-report", "is the nightly-report running? start it"],
  ["while-running", "cron", "automation", "nightly-report", "cron 02:00: nightly-report"],
  ["while-running", "dm", "user", "sync-inventory", "sync-inventory now please"],
  ["while-running", "ops", "user", "sync-inventory", "@ops run sync-inventory"],
  ["while-running", "thread", "follow-up", "weekly-digest", "and the weekly-digest too"],
  ["while-running", "cron", "automation", "weekly-digest", "cron mon 06:00: weekly-digest"],
  ["after-failure", "cron", "automation", "sync-inventory", "cron */15: sync-inventory (retry 1)"],
  ["after-failure", "cron", "automation", "sync-inventory", "cron */15: sync-inventory (retry 2)"],
  ["after-failure", "ops", "user", "sync-inventory", "@ops sync-inventory failed, run it again"],
  ["after-approval", "cron", "automation", "sync-inventory", "cron */15: sync-inventory"],
  ["after-approval", "dm", "user", "sync-inventory", "retry sync-inventory"],
];

/** mulberry32 (Tommy Ettinger, public domain): a tiny seeded PRNG, good enough to jitter a simulation. */
function mulberry32(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The trigger sequence both runs play: the script above with seeded arrival times and agent turns. */
export function planTriggers(seed: number): Trigger[] {
  const random = mulberry32(seed);
  const between = (low: number, high: number) => low + Math.floor(random() * (high - low + 1));
  return SCRIPT.map(([wave, session, source, task, text], index) => ({
    id: `m${String(index + 1).padStart(2, "0")}`,
    wave,
    channel: CHANNEL_OF[session],
    sessionKey: SESSIONS[session],
    source,
    task,
    text,
    arriveAfterMs: wave === "kickoff" ? 0 : between(0, 80),
    turnMs: between(2, 20),
  }));
}

// --- one run --------------------------------------------------------------------------------

export type Mode = "unguarded" | "guarded";

export interface Counts {
  triggers: number;
  logicalTasks: number;
  launches: number;
  launchesByTask: Record<TaskName, number>;
  /** Launches that started while another launch of the same task was still running. */
  duplicateLaunches: number;
  /** Launches that found the downstream script's lock file taken. */
  lockConflicts: number;
  /** Runs that exited 1 (a lock conflict's exit 75 is not counted here). */
  failedRuns: number;
  /** Launches of the failed task after its failure, before and after the operator's approval. */
  relaunchesBeforeApproval: number;
  relaunchesAfterApproval: number;
  /** Triggers answered with the winner's run id instead of a launch. */
  alreadyRunningReplies: number;
  /** Triggers answered "the last run failed, a retry needs approval". */
  retryRefusedReplies: number;
}

/** A guard as the sidecar shows it at the end (what `taskguard ls` prints). */
export interface GuardView {
  taskKey: string;
  state: string;
  runId: string;
  attempt: number;
  duplicateCount: number;
  lastDetail: string;
  approvedBy: string;
}

export interface RunReport {
  mode: Mode;
  counts: Counts;
  launches: LaunchRecord[];
  conflicts: LockConflict[];
  replies: ReplyRecord[];
  /** The journal's sequence number of the failure and of the approval point (in both runs, for comparison). */
  failureSeq: number | undefined;
  approvalSeq: number;
  /** With the guard: the sidecar's guards at the end. */
  guards: GuardView[];
}

export interface ScenarioReport {
  seed: number;
  scope: string;
  failingTask: TaskName;
  approval: { approver: string; reason: string };
  triggers: Trigger[];
  unguarded: RunReport;
  guarded: RunReport;
}

function deliver(gateway: Gateway, triggers: Trigger[]): Promise<void[]> {
  return Promise.all(triggers.map((trigger) => sleep(trigger.arriveAfterMs).then(() => gateway.receive(trigger))));
}

async function playOnce(mode: Mode, triggers: Trigger[], lockDir: string, client?: Client): Promise<RunReport> {
  const journal = new Journal();
  const gates = new WorkGates();
  const gateway = new Gateway({
    journal,
    downstream: new DownstreamScript(lockDir, journal, gates, PLAN),
    guard: client === undefined ? undefined : { client, scope: SCOPE },
  });
  const wave = (name: Wave) => triggers.filter((trigger) => trigger.wave === name);

  // 1. The first trigger of each task, one after the other: each starts its long run.
  for (const trigger of wave("kickoff")) {
    await gateway.receive(trigger);
  }
  // 2. While they run: repeats, follow-ups from other sessions and channels, cron, all at once.
  await deliver(gateway, wave("while-running"));
  gates.open(TASK_NAMES);
  await gateway.idle(); // nightly-report and weekly-digest succeed; sync-inventory exits 1
  // 3. Cron's retries and a user's "run it again" for the failed task.
  await deliver(gateway, wave("after-failure"));
  gates.open([PLAN.failsOnce]);
  await gateway.idle();
  // 4. An operator looks at the failure and approves one retry (without a guard there is nothing to approve).
  await client?.approveRetry(`${SCOPE}::${PLAN.failsOnce}`, { approver: OPERATOR, reason: APPROVAL_REASON });
  const approvalSeq = journal.mark("approve-retry");
  // 5. The next triggers for it: exactly one may start.
  await deliver(gateway, wave("after-approval"));
  gates.open([PLAN.failsOnce]);
  await gateway.idle();

  const guards: GuardView[] = [];
  for await (const guard of client?.list({ keyPrefix: `${SCOPE}::` }) ?? []) {
    const { taskKey, state, runId, attempt, duplicateCount, lastDetail, approvedBy } = guard;
    guards.push({ taskKey, state, runId, attempt, duplicateCount, lastDetail, approvedBy });
  }
  const failure = journal.launches.find((launch) => launch.exitCode === EXIT_FAILED);
  return {
    mode,
    counts: count(triggers, journal, gateway.replies, failure, approvalSeq),
    launches: journal.launches,
    conflicts: journal.conflicts,
    replies: gateway.replies,
    failureSeq: failure?.endSeq,
    approvalSeq,
    guards,
  };
}

function count(
  triggers: Trigger[],
  journal: Journal,
  replies: ReplyRecord[],
  failure: LaunchRecord | undefined,
  approvalSeq: number,
): Counts {
  const launches = journal.launches;
  const running = (other: LaunchRecord, at: number) =>
    other.startSeq < at && (other.endSeq === undefined || other.endSeq > at);
  const relaunches = launches.filter(
    (launch) => failure?.endSeq !== undefined && launch.task === failure.task && launch.startSeq > failure.endSeq,
  );
  return {
    triggers: triggers.length,
    logicalTasks: new Set(triggers.map((trigger) => trigger.task)).size,
    launches: launches.length,
    launchesByTask: Object.fromEntries(
      TASK_NAMES.map((task) => [task, launches.filter((launch) => launch.task === task).length]),
    ) as Record<TaskName, number>,
    duplicateLaunches: launches.filter((launch) =>
      launches.some((other) => other !== launch && other.task === launch.task && running(other, launch.startSeq)),
    ).length,
    lockConflicts: journal.conflicts.length,
    failedRuns: launches.filter((launch) => launch.exitCode === EXIT_FAILED).length,
    relaunchesBeforeApproval: relaunches.filter((launch) => launch.startSeq < approvalSeq).length,
    relaunchesAfterApproval: relaunches.filter((launch) => launch.startSeq > approvalSeq).length,
    alreadyRunningReplies: replies.filter((reply) => reply.outcome === "ALREADY_RUNNING").length,
    retryRefusedReplies: replies.filter((reply) => reply.outcome === "RETRY_REQUIRES_APPROVAL").length,
  };
}

// --- both runs ------------------------------------------------------------------------------

/** Plays the trigger sequence without and with the guard; starts (and stops) its own sidecar. */
export async function runScenario(seed = DEFAULT_SEED): Promise<ScenarioReport> {
  const triggers = planTriggers(seed);
  const workdir = mkdtempSync("/tmp/tg-gw-"); // short: a unix socket path must fit in 108 bytes
  const lockDir = (mode: Mode) => {
    const dir = join(workdir, mode);
    mkdirSync(dir);
    return dir;
  };
  // The sidecar (a Python process) starts while the unguarded run plays; that run does not need it.
  const starting = SidecarProcess.start(workdir);
  starting.catch(() => {}); // awaited below
  let sidecar: SidecarProcess | undefined;
  let done = false;
  try {
    const unguarded = await playOnce("unguarded", triggers, lockDir("unguarded"));
    sidecar = await starting;
    const client = new Client({ address: sidecar.address, holder: "gateway:ops" });
    let guarded: RunReport;
    try {
      guarded = await playOnce("guarded", triggers, lockDir("guarded"), client);
    } finally {
      client.close();
    }
    done = true;
    return {
      seed,
      scope: SCOPE,
      failingTask: PLAN.failsOnce,
      approval: { approver: OPERATOR, reason: APPROVAL_REASON },
      triggers,
      unguarded,
      guarded,
    };
  } finally {
    sidecar ??= await starting.catch(() => undefined);
    await sidecar?.stop();
    if (done) {
      rmSync(workdir, { recursive: true, force: true });
    } else {
      console.error(`gateway-scenario: kept ${workdir} (sidecar.log, lock files) for a look`);
    }
  }
}

// --- output ---------------------------------------------------------------------------------

function clock(iso: string | undefined): string {
  return iso === undefined ? "-" : iso.slice(11);
}

export function render(report: ScenarioReport): string {
  const { unguarded: u, guarded: g } = report;
  const failing = report.failingTask;
  const rows: [string, number | string, number | string][] = [
    ["trigger messages", u.counts.triggers, g.counts.triggers],
    ["launches of the downstream script", u.counts.launches, g.counts.launches],
    ...TASK_NAMES.map((task): [string, number, number] => [
      `  ${task}`,
      u.counts.launchesByTask[task],
      g.counts.launchesByTask[task],
    ]),
    ["duplicate launches (overlapping a run)", u.counts.duplicateLaunches, g.counts.duplicateLaunches],
    ["lock conflicts seen by the script", u.counts.lockConflicts, g.counts.lockConflicts],
    ["failed runs (exit 1)", u.counts.failedRuns, g.counts.failedRuns],
    [`relaunches of ${failing} before approval`, u.counts.relaunchesBeforeApproval, g.counts.relaunchesBeforeApproval],
    [`relaunches of ${failing} after approval`, u.counts.relaunchesAfterApproval, g.counts.relaunchesAfterApproval],
    ["answered ALREADY_RUNNING (winner's run id)", u.counts.alreadyRunningReplies, g.counts.alreadyRunningReplies],
    ["answered RETRY_REQUIRES_APPROVAL", u.counts.retryRefusedReplies, g.counts.retryRefusedReplies],
  ];
  const width = Math.max(...rows.map(([label]) => label.length));
  const lines = [
    `Gateway scenario, seed ${report.seed}: ${u.counts.triggers} trigger messages for ${u.counts.logicalTasks} ` +
      "logical tasks from discord, telegram and cron;",
    `with the guard, every trigger asks for ${report.scope}::<taskName> first.`,
    "",
    `${"".padEnd(width)}  without guard  with guard`,
    ...rows.map(
      ([label, without, withGuard]) =>
        `${label.padEnd(width)}  ${String(without).padStart(13)}  ${String(withGuard).padStart(10)}`,
    ),
    "",
    "With the guard, what each trigger heard:",
    ...g.replies.map(
      (reply) =>
        `  ${reply.trigger} ${reply.sessionKey.padEnd(27)} ${reply.task.padEnd(14)} ` +
        `${reply.outcome.padEnd(23)} ${reply.runId} (started ${clock(reply.startedAt)})`,
    ),
    "",
    `The sidecar's guards at the end (approved by ${report.approval.approver}: "${report.approval.reason}"):`,
    ...g.guards.map(
      (guard) =>
        `  ${guard.taskKey.padEnd(26)} ${guard.state.padEnd(9)} ${guard.runId} attempt ${guard.attempt}, ` +
        `${guard.duplicateCount} refused during this run`,
    ),
  ];
  return lines.join("\n");
}

if (import.meta.main) {
  // Exit through process.exit on SIGINT/SIGTERM, so that the "exit" handler that takes the sidecar along runs.
  process.once("SIGINT", () => process.exit(130));
  process.once("SIGTERM", () => process.exit(143));
  const { values } = parseArgs({
    options: { json: { type: "boolean", default: false }, seed: { type: "string", default: String(DEFAULT_SEED) } },
  });
  const seed = Number(values.seed);
  if (!Number.isSafeInteger(seed)) {
    console.error(`--seed: must be an integer (got ${values.seed})`);
    process.exit(2);
  }
  const report = await runScenario(seed);
  console.log(values.json ? JSON.stringify(report, null, 2) : render(report));
}
