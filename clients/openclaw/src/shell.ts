/**
 * The exec rewrite: run the model's command under `taskguard run`, pure functions.
 *
 * OpenClaw runs an exec's `command` with the gateway user's shell ($SHELL, else
 * sh), so the rewrite is plain POSIX sh. The rewritten command starts
 * `taskguard run KEY --run-id RUN -- /bin/sh -c '<command>'`: `taskguard run`
 * acquires over a Hold stream with the run id the plugin already holds, which
 * hands it the plugin's lease (same run id, same caller) bound to its own
 * stream. From then on the guard lives exactly as long as the command: exit 0
 * is SUCCEEDED, any other exit FAILED with the code, a killed wrapper ABANDONED,
 * whatever happens to the gateway. An approved retry first waits at the
 * plugin's gate (`gate.ts`) until its approval and its run are in place.
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
   * An approved retry: first read one line from this FIFO (`gate.ts`), and run only if it says `go`.
   * OpenClaw starts the approved tool without waiting for the plugin's `onResolution`, which must first
   * learn who approved, approve the retry and acquire its run.
   */
  gate?: string;
  /** The task is running: `taskguard run` waits in its queue this way (`--on-conflict`), up to `maxWaitMs`. */
  onConflict?: "queue" | "keep-newest" | "supersede";
  maxWaitMs?: number | undefined;
  /** Printed on stderr before anything else: what the model reads first in the exec's output. */
  notice?: string;
  /** The run's holder, when the wrapper acquires it itself (a queued exec: the plugin holds no lease for it). */
  holder?: string;
}

/** What an approved exec exits with when its run was not let through (as `taskguard run` does for "needs approval"). */
export const GATE_REFUSED_EXIT = 76;

export function wrapCommand(options: WrapOptions): string {
  const tg = shellQuote(options.taskguardBin);
  const token = options.tokenFile ? ` --token-file ${shellQuote(options.tokenFile)}` : "";
  const addr = `--addr ${shellQuote(options.address)}${token}`;
  const key = shellQuote(options.taskKey);
  const waits = options.onConflict === undefined ? "" : ` --on-conflict ${options.onConflict}`;
  const bound = options.maxWaitMs === undefined ? "" : ` --max-wait ${options.maxWaitMs / 1000}s`;
  const holder = options.holder === undefined ? "" : ` --holder ${shellQuote(options.holder)}`;
  const run =
    `exec ${tg} ${addr} run ${key} --run-id ${shellQuote(options.runId)}${waits}${bound}${holder} -- ` +
    `/bin/sh -c ${shellQuote(options.command)}`;
  const told = options.notice === undefined ? "" : `printf '%s\\n' ${shellQuote(options.notice)} >&2; `;
  if (options.gate === undefined) {
    return `${told}${run}`;
  }
  // POSIX sh: the plugin holds the FIFO open, so this open does not block; EOF (the gateway is gone) or a
  // FIFO already removed leaves the word empty.
  const wait =
    `taskguard_gate=; { IFS= read -r taskguard_gate < ${shellQuote(options.gate)}; } 2>/dev/null; ` +
    `if [ "$taskguard_gate" != go ]; then ` +
    `echo "Task Guard: the approved retry was not started: \${taskguard_gate:-the OpenClaw plugin did not answer}" >&2; ` +
    `exit ${GATE_REFUSED_EXIT}; fi`;
  return `${wait}; ${run}`;
}
