#!/usr/bin/env python3
"""A turnd worker in Python: the line protocol of CONTRACT §5, standard library only.

turnd spawns this once per deployment (one conversation) and keeps it alive across turns:

    worker.command = ["python3", "/path/to/worker.py"]

stdin  (turnd -> us): one JSON object per line; {"type":"turn","epoch":7,"turn":{...}}
stdout (us -> turnd): one JSON object per line; exactly one "reply" or "error" per turn,
                      "heartbeat" while a long turn is progressing.
stderr:               free text; turnd logs it, tagged with the deployment.

Schemas of every line: docs/schemas/worker-stdin*.schema.json, worker-stdout*.schema.json.
"""

import json
import os
import sys
import time

# The protocol version this worker speaks. turnd says which one it speaks in TURND_PROTOCOL;
# later versions only add fields and line types, which we ignore, so a newer number is a
# warning, not a reason to refuse work.
PROTOCOL = "1"


def log(text):
    # stdout is the protocol channel: anything else goes to stderr.
    print(f"python-worker: {text}", file=sys.stderr, flush=True)


def send(line):
    # One object per line, flushed at once: turnd reads line by line, and a reply sitting in
    # our buffer is a turn that times out.
    sys.stdout.write(json.dumps(line, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def answer(turn, answered):
    """What this worker does with a turn. Replace with the real work."""
    payload = turn.get("payload")
    options = payload if isinstance(payload, dict) else {}
    # A long turn says it is alive well within TURND_TURN_DEADLINE_MS, or turnd fails it with
    # TURN_TIMEOUT and stops this process as hung.
    for _ in range(int(options.get("heartbeats", 0))):
        time.sleep(0.05)
        send({"type": "heartbeat"})
    if options.get("fail"):
        # A terminal error: the turn ends with this code (WORKER_ERROR when none is given).
        return {"type": "error", "messageId": turn["messageId"],
                "error": str(options["fail"]), "code": "EXAMPLE_FAILED"}
    return {
        "type": "reply",
        "messageId": turn["messageId"],
        "payload": {
            "text": f"echo: {options.get('text', payload)}",
            "turns": answered,
            "deployment": os.environ.get("TURND_DEPLOYMENT", ""),
            "worker": "python",
        },
    }


def main():
    version = os.environ.get("TURND_PROTOCOL", "")
    if version != PROTOCOL:
        log(f"TURND_PROTOCOL is {version!r}, this worker speaks {PROTOCOL}; continuing")
    answered = 0
    # Iterating over stdin ends at EOF: turnd closes our stdin when it wants us gone (idle,
    # eviction, shutdown). Exit promptly and cleanly then; turnd sends SIGTERM (whose
    # default action is fine) and later SIGKILL to a worker that lingers.
    for raw in sys.stdin:
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError as e:
            log(f"ignoring a line that is not JSON: {e}")
            continue
        # Ignore line types we do not know (a later protocol may add e.g. "cancel").
        if not isinstance(line, dict) or line.get("type") != "turn":
            log(f"ignoring a line of type {line.get('type') if isinstance(line, dict) else None!r}")
            continue
        turn = line.get("turn")
        if not isinstance(turn, dict) or not isinstance(turn.get("messageId"), str):
            log("ignoring a turn line without a turn")
            continue
        answered += 1
        try:
            send(answer(turn, answered))
        except Exception as e:  # one bad turn must not take the deployment's other turns down
            send({"type": "error", "messageId": turn["messageId"], "error": repr(e)})


if __name__ == "__main__":
    try:
        main()
    except (BrokenPipeError, KeyboardInterrupt):
        pass
