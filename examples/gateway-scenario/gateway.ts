/**
 * A toy agent gateway: messages from several channels land in per-session
 * lanes (one message at a time per session, sessions in parallel, as a real
 * gateway's session lanes do), the agent takes a turn on each, and when the
 * message asks for a task it launches the downstream script in the
 * background and replies at once, the way a tool call starts a long `exec`
 * and leaves it to be polled. The lane is then free for the next message.
 *
 * Without a guard every such message launches the script. With a guard, the
 * gateway first asks the sidecar for `<scope>::<taskName>` over a Hold stream
 * (`openHold`), launches only when it gets the lease, releases it with the
 * script's exit status, and answers a refused trigger with the run in the way.
 */

import { setTimeout as sleep } from "node:timers/promises";
import { type Client, Lease, type RefusalOutcome } from "taskguard-sidecar-client";
import { type DownstreamScript, EXIT_OK, type Journal, type TaskName } from "./downstream.ts";

export type Channel = "discord" | "telegram" | "cron";

/** One incoming message that asks for a task. */
export interface Trigger {
  /** Also names the run this trigger would start (`run-<id>`): a fresh run id per trigger, never per task. */
  id: string;
  wave: string;
  channel: Channel;
  sessionKey: string;
  source: "user" | "follow-up" | "automation";
  task: TaskName;
  text: string;
  /** When it arrives, counted from the start of its wave (seeded). */
  arriveAfterMs: number;
  /** How long the agent's turn on it takes before it dispatches (seeded). */
  turnMs: number;
}

/** LAUNCHED, or the client's refusal (the scenario acquires with "return": never a queued caller's refusals). */
export type ReplyOutcome = "LAUNCHED" | RefusalOutcome;

/** What the gateway answered a trigger. */
export interface ReplyRecord {
  seq: number;
  trigger: string;
  channel: Channel;
  sessionKey: string;
  task: TaskName;
  outcome: ReplyOutcome;
  /** LAUNCHED: the run it started. Refused: the run in the way (the winner, or the failed run). */
  runId: string;
  /** The guard's start time of that run, when a guard answered. */
  startedAt: string | undefined;
  /** What the gateway posts back to the channel. */
  text: string;
}

export interface GatewayOptions {
  journal: Journal;
  downstream: DownstreamScript;
  /** Absent: no guard, every trigger launches the script. */
  guard?: { client: Client; scope: string } | undefined;
}

/** One session's queue: its messages are handled one after another, in arrival order. */
class SessionLane {
  #tail: Promise<void> = Promise.resolve();

  enqueue(handle: () => Promise<void>): Promise<void> {
    const done = this.#tail.then(handle);
    this.#tail = done.catch(() => {}); // a failed message must not wedge the lane; the caller still sees the error
    return done;
  }
}

export function runIdOf(trigger: Trigger): string {
  return `run-${trigger.id}`;
}

export class Gateway {
  readonly replies: ReplyRecord[] = [];
  readonly #journal: Journal;
  readonly #downstream: DownstreamScript;
  readonly #guard: GatewayOptions["guard"];
  readonly #lanes = new Map<string, SessionLane>();
  readonly #running = new Set<Promise<void>>();
  readonly #failures: unknown[] = [];

  constructor(options: GatewayOptions) {
    this.#journal = options.journal;
    this.#downstream = options.downstream;
    this.#guard = options.guard;
  }

  /** Queue `trigger` on its session's lane; resolves once it is answered (and a launch has tried its lock file). */
  receive(trigger: Trigger): Promise<void> {
    let lane = this.#lanes.get(trigger.sessionKey);
    if (lane === undefined) {
      lane = new SessionLane();
      this.#lanes.set(trigger.sessionKey, lane);
    }
    return lane.enqueue(() => this.#handle(trigger));
  }

  /** Resolves when every launched run has exited (and, with the guard, been released). */
  async idle(): Promise<void> {
    while (this.#running.size > 0) {
      await Promise.all([...this.#running]);
    }
    if (this.#failures.length > 0) {
      throw new AggregateError(this.#failures, "a background run failed in the gateway");
    }
  }

  async #handle(trigger: Trigger): Promise<void> {
    await sleep(trigger.turnMs); // the agent reads the message and decides to run the task
    if (this.#guard === undefined) {
      await this.#launch(trigger);
      return;
    }
    const { client, scope } = this.#guard;
    const answer = await client.openHold(`${scope}::${trigger.task}`, {
      runId: runIdOf(trigger),
      onConflict: "return",
      labels: { channel: trigger.channel, session: trigger.sessionKey, trigger: trigger.id },
    });
    if (answer instanceof Lease) {
      await this.#launch(trigger, answer);
      return;
    }
    // The run in the way: the winner (ALREADY_RUNNING), the failed run (RETRY_REQUIRES_APPROVAL), or the run
    // whose lease was lost, on a key with a lock-delay (LOCK_DELAYED; the scenario's sidecar has no such rule).
    const since = answer.startedAt.toISOString();
    const text =
      answer.outcome === "ALREADY_RUNNING"
        ? `${trigger.task} is already running: run ${answer.runId}, started ${since}; not starting another`
        : answer.outcome === "LOCK_DELAYED"
          ? `${trigger.task}: run ${answer.runId} lost its guard; the task opens again at ` +
            `${answer.guard.lockDelayUntil?.toISOString() ?? "once its lock-delay ends"}`
          : `${trigger.task}: run ${answer.runId} failed (${answer.guard.lastDetail}); ` +
            "a retry needs an operator's approval";
    this.#reply(trigger, answer.outcome, answer.runId, since, text);
  }

  async #launch(trigger: Trigger, lease?: Lease): Promise<void> {
    const runId = runIdOf(trigger);
    const run = this.#downstream.launch(trigger.task, runId, trigger.id, lease);
    const finished = run.exited.then(async (code) => {
      // Released with the script's own verdict: a FAILED guard is what stops the silent retries.
      await lease?.release(code === EXIT_OK ? "SUCCEEDED" : "FAILED", `exit ${code}: ${run.record.detail}`);
    });
    this.#track(finished);
    await run.lockTried;
    this.#reply(trigger, "LAUNCHED", runId, lease?.startedAt.toISOString(), `started ${trigger.task} as ${runId}`);
  }

  #reply(trigger: Trigger, outcome: ReplyOutcome, runId: string, startedAt: string | undefined, text: string): void {
    this.replies.push({
      seq: this.#journal.next(),
      trigger: trigger.id,
      channel: trigger.channel,
      sessionKey: trigger.sessionKey,
      task: trigger.task,
      outcome,
      runId,
      startedAt,
      text,
    });
  }

  #track(run: Promise<void>): void {
    const tracked = run.catch((error: unknown) => {
      this.#failures.push(error);
    });
    this.#running.add(tracked);
    void tracked.finally(() => this.#running.delete(tracked));
  }
}
