// A turnd worker in TypeScript: the line protocol of CONTRACT §5, Node's standard library only.
//
// turnd spawns it once per deployment (one conversation) and keeps it alive across turns:
//
//     worker.command = ["node", "/path/to/examples/typescript/dist/worker.js"]
//
// stdin  (turnd → us): one JSON object per line; {"type":"turn","epoch":7,"turn":{...}}
// stdout (us → turnd): one JSON object per line; exactly one "reply" or "error" per turn,
//                      "heartbeat" while a long turn is progressing.
// stderr:              free text; turnd logs it, tagged with the deployment.

import * as readline from "node:readline";
import type { StdinLine, StdoutLine, Turn } from "./protocol";

// The protocol version this worker speaks. turnd says which one it speaks in TURND_PROTOCOL;
// later versions only add fields and line types, which we ignore, so a newer number is a
// warning, not a reason to refuse work.
const PROTOCOL = "1";

function log(text: string): void {
  // stdout is the protocol channel: anything else goes to stderr.
  process.stderr.write(`typescript-worker: ${text}\n`);
}

function send(line: StdoutLine): void {
  // One object per line. process.stdout to a pipe is asynchronous in Node, but writes keep
  // their order and are flushed before the process exits normally.
  process.stdout.write(JSON.stringify(line) + "\n");
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

let answered = 0;

/** What this worker does with a turn. Replace with the real work. */
async function answer(turn: Turn): Promise<StdoutLine> {
  const payload = turn.payload;
  const options = (typeof payload === "object" && payload !== null ? payload : {}) as {
    text?: unknown;
    heartbeats?: number;
    fail?: string;
  };
  // A long turn says it is alive well within TURND_TURN_DEADLINE_MS, or turnd fails it with
  // TURN_TIMEOUT and stops this process as hung.
  for (let i = 0; i < (options.heartbeats ?? 0); i++) {
    await sleep(50);
    send({ type: "heartbeat" });
  }
  if (options.fail) {
    // A terminal error: the turn ends with this code (WORKER_ERROR when none is given).
    return { type: "error", messageId: turn.messageId, error: String(options.fail), code: "EXAMPLE_FAILED" };
  }
  answered += 1;
  return {
    type: "reply",
    messageId: turn.messageId,
    payload: {
      text: `echo: ${typeof options.text === "string" ? options.text : JSON.stringify(payload ?? null)}`,
      turns: answered,
      deployment: process.env.TURND_DEPLOYMENT ?? "",
      worker: "typescript",
    },
  };
}

async function main(): Promise<void> {
  const version = process.env.TURND_PROTOCOL ?? "";
  if (version !== PROTOCOL) {
    log(`TURND_PROTOCOL is ${JSON.stringify(version)}, this worker speaks ${PROTOCOL}; continuing`);
  }
  // Turns come one at a time (turnd sends the next after our answer), but awaiting each
  // line in a for-await loop keeps the answers in order whatever the input does.
  const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
  for await (const raw of lines) {
    if (raw.trim() === "") continue;
    let line: StdinLine;
    try {
      line = JSON.parse(raw) as StdinLine;
    } catch (e) {
      log(`ignoring a line that is not JSON: ${(e as Error).message}`);
      continue;
    }
    // Ignore line types we do not know (a later protocol may add e.g. "cancel").
    if (line?.type !== "turn" || !("turn" in line)) {
      log(`ignoring a line of type ${JSON.stringify(line?.type)}`);
      continue;
    }
    const turn = line.turn;
    try {
      send(await answer(turn));
    } catch (e) {
      // One bad turn must not take the deployment's other turns down.
      send({ type: "error", messageId: turn.messageId, error: String(e) });
    }
  }
  // End of stdin: turnd closed it because it wants us gone (idle, eviction, shutdown). Exit
  // promptly and cleanly; turnd sends SIGTERM (whose default action is fine) and later
  // SIGKILL to a worker that lingers. Returning lets Node flush stdout, then exit 0.
}

main().catch((e) => {
  log(`fatal: ${e}`);
  process.exit(1);
});
