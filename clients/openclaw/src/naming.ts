/**
 * Task keys for tool calls: `<scope>::<taskName>`, pure functions.
 *
 * The scope decides who collides with whom. `agent` (the default) is
 * `agent:<agentId>`, so a channel session, a thread, a DM and a cron run of
 * the same agent all ask for one guard; `session` is the feature request's
 * `<sessionKey>::<taskName>` (repeats inside one session only); `global` is one
 * guard per task name on the whole host.
 *
 * The task name of an exec is its normalised command, of a sessions_spawn its
 * taskName or label, else a hash of its task text; configured rules (regex →
 * name, scope) name the tasks that matter, so that `./report.sh --date today`
 * and `bash report.sh` can both be `nightly-report`.
 */

import { createHash } from "node:crypto";
import type { ConflictChoice, GuardedTool, Rule, Scope, UnavailablePolicy } from "./config.ts";

/** Where a tool call comes from, as OpenClaw's hook context tells it. */
export interface CallOrigin {
  agentId: string | undefined;
  sessionKey: string | undefined;
}

export interface TaskIdentity {
  taskKey: string;
  taskName: string;
  scope: Scope;
  /** The rule's policy for an unreachable sidecar, when a rule named the task. */
  onUnavailable: UnavailablePolicy | undefined;
  /** What a call gets while the task runs: the rule's, else "reject". */
  onConflict: ConflictChoice;
  maxWaitMs: number | undefined;
}

/** The sidecar takes keys of 1..512 bytes; names are kept well inside that. */
const MAX_NAME_BYTES = 160;
const SHORT_PREFIX_CHARS = 60;

function sha(text: string): string {
  return createHash("sha256").update(text).digest("hex").slice(0, 12);
}

/** Whitespace collapsed, ends trimmed: `ls  -l\n` and `ls -l` are one task. */
export function normaliseCommand(command: string): string {
  return command.replace(/\s+/g, " ").trim();
}

/**
 * A name safe inside a task key: printable, no `::` (the sidecar splits the key
 * at its last `::`), short. A long one keeps its start and gets a hash of the whole.
 */
export function safeName(name: string): string {
  const printable = name.replace(/[\p{Cc}\p{Cf}]/gu, " ").replaceAll("::", ": :");
  if (Buffer.byteLength(printable) <= MAX_NAME_BYTES) {
    return printable;
  }
  return `${[...printable].slice(0, SHORT_PREFIX_CHARS).join("").trimEnd()}… #${sha(name)}`;
}

/** The text a tool call's name comes from, and the name used when no rule matches. */
export function describeCall(tool: GuardedTool, params: Record<string, unknown>): { subject: string; name: string } {
  if (tool === "exec") {
    const command = normaliseCommand(typeof params.command === "string" ? params.command : "");
    return { subject: command, name: safeName(command) };
  }
  const stable = [params.taskName, params.label].find((value) => typeof value === "string" && value.trim() !== "");
  const task = typeof params.task === "string" ? params.task : "";
  const name = typeof stable === "string" ? safeName(stable.trim()) : `spawn #${sha(task)}`;
  const subject = [params.taskName, params.label, task].filter((v) => typeof v === "string").join("\n");
  return { subject, name: `spawn:${name}` };
}

export function scopeKey(scope: Scope, origin: CallOrigin): string {
  switch (scope) {
    case "global":
      return "global";
    case "session":
      // Without a session there is nothing narrower than the agent to key on.
      return origin.sessionKey ?? `agent:${origin.agentId ?? "main"}`;
    default:
      return `agent:${origin.agentId ?? agentOf(origin.sessionKey) ?? "main"}`;
  }
}

/** `agent:<id>:...` session keys carry their agent. */
export function agentOf(sessionKey: string | undefined): string | undefined {
  const match = /^agent:([^:]+):/.exec(sessionKey ?? "");
  return match?.[1];
}

export function identify(
  tool: GuardedTool,
  params: Record<string, unknown>,
  origin: CallOrigin,
  defaultScope: Scope,
  rules: readonly Rule[],
): TaskIdentity {
  const { subject, name } = describeCall(tool, params);
  for (const rule of rules) {
    if (rule.tool !== undefined && rule.tool !== tool) continue;
    const match = rule.match.exec(subject);
    if (match === null) continue;
    const named = safeName(rule.name.replace(/\$(\d)/g, (_, group: string) => match[Number(group)] ?? ""));
    const scope = rule.scope ?? defaultScope;
    return {
      taskKey: `${scopeKey(scope, origin)}::${named}`,
      taskName: named,
      scope,
      onUnavailable: rule.onUnavailable,
      onConflict: rule.onConflict,
      maxWaitMs: rule.maxWaitMs,
    };
  }
  return {
    taskKey: `${scopeKey(defaultScope, origin)}::${name}`,
    taskName: name,
    scope: defaultScope,
    onUnavailable: undefined,
    onConflict: "reject",
    maxWaitMs: undefined,
  };
}
