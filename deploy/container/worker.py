#!/usr/bin/env python3
"""A minimal turnd worker in Python (README "Writing a worker"): one JSON line per turn on
stdin, one reply line on stdout. The image deploy/container/python-worker.Dockerfile runs it."""
import json
import sys

for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("type") != "turn":
        continue
    turn = msg["turn"]
    text = (turn.get("payload") or {}).get("text")
    reply = {"type": "reply", "messageId": turn["messageId"], "payload": {"text": f"python heard: {text}"}}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
