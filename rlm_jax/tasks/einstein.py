"""Einstein riddles (zebra puzzles): houses in a row, attribute values, clues, one question.

Level schedule (houses, attribute kinds): (3,2) (3,3) (3,4) (4,2) (4,3) (4,4) (5,3) (5,4) (5,5)
(5,6). The whole grid is uniquely determined by the clues (checked by the solver below), the
clue set is minimal (no clue can be dropped), and the asked-about value is never named in a
clue, so answering needs the grid. The answer house is drawn uniformly first, so answer
positions are not skewed.

Solver: each attribute kind is one variable whose domain is the n! permutations (value ->
house); clues become masks on one domain or boolean relation matrices between two domains;
the solution count (up to 2) is found by backtracking with forward checking, vectorised over
permutations with numpy.

Reference steps list the solved grid one house per step (`House 1: red, Brit.`), then
`Answer: 3`. x1 records (`solution` the house number as a string) verify the same way.
"""
from __future__ import annotations

import functools
import itertools
import re

import numpy as np

from rlm_jax.tasks import extract
from rlm_jax.tasks.common import check_task, level_of, make_rng, tail

NAME = "Einstein"

_SCHEDULE = ((3, 2), (3, 3), (3, 4), (4, 2), (4, 3), (4, 4), (5, 3), (5, 4), (5, 5), (5, 6))
_CATEGORIES = {
    "color": ("red", "green", "blue", "white", "yellow", "black"),
    "nationality": ("Brit", "Swede", "Dane", "German", "Italian", "Spaniard"),
    "drink": ("tea", "coffee", "milk", "water", "juice", "soda"),
    "pet": ("dog", "cat", "bird", "fish", "horse", "rabbit"),
    "food": ("bread", "rice", "pasta", "soup", "salad", "cheese"),
    "job": ("baker", "doctor", "pilot", "farmer", "teacher", "artist"),
    "sport": ("chess", "tennis", "golf", "soccer", "rugby", "hockey"),
    "name": ("Anna", "Ben", "Carl", "Dora", "Emil", "Fay"),
}
# Clue kinds and sampling weights. "in"/"not_in" compare with a house number.
_KINDS = ("same", "not_same", "left", "right", "next", "in", "not_in")
_WEIGHTS = (0.25, 0.1, 0.15, 0.1, 0.2, 0.1, 0.1)
_HOUSE = -1  # the "type" of a house-number operand

Clue = tuple[str, int, int, int, int]  # (kind, type1, value1, type2 or _HOUSE, value2 or house)


@functools.lru_cache(maxsize=None)
def permutations(n: int) -> np.ndarray:
  """[n!, n] int8: row k maps value index -> house index (0-based)."""
  return np.array(list(itertools.permutations(range(n))), dtype=np.int8)


def _rel(kind: str, a, b):
  if kind in ("same", "in"):
    return a == b
  if kind in ("not_same", "not_in"):
    return a != b
  if kind == "left":
    return a + 1 == b
  if kind == "right":
    return a == b + 1
  return np.abs(a.astype(np.int16) - b) == 1


class Constraints:
  """Per-clue masks/matrices, combined on demand for a subset of clues."""

  def __init__(self, n: int, m: int, clues: list[Clue]):
    self.n, self.m = n, m
    self.perm = permutations(n)
    self.parts = [self._part(c) for c in clues]

  def add(self, clue: Clue) -> None:
    self.parts.append(self._part(clue))

  def _part(self, clue: Clue):
    kind, t1, v1, t2, v2 = clue
    p = self.perm
    # Masks are float32 0/1 so that combining is a product and propagation a mat-vec.
    if t2 == _HOUSE:
      return ("unary", t1, _rel(kind, p[:, v1], np.int8(v2)).astype(np.float32))
    if t1 == t2:
      return ("unary", t1, _rel(kind, p[:, v1], p[:, v2]).astype(np.float32))
    if t1 > t2:
      t1, t2, v1, v2 = t2, t1, v2, v1
      kind = {"left": "right", "right": "left"}.get(kind, kind)
    mat = _rel(kind, p[:, v1][:, None], p[:, v2][None, :]).astype(np.float32)
    return ("binary", (t1, t2), mat)

  def combine(self, active) -> tuple[list[np.ndarray], dict]:
    """(domains, rel) for the clues with indices in `active` (see `count_solutions`)."""
    size = len(self.perm)
    domains = [np.ones(size, np.float32) for _ in range(self.m)]
    rel: dict[tuple[int, int], np.ndarray] = {}
    for i in active:
      domains, rel = self.with_clue((domains, rel), i)
    return domains, rel

  def with_clue(self, state, i):
    """`state` plus clue i (copy-on-write: `state` is not modified)."""
    (domains, rel), (kind, key, arr) = state, self.parts[i]
    if kind == "unary":
      domains = list(domains)
      domains[key] = domains[key] * arr
    else:
      rel = dict(rel)
      rel[key] = rel[key] * arr if key in rel else arr
    return domains, rel

  def without_clue(self, state, active, i):
    """`state` (the combination of `active`) minus clue i; only clue i's entry is rebuilt."""
    (domains, rel), (kind, key, _) = state, self.parts[i]
    rest = [self.parts[j][2] for j in active
            if j != i and self.parts[j][0] == kind and self.parts[j][1] == key]
    prod = functools.reduce(np.multiply, rest) if rest else None
    if kind == "unary":
      domains = list(domains)
      domains[key] = prod if prod is not None else np.ones(len(self.perm), np.float32)
    else:
      rel = dict(rel)
      if prod is None:
        del rel[key]
      else:
        rel[key] = prod
    return domains, rel


def count_solutions(domains: list[np.ndarray], rel: dict, limit: int = 2) -> int:
  """Number of grids (up to `limit`) consistent with unary `domains` and pairwise `rel`.

  Args:
    domains: per attribute kind, a 0/1 mask over `permutations(n)`.
    rel: (a, b) with a < b -> 0/1 matrix [n!, n!]; 1 where the pair of permutations is
      allowed by every clue between kinds a and b.
    limit: stop counting here (2 decides uniqueness).
  """
  m = len(domains)
  doms = [np.asarray(d, np.float32) for d in domains]
  mats = {}
  for (a, b), r in rel.items():
    f = np.asarray(r, np.float32)
    mats[a, b], mats[b, a] = f, f.T
  # Forward checking only: arc consistency at the root was measured slower here.
  sizes = [int(np.count_nonzero(d)) for d in doms]
  neighbors = {t: [(u, mats[t, u]) for u in range(m) if (t, u) in mats] for t in range(m)}

  def rec(doms, sizes, unassigned, budget):
    if not unassigned:
      return 1
    t = min(unassigned, key=sizes.__getitem__)
    rest = [u for u in unassigned if u != t]
    total = 0
    for k in np.flatnonzero(doms[t]):
      new, new_sizes = list(doms), list(sizes)
      ok = True
      for u, r in neighbors[t]:
        if u in rest:
          new[u] = new[u] * r[k]
          new_sizes[u] = int(np.count_nonzero(new[u]))
          if new_sizes[u] == 0:
            ok = False
            break
      if ok:
        total += rec(new, new_sizes, rest, budget - total)
        if total >= budget:
          return total
    return total

  return rec(doms, sizes, list(range(m)), limit)


def _sample_clue(rng, n, m, sol, perm, banned) -> Clue:
  """A random clue true for solution `sol` (type -> permutation index) not naming `banned`."""
  house_of = lambda t, v: int(perm[sol[t], v])
  value_at = lambda t, h: int(np.flatnonzero(perm[sol[t]] == h)[0])
  while True:
    kind = rng.choices(_KINDS, _WEIGHTS)[0]
    t1, v1 = rng.randrange(m), rng.randrange(n)
    if (t1, v1) == banned:
      continue
    h1 = house_of(t1, v1)
    if kind in ("in", "not_in"):
      h2 = h1 if kind == "in" else rng.choice([h for h in range(n) if h != h1])
      return (kind, t1, v1, _HOUSE, h2)
    t2 = rng.randrange(m)
    if kind == "same":
      if t2 == t1:
        continue
      h2 = h1
    elif kind == "not_same":
      h2 = rng.choice([h for h in range(n) if h != h1])
    elif kind == "left":
      h2 = h1 + 1
    elif kind == "right":
      h2 = h1 - 1
    else:
      h2 = h1 + rng.choice((-1, 1))
    if not 0 <= h2 < n:
      continue
    v2 = value_at(t2, h2)
    if (t2, v2) == banned or (t2, v2) == (t1, v1):
      continue
    return (kind, t1, v1, t2, v2)


def _clue_text(clue: Clue, label) -> str:
  kind, t1, v1, t2, v2 = clue
  a = label(t1, v1)
  if t2 == _HOUSE:
    return f"{a} is {'not ' if kind == 'not_in' else ''}in house {v2 + 1}."
  b = label(t2, v2)
  return {
      "same": f"{a} is in the same house as {b}.",
      "not_same": f"{a} is not in the same house as {b}.",
      "left": f"{a} is directly left of {b}.",
      "right": f"{a} is directly right of {b}.",
      "next": f"{a} is next to {b}.",
  }[kind]


def generate(seed, difficulty: float) -> dict:
  """One riddle with a unique grid and a minimal clue set.

  Args:
    seed: anything `common.make_rng` accepts.
    difficulty: in [0, 1].

  Returns:
    x1-schema dict with `solution` the 1-based house number as a string, plus `steps`.
  """
  level = level_of(difficulty)
  rng = make_rng(seed)
  n, m = _SCHEDULE[level - 1]
  perm = permutations(n)
  cats = rng.sample(sorted(_CATEGORIES), m)
  values = [sorted(rng.sample(_CATEGORIES[c], n)) for c in cats]
  sol = [rng.randrange(len(perm)) for _ in range(m)]
  answer_house = rng.randrange(n)
  t_star = rng.randrange(m)
  v_star = int(np.flatnonzero(perm[sol[t_star]] == answer_house)[0])

  # Add random true clues in chunks until the grid is unique, keep the shortest unique prefix
  # (binary search: more clues never add solutions), then drop every clue it does not need.
  clues: list[Clue] = []
  cons = Constraints(n, m, [])
  unique = lambda state: count_solutions(*state) == 1
  state = cons.combine([])
  prefix_states = [state]  # state after each clue
  lo = 0
  while True:
    for _ in range(m + 1):
      clue = _sample_clue(rng, n, m, sol, perm, (t_star, v_star))
      if clue not in clues:
        clues.append(clue)
        cons.add(clue)
        state = cons.with_clue(state, len(clues) - 1)
        prefix_states.append(state)
    if unique(state):
      break
    lo = len(clues)
  hi = len(clues)
  while lo + 1 < hi:
    mid = (lo + hi) // 2
    if unique(prefix_states[mid]):
      hi = mid
    else:
      lo = mid
  active, state = list(range(hi)), prefix_states[hi]
  order = list(active)
  rng.shuffle(order)
  for i in order:
    trial = cons.without_clue(state, active, i)
    if unique(trial):
      active, state = [j for j in active if j != i], trial
  clues = [clues[i] for i in active]
  rng.shuffle(clues)

  label = lambda t, v: f"{values[t][v]} ({cats[t]})"
  listing = " ".join(f"{cats[t].capitalize()}: {', '.join(values[t])}." for t in range(m))
  clue_text = " ".join(f"{i + 1}. {_clue_text(c, label)}" for i, c in enumerate(clues))
  problem = (f"Houses 1 to {n} stand in a row, left to right. Each value below belongs to exactly "
             f"one house. {listing} Clues: {clue_text} Which house has {label(t_star, v_star)}?")
  steps = []
  for h in range(n):
    row = [values[t][int(np.flatnonzero(perm[sol[t]] == h)[0])] for t in range(m)]
    steps.append(f"House {h + 1}: {', '.join(row)}.")
  steps.append(f"Answer: {answer_house + 1}")
  return {
      "type": NAME,
      "level": level,
      "problem": problem,
      "unique_solution": True,
      "solution": str(answer_house + 1),
      "steps": steps,
  }


def parse_task(task: dict) -> int:
  check_task(task, "solution")
  try:
    return int(str(task["solution"]).strip())
  except ValueError:
    raise ValueError(f"Einstein task solution must be a house number, got {task['solution']!r}")


def answer_text(task: dict) -> str:
  return str(parse_task(task))


_HOUSE_RE = re.compile(r"\bhouse\s{0,3}(?:number\s{0,3}|no\.?\s{0,3}|#\s{0,3})?(\d{1,3})\b", re.IGNORECASE)
_INT_RE = re.compile(r"(?<![\w.])(\d{1,3})(?![\w]|\.\d)")


def final_house(output: str) -> int | None:
  """The final house number in free text: last \\boxed{}, else after the last answer marker,
  else the last "house N"."""
  text = tail(output)
  marks = extract.marker_positions(text)
  for start, end in reversed(marks[-extract.MAX_MARKERS:]):
    if text[start:end].startswith("\\"):
      seg = extract.braced_after(text, start) or ""
    else:
      seg = text[end:end + 80]
    found = [m for m in (_HOUSE_RE.search(seg), _INT_RE.search(seg)) if m]
    if found:
      return int(min(found, key=lambda m: m.start()).group(1))
  last = None
  for m in _HOUSE_RE.finditer(text):
    last = m
  return int(last.group(1)) if last else None


def verify(task: dict, output: str) -> int:
  return score(parse_task(task), output)


def score(house: int, output: str) -> int:
  """2 if the final house number in `output` is `house`, 0 if another, -1 if none."""
  got = final_house(output)
  if got is None:
    return -1
  return 2 if got == house else 0
