"""Host-side reward functions chosen by config, with the calling convention of TRL.

A reward function is

  reward_func(prompts: list[str], completions: list[str], **columns) -> list[float | None]

where `columns` are the task fields as lists, one entry per completion (`type`, `problem`,
`solution`, `level`, ...; `columns_of(tasks)` builds them). `None` means "does not apply to
this row" and counts as nothing in a weighted sum (TRL's nansum). A completion may also be a
conversational one (a list of `{"role", "content"}` messages); its last message is scored.

Specs (`load_reward_fns`): a built-in name (`correctness`, `format`, `length`), a
`module:function` importable from `sys.path`, or `path/to/file.py:function`; keyword
arguments can follow in parentheses, e.g. `correctness(partial=0.5)`, `length(limit=400,
per=0.01, unit='token')` (literals only: they are read with `ast.literal_eval`).

Built-ins never raise because of model text: an output the verifier cannot read is scored as
invalid. A user function that raises is retried row by row; rows that still raise score 0 (and
are logged); one that raises on every row is a bug and raises a one-line error naming it.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import logging
import math
import os
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from rlm_jax.tasks import registry
from rlm_jax.tasks.common import tail

log = logging.getLogger(__name__)

RewardFn = Callable[..., list]

# An answer marker: an "Answer:" line (optionally "Final answer:"), \boxed{...}, or GSM8K's "####".
_MARKER_RE = re.compile(r'(?im)^[ \t*#>_-]*(?:final\s+)?answer\s*(?:is\s*)?[:=]|\\boxed\s*\{|####')


def completion_text(completion: Any) -> str:
  """The text of a completion: a str, or the content of the last message of a conversation."""
  if isinstance(completion, str):
    return completion
  if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], Mapping):
    content = completion[-1].get('content', '')
    return content if isinstance(content, str) else ''
  return ''


def columns_of(tasks: Sequence[Mapping]) -> dict[str, list]:
  """Task dicts -> `{field: [value per task]}` (a field a task lacks is None there)."""
  keys: dict[str, None] = {}
  for t in tasks:
    keys.update(dict.fromkeys(t))
  return {k: [t.get(k) for t in tasks] for k in keys}


def _rows(n: int, columns: Mapping[str, Sequence]) -> list[dict]:
  return [{k: v[i] for k, v in columns.items()} for i in range(n)]


# ----------------------------------------------------------------------------- built-ins


def correctness(prompts, completions, *, solved: float = 1.0, partial: float = 0.0, wrong: float = 0.0,
                invalid: float = 0.0, **columns) -> list[float]:
  """The task verifier's score (`rlm_jax.tasks.verify`) mapped to a float.

  Args:
    prompts, completions: as every reward function.
    solved / partial / wrong / invalid: rewards of the scores 2 / 1 (constraints met, e.g. a
      SAT assignment that is incomplete, a Countdown expression with the wrong value) / 0 / -1
      (no readable answer).
    **columns: the task fields; at least `type` and `solution`.

  Returns:
    One float per completion. A task the verifier rejects (a data bug) raises; model text
    never does.
  """
  table = {2: solved, 1: partial, 0: wrong, -1: invalid}
  out = []
  for task, c in zip(_rows(len(completions), columns), completions):
    out.append(float(table[registry.verify(task, completion_text(c))]))
  return out


def format_reward(prompts, completions, *, present: float = 1.0, absent: float = 0.0, **columns) -> list[float]:
  """`present` when the completion has an answer marker ('Answer:' line, `\\boxed{`, `####`)."""
  del prompts, columns
  return [present if _MARKER_RE.search(tail(completion_text(c))) else absent for c in completions]


def length(prompts, completions, *, limit: int = 512, per: float = 0.001, unit: str = 'char',
           **columns) -> list[float]:
  """`-per * max(0, size - limit)`: a penalty for each token or character beyond `limit`.

  Args:
    unit: 'char' (len of the text) or 'token' (needs the column `completion_tokens`, the
      number of generated tokens of each row, which the GRPO host loop passes).
  """
  del prompts
  if unit == 'char':
    sizes = [len(completion_text(c)) for c in completions]
  elif unit == 'token':
    if 'completion_tokens' not in columns:
      raise ValueError("reward function 'length(unit=\"token\")' needs the column 'completion_tokens'")
    sizes = [int(n) for n in columns['completion_tokens']]
  else:
    raise ValueError(f"reward function 'length': unit={unit!r} must be 'char' or 'token'")
  return [-per * max(0, n - limit) for n in sizes]


BUILTINS: dict[str, RewardFn] = {'correctness': correctness, 'format': format_reward, 'length': length}


# ----------------------------------------------------------------------------- loading


def _parse_spec(spec: str) -> tuple[str, dict]:
  spec = spec.strip()
  m = re.fullmatch(r'([^()]+?)\s*(?:\((.*)\))?', spec, re.S)
  if not m:
    raise ValueError(f'reward function {spec!r}: expected NAME, module:function or file.py:function, '
                     f'optionally with (key=value, ...)')
  head, args = m.group(1), m.group(2)
  kwargs = {}
  if args and args.strip():
    try:
      call = ast.parse(f'f({args})', mode='eval').body
      if call.args:
        raise ValueError('positional arguments')
      kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as e:
      raise ValueError(f'reward function {spec!r}: arguments must be key=literal, ... ({e})') from None
  return head, kwargs


def _import(head: str, spec: str) -> RewardFn:
  if head in BUILTINS:
    return BUILTINS[head]
  if ':' not in head:
    raise ValueError(f'reward function {spec!r}: not a built-in ({sorted(BUILTINS)}) nor module:function')
  mod_name, _, fn_name = head.rpartition(':')
  if mod_name.endswith('.py'):
    if not os.path.isfile(mod_name):
      raise ValueError(f'reward function {spec!r}: file {mod_name} not found')
    mspec = importlib.util.spec_from_file_location(f'_reward_{abs(hash(mod_name))}', mod_name)
    module = importlib.util.module_from_spec(mspec)
    try:
      mspec.loader.exec_module(module)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'reward function {spec!r}: {mod_name} failed to import ({type(e).__name__}: {e})') from None
  else:
    try:
      module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
      raise ValueError(f'reward function {spec!r}: module {mod_name!r} not found ({e})') from None
  fn = getattr(module, fn_name, None)
  if fn is None:
    raise ValueError(f'reward function {spec!r}: module {mod_name!r} has no function {fn_name!r}')
  if not callable(fn):
    raise ValueError(f'reward function {spec!r}: {fn_name!r} is not callable')
  return fn


class _Named:
  """A reward function with its spec (for messages and metric names) and bound keywords."""

  def __init__(self, spec: str, fn: RewardFn, kwargs: dict):
    self.spec, self.fn, self.kwargs = spec, fn, kwargs
    self.__name__ = spec

  def __call__(self, prompts, completions, **columns):
    return self.fn(prompts, completions, **columns, **self.kwargs)


def load_reward_fns(specs: Sequence[str]) -> list[RewardFn]:
  """Callables for `specs` (see the module docstring); each has `.spec` and `.__name__`.

  Raises:
    ValueError: one line naming the spec when a module, file or function is missing or the
      arguments are malformed.
  """
  if isinstance(specs, str):
    specs = [specs]
  out = []
  for spec in specs:
    head, kwargs = _parse_spec(spec)
    out.append(_Named(spec, _import(head, spec), kwargs))
  return out


# ----------------------------------------------------------------------------- combining


def _call(fn: RewardFn, prompts, completions, columns) -> np.ndarray:
  """One function on a batch -> float64 [B] (None -> nan), robust to exceptions per row."""
  name = getattr(fn, '__name__', repr(fn))
  n = len(completions)

  def check(vals, m):
    if not isinstance(vals, (list, tuple, np.ndarray)) or len(vals) != m:
      raise ValueError(f'reward function {name!r} returned {type(vals).__name__} of length '
                       f'{len(vals) if hasattr(vals, "__len__") else "?"}; expected a list of {m} floats')
    return [math.nan if v is None else float(v) for v in vals]

  try:
    return np.asarray(check(fn(list(prompts), list(completions), **columns), n), np.float64)
  except ValueError as e:
    if str(e).startswith('reward function'):
      raise
    err = e
  except Exception as e:  # pylint: disable=broad-except
    err = e
  out, failures = np.zeros(n, np.float64), 0
  for i in range(n):
    try:
      out[i] = check(fn([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in columns.items()}), 1)[0]
    except Exception:  # pylint: disable=broad-except
      failures += 1
  if failures == n:
    raise ValueError(f'reward function {name!r} raised on every completion: {type(err).__name__}: '
                     f'{str(err)[:200]}') from None
  log.warning('reward function %r raised on %d of %d completions (scored 0): %s', name, failures, n, err)
  return out


def score(fns: Sequence[RewardFn], prompts: Sequence, completions: Sequence, **columns) -> np.ndarray:
  """Every function on the batch: float64 `[F, B]`, nan where a function returned None."""
  n = len(completions)
  if len(prompts) != n or any(len(v) != n for v in columns.values()):
    bad = [k for k, v in columns.items() if len(v) != n]
    raise ValueError(f'reward columns must have one entry per completion ({n}); '
                     f'prompts has {len(prompts)}, mismatched columns: {bad}')
  if not fns:
    return np.zeros((0, n), np.float64)
  return np.stack([_call(fn, prompts, completions, columns) for fn in fns])


def combine(fns: Sequence[RewardFn], weights: Sequence[float] | None = None) -> RewardFn:
  """One reward function: the weighted sum of `fns` (weights default to 1; None rows skipped).

  Raises:
    ValueError: when the number of weights differs from the number of functions.
  """
  fns = list(fns)
  w = np.ones(len(fns)) if weights is None else np.asarray(weights, np.float64)
  if w.shape != (len(fns),):
    raise ValueError(f'rl.reward_weights has {w.size} entries for {len(fns)} reward functions')

  def combined(prompts, completions, **columns):
    per_FxB = score(fns, prompts, completions, **columns)
    return np.nansum(w[:, None] * per_FxB, axis=0).tolist()

  combined.__name__ = ' + '.join(f'{wi:g}*{getattr(f, "__name__", "fn")}' for wi, f in zip(w, fns))
  return combined
