"""One child process of an isolated device check: runs the named checks of one group in order and writes an
event per start and per result (JSON lines) for the parent, which enforces the time budgets.

    python -m plugins.ukd.device_check.child --context CTX.json --events EVENTS.jsonl --checks a,b,c
"""
import argparse
import json
import os
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--checks", required=True, help="comma-separated check names")
    args = parser.parse_args(argv)
    from .core import Context, load_checks, run_one

    with open(args.context) as f:
        ctx = Context.from_json(f.read())
    table = {c.name: c for c in load_checks()}
    with open(args.events, "a") as events:
        def emit(event):
            events.write(json.dumps(event) + "\n")
            events.flush()
            os.fsync(events.fileno())

        for name in args.checks.split(","):
            result = run_one(table[name], ctx, on_start=lambda c: emit({"event": "start", "name": c.name}))
            emit({"event": "result", "result": result})
            print(f"device check {name}: {result['status']} {result['reason']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
