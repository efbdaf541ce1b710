"""Command line: generate task files, verify model outputs.

  python -m rlm_jax.tasks generate --domain sat --n 1000 --seed 0 --out sat.json.bz2
  python -m rlm_jax.tasks verify --tasks sat.json.bz2 --outputs outputs.jsonl \
      [--scores-out scores.jsonl]

`generate` writes x1's format (`{"version": 1, "data": [...]}`; `.json` or `.json.bz2`) with
n / len(levels) tasks per level. `verify` reads a task file (x1 JSON, JSONL, GSM8K JSONL) and
one `{"output": str}` per line aligned with it, prints accuracy (score 2) overall and per
level plus the score histogram, and can write per-record scores as JSONL.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time

from rlm_jax import jsonl
from rlm_jax.tasks import files, gsm8k, registry, rewards


def _levels(text: str) -> list[int]:
  out = []
  for part in text.split(","):
    if "-" in part:
      a, b = part.split("-", 1)
      out.extend(range(int(a), int(b) + 1))
    elif part.strip():
      out.append(int(part))
  return out


def _generate(args) -> int:
  levels = _levels(args.levels)
  if not (args.out.endswith(".json") or args.out.endswith(".json.bz2")):
    raise ValueError(f"--out {args.out}: must end in .json or .json.bz2 (x1 format)")
  t0 = time.perf_counter()
  if args.source:
    if registry.normalize_name(args.domain) != "gsm8k":
      raise ValueError("--source only applies to --domain gsm8k")
    pool = files.load_tasks(args.source)
    per, rem = divmod(args.n, len(levels))
    if rem:
      raise ValueError(f"n={args.n} is not a multiple of the {len(levels)} levels")
    tasks = []
    for level in levels:
      for j in range(per):
        task = gsm8k.generate((args.seed, level, j), registry.difficulty_of(level), pool=pool)
        task["id"] = len(tasks)
        tasks.append(task)
  else:
    tasks = registry.generate_dataset(args.domain, args.n, args.seed, levels)
  files.save_tasks(args.out, tasks)
  print(f"wrote {len(tasks)} {args.domain} tasks ({len(tasks) // len(levels)} per level) to "
        f"{args.out} in {time.perf_counter() - t0:.2f}s")
  return 0


def _read_outputs(path: str) -> list[str]:
  outputs = []
  for where, obj in jsonl.records(path):
    if not isinstance(obj, dict) or not isinstance(obj.get("output"), str):
      raise ValueError(f"{where}: expected {{\"output\": str}}")
    outputs.append(obj["output"])
  return outputs


def _verify(args) -> int:
  tasks = files.load_tasks(args.tasks)
  outputs = _read_outputs(args.outputs)
  if len(tasks) != len(outputs):
    raise ValueError(f"{args.tasks} has {len(tasks)} tasks but {args.outputs} has "
                     f"{len(outputs)} outputs")
  scores = [registry.verify(t, o) for t, o in zip(tasks, outputs)]
  by_level = collections.defaultdict(list)
  for t, s in zip(tasks, scores):
    by_level[t.get("level")].append(s)
  n = len(scores)
  solved = sum(s == 2 for s in scores)
  print(f"accuracy {solved / max(n, 1):.4f} ({solved}/{n})")
  hist = collections.Counter(scores)
  print("scores " + " ".join(f"{k}:{hist.get(k, 0)}" for k in rewards.SCORES))
  for level in sorted(by_level, key=lambda x: (x is None, x)):
    ss = by_level[level]
    print(f"level {level}: accuracy {sum(s == 2 for s in ss) / len(ss):.4f} "
          f"({sum(s == 2 for s in ss)}/{len(ss)})")
  if args.scores_out:
    with open(args.scores_out, "w", encoding="utf-8") as f:
      for i, (t, s) in enumerate(zip(tasks, scores)):
        f.write(json.dumps({"index": i, "type": t.get("type"), "level": t.get("level"),
                            "score": s, "reward": rewards.reward(s)}) + "\n")
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m rlm_jax.tasks", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  g = sub.add_parser("generate", help="write an x1-format task file")
  g.add_argument("--domain", required=True, help=f"one of {sorted(registry.DOMAINS)}")
  g.add_argument("--n", type=int, required=True, help="number of tasks (multiple of #levels)")
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--out", required=True, help="output .json or .json.bz2")
  g.add_argument("--levels", default="1-10", help="e.g. 1-10 or 1,2,3 (default 1-10)")
  g.add_argument("--source", default=None, help="gsm8k only: pool file (default: shipped sample)")
  v = sub.add_parser("verify", help="score outputs against tasks")
  v.add_argument("--tasks", required=True, help="x1 .json/.json.bz2, or .jsonl")
  v.add_argument("--outputs", required=True, help='JSONL, one {"output": str} per task')
  v.add_argument("--scores-out", default=None, help="write per-record scores (JSONL)")
  args = parser.parse_args(argv)
  try:
    return _generate(args) if args.command == "generate" else _verify(args)
  except (ValueError, KeyError, OSError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {msg}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
