"""Helpers shared by the task domains: seeding, difficulty levels, text hygiene."""
from __future__ import annotations

import random
import sys
import unicodedata
from typing import Any

import numpy as np

NUM_LEVELS = 10

# Model output is untrusted and may be huge; every verifier scans at most this many characters
# (the tail, where the final answer lives), which bounds verification time.
MAX_SCAN_CHARS = 20_000


def make_rng(seed: Any) -> random.Random:
  """Returns a private `random.Random` derived from `seed`, independent of global RNG state.

  Args:
    seed: an int, a sequence of ints (e.g. `(seed, index)`), a `np.random.SeedSequence`, a
      `np.random.Generator` (one draw is consumed), or a JAX PRNG key (raw uint32 array or
      typed key).

  Returns:
    A `random.Random` seeded deterministically from `seed`.
  """
  if isinstance(seed, random.Random):
    return seed
  if isinstance(seed, np.random.Generator):
    entropy = [int(x) for x in seed.integers(0, 2**32, size=4, dtype=np.uint64)]
  elif isinstance(seed, np.random.SeedSequence):
    entropy = [int(x) for x in seed.generate_state(4)]
  else:
    entropy = _entropy_of(seed)
    entropy = [int(x) for x in np.random.SeedSequence(entropy).generate_state(4)]
  value = 0
  for word in entropy:
    value = (value << 32) | word
  return random.Random(value)


def _entropy_of(seed: Any) -> list[int]:
  if isinstance(seed, bool):
    raise TypeError(f"seed must be an int, a sequence of ints or a PRNG key, got {seed!r}")
  if isinstance(seed, (int, np.integer)):
    return _nonneg([int(seed)])
  if isinstance(seed, (list, tuple)):
    out = []
    for s in seed:
      out.extend(_entropy_of(s))
    return out
  if "jax" in sys.modules:
    jax = sys.modules["jax"]
    if isinstance(seed, jax.Array) and jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
      seed = jax.random.key_data(seed)
  try:
    arr = np.asarray(seed)
  except Exception as e:  # pragma: no cover - exotic objects
    raise TypeError(f"seed must be an int, a sequence of ints or a PRNG key, got {seed!r}") from e
  if arr.dtype.kind not in "iu":
    raise TypeError(f"seed must be an int, a sequence of ints or a PRNG key, got {seed!r}")
  return _nonneg([int(x) for x in arr.ravel()])


def _nonneg(values: list[int]) -> list[int]:
  # SeedSequence wants non-negative entropy; fold the sign in so -1 and 1 differ.
  return [2 * v if v >= 0 else -2 * v - 1 for v in values]


def apply_op(a: int, op: str, b: int) -> int | None:
  """a op b for op in + - * / on integers; None for a division that is not exact (or by 0)."""
  if op == "+":
    return a + b
  if op == "-":
    return a - b
  if op == "*":
    return a * b
  if b == 0 or a % b:
    return None
  return a // b


def level_of(difficulty: float) -> int:
  """Maps difficulty in [0, 1] to the x1 level 1..10 (x1: int(10 d) + 1, with d = 1 -> 10)."""
  d = float(difficulty)
  if not 0.0 <= d <= 1.0:
    raise ValueError(f"difficulty must be in [0, 1], got {difficulty!r}")
  return min(NUM_LEVELS, int(d * NUM_LEVELS) + 1)


def difficulty_of(level: int) -> float:
  """Mid-bucket difficulty of a level: `level_of(difficulty_of(l)) == l`."""
  if not 1 <= int(level) <= NUM_LEVELS or int(level) != level:
    raise ValueError(f"level must be an int in 1..{NUM_LEVELS}, got {level!r}")
  return (int(level) - 0.5) / NUM_LEVELS


_ASCII_MAP = {
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"',
    "\u2013": "-", "\u2014": "-", "\u2015": "-", "\u2212": "-", "\u2010": "-", "\u2011": "-",
    "\u2026": "...", "\u00d7": "*", "\u00f7": "/", "\u00a0": " ", "\u2009": " ", "\u202f": " ",
    "\u00bd": "1/2", "\u00bc": "1/4", "\u00be": "3/4", "\u20ac": "EUR", "\u00a3": "GBP",
    "\u00b0": " degrees",
}


def to_ascii(text: str) -> str:
  """Printable-ASCII version of `text`: common typography mapped, whitespace runs -> one space."""
  out = []
  for ch in text:
    ch = _ASCII_MAP.get(ch, ch)
    if len(ch) == 1 and ord(ch) > 126:
      ch = unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode("ascii")
    out.append(ch)
  return " ".join("".join(out).split())


def is_printable_ascii(text: str) -> bool:
  """True iff every character is in 0x20..0x7e (no newlines, tabs or unicode)."""
  return all(" " <= ch <= "~" for ch in text)


def tail(text: str, limit: int = MAX_SCAN_CHARS) -> str:
  """The last `limit` characters of `text` (answers sit at the end of an output)."""
  return text if len(text) <= limit else text[-limit:]


def check_task(task: Any, *fields: str) -> None:
  """Raises a one-line ValueError when `task` lacks one of `fields`."""
  if not isinstance(task, dict):
    raise ValueError(f"task must be a dict, got {type(task).__name__}")
  for f in fields:
    if f not in task:
      raise ValueError(f"task of type {task.get('type')!r} lacks field {f!r}")
