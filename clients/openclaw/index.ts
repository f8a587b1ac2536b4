/**
 * The OpenClaw plugin entry: Task Guard in front of `exec` and `sessions_spawn`.
 *
 * An installed plugin (`openclaw plugins install taskguard-sidecar-openclaw-X.tgz`) runs the compiled
 * `dist/index.js` (package.json's `openclaw.runtimeExtensions`); a folder in `plugins.load.paths` runs this
 * TypeScript. OpenClaw calls `register(api)`, also in processes (and
 * modes) that only inspect plugins. Hooks are wired in every mode; only the
 * gateway's own registration ("full") connects to the sidecar at once and keeps
 * the channel connected, elsewhere a hook connects when it first needs to.
 */

import { resolveSettings } from "./src/config.ts";
import { gatewayLedger } from "./src/approvals.ts";
import type { PluginApi } from "./src/openclaw.ts";
import { TaskGuardPlugin } from "./src/plugin.ts";

export const PLUGIN_ID = "taskguard";
/** How long one read of OpenClaw's approval history may take (the plugin stops waiting for it sooner). */
const APPROVER_LOOKUP_TIMEOUT_MS = 5000;

export default {
  id: PLUGIN_ID,
  name: "Task Guard",
  description: "One run per task: exec and sessions_spawn ask the Task Guard sidecar before they start.",
  register(api: PluginApi): void {
    const settings = resolveSettings(api.pluginConfig);
    const plugin = new TaskGuardPlugin({
      settings,
      logger: api.logger,
      ledger: gatewayLedger(PLUGIN_ID, APPROVER_LOOKUP_TIMEOUT_MS),
    });
    if (api.registrationMode === undefined || api.registrationMode === "full") {
      if (settings.taskguardMissing !== undefined) {
        api.logger.error(
          `taskguard: cannot find the taskguard command the exec wrapper runs: ${settings.taskguardMissing}. ` +
            "Until then each exec is guarded by a TTL lease the plugin renews instead of by `taskguard run` " +
            "(a backgrounded command's guard then ends EXPIRED, not with its exit code)",
        );
      }
      plugin.start();
      api.logger.info(
        `taskguard: guarding ${[settings.exec.enabled && "exec", settings.sessionsSpawn.enabled && "sessions_spawn"]
          .filter(Boolean)
          .join(", ")} through ${settings.address} (pid ${process.pid}; wrapper ${settings.taskguardBin ?? "none"}; ` +
          `when unreachable: ${settings.onUnavailable}, checked after ${settings.decisionTimeoutMs} ms; a sidecar ` +
          `that is up is waited for up to ${settings.maxDecisionMs} ms)`,
      );
    }
    api.on("before_tool_call", (event, ctx) => plugin.beforeToolCall(event, ctx), {
      matcher: ["exec", "sessions_spawn"],
    });
    api.on("after_tool_call", (event, ctx) => plugin.afterToolCall(event, ctx), {
      matcher: ["exec", "sessions_spawn", "process"],
    });
    api.on("subagent_ended", (event, ctx) => plugin.subagentEnded(event, ctx));
    api.on("gateway_stop", () => plugin.close());
  },
};
