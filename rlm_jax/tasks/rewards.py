"""Verifier score -> scalar reward, configurable per experiment.

Scores: -1 invalid/unparseable output, 0 wrong, 1 satisfies the constraints without solving
(SAT partial assignment, Countdown expression with the wrong value), 2 solved.

Default: {-1: 0.0, 0: 0.0, 1: 0.0, 2: 1.0}, the defaults of `training.rewards.RewardConfig`
(which takes them from here): 1 for a solved task, nothing else; a partial solution earns
nothing by default, as rewarding it invites stopping early. Pass e.g. {-1: -1.0, 0: 0.0, 1: 0.0,
2: 1.0} to penalise unreadable output below a wrong answer (RL then learns the answer format
first), {-1: 0.0, 0: 0.0, 1: 0.5, 2: 1.0} for shaped rewards, or {-1: -1.0, 0: -1.0, 1: -1.0,
2: 1.0} for the +-1 terminal reward of x1's MCTS.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

SCORES = (-1, 0, 1, 2)
DEFAULT_REWARDS: Mapping[int, float] = {-1: 0.0, 0: 0.0, 1: 0.0, 2: 1.0}


def check_mapping(mapping: Mapping[int, float]) -> dict[int, float]:
  """A validated copy of `mapping`; raises ValueError naming missing/unknown scores."""
  keys = set(mapping)
  if keys != set(SCORES):
    missing, extra = sorted(set(SCORES) - keys), sorted(keys - set(SCORES), key=repr)
    raise ValueError(f"reward mapping must have exactly the scores {list(SCORES)}; "
                     f"missing {missing}, unknown {extra}")
  return {int(k): float(v) for k, v in mapping.items()}


def reward(score: int, mapping: Mapping[int, float] | None = None) -> float:
  """Reward of one verifier score.

  Args:
    score: -1, 0, 1 or 2 (from `rlm_jax.tasks.verify`).
    mapping: score -> reward; `DEFAULT_REWARDS` when None.

  Returns:
    The reward as a float. Raises ValueError for a score outside {-1, 0, 1, 2}.
  """
  table = DEFAULT_REWARDS if mapping is None else check_mapping(mapping)
  if score not in table or isinstance(score, bool):
    raise ValueError(f"score must be one of {list(SCORES)}, got {score!r}")
  return float(table[score])


def reward_array(scores: Sequence[int] | np.ndarray,
            mapping: Mapping[int, float] | None = None) -> np.ndarray:
  """Vectorised `reward`: float32 array of the same shape as `scores`."""
  table = DEFAULT_REWARDS if mapping is None else check_mapping(mapping)
  s = np.asarray(scores)
  if s.size and not np.isin(s, SCORES).all():
    bad = s[~np.isin(s, SCORES)].ravel()[0]
    raise ValueError(f"score must be one of {list(SCORES)}, got {bad.item()!r}")
  lut = np.array([table[k] for k in SCORES], np.float32)
  return lut[s.astype(np.int64) + 1] if s.size else np.zeros(s.shape, np.float32)
