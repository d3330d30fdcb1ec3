// Publishes turns to turnd with publisher confirms (CONTRACT §2), using amqplib.
//
//     node dist/producer.js --agent demo --conversation c1 "hello" "how are you?"
//
// Prints each turn's messageId on stdout once the broker has confirmed it.

import { randomUUID } from "node:crypto";
import { parseArgs } from "node:util";
import * as amqp from "amqplib";
import type { Turn } from "./protocol";

const { values: opts, positionals: texts } = parseArgs({
  allowPositionals: true,
  options: {
    url: { type: "string", default: "amqp://guest:guest@127.0.0.1:5672/%2f" },
    prefix: { type: "string", default: "turnd" }, // turnd's amqp.prefix
    agent: { type: "string", default: "demo" },
    org: { type: "string" }, // organizationId (none by default)
    conversation: { type: "string" }, // conversationId (a fresh one by default)
  },
});

/** Publishes one message and resolves once the broker confirmed it; rejects on a nack. */
function publishConfirmed(ch: amqp.ConfirmChannel, exchange: string, key: string, body: Buffer, options: amqp.Options.Publish): Promise<void> {
  return new Promise((resolve, reject) => {
    ch.publish(exchange, key, body, options, (err) => (err ? reject(new Error("broker nacked the turn")) : resolve()));
  });
}

async function main(): Promise<void> {
  if (texts.length === 0) throw new Error("usage: producer.js [--agent A] [--org O] [--conversation C] TEXT...");
  const exchange = `${opts.prefix}.turns`;
  const conversation = opts.conversation ?? `c-${randomUUID()}`;
  const connection = await amqp.connect(opts.url!);
  try {
    // Publisher confirms: without them a publish is fire-and-forget, and a turn lost in a
    // broker failover would never be answered. With them, the broker acks each turn once it
    // has it safely (in the quorum inbox), or nacks it.
    const ch = await connection.createConfirmChannel();
    // Fail with a clear message when turnd has not declared its topology yet (it does at start).
    await ch.checkExchange(exchange);
    // mandatory: an unroutable turn (no inbox bound: turnd never ran with this prefix) comes
    // back, before its confirm, instead of being dropped silently.
    const returned = new Set<string>();
    ch.on("return", (msg: amqp.Message) => returned.add(String(msg.properties.messageId)));

    for (const text of texts) {
      const turn: Turn = {
        // The idempotency key: publishing the same messageId again (a retry after a timeout,
        // a nack or a lost connection) never runs the turn twice nor yields a second terminal
        // event, so retrying with the same id is always safe.
        messageId: randomUUID(),
        agentId: opts.agent!,
        conversationId: conversation,
        payload: { text },
      };
      if (opts.org) turn.organizationId = opts.org;
      const body = Buffer.from(JSON.stringify(turn));
      const properties = { contentType: "application/json", persistent: true, mandatory: true, messageId: turn.messageId };
      for (let attempt = 1; ; attempt++) {
        try {
          // Awaiting each confirm keeps the example simple and the turns of this conversation
          // in publish order; a high-volume producer would keep a window of confirms in flight.
          await publishConfirmed(ch, exchange, `turn.${opts.org ?? "_"}`, body, properties);
          break;
        } catch (e) {
          if (attempt >= 5) throw new Error(`${turn.messageId} was not confirmed after ${attempt} attempts: ${e}`);
          process.stderr.write(`producer: ${e} (attempt ${attempt}); retrying\n`);
        }
      }
      if (returned.has(turn.messageId)) {
        throw new Error("the turn was unroutable: is turnd running with this amqp.prefix?");
      }
      console.log(turn.messageId);
    }
    await ch.close();
  } finally {
    await connection.close();
  }
}

main().catch((e) => {
  process.stderr.write(`producer: ${e instanceof Error ? e.message : e}\n`);
  process.exit(1);
});
