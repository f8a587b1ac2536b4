/**
 * The exec rewrite: run the model's command under `taskguard run`, pure functions.
 *
 * OpenClaw runs an exec's `command` with bash. The rewritten command starts
 * `taskguard run KEY --run-id RUN -- /bin/sh -c '<command>'`: `taskguard run`
 * acquires over a Hold stream with the run id the plugin already holds, which
 * hands it the plugin's lease (same run id, same caller) bound to its own
 * stream. From then on the guard lives exactly as long as the command: exit 0
 * is SUCCEEDED, any other exit FAILED with the code, a killed wrapper ABANDONED,
 * whatever happens to the gateway.
 */

/** POSIX single quotes: the only character that needs care inside them is the quote itself. */
export function shellQuote(word: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(word) ? word : `'${word.replaceAll("'", `'\\''`)}'`;
}

export interface WrapOptions {
  taskguardBin: string;
  address: string;
  tokenFile?: string | undefined;
  taskKey: string;
  runId: string;
  command: string;
  /**
   * Approve the retry first, in the same shell, just before the run: OpenClaw
   * runs the tool without waiting for the plugin's `onResolution`, so an
   * approval made only there could land after `taskguard run` asks.
   */
  approve?: { approver: string; reason: string };
}

export function wrapCommand(options: WrapOptions): string {
  const tg = shellQuote(options.taskguardBin);
  const token = options.tokenFile ? ` --token-file ${shellQuote(options.tokenFile)}` : "";
  const addr = `--addr ${shellQuote(options.address)}${token}`;
  const key = shellQuote(options.taskKey);
  const run =
    `exec ${tg} ${addr} run ${key} --run-id ${shellQuote(options.runId)} -- ` +
    `/bin/sh -c ${shellQuote(options.command)}`;
  if (options.approve === undefined) {
    return run;
  }
  // Exit code 67 (the guard is no longer FAILED: the plugin's own approval got there first) is expected.
  const approve =
    `${tg} ${addr} approve-retry ${key} --approver ${shellQuote(options.approve.approver)} ` +
    `--reason ${shellQuote(options.approve.reason)} >/dev/null 2>&1`;
  return `${approve}; ${run}`;
}
