#!/usr/bin/env python3
"""Publishes turns to turnd with publisher confirms (CONTRACT §2), using pika.

    python3 producer.py --agent demo --conversation c1 "hello" "how are you?"

Prints each turn's messageId on stdout once the broker has confirmed it.
"""

import argparse
import json
import sys
import uuid

import pika


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    p.add_argument("--prefix", default="turnd", help="turnd's amqp.prefix")
    p.add_argument("--agent", default="demo")
    p.add_argument("--org", default=None, help="organizationId (none by default)")
    p.add_argument("--conversation", default=None, help="conversationId (a fresh one by default)")
    p.add_argument("texts", nargs="+", help="one turn per text: payload {\"text\": TEXT}")
    args = p.parse_args()
    conversation = args.conversation or f"c-{uuid.uuid4()}"

    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    # Fail with a clear message when turnd has not declared its topology yet (it does at start).
    channel.exchange_declare(f"{args.prefix}.turns", passive=True)
    # Publisher confirms: without them a publish is fire-and-forget, and a turn lost in a
    # broker failover would never be answered. With them, basic_publish returns only once
    # RabbitMQ has the turn safely (in the quorum inbox), and raises when it has not.
    channel.confirm_delivery()

    for text in args.texts:
        turn = {
            # The idempotency key: publishing the same messageId again (a retry after a
            # timeout, a nack or a lost connection) never runs the turn twice nor yields a
            # second terminal event, so retrying with the same id is always safe.
            "messageId": str(uuid.uuid4()),
            "agentId": args.agent,
            "conversationId": conversation,
            "payload": {"text": text},
        }
        if args.org:
            turn["organizationId"] = args.org
        for attempt in range(1, 6):
            try:
                channel.basic_publish(
                    exchange=f"{args.prefix}.turns",
                    routing_key=f"turn.{args.org or '_'}",
                    body=json.dumps(turn).encode(),
                    properties=pika.BasicProperties(
                        content_type="application/json",
                        delivery_mode=2,  # persistent: the turn survives a broker restart
                    ),
                    # Unroutable (no inbox bound: turnd never ran with this prefix) is an
                    # error, not a silent drop.
                    mandatory=True,
                )
                break
            except pika.exceptions.NackError:
                print(f"producer: broker nacked {turn['messageId']} (attempt {attempt}); retrying", file=sys.stderr)
        else:
            sys.exit(f"producer: {turn['messageId']} was not confirmed after 5 attempts")
        # Turns of one conversation published on one channel are taken in publish order.
        print(turn["messageId"], flush=True)
    connection.close()


if __name__ == "__main__":
    try:
        main()
    except pika.exceptions.UnroutableError:
        sys.exit("producer: the turn was unroutable: is turnd running with this amqp.prefix?")
    except pika.exceptions.AMQPError as e:
        sys.exit(f"producer: {type(e).__name__}: {e}")
