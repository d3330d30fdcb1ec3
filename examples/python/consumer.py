#!/usr/bin/env python3
"""Consumes turnd's terminal events (CONTRACT §6) and handles each one once, using pika.

    python3 consumer.py --queue my-app.replies [--expect N]

Prints each new event's body on stdout, one line each; exits after N events with --expect.
"""

import argparse
import collections
import json
import sys

import pika


class Seen:
    """The message_ids handled lately, bounded. In production keep them where the effect goes
    (e.g. a unique key in your database, written in the same transaction as the effect), so a
    redelivery after a consumer crash is recognised too."""

    def __init__(self, size=100_000):
        self.ids = collections.OrderedDict()
        self.size = size

    def add(self, message_id):
        """True if message_id is new."""
        if message_id in self.ids:
            return False
        self.ids[message_id] = None
        if len(self.ids) > self.size:
            self.ids.popitem(last=False)
        return True


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    p.add_argument("--prefix", default="turnd", help="turnd's amqp.prefix")
    p.add_argument("--queue", required=True, help="this application's durable queue")
    p.add_argument("--binding", default="reply.#", help="e.g. reply.<organizationId>.#")
    p.add_argument("--expect", type=int, default=0, help="exit after this many events (0: never)")
    p.add_argument("--timeout", type=float, default=0, help="exit 1 after this many seconds (0: never)")
    args = p.parse_args()

    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    # A durable queue of our own: events published while we are down wait for us. (An
    # exclusive, auto-named queue would lose them.)
    channel.queue_declare(args.queue, durable=True)
    channel.queue_bind(args.queue, f"{args.prefix}.replies", routing_key=args.binding)
    channel.basic_qos(prefetch_count=64)
    print("consumer: ready", file=sys.stderr, flush=True)

    seen = Seen()
    handled = 0
    if args.timeout:
        connection.call_later(args.timeout, lambda: sys.exit(f"consumer: timed out after {handled} events"))

    def on_event(ch, method, properties, body):
        nonlocal handled
        # turnd publishes every event at least once: after a broker or daemon failure the same
        # event (same message_id) may come again. Handle it once.
        if not seen.add(properties.message_id):
            print(f"consumer: duplicate {properties.message_id} dropped", file=sys.stderr, flush=True)
            ch.basic_ack(method.delivery_tag)
            return
        try:
            event = json.loads(body)
        except ValueError as e:
            # Not turnd's: requeueing would loop it forever.
            print(f"consumer: dropping a delivery that is not JSON: {e}", file=sys.stderr, flush=True)
            ch.basic_reject(method.delivery_tag, requeue=False)
            return
        # The turn's messageId is also the AMQP correlation_id; kind is "reply" or "error".
        if event["kind"] == "error":
            print(f"consumer: turn {event['messageId']} failed: {event['error']['code']}", file=sys.stderr, flush=True)
        sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
        sys.stdout.flush()
        # Ack after handling: a crash before this line redelivers the event (and the seen-set
        # above, if kept durably, keeps it from being handled twice).
        ch.basic_ack(method.delivery_tag)
        handled += 1
        if args.expect and handled >= args.expect:
            ch.stop_consuming()

    channel.basic_consume(args.queue, on_event)
    channel.start_consuming()
    connection.close()


if __name__ == "__main__":
    try:
        main()
    except pika.exceptions.AMQPError as e:
        sys.exit(f"consumer: {type(e).__name__}: {e}")
