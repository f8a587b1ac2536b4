/**
 * The OpenClaw plugin entry: Task Guard in front of `exec` and `sessions_spawn`.
 *
 * OpenClaw loads this file itself (TypeScript, no build step) from
 * `plugins.load.paths` and calls `register(api)`, also in processes that only
 * inspect plugins; hooks are wired in every mode, and the connection to the
 * sidecar is made only when a hook first needs it.
 */

import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { pluginRootFrom, resolveSettings } from "./src/config.ts";
import type { PluginApi } from "./src/openclaw.ts";
import { TaskGuardPlugin } from "./src/plugin.ts";

export const PLUGIN_ID = "taskguard";

function here(): string {
  try {
    return dirname(fileURLToPath(import.meta.url));
  } catch {
    return process.cwd();
  }
}

export default {
  id: PLUGIN_ID,
  name: "Task Guard",
  description: "One run per task: exec and sessions_spawn ask the Task Guard sidecar before they start.",
  register(api: PluginApi): void {
    const root = pluginRootFrom(api.rootDir, join(here(), "src"));
    const settings = resolveSettings(api.pluginConfig, root);
    const plugin = new TaskGuardPlugin({ settings, logger: api.logger, nodeClientRoot: join(root, "..", "node") });
    if (api.registrationMode === undefined || api.registrationMode === "full") {
      api.logger.info(
        `taskguard: guarding ${[settings.exec.enabled && "exec", settings.sessionsSpawn.enabled && "sessions_spawn"]
          .filter(Boolean)
          .join(", ")} through ${settings.address} (pid ${process.pid}; wrapper ${settings.taskguardBin}; ` +
          `when unreachable: ${settings.onUnavailable} within ${settings.decisionTimeoutMs} ms)`,
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
