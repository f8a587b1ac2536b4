/**
 * The slice of OpenClaw 2026.9.6's plugin API this plugin uses, written out
 * from the package's own declarations (`dist/plugin-sdk/*.d.ts`:
 * `PluginHookToolContext`, `PluginHookBeforeToolCallEvent`,
 * `PluginHookBeforeToolCallResult`, `PluginHookSubagentEndedEvent`, ...), so
 * that the plugin type-checks without the 650 MB package installed. OpenClaw
 * documents every plugin API as experimental: re-check these against each
 * version you declare compatible.
 */

import type { TraceContext } from "./trace.ts";

export interface PluginLogger {
  debug?: (message: string) => void;
  info: (message: string) => void;
  warn: (message: string) => void;
  error: (message: string) => void;
}

export interface ToolRequester {
  readonly channel?: string;
  readonly accountId?: string;
  readonly senderId?: string;
  readonly senderIsOwner?: boolean;
}

export interface ToolContext {
  agentId?: string;
  sessionKey?: string;
  sessionId?: string;
  runId?: string;
  toolName: string;
  toolCallId?: string;
  trace?: TraceContext;
  channelId?: string;
  requester?: ToolRequester;
  abortSignal?: AbortSignal;
}

export interface BeforeToolCallEvent {
  toolName: string;
  params: Record<string, unknown>;
  runId?: string;
  toolCallId?: string;
}

export interface AfterToolCallEvent {
  toolName: string;
  params: Record<string, unknown>;
  runId?: string;
  toolCallId?: string;
  result?: unknown;
  error?: string;
  durationMs?: number;
}

export type ApprovalDecision = "allow-once" | "allow-always" | "deny" | "timeout" | "cancelled";

export interface BeforeToolCallResult {
  params?: Record<string, unknown>;
  block?: boolean;
  blockReason?: string;
  requireApproval?: {
    title: string;
    description: string;
    severity?: "info" | "warning" | "critical";
    timeoutMs?: number;
    allowedDecisions?: Array<"allow-once" | "allow-always" | "deny">;
    onResolution?: (decision: ApprovalDecision) => Promise<void> | void;
  };
}

export interface SubagentContext {
  runId?: string;
  childSessionKey?: string;
  requesterSessionKey?: string;
}

export interface SubagentEndedEvent {
  targetSessionKey: string;
  targetKind: "subagent" | "acp";
  reason: string;
  runId?: string;
  endedAt?: number;
  outcome?: "ok" | "error" | "timeout" | "killed" | "reset" | "deleted";
  error?: string;
}

export interface HookHandlers {
  before_tool_call: (event: BeforeToolCallEvent, ctx: ToolContext) => Promise<BeforeToolCallResult | undefined>;
  after_tool_call: (event: AfterToolCallEvent, ctx: ToolContext) => Promise<void>;
  subagent_ended: (event: SubagentEndedEvent, ctx: SubagentContext) => Promise<void>;
  gateway_stop: (event: { reason?: string }, ctx: unknown) => void;
}

export interface PluginApi {
  id: string;
  rootDir?: string;
  /** "full" in the gateway; OpenClaw also loads plugins only to inspect them. */
  registrationMode?: string;
  pluginConfig?: unknown;
  logger: PluginLogger;
  on<K extends keyof HookHandlers>(hook: K, handler: HookHandlers[K], options?: { matcher?: string[]; priority?: number }): void;
}
