/**
 * The scenario as a user runs it (`node scenario.ts --json`, which starts and
 * stops its own sidecar), checked: the guarded run keeps to one launch per
 * logical task and one approved relaunch, and the unguarded run really shows
 * the problem. Also type-checks the example, whose files no other tsc run sees.
 */

import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { dirname, join, resolve } from "node:path";
import { before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import type { LaunchRecord } from "../downstream.ts";
import type { ReplyRecord } from "../gateway.ts";
import { APPROVAL_REASON, OPERATOR, type ScenarioReport } from "../scenario.ts";
import { ROOT, within } from "../sidecar.ts";

const EXAMPLE_DIR = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const RUN_TIMEOUT_MS = 30_000;

/** Runs `scenario.ts --json` and parses its one JSON document. */
async function runScenarioJson(): Promise<ScenarioReport> {
  const child = spawn(process.execPath, [join(EXAMPLE_DIR, "scenario.ts"), "--json"], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stdout = "";
  let stderr = "";
  child.stdout.setEncoding("utf8").on("data", (chunk: string) => (stdout += chunk));
  child.stderr.setEncoding("utf8").on("data", (chunk: string) => (stderr += chunk));
  const exited = new Promise<number | null>((resolve) => child.once("close", (code) => resolve(code)));
  try {
    const code = await within(exited, "scenario.ts --json to finish", RUN_TIMEOUT_MS);
    assert.equal(code, 0, `scenario.ts --json exited ${code}:\n${stderr}`);
  } finally {
    child.kill("SIGTERM"); // a no-op once it exited; on a timeout, it stops the scenario and its sidecar
  }
  return JSON.parse(stdout) as ScenarioReport;
}

function launchOf(launches: LaunchRecord[], runId: string): LaunchRecord {
  const launch = launches.find((candidate) => candidate.runId === runId);
  assert.ok(launch, `no launch has run id ${runId}`);
  return launch;
}

function byOutcome(replies: ReplyRecord[], outcome: ReplyRecord["outcome"]): ReplyRecord[] {
  return replies.filter((reply) => reply.outcome === outcome);
}

describe("the gateway scenario", () => {
  let report: ScenarioReport;

  before(async () => {
    report = await runScenarioJson();
  });

  test("without the guard, every trigger launches and the downstream script sees duplicates and lock conflicts", () => {
    const { counts } = report.unguarded;
    assert.equal(counts.launches, report.triggers.length);
    assert.ok(counts.duplicateLaunches > 0, "no duplicate launches: the scenario does not reproduce the problem");
    assert.ok(counts.lockConflicts > 0, "no lock conflicts: the scenario does not reproduce the problem");
    assert.equal(counts.failedRuns, 1);
    const afterFailure = report.triggers.filter((trigger) => trigger.wave === "after-failure").length;
    assert.equal(counts.relaunchesBeforeApproval, afterFailure, "the failed task is relaunched by every re-trigger");
    assert.equal(counts.alreadyRunningReplies + counts.retryRefusedReplies, 0);
  });

  test("with the guard, each logical task launches exactly once, plus one relaunch after the approval", () => {
    const { counts, launches, conflicts } = report.guarded;
    assert.deepEqual(counts.launchesByTask, { "nightly-report": 1, "sync-inventory": 2, "weekly-digest": 1 });
    assert.equal(counts.launches, counts.logicalTasks + 1);
    assert.equal(counts.duplicateLaunches, 0);
    assert.equal(counts.lockConflicts, 0);
    assert.deepEqual(conflicts, []);
    assert.ok(launches.every((launch) => launch.gotLock));
    assert.equal(counts.failedRuns, 1);
    assert.equal(counts.relaunchesBeforeApproval, 0);
    assert.equal(counts.relaunchesAfterApproval, 1);
  });

  test("with the guard, every trigger gets one answer, and only the launches' triggers launched", () => {
    const { replies, launches, counts } = report.guarded;
    const answered = replies.map((reply) => reply.trigger).sort();
    assert.deepEqual(answered, report.triggers.map((trigger) => trigger.id).sort());
    const launched = byOutcome(replies, "LAUNCHED");
    assert.deepEqual(
      launched.map((reply) => reply.runId),
      launches.map((launch) => launch.runId),
    );
    assert.equal(counts.alreadyRunningReplies + counts.retryRefusedReplies, counts.triggers - counts.launches);
  });

  test("with the guard, every duplicate is answered ALREADY_RUNNING with the winner's run id and start time", () => {
    const { replies, launches, counts } = report.guarded;
    const duplicates = byOutcome(replies, "ALREADY_RUNNING");
    assert.equal(duplicates.length, counts.alreadyRunningReplies);
    assert.ok(duplicates.length > 0);
    for (const reply of duplicates) {
      const winner = launchOf(launches, reply.runId);
      assert.equal(winner.task, reply.task, `${reply.trigger} was answered with another task's run`);
      assert.ok(winner.startSeq < reply.seq, `${reply.trigger} was answered before ${winner.runId} started`);
      assert.ok(winner.endSeq !== undefined && reply.seq < winner.endSeq, `${winner.runId} had ended`);
      assert.equal(reply.startedAt, winner.startedAt, `${reply.trigger}: not the winner's start time`);
    }
  });

  test("with the guard, the failed task is refused until the approval, then relaunched exactly once", () => {
    const { replies, launches, failureSeq, approvalSeq } = report.guarded;
    const failed = launches.filter((launch) => launch.exitCode === 1);
    assert.equal(failed.length, 1);
    const [failure] = failed as [LaunchRecord];
    assert.equal(failure.task, report.failingTask);
    assert.ok(failureSeq !== undefined && failureSeq < approvalSeq);

    const refused = byOutcome(replies, "RETRY_REQUIRES_APPROVAL");
    assert.equal(refused.length, report.triggers.filter((trigger) => trigger.wave === "after-failure").length);
    for (const reply of refused) {
      assert.equal(reply.runId, failure.runId, `${reply.trigger} was not answered with the failed run`);
      assert.ok(failureSeq < reply.seq && reply.seq < approvalSeq);
    }

    const relaunches = launches.filter((launch) => launch.task === failure.task && launch.startSeq > failureSeq);
    assert.equal(relaunches.length, 1);
    assert.ok(relaunches.every((launch) => launch.startSeq > approvalSeq), "relaunched before the approval");
    assert.equal(relaunches[0]?.exitCode, 0);
  });

  test("with the guard, the sidecar's guards agree: every run ended, one approved retry, duplicates counted", () => {
    const { guards, replies } = report.guarded;
    assert.deepEqual(
      guards.map((guard) => guard.taskKey),
      ["nightly-report", "sync-inventory", "weekly-digest"].map((task) => `${report.scope}::${task}`),
    );
    for (const guard of guards) {
      assert.equal(guard.state, "SUCCEEDED", guard.taskKey);
      const refusedForThisRun = byOutcome(replies, "ALREADY_RUNNING").filter((reply) => reply.runId === guard.runId);
      assert.equal(guard.duplicateCount, refusedForThisRun.length, `${guard.taskKey}: duplicate_count`);
    }
    const retried = guards.find((guard) => guard.taskKey.endsWith(`::${report.failingTask}`));
    assert.equal(retried?.attempt, 2);
    assert.equal(retried?.approvedBy, OPERATOR);
    assert.equal(report.approval.reason, APPROVAL_REASON);
  });
});

test("tsc --noEmit finds no type errors in the example", () => {
  const tsc = join(ROOT, "clients", "node", "node_modules", "typescript", "bin", "tsc");
  const result = spawnSync(process.execPath, [tsc, "--noEmit", "-p", join(EXAMPLE_DIR, "tsconfig.json")], {
    cwd: EXAMPLE_DIR,
    encoding: "utf8",
  });
  assert.equal(result.status, 0, `tsc --noEmit:\n${result.stdout}${result.stderr}`);
});
