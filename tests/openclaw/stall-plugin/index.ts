/**
 * Test-only: a tool call whose parameters hold `STALL:<ms>` blocks the
 * gateway's main thread for that long, the way the gateway's own synchronous
 * SQLite passes block it ("slow SQLite reclamation ... isMainThread=true
 * elapsedMs=7878" while it starts).
 *
 * Its before_tool_call hook runs first (higher priority) and returns at once;
 * the block starts in the check phase of the same turn of the event loop, once
 * the next hooks (Task Guard's) have sent their requests: their answers arrive
 * while the thread is blocked, and sit in the socket until it is free.
 */

const STALL = /STALL:(\d+)/;

interface Api {
  logger: { info: (message: string) => void };
  on(
    hook: "before_tool_call",
    handler: (event: { toolName: string; params: Record<string, unknown> }) => undefined,
    options: { priority: number },
  ): void;
}

export default {
  id: "stall",
  name: "Main-thread stall (tests)",
  description: "Blocks the gateway's main thread when a tool call asks for it.",
  register(api: Api): void {
    api.on(
      "before_tool_call",
      (event) => {
        const ms = Number(STALL.exec(JSON.stringify(event.params))?.[1] ?? 0);
        if (ms > 0) {
          setImmediate(() => {
            const began = performance.now();
            Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
            api.logger.info(`stall: blocked the main thread for ${Math.round(performance.now() - began)} ms (${event.toolName})`);
          });
        }
        return undefined;
      },
      { priority: 1000 },
    );
  },
};
