// Consumes turnd's terminal events (CONTRACT §6) and handles each one once, using amqplib.
//
//     node dist/consumer.js --queue my-app.replies [--expect N]
//
// Prints each new event's body on stdout, one line each; exits after N events with --expect.

import { parseArgs } from "node:util";
import * as amqp from "amqplib";
import type { TerminalEvent } from "./protocol";

const { values: opts } = parseArgs({
  options: {
    url: { type: "string", default: "amqp://guest:guest@127.0.0.1:5672/%2f" },
    prefix: { type: "string", default: "turnd" }, // turnd's amqp.prefix
    queue: { type: "string" }, // this application's durable queue
    binding: { type: "string", default: "reply.#" }, // e.g. reply.<organizationId>.#
    expect: { type: "string", default: "0" }, // exit after this many events (0: never)
    timeout: { type: "string", default: "0" }, // exit 1 after this many seconds (0: never)
  },
});

/**
 * The message_ids handled lately, bounded. In production keep them where the effect goes
 * (e.g. a unique key in your database, written in the same transaction as the effect), so a
 * redelivery after a consumer crash is recognised too.
 */
class Seen {
  private ids = new Set<string>();
  constructor(private size = 100_000) {}
  /** True if id is new. */
  add(id: string): boolean {
    if (this.ids.has(id)) return false;
    this.ids.add(id);
    // A Set iterates in insertion order: the first one is the oldest.
    if (this.ids.size > this.size) this.ids.delete(this.ids.values().next().value!);
    return true;
  }
}

async function main(): Promise<void> {
  if (!opts.queue) throw new Error("--queue is required");
  const queue = opts.queue;
  const expect = Number(opts.expect);
  const connection = await amqp.connect(opts.url!);
  const ch = await connection.createChannel();
  // A durable queue of our own: events published while we are down wait for us. (An
  // exclusive, auto-named queue would lose them.)
  await ch.assertQueue(queue, { durable: true });
  await ch.bindQueue(queue, `${opts.prefix}.replies`, opts.binding!);
  await ch.prefetch(64);
  process.stderr.write("consumer: ready\n");

  const seen = new Seen();
  let handled = 0;
  const timeout = Number(opts.timeout);
  if (timeout > 0) {
    setTimeout(() => {
      process.stderr.write(`consumer: timed out after ${handled} events\n`);
      process.exit(1);
    }, timeout * 1000);
  }
  const done = new Promise<void>((resolve) => {
    void ch.consume(queue, (msg) => {
      if (msg === null) return resolve(); // the broker cancelled us (queue deleted)
      const id = String(msg.properties.messageId);
      // turnd publishes every event at least once: after a broker or daemon failure the same
      // event (same message_id) may come again. Handle it once.
      if (!seen.add(id)) {
        process.stderr.write(`consumer: duplicate ${id} dropped\n`);
        ch.ack(msg);
        return;
      }
      let event: TerminalEvent;
      try {
        event = JSON.parse(msg.content.toString("utf8")) as TerminalEvent;
      } catch (e) {
        // Not turnd's: requeueing would loop it forever.
        process.stderr.write(`consumer: dropping a delivery that is not JSON: ${(e as Error).message}\n`);
        ch.reject(msg, false);
        return;
      }
      // The turn's messageId is also the AMQP correlation_id; kind is "reply" or "error".
      if (event.kind === "error") {
        process.stderr.write(`consumer: turn ${event.messageId} failed: ${event.error?.code}\n`);
      }
      process.stdout.write(JSON.stringify(event) + "\n");
      // Ack after handling: a crash before this line redelivers the event (and the seen-set
      // above, if kept durably, keeps it from being handled twice).
      ch.ack(msg);
      handled += 1;
      if (expect > 0 && handled >= expect) resolve();
    });
  });
  await done;
  await connection.close();
  process.exit(0);
}

main().catch((e) => {
  process.stderr.write(`consumer: ${e instanceof Error ? e.message : e}\n`);
  process.exit(1);
});
