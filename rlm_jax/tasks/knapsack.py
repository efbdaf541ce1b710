"""0/1 knapsack, decision version: is there a set of items within the weight limit whose value
reaches the target? Answer True or False.

The question says "total weight at most W and total value at least V", and the label is
exactly `best value with weight <= W  >=  V` (x1's wording "higher than"/"lower than" disagreed
with its >= label). Labels are balanced (True/False drawn with probability 1/2, then the target
placed on that side of the optimum); the target lies within a slack of the optimum that
shrinks with the level (min(1.5 (10 - level), optimum / 2); level 10: the target is the
optimum or the optimum + 1).

Levels: 3 items at level 1 up to 12 at level 10; weights and values 1..9 up to level 3, then
up to 20. x1 records (solution a bool, or "True"/"False") verify the same way.

Reference steps take the items of an optimal set one per step with running totals, compare
the best value with the target, then `Answer: True|False`.
"""
from __future__ import annotations

import re

from rlm_jax.tasks import extract
from rlm_jax.tasks.boolean import answer_text, parse_task  # noqa: F401  (re-exported)
from rlm_jax.tasks.common import level_of, make_rng, tail

NAME = "Knapsack"

_ITEMS = ("pen", "map", "book", "flask", "snack", "rope", "brush", "towel", "knife", "mask",
          "soap", "torch", "coin", "key", "lock", "lens", "card", "cable", "tape", "cap")


# Feasibility words models use instead of True/False ("Answer: not possible"). The negative
# forms come first in the alternation so that "impossible" is never read as "possible".
_FEASIBLE_RE = re.compile(
    r"\b(impossible|infeasible|not\s{1,3}(?:possible|feasible)|no\s{1,3}such\s{1,3}(?:set|subset|selection)"
    r"|cannot|can't|can\s{1,3}not|possible|feasible|there\s{1,3}is\s{1,3}(?:such\s{1,3})?a\s{1,3}set)\b",
    re.IGNORECASE)
# Without an answer marker, only the end of the output is read for those words.
_FEASIBLE_TAIL = 300


def _feasible(output: str) -> bool | None:
  text = tail(output)
  seg = extract.answer_segment(text)
  matches = list(_FEASIBLE_RE.finditer(seg if seg is not None else text[-_FEASIBLE_TAIL:]))
  if not matches:
    return None
  word = " ".join(matches[-1].group(1).lower().split())
  return not (word.startswith(("im", "in", "not", "no ", "can")))


def verify(task: dict, output: str) -> int:
  return score(parse_task(task), output)


def score(label: bool, output: str) -> int:
  """2 if the final answer matches `label`, 0 if not, -1 if none.

  True/False and yes/no as every boolean domain (`extract.final_bool`); then feasibility
  words: "possible", "there is a set" (True), "impossible", "not possible", "cannot" (False).
  """
  got = extract.final_bool(output)
  if got is None:
    got = _feasible(output)
  if got is None:
    return -1
  return 2 if got == label else 0


def best_set(weights, values, limit) -> tuple[int, list[int]]:
  """(max value, item indices of one optimal set) with total weight <= limit (exact DP)."""
  n = len(weights)
  # best[i][w]: best value using the first i items within weight w.
  best = [[0] * (limit + 1)]
  for i in range(n):
    prev = best[-1]
    row = list(prev)
    wi, vi = weights[i], values[i]
    for w in range(wi, limit + 1):
      cand = prev[w - wi] + vi
      if cand > row[w]:
        row[w] = cand
    best.append(row)
  chosen, w = [], limit
  for i in range(n, 0, -1):
    if best[i][w] != best[i - 1][w]:
      chosen.append(i - 1)
      w -= weights[i - 1]
  return best[n][limit], sorted(chosen)


def generate(seed, difficulty: float) -> dict:
  """One knapsack decision task; see the module docstring for the level schedule.

  Args:
    seed: anything `common.make_rng` accepts.
    difficulty: in [0, 1].

  Returns:
    x1-schema dict with `solution` a bool (as in x1), `unique_solution` True, plus `steps`.
  """
  level = level_of(difficulty)
  rng = make_rng(seed)
  n = level + 2
  bound = 9 if level <= 3 else 20
  names = rng.sample(_ITEMS, n)
  best = 0
  while best == 0:  # at least one item must fit, or "True" could not be reached
    weights = [rng.randint(1, bound) for _ in range(n)]
    values = [rng.randint(1, bound) for _ in range(n)]
    total = sum(weights)
    limit = rng.randint(max(1, total // 4), max(1, (3 * total) // 4))
    best, chosen = best_set(weights, values, limit)
  slack = min(round((10 - level) * 1.5), best // 2)
  label = rng.random() < 0.5
  if label:
    target = max(1, best - rng.randint(0, slack))
  else:
    target = best + 1 + rng.randint(0, slack)
  assert label == (best >= target)
  items = ", ".join(f"{names[i]} ({weights[i]}, {values[i]})" for i in range(n))
  problem = (f"Items (weight, value): {items}. Is there a set of items with total weight at most "
             f"{limit} and total value at least {target}? True or False?")
  steps = []
  w = v = 0
  for i in chosen:
    w, v = w + weights[i], v + values[i]
    steps.append(f"take {names[i]}: weight {w}, value {v}")
  if label:
    steps.append(f"weight {w} <= {limit} and value {v} >= {target}")
  else:
    steps.append(f"best value within weight {limit} is {best} < {target}")
  steps.append(f"Answer: {label}")
  return {
      "type": NAME,
      "level": level,
      "problem": problem,
      "unique_solution": True,
      "solution": label,
      "steps": steps,
  }

