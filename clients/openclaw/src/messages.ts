/**
 * What the model and the user read: block reasons and approval prompts, pure functions.
 *
 * OpenClaw hands `blockReason` to the model as the tool's result, and the model
 * relays it. So each reason is complete on its own: which task, what happened,
 * the run in the way (id, since when, where), and what happens next.
 */

import type { Guard, Holder } from "taskguard-sidecar-client";
import { shellQuote } from "./shell.ts";

/** Labels the plugin puts on every guard it acquires; the winner's tell a loser where the run lives. */
export const LABELS = {
  sessionKey: "openclaw.session_key",
  agentId: "openclaw.agent_id",
  tool: "openclaw.tool",
  channel: "openclaw.channel",
  toolCallId: "openclaw.tool_call_id",
  agentRunId: "openclaw.run_id",
} as const;

export function ago(since: Date, now: Date): string {
  const seconds = Math.max(0, Math.round((now.getTime() - since.getTime()) / 1000));
  if (seconds < 90) return `${seconds} s`;
  const minutes = Math.round(seconds / 60);
  if (minutes < 90) return `${minutes} min`;
  return `${(minutes / 60).toFixed(1)} h`;
}

/**
 * ALREADY_RUNNING: the tool is blocked; this is its result. A task several runs may hold at once (the sidecar's
 * `max_holders`) is refused when every place is taken: the reason then says how many runs hold it and names them.
 */
export function alreadyRunningReason(taskName: string, winner: Guard, now: Date = new Date()): string {
  if (winner.holders.length > 0) {
    return allPlacesTakenReason(taskName, winner.runs, now);
  }
  const session = winner.labels[LABELS.sessionKey];
  const where = session ? `session ${session}` : `holder ${winner.holder || "unknown"}`;
  const started = winner.startedAt.toISOString();
  return (
    `Task Guard: "${taskName}" is already running, so it was not started again. ` +
    `Run ${winner.runId} has been running since ${started} (${ago(winner.startedAt, now)} ago), ` +
    `started from ${where}; its result will be reported there. ` +
    `Tell the user it is already running (run ${winner.runId}) instead of starting it again.`
  );
}

/** The most runs a reason names one by one (a key may have up to 64); the rest are counted. */
const RUNS_NAMED = 8;

function allPlacesTakenReason(taskName: string, runs: readonly Holder[], now: Date): string {
  const named = runs
    .slice(0, RUNS_NAMED)
    .map(
      (run) =>
        `run ${run.runId}, since ${run.startedAt.toISOString()} (${ago(run.startedAt, now)} ago), ` +
        `started from ${startedFrom(run)}`,
    );
  const rest = runs.length - named.length;
  const more = rest > 0 ? `; and ${rest} more` : "";
  return (
    `Task Guard: "${taskName}" is already running as often as it may run at once (${runs.length} runs), so it ` +
    `was not started again. The runs that hold it: ${named.join("; ")}${more}. Each run's result will be ` +
    `reported where it was started. Tell the user it is already running ${runs.length} times at once instead ` +
    `of starting it again, and that it can be started once one of those runs ends.`
  );
}

/** Where the run in the way was started from, as its labels tell. */
function startedFrom(winner: Pick<Guard, "labels" | "holder">): string {
  const session = winner.labels[LABELS.sessionKey];
  return session ? `session ${session}` : `holder ${winner.holder || "unknown"}`;
}

/**
 * LOCK_DELAYED: the last run was lost (abandoned, expired, force-released), and the key stays closed for a while
 * so that a holder that did not notice can stop. Not a failure: no approval is needed, only time.
 */
export function lockDelayedReason(taskName: string, lost: Guard, now: Date = new Date()): string {
  const how = lost.lastDetail.trim() ? `${lost.state.toLowerCase()}: ${clip(lost.lastDetail.trim(), 120)}` : lost.state.toLowerCase();
  const opens = lost.lockDelayUntil;
  const when = opens
    ? `until ${opens.toISOString()} (in ${ago(now, opens)})`
    : "for the lock-delay its Task Guard rule sets";
  return (
    `Task Guard: "${taskName}" was not started. Its last run (run ${lost.runId}) was lost (${how}), and the task ` +
    `stays closed ${when}, in case that run is still at work somewhere. No approval is needed: it can be ` +
    `started again after that. Tell the user when it can run again.`
  );
}

/**
 * An exec that waits in the task's queue under `taskguard run`: the first line of its output. The wrapper then
 * tells each change of its place ("queued, position N behind run X") and runs the command when its turn comes.
 */
export function queuedExecNotice(taskName: string, winner: Guard, choice: "queue" | "keep-newest" | "supersede"): string {
  const after = `run ${winner.runId} (started ${winner.startedAt.toISOString()} from ${startedFrom(winner)})`;
  if (choice === "supersede") {
    return (
      `Task Guard: "${taskName}" was already running as ${after}. That run is asked to stop; this command ` +
      `runs as soon as it has.`
    );
  }
  const newest =
    choice === "keep-newest"
      ? " If another request for the same task comes while it waits, that newer one takes its place and this one exits 84 without running."
      : "";
  // The snapshot the refusal came with counts the calls waiting ahead (keep-newest replaces its own kind).
  const ahead = choice === "queue" ? winner.waiters.length : winner.waiters.filter((waiter) => !waiter.keepNewest).length;
  const others = ahead === 0 ? "" : ahead === 1 ? " and the 1 call queued before it" : ` and the ${ahead} calls queued before it`;
  return (
    `Task Guard: "${taskName}" is already running as ${after}. This command waits in the task's queue ` +
    `(position ${ahead + 1}) and runs after that run${others} ends.${newest}`
  );
}

/** A queued sub-agent whose turn did not come while the tool call could wait. */
export function waitEndedReason(taskName: string, winner: Guard, position: number, waitedMs: number): string {
  const place = position > 0 ? ` at position ${position}` : "";
  return (
    `Task Guard: "${taskName}" is already running as run ${winner.runId} (since ${winner.startedAt.toISOString()}, ` +
    `started from ${startedFrom(winner)}). This call waited in the task's queue${place} for ` +
    `${Math.round(waitedMs / 100) / 10} s, as long as a tool call may wait, and was not started. It can run ` +
    `after run ${winner.runId} ends: tell the user it is queued behind that run and to ask again then.`
  );
}

/** keep-newest: a newer call for the same task took this one's place in the queue. */
export function supersededReason(taskName: string, by: string, winner: Guard): string {
  const newer = by ? ` (run ${by})` : "";
  return (
    `Task Guard: "${taskName}" was not started: a newer request for the same task${newer} took its place in ` +
    `the queue behind run ${winner.runId}, and only the newest request runs after that run. Tell the user ` +
    `the newer request replaces this one.`
  );
}

/** The task's queue already holds as many waiting calls as the sidecar's rule allows. */
export function queueFullReason(taskName: string, winner: Guard): string {
  return (
    `Task Guard: "${taskName}" was not started: it is already running as run ${winner.runId}, and its queue ` +
    `is full (${winner.waiters.length} waiting). Tell the user it is already running and queued, and to try ` +
    `again after run ${winner.runId} ends.`
  );
}

/** The sidecar is unreachable and the policy is `block`. */
export function unavailableReason(taskName: string, why: string): string {
  return (
    `Task Guard could not confirm that "${taskName}" is not already running (${why}), and this task is ` +
    `configured to be blocked in that case, so it was not started. ` +
    `Tell the user to try again once the Task Guard service is back.`
  );
}

/** The sidecar is up but refused the call, or did not answer it in time: running it could start a second run. */
export function notConfirmedReason(taskName: string, why: string): string {
  return (
    `Task Guard could not confirm that "${taskName}" is not already running (${why}). The Task Guard service ` +
    `is up, so running it anyway could start it twice; it was not started. Tell the user to try again shortly.`
  );
}

/** How the failed run ended, in one line: "exit code 3", "killed by signal SIGKILL". */
function howItEnded(failed: Guard): string {
  const detail = failed.lastDetail.trim();
  return detail ? `${failed.state.toLowerCase()}: ${clip(detail, 120)}` : failed.state.toLowerCase();
}

function endedAt(failed: Guard): string {
  return failed.releasedAt ? ` at ${failed.releasedAt.toISOString()}` : "";
}

/**
 * RETRY_REQUIRES_APPROVAL: the prompt a person answers with /approve, capped the way the Gateway caps it.
 * `retryRunId` makes it unique: the plugin finds this approval in OpenClaw's ledger by it (`approvals.ts`).
 */
export function approvalPrompt(taskName: string, failed: Guard, retryRunId: string): { title: string; description: string } {
  const title = clip(`Retry failed task "${taskName}"?`, 80);
  const description =
    `Task Guard: the last run of "${clip(taskName, 160)}" (run ${failed.runId}) ended${endedAt(failed)}, ` +
    `${howItEnded(failed)}. A failed task is not started again without an approval. Allow once to run it ` +
    `one more time now (as run ${retryRunId}); deny to leave it blocked.`;
  return { title, description: clip(description, 512) };
}

/**
 * RETRY_REQUIRES_APPROVAL in a run that cannot ask a person (no chat: `openclaw agent` from a command line,
 * a scheduled run). OpenClaw would block it with "Plugin approval unavailable"; this says why and what to do.
 */
export function approvalUnavailableReason(taskName: string, taskKey: string, failed: Guard): string {
  return (
    `Task Guard: "${taskName}" was not started. Its last run (run ${failed.runId}) ended${endedAt(failed)}, ` +
    `${howItEnded(failed)}, and a task whose last run failed runs again only after a person approves it. ` +
    `This run cannot ask for that approval: it has no chat to ask in (like \`openclaw agent\` from a command ` +
    `line, or a scheduled run). To allow one more run, approve it on the gateway's host with ` +
    `\`taskguard approve-retry ${shellQuote(taskKey)} --reason "..."\`, or ask for it again from a chat that can ` +
    `show approvals (the web chat, the TUI, or a channel with approvals) and answer /approve there. ` +
    `Tell the user this.`
  );
}

/** The reason recorded with the sidecar's approval: where OpenClaw's approval came from, and who asked. */
export function approvalReason(approval: {
  taskName: string;
  approvalId: string | undefined;
  requester: string;
  sessionKey: string | undefined;
  unknownBecause?: string;
}): string {
  const id = approval.approvalId ? ` (approval ${approval.approvalId})` : "";
  const unknown = approval.unknownBecause ? `; who approved is unknown: ${approval.unknownBecause}` : "";
  return (
    `approved in OpenClaw${id} for "${approval.taskName}"; asked by ${approval.requester} ` +
    `from session ${approval.sessionKey ?? "-"}${unknown}`
  );
}

function clip(text: string, max: number): string {
  return text.length <= max ? text : `${text.slice(0, max - 1)}…`;
}
