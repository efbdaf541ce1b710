"""The domain table and the entry points that dispatch on a task's type.

Every domain module offers `NAME` (the task `type` it writes), `generate(seed, difficulty)`,
`parse_task(task) -> gold` (raises ValueError on a malformed task), `score(gold, output) ->
int` and `answer_text(task) -> str`; a domain whose steps can be judged one by one also offers
`check_steps(task, steps) -> list[int]` (process labels of any trace).
"""
from __future__ import annotations

import logging
import re
from types import ModuleType
from typing import Any, Iterable

from rlm_jax.tasks import (arithmetic, countdown, einstein, gsm8k, knapsack, mathverify,
                           prontoqa, sat)
from rlm_jax.tasks.common import NUM_LEVELS, difficulty_of

log = logging.getLogger(__name__)


def normalize_name(name: str) -> str:
  """Lower-case, punctuation-free form of a domain/type name ("PrOntoQA" -> "prontoqa")."""
  return re.sub(r"[^a-z0-9]", "", str(name).lower())


class DomainTable(dict):
  """dict name -> domain module whose lookups ignore case and punctuation, so x1 type names
  ("SAT", "Knapsack", "Einstein", "ProntoQA", "PrOntoQA") find their domain."""

  def __getitem__(self, name):
    try:
      return super().__getitem__(normalize_name(name))
    except KeyError:
      raise KeyError(f"unknown task domain {name!r}; known: {sorted(self)}") from None

  def __contains__(self, name):
    return super().__contains__(normalize_name(name))

  def get(self, name, default=None):
    return super().get(normalize_name(name), default)


DOMAINS: DomainTable = DomainTable(
    sat=sat, knapsack=knapsack, einstein=einstein, prontoqa=prontoqa, countdown=countdown,
    arithmetic=arithmetic, gsm8k=gsm8k)

# Types that can be verified but not generated (MATH-style LaTeX answers).
_VERIFY_ONLY = DomainTable(math=mathverify)


def domain_of(task: dict) -> ModuleType:
  """The domain module for `task["type"]`; ValueError for a missing or unknown type."""
  if not isinstance(task, dict) or "type" not in task:
    raise ValueError(f"task must be a dict with a 'type' field, got {str(task)[:80]!r}")
  mod = DOMAINS.get(task["type"]) or _VERIFY_ONLY.get(task["type"])
  if mod is None:
    raise ValueError(f"unknown task type {task['type']!r}; known: "
                     f"{sorted(DOMAINS) + sorted(_VERIFY_ONLY)}")
  return mod


def generate(domain: str, seed: Any, difficulty: float) -> dict:
  """One task of `domain` (x1 schema plus `steps`), reproducible from `seed`.

  Args:
    domain: a `DOMAINS` name (case-insensitive; x1 type names work).
    seed: int, sequence of ints, `np.random.Generator`/`SeedSequence` or a JAX PRNG key.
    difficulty: in [0, 1]; level = min(10, int(10 d) + 1).

  Returns:
    `{"type", "level", "problem", "unique_solution", "solution", "steps"}`; the steps end with
    `"Answer: " + answer_text(task)`.
  """
  return DOMAINS[domain].generate(seed, difficulty)


def generate_dataset(domain: str, n: int, seed: int,
                     levels: Iterable[int] = range(1, NUM_LEVELS + 1)) -> list[dict]:
  """`n` tasks, exactly n / len(levels) per level, ordered by level, reproducible.

  Task j of level l is generated from the seed (seed, l, j), so it does not depend on `n`, on
  the other levels, or on global RNG state. Each task gets `id` = its index in the list.

  Raises:
    ValueError: when `n` is not a multiple of the number of levels, or a level is not 1..10.
  """
  levels = list(levels)
  mod = DOMAINS[domain]
  if not levels:
    raise ValueError("levels is empty")
  for level in levels:
    difficulty_of(level)  # validates
  if n < 0 or n % len(levels):
    raise ValueError(f"n={n} is not a non-negative multiple of the {len(levels)} levels")
  per = n // len(levels)
  tasks = []
  for level in levels:
    for j in range(per):
      task = mod.generate((int(seed), int(level), j), difficulty_of(level))
      task["id"] = len(tasks)
      tasks.append(task)
  return tasks


def verify(task: dict, output: str) -> int:
  """Scores model `output` for `task`: -1 invalid, 0 wrong, 1 constraints met (not solved),
  2 solved.

  Never raises because of `output` (any string, any length: only its tail is scanned, and
  a non-str output scores -1). A malformed *task* (unknown type, missing or unparseable
  solution) raises ValueError naming the problem, since that is a data bug.
  """
  mod = domain_of(task)
  gold = mod.parse_task(task)
  if not isinstance(output, str):
    return -1
  try:
    return int(mod.score(gold, output))
  except Exception:  # pylint: disable=broad-except
    # Defence in depth: the fuzz tests call `score` unguarded; here an output must not crash
    # a training loop.
    log.exception("verifier for %s raised on an output; scoring -1", task["type"])
    return -1


def has_step_checker(task: dict) -> bool:
  """Whether `task`'s domain judges steps one by one (`check_steps`)."""
  return hasattr(domain_of(task), "check_steps")


def check_steps(task: dict, steps: list[str]) -> list[int]:
  """Process labels of a trace (1 right, 0 from the first wrong step on) by the domain's own
  step checker; never raises because of the steps (a checker that fails scores them 0)."""
  mod = domain_of(task)
  mod.parse_task(task)
  try:
    return [int(x) for x in mod.check_steps(task, list(steps))]
  except Exception:  # pylint: disable=broad-except
    log.exception("step checker for %s raised on a trace; labelling it wrong", task["type"])
    return [0] * len(steps)


def answer_text(task: dict) -> str:
  """The canonical short final answer (`42`, `True`, `x1=T x2=F`, `3`, `(3+5)*2`)."""
  return domain_of(task).answer_text(task)
