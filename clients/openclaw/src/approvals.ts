/**
 * Who approved a retry, as OpenClaw recorded it.
 *
 * OpenClaw passes `requireApproval.onResolution` the decision only. Who made
 * it is in OpenClaw's approval ledger: `openclaw approvals resolve` prints it
 * ("resolved allow-once by runtime:cli"), and the Gateway's `approval.history`
 * returns each resolved approval with its `resolver` ({kind, id}) and the
 * prompt it showed. The plugin finds its own approval there by a marker it put
 * in the prompt's description (the retry's run id, unique per request) and
 * names the approver as OpenClaw's CLI does, `<kind>:<id>`: `runtime:cli` for
 * `openclaw approvals resolve`, `runtime:Chat approval (webchat:<sender>)` for
 * `/approve` in a chat, `device:<id>` for a paired device.
 *
 * The Gateway is called through OpenClaw's public SDK helper
 * (`openclaw/plugin-sdk/gateway-runtime`'s `callGatewayFromCli`), which finds
 * the Gateway and its credentials the way the CLI does: the plugin reads no
 * credential itself. OpenClaw's plugin loader maps that import to the running
 * OpenClaw; elsewhere (the plugin's own tests) it is missing, and so is the
 * approver.
 */

export interface ResolvedApproval {
  /** OpenClaw's approval id (`plugin:<uuid>`). */
  id: string;
  /** `<kind>:<id>` of the resolver, as `openclaw approvals` prints it. */
  approver: string;
}

export interface ApprovalLedger {
  /** Loads what a lookup needs, ahead of the first one (the first call costs a second on a busy gateway). */
  prepare(): void;
  /** The resolved approval asked from `sessionKey` whose description contains `marker`, if OpenClaw has one. */
  find(marker: string, sessionKey: string | undefined): Promise<ResolvedApproval | undefined>;
}

type CallGateway = (
  method: string,
  options: Record<string, unknown>,
  params: Record<string, unknown>,
  extra: Record<string, unknown>,
) => Promise<unknown>;

// A variable, not a literal: TypeScript then does not look for the module's types (OpenClaw is not installed here).
const GATEWAY_RUNTIME = "openclaw/plugin-sdk/gateway-runtime";
/** approval.history's largest page; it lists the newest first. */
const HISTORY_PAGE = 100;

/** OpenClaw's ledger, read over its Gateway: `approval.history` (scope operator.approvals), newest first. */
export function gatewayLedger(pluginId: string, timeoutMs: number): ApprovalLedger {
  let loading: Promise<CallGateway> | undefined;
  const load = (): Promise<CallGateway> => {
    loading ??= (import(GATEWAY_RUNTIME) as Promise<{ callGatewayFromCli?: unknown }>).then((module) => {
      if (typeof module.callGatewayFromCli !== "function") {
        throw new Error(`${GATEWAY_RUNTIME} has no callGatewayFromCli`);
      }
      return module.callGatewayFromCli as CallGateway;
    });
    loading.catch(() => {
      loading = undefined; // try again next time
    });
    return loading;
  };
  return {
    prepare: () => void load().catch(() => {}),
    async find(marker: string, sessionKey: string | undefined): Promise<ResolvedApproval | undefined> {
      const call = await load();
      const page = await call(
        "approval.history",
        { json: true, timeout: String(timeoutMs) },
        { kind: "plugin", limit: HISTORY_PAGE },
        { scopes: ["operator.approvals"], progress: false },
      );
      return findApproval(page, { pluginId, marker, sessionKey });
    },
  };
}

/**
 * In an `approval.history` page, the approval this plugin asked for: its plugin id, the marker in its
 * description, and (when known) the session it was asked from. Anyone who may request approvals could
 * make one that looks alike; it would also need the marker (a fresh UUID) and that session.
 */
export function findApproval(
  page: unknown,
  want: { pluginId: string; marker: string; sessionKey: string | undefined },
): ResolvedApproval | undefined {
  const items = record(page).items;
  for (const item of Array.isArray(items) ? items : []) {
    const entry = record(item);
    const presentation = record(entry.presentation);
    const description = presentation.description;
    if (presentation.pluginId !== want.pluginId || typeof description !== "string" || !description.includes(want.marker)) {
      continue;
    }
    if (want.sessionKey !== undefined && record(entry.source).sessionKey !== want.sessionKey) {
      continue;
    }
    const approver = resolverName(entry.resolver);
    if (typeof entry.id === "string" && approver !== undefined) {
      return { id: entry.id, approver };
    }
  }
  return undefined;
}

/** As `openclaw approvals resolve` prints a resolver: `kind:id`, or the kind alone. */
export function resolverName(resolver: unknown): string | undefined {
  const { kind, id } = record(resolver);
  if (typeof kind !== "string" || kind === "") return undefined;
  return typeof id === "string" && id !== "" ? `${kind}:${id}` : kind;
}

function record(value: unknown): Record<string, unknown> {
  return typeof value === "object" && value !== null ? (value as Record<string, unknown>) : {};
}
