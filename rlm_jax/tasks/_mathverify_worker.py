"""Worker process for `rlm_jax.tasks.mathverify`: one JSON request per stdin line.

Request: {"gold": str, "pred": str, "timeout": int}. Reply (one line): {"equal": true | false |
null}, null when nothing could be parsed from `pred`. Runs as a plain script (no package
imports) so that starting it never re-imports the caller's program. math-verify's own
signal-based timeout is active here (this is the main thread); the parent additionally kills
the process when a reply is late, so a call cannot hang.
"""
import json
import logging
import sys


def main():
  logging.disable(logging.CRITICAL)
  from math_verify import parse, verify  # pylint: disable=import-outside-toplevel
  sys.stdout.write('{"ready": true}\n')
  sys.stdout.flush()
  for line in sys.stdin:
    try:
      req = json.loads(line)
      t = max(1, int(req.get("timeout", 5)))
      gold = parse(req["gold"], parsing_timeout=t)
      pred = parse(req["pred"], parsing_timeout=t)
      if not pred:
        equal = None
      elif not gold:
        equal = False
      else:
        equal = bool(verify(gold, pred, timeout_seconds=t))
    except Exception:  # pylint: disable=broad-except
      equal = False
    sys.stdout.write(json.dumps({"equal": equal}) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
  main()
