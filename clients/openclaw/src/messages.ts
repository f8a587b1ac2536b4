/**
 * What the model and the user read: block reasons and approval prompts, pure functions.
 *
 * OpenClaw hands `blockReason` to the model as the tool's result, and the model
 * relays it. So each reason is complete on its own: which task, what happened,
 * the run in the way (id, since when, where), and what happens next.
 */

import type { Guard } from "../../node/src/index.ts";

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

/** ALREADY_RUNNING: the tool is blocked; this is its result. */
export function alreadyRunningReason(taskName: string, winner: Guard, now: Date = new Date()): string {
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

/** The sidecar did not answer in time and the policy is `block`. */
export function unavailableReason(taskName: string, why: string, budgetMs: number): string {
  return (
    `Task Guard could not confirm that "${taskName}" is not already running (${why}; no answer within ` +
    `${budgetMs} ms), and this task is configured to be blocked in that case, so it was not started. ` +
    `Tell the user to try again once the Task Guard service is back.`
  );
}

/** How the failed run ended, in one line: "exit code 3", "killed by signal SIGKILL". */
function howItEnded(failed: Guard): string {
  const detail = failed.lastDetail.trim();
  return detail ? `${failed.state.toLowerCase()}: ${detail}` : failed.state.toLowerCase();
}

/** RETRY_REQUIRES_APPROVAL: the prompt a person answers with /approve. Capped the way the Gateway caps it. */
export function approvalPrompt(taskName: string, failed: Guard): { title: string; description: string } {
  const title = clip(`Retry failed task "${taskName}"?`, 80);
  const when = failed.releasedAt ? ` at ${failed.releasedAt.toISOString()}` : "";
  const description = clip(
    `Task Guard: the last run of "${taskName}" (run ${failed.runId}) ended${when}, ${howItEnded(failed)}. ` +
      `A failed task is not started again without an approval. Allow once to run it one more time now; ` +
      `deny to leave it blocked.`,
    512,
  );
  return { title, description };
}

/** The tool result when the approval is denied or not given. OpenClaw writes its own; this goes to the log. */
export function approvalReason(approver: string, channel: string | undefined, taskName: string): string {
  const via = channel ? ` via ${channel}` : "";
  return `approved${via} by ${approver} from OpenClaw for "${taskName}"`;
}

function clip(text: string, max: number): string {
  return text.length <= max ? text : `${text.slice(0, max - 1)}…`;
}
