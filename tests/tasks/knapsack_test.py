import itertools
import random
import re

import pytest

from rlm_jax.tasks import knapsack
from rlm_jax.tasks.common import difficulty_of

_ITEM_RE = re.compile(r"(\w+) \((\d+), (\d+)\)")
_Q_RE = re.compile(r"total weight at most (\d+) and total value at least (\d+)\?")


def _brute_force_best(weights, values, limit):
  best = 0
  for r in range(len(weights) + 1):
    for combo in itertools.combinations(range(len(weights)), r):
      if sum(weights[i] for i in combo) <= limit:
        best = max(best, sum(values[i] for i in combo))
  return best


def test_dp_matches_brute_force():
  rng = random.Random(0)
  for _ in range(100):
    n = rng.randint(1, 8)
    w = [rng.randint(1, 20) for _ in range(n)]
    v = [rng.randint(1, 20) for _ in range(n)]
    limit = rng.randint(0, 60)
    best, chosen = knapsack.best_set(w, v, limit)
    assert best == _brute_force_best(w, v, limit)
    assert sum(w[i] for i in chosen) <= limit and sum(v[i] for i in chosen) == best


@pytest.mark.parametrize("level", range(1, 11))
def test_label_agrees_with_the_question_wording(level):
  for j in range(10):
    task = knapsack.generate((1, level, j), difficulty_of(level))
    items = _ITEM_RE.findall(task["problem"].split("Is there")[0])
    assert len(items) == level + 2
    weights, values = [int(w) for _, w, _ in items], [int(v) for _, _, v in items]
    limit, target = map(int, _Q_RE.search(task["problem"]).groups())
    # "total weight at most W and total value at least V" <=> best value within W >= V.
    assert task["solution"] is (_brute_force_best(weights, values, limit) >= target)
    assert knapsack.verify(task, " ".join(task["steps"])) == 2
    assert knapsack.verify(task, f"Answer: {not task['solution']}") == 0


def test_labels_are_balanced_and_tight_at_level_10():
  tasks = [knapsack.generate((2, 10, j), difficulty_of(10)) for j in range(200)]
  frac = sum(t["solution"] for t in tasks) / len(tasks)
  assert 0.4 < frac < 0.6
  for t in tasks[:20]:
    items = _ITEM_RE.findall(t["problem"].split("Is there")[0])
    limit, target = map(int, _Q_RE.search(t["problem"]).groups())
    best = _brute_force_best([int(w) for _, w, _ in items], [int(v) for _, _, v in items], limit)
    assert target in (best, best + 1)


@pytest.mark.parametrize("solution", [True, "True", "true"])
def test_x1_style_labels(solution):
  task = {"type": "Knapsack", "solution": solution}
  assert knapsack.verify(task, "The answer is True.") == 2
  assert knapsack.verify(task, "**False**") == 0
  assert knapsack.verify(task, "I don't know") == -1
  assert knapsack.answer_text(task) == "True"


def test_bad_label_raises():
  with pytest.raises(ValueError, match="solution"):
    knapsack.verify({"type": "Knapsack", "solution": "maybe"}, "True")


@pytest.mark.parametrize("output,got", [
    ("Answer: possible", True), ("Answer: impossible", False), ("Answer: it is not possible.", False),
    ("No such set exists.", False), ("Yes, there is a set: pen and map.", True), ("Answer: Yes.", True),
    ("We cannot reach the target.", False), ("I am not sure.", None),
    ("It is possible to take the pen... Answer: infeasible", False),
])
def test_yes_no_variants(output, got):
  for label in (True, False):
    task = {"type": "Knapsack", "solution": label}
    assert knapsack.verify(task, output) == (-1 if got is None else 2 if got == label else 0)
