/**
 * The plugin's settings (`plugins.entries.taskguard.config`), with their defaults.
 *
 * OpenClaw validates the config against `openclaw.plugin.json`'s `configSchema`
 * before the plugin loads; this module fills in defaults and compiles the naming
 * rules. It reads the environment only for `TASKGUARD_ADDR`, like the Node client.
 */

import { accessSync, constants, statSync } from "node:fs";
import { delimiter, isAbsolute, join, resolve } from "node:path";
import { defaultAddress } from "taskguard-sidecar-client";

export type Scope = "agent" | "session" | "global";
export type UnavailablePolicy = "allow" | "block";
export type GuardedTool = "exec" | "sessions_spawn";
/** "gateway": wrap an exec in `taskguard run` when it runs on the gateway host; "always"; "never" (TTL lease instead). */
export type WrapMode = "gateway" | "always" | "never";
/**
 * When the task is already running: block the call ("reject"); wait in the task's queue and run after the
 * current run ("queue"); the same, but a newer call replaces a waiting one ("keep-newest"); ask the running
 * run to stop and run next ("supersede", exec only).
 */
export type ConflictChoice = "reject" | "queue" | "keep-newest" | "supersede";
export const CONFLICT_CHOICES: readonly ConflictChoice[] = ["reject", "queue", "keep-newest", "supersede"];

export interface Rule {
  /** Only for this tool; both when unset. */
  tool: GuardedTool | undefined;
  /** Tested against the normalised command (exec) or the taskName, label and task text (sessions_spawn). */
  match: RegExp;
  /** The task name; `$1`.. refer to the match's groups. */
  name: string;
  scope: Scope | undefined;
  onUnavailable: UnavailablePolicy | undefined;
  onConflict: ConflictChoice;
  /** How long a waiting call may wait in the queue; unset: as long as the sidecar's rule (an exec) or the hook allows. */
  maxWaitMs: number | undefined;
}

export interface ToolSettings {
  enabled: boolean;
  scope: Scope;
}

export interface Settings {
  /** The sidecar, `unix:/path` or `host:port`. */
  address: string;
  /** A file holding the bearer token the sidecar asks for; the plugin and the `taskguard run` wrapper both present it. */
  tokenFile: string | undefined;
  /** The `taskguard` executable that wraps an exec: the configured one, else the first on PATH; unset when missing. */
  taskguardBin: string | undefined;
  /** Why there is no `taskguardBin`, for the gateway log. */
  taskguardMissing: string | undefined;
  /**
   * How long a call waits for the sidecar before the plugin checks whether the sidecar is reachable; when
   * it is not (connection refused, no socket, no answer to a health check), `onUnavailable` decides then.
   */
  decisionTimeoutMs: number;
  /** How long a reachable sidecar's answer is waited for in all; after that the call is blocked. */
  maxDecisionMs: number;
  /** What a call gets when the sidecar is unreachable. */
  onUnavailable: UnavailablePolicy;
  exec: ToolSettings & { wrap: WrapMode; leaseTtlMs: number };
  sessionsSpawn: ToolSettings;
  rules: Rule[];
  approval: { timeoutMs: number; severity: "info" | "warning" | "critical" };
}

/** With the reachability check (at most PROBE_MS more), an unreachable sidecar is noticed within 2.5 s. */
export const DEFAULT_DECISION_TIMEOUT_MS = 1500;
export const MAX_DECISION_TIMEOUT_MS = 10_000;
/** How long the reachability check may take: becoming ready, or answering a health check on a ready connection. */
export const PROBE_MS = 1000;
/** Below OpenClaw's 15 s before_tool_call timeout (a hook that times out fails the call), with room to spare. */
export const DEFAULT_MAX_DECISION_MS = 10_000;
export const MAX_MAX_DECISION_MS = 13_000;

type Raw = Record<string, unknown>;

function record(value: unknown): Raw {
  return typeof value === "object" && value !== null && !Array.isArray(value) ? (value as Raw) : {};
}

function text(value: unknown): string | undefined {
  return typeof value === "string" && value.trim() !== "" ? value.trim() : undefined;
}

function count(value: unknown, fallback: number, min: number, max: number): number {
  return typeof value === "number" && Number.isFinite(value) ? Math.min(max, Math.max(min, value)) : fallback;
}

function oneOf<T extends string>(value: unknown, allowed: readonly T[], fallback: T): T {
  return typeof value === "string" && (allowed as readonly string[]).includes(value) ? (value as T) : fallback;
}

const SCOPES = ["agent", "session", "global"] as const;
const POLICIES = ["allow", "block"] as const;

function executable(path: string): boolean {
  try {
    accessSync(path, constants.X_OK);
    return statSync(path).isFile();
  } catch {
    return false;
  }
}

/**
 * The `taskguard` command the exec wrapper runs: `configured` (a path, or a name looked up on PATH), else
 * `taskguard` on PATH, as an absolute path; or why there is none.
 */
export function findTaskguard(
  configured: string | undefined,
  env: NodeJS.ProcessEnv = process.env,
): { path: string } | { missing: string } {
  const wanted = configured ?? "taskguard";
  const how = "install it (pipx install taskguard-sidecar) or set plugins.entries.taskguard.config.taskguardBin";
  if (wanted.includes("/")) {
    const path = resolve(wanted);
    return executable(path)
      ? { path }
      : { missing: `taskguardBin ${JSON.stringify(wanted)} is not an executable file; ${how} to the taskguard command` };
  }
  const folders = (env.PATH ?? "").split(delimiter).filter((folder) => isAbsolute(folder));
  const found = folders.map((folder) => join(folder, wanted)).find(executable);
  if (found !== undefined) return { path: found };
  const what = configured === undefined ? "no taskguard command" : `no ${JSON.stringify(wanted)} (taskguardBin)`;
  return { missing: `${what} on PATH (${env.PATH ?? ""}); ${how} to its path` };
}

export function resolveSettings(raw: unknown, env: NodeJS.ProcessEnv = process.env): Settings {
  const config = record(raw);
  const tools = record(config.tools);
  const exec = record(tools.exec);
  const spawn = record(tools.sessions_spawn);
  const approval = record(config.approval);
  const decisionTimeoutMs = count(config.decisionTimeoutMs, DEFAULT_DECISION_TIMEOUT_MS, 50, MAX_DECISION_TIMEOUT_MS);
  const taskguard = findTaskguard(text(config.taskguardBin), env);
  return {
    address: text(config.address) ?? defaultAddress(env),
    tokenFile: text(config.tokenFile),
    taskguardBin: "path" in taskguard ? taskguard.path : undefined,
    taskguardMissing: "missing" in taskguard ? taskguard.missing : undefined,
    decisionTimeoutMs,
    // At least the budget and the reachability check: a reachable sidecar gets that long, whatever the setting.
    maxDecisionMs: Math.max(
      decisionTimeoutMs + PROBE_MS,
      count(config.maxDecisionMs, DEFAULT_MAX_DECISION_MS, 0, MAX_MAX_DECISION_MS),
    ),
    onUnavailable: oneOf(config.onUnavailable, POLICIES, "allow"),
    exec: {
      enabled: exec.enabled !== false,
      scope: oneOf(exec.scope, SCOPES, "agent"),
      wrap: oneOf(exec.wrap, ["gateway", "always", "never"] as const, "gateway"),
      leaseTtlMs: count(exec.leaseTtlMs, 60_000, 1_000, 3_600_000),
    },
    sessionsSpawn: { enabled: spawn.enabled !== false, scope: oneOf(spawn.scope, SCOPES, "agent") },
    rules: (Array.isArray(config.rules) ? config.rules : []).map((value, index) => compileRule(record(value), index)),
    approval: {
      timeoutMs: count(approval.timeoutMs, 600_000, 1_000, 600_000),
      severity: oneOf(approval.severity, ["info", "warning", "critical"] as const, "warning"),
    },
  };
}

function compileRule(rule: Raw, index: number): Rule {
  const match = text(rule.match);
  const name = text(rule.name);
  if (match === undefined || name === undefined) {
    throw new Error(`taskguard: rules[${index}] needs "match" (a regular expression) and "name"`);
  }
  const tool = rule.tool === "exec" || rule.tool === "sessions_spawn" ? rule.tool : undefined;
  const onConflict = rule.onConflict ?? "reject";
  if (typeof onConflict !== "string" || !(CONFLICT_CHOICES as readonly string[]).includes(onConflict)) {
    throw new Error(
      `taskguard: rules[${index}].onConflict must be one of ${CONFLICT_CHOICES.join(", ")} (got ${JSON.stringify(onConflict)})`,
    );
  }
  // A sub-agent cannot be told to stop from here: superseding one would only have it force-released later.
  if (onConflict === "supersede" && tool !== "exec") {
    throw new Error(`taskguard: rules[${index}].onConflict "supersede" needs "tool": "exec" (a running exec can be stopped)`);
  }
  return {
    tool,
    match: new RegExp(match),
    name,
    scope: rule.scope === undefined ? undefined : oneOf(rule.scope, SCOPES, "agent"),
    onUnavailable: rule.onUnavailable === undefined ? undefined : oneOf(rule.onUnavailable, POLICIES, "allow"),
    onConflict: onConflict as ConflictChoice,
    maxWaitMs: rule.maxWaitMs === undefined ? undefined : count(rule.maxWaitMs, 100, 100, 7 * 24 * 3_600_000),
  };
}
