import collections
import itertools
import re

import pytest

from rlm_jax.tasks import einstein
from rlm_jax.tasks.common import difficulty_of


def _parse(problem):
  """(n, kinds -> values, clues, target) from a generated problem text."""
  n = int(re.match(r"Houses 1 to (\d+)", problem).group(1))
  listing = problem.split("one house. ")[1].split(" Clues: ")[0]
  kinds = {k.lower(): v.split(", ") for k, v in re.findall(r"(\w+): ([^.]+)\.", listing)}
  clue_text = problem.split(" Clues: ")[1].split(" Which house has ")[0]
  clues = [c.strip() for c in re.split(r"(?:^|\s)\d+\. (?=[A-Za-z])", clue_text) if c.strip()]
  target = re.search(r"Which house has (\w+) \((\w+)\)\?", problem).groups()
  return n, kinds, clues, target


def _holds(clue, grid):
  """Reference semantics of one clue sentence on grid: (value, kind) -> house (1-based)."""
  item = r"(\w+) \((\w+)\)"
  m = re.fullmatch(rf"{item} is (not )?in house (\d+)\.", clue)
  if m:
    h = grid[m.group(1), m.group(2)]
    return (h == int(m.group(4))) != bool(m.group(3))
  m = re.fullmatch(rf"{item} is (.+) {item}\.", clue)
  a, rel, b = grid[m.group(1), m.group(2)], m.group(3), grid[m.group(4), m.group(5)]
  return {"in the same house as": a == b, "not in the same house as": a != b,
          "directly left of": a + 1 == b, "directly right of": a == b + 1,
          "next to": abs(a - b) == 1}[rel]


def _all_grids(n, kinds):
  names = list(kinds)
  for perms in itertools.product(itertools.permutations(range(1, n + 1)), repeat=len(names)):
    yield {(v, k): p[i] for k, p in zip(names, perms) for i, v in enumerate(kinds[k])}


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_unique_and_minimal_by_brute_force(level):
  """Enumerates every grid (up to 24^3 = 13824) and checks the riddle's claims."""
  for j in range(2):
    task = einstein.generate((0, level, j), difficulty_of(level))
    n, kinds, clues, (tv, tk) = _parse(task["problem"])
    grids = list(_all_grids(n, kinds))
    sat = [[_holds(c, g) for c in clues] for g in grids]
    solutions = [g for g, s in zip(grids, sat) if all(s)]
    assert len(solutions) == 1
    assert str(solutions[0][tv, tk]) == task["solution"]
    for i in range(len(clues)):  # minimal: dropping any clue admits another grid
      assert sum(all(s[:i] + s[i + 1:]) for s in sat) > 1
    assert all(f"{tv} ({tk})" not in c for c in clues)  # the asked value is never named


def test_grid_steps_match_the_solution():
  task = einstein.generate(3, difficulty_of(4))
  n, kinds, clues, (tv, tk) = _parse(task["problem"])
  grid = {}
  for h, step in enumerate(task["steps"][:-1], 1):
    for kind, value in zip(kinds, step.split(": ")[1].rstrip(".").split(", ")):
      grid[value, kind] = h
  assert all(_holds(c, grid) for c in clues)
  assert str(grid[tv, tk]) == task["solution"]


def test_count_solutions_on_a_tiny_case():
  # Two houses, one kind: no clue -> 2 grids; "value 0 in house 1" -> 1 grid.
  cons = einstein.Constraints(2, 1, [("in", 0, 0, einstein._HOUSE, 0)])
  assert einstein.count_solutions(*cons.combine([])) == 2
  assert einstein.count_solutions(*cons.combine([0])) == 1


def test_answer_positions_are_not_skewed():
  counts = collections.Counter(einstein.generate((5, 7, j), difficulty_of(7))["solution"]
                               for j in range(150))
  assert set(counts) == {"1", "2", "3", "4", "5"}
  assert max(counts.values()) < 2.2 * 150 / 5  # uniform expectation 30 each


@pytest.mark.parametrize("level", range(1, 11))
def test_every_level_verifies(level):
  task = einstein.generate((9, level, 0), difficulty_of(level))
  assert einstein.verify(task, " ".join(task["steps"])) == 2
  wrong = str(int(task["solution"]) % einstein._SCHEDULE[level - 1][0] + 1)
  assert einstein.verify(task, f"Answer: {wrong}") == 0


@pytest.mark.parametrize("output,score", [
    ("\\boxed{2}", 2), ("The cat is in house 2.", 2), ("Answer: house 2", 2),
    ("\\boxed{3}", 0), ("\\boxed{1} no wait \\boxed{2}", 2), ("Answer: 2. Clue 3 says 5.", 2),
    ("I give up", -1),
])
def test_verify_phrasings(output, score):
  assert einstein.verify({"type": "Einstein", "solution": "2"}, output) == score
