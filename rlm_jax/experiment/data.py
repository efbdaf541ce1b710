"""The data splits of an experiment: SFT traces, held-out problems, the phase-2 problem pool.

Every split is tokenised once on host (numpy) by `encode_split`; batches are cut from these
arrays by row indices that are functions of (seed, step).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Sequence

import numpy as np

from rlm_jax import configlib
from rlm_jax import tasks as tasks_lib
from rlm_jax.data import encoding
from rlm_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass
class Data:
  """Tokenised tasks of one split (host numpy)."""

  tasks: list
  prompt: np.ndarray
  prompt_mask: np.ndarray
  answer: np.ndarray
  answer_len: np.ndarray
  sft: dict

  def prompt_batch(self) -> dict[str, np.ndarray]:
    """The arrays an RL batch is cut from (rows = tasks)."""
    return {'prompt': self.prompt, 'prompt_mask': self.prompt_mask, 'answer': self.answer,
            'answer_len': self.answer_len}


def _per_level(n: int, cfg) -> int:
  """`n` rounded up to a multiple of the number of levels (generate_dataset needs it)."""
  return -(-n // len(cfg.levels)) * len(cfg.levels)


def encode_split(tok: Tokenizer, ts: Sequence[dict], cfg, traces: bool = True,
                 fmt: encoding.PromptFormat = encoding.DEFAULT_FORMAT) -> Data:
  """Prompts, canonical final steps and (with `traces`) SFT sequences of a list of tasks.

  `cfg` is the `task` section (prompt_len, completion_len, answer_len); `fmt` the prompt format.
  """
  prompt, mask = encoding.encode_prompts(tok, ts, cfg.prompt_len, fmt)
  answer, answer_len = encoding.encode_answers(tok, ['Answer: ' + tasks_lib.answer_text(t) for t in ts],
                                               cfg.answer_len)
  sft = encoding.encode_sft(tok, ts, cfg.prompt_len + cfg.completion_len, fmt) if traces else {}
  return Data(list(ts), prompt, mask, answer, answer_len, sft)


# Files of `task.domain` used when no task.*_file is given (train on train, evaluate on test).
DEFAULT_FILES = {'gsm8k': ('builtin:gsm8k_train_sample.jsonl', 'builtin:gsm8k_sample.jsonl')}


def _files(cfg) -> tuple[str, str, str]:
  train, held = cfg.train_file, cfg.eval_file
  if not (train or held or cfg.rl_file) and cfg.domain in DEFAULT_FILES:
    train, held = DEFAULT_FILES[cfg.domain]
  return train, held, cfg.rl_file


def _subset(ts: list, n: int, seed) -> list:
  """At most `n` of `ts` (0: all), drawn reproducibly, in source order."""
  if not n or len(ts) <= n:
    return ts
  return [ts[i] for i in sorted(np.random.default_rng(seed).choice(len(ts), n, replace=False))]


def load_file_split(tok: Tokenizer, cfg, key: str, fmt, *, traces: bool, exclude=(), size: int = 0,
                    seed=0, verbose: bool = True) -> list[dict]:
  """The tasks of `task.<key>` (a file or dataset), minus `exclude`'s problems, fitted to the
  task lengths (`task.length_policy`), at most `size` of them.

  Raises:
    ConfigError: one line naming `task.<key>` (unreadable, empty after filtering, no solution
      steps where SFT needs them) or the length key.
  """
  from rlm_jax.data import datasets  # pylint: disable=g-import-not-at-top
  path = dict(zip(('train_file', 'eval_file', 'rl_file'), _files(cfg)))[key]
  try:
    ts = datasets.load_split(path, question_key=cfg.question_key, answer_key=cfg.answer_key)
  except (ValueError, ImportError, OSError) as e:
    raise configlib.ConfigError(f'task.{key}={path}: {e}') from e
  ts, overlap = datasets.remove_overlap(ts, exclude)
  if traces:
    bare = [i for i, t in enumerate(ts) if not t.get('steps')]
    if bare:
      raise configlib.ConfigError(f'task.{key}={path}: problem {bare[0] + 1} has no solution steps, which SFT '
                                  'trains on (set sft.steps=0 to skip SFT)')
  try:  # evaluation and RL generate their own completions: only prompts and answers must fit
    ts, dropped = datasets.fit_lengths(tok, ts, cfg.prompt_len, cfg.completion_len if traces else 10**9,
                                       cfg.answer_len, cfg.length_policy, where=path, fmt=fmt)
  except ValueError as e:
    raise configlib.ConfigError(str(e)) from e
  if not ts:
    raise configlib.ConfigError(f'task.{key}={path}: no problem left ({overlap} also in the training split)')
  ts = _subset(ts, size, seed)
  if verbose:
    print(f'task.{key}={path}: {len(ts)} problems ({dropped} dropped by task.length_policy, {overlap} '
          'removed as training problems)', file=sys.stderr)
  return [dict(t, id=i) for i, t in enumerate(ts)]


def build_data(tok: Tokenizer, cfg, eval_size: int, fmt: encoding.PromptFormat = encoding.DEFAULT_FORMAT,
               traces: bool = True) -> tuple[Data, Data]:
  """(SFT split, held-out split) of the `task` section `cfg`: from files or the generator."""
  train_file, eval_file, _ = _files(cfg)
  if train_file:
    train = load_file_split(tok, cfg, 'train_file', fmt, traces=traces, size=cfg.train_size, seed=(cfg.seed, 0))
  else:
    train = tasks_lib.generate_dataset(cfg.domain, _per_level(cfg.train_size, cfg), cfg.seed, levels=cfg.levels)
  if eval_file:
    held = load_file_split(tok, cfg, 'eval_file', fmt, traces=False, exclude=train, size=eval_size,
                           seed=(cfg.seed, 1))
  else:
    seen = {t['problem'] for t in train}
    held = [t for t in tasks_lib.generate_dataset(cfg.domain, _per_level(4 * eval_size, cfg), cfg.seed + 1,
                                                  levels=cfg.levels) if t['problem'] not in seen]
    if not held:
      raise configlib.ConfigError(f'task.domain={cfg.domain}: no held-out problem left after removing the '
                                  f'{len(seen)} training problems')
    rng = np.random.default_rng(cfg.seed)
    held = [held[i] for i in sorted(rng.choice(len(held), min(eval_size, len(held)), replace=False))]
  return encode_split(tok, train, cfg, traces, fmt), encode_split(tok, held, cfg, False, fmt)


def build_rl_pool(tok: Tokenizer, cfg, exclude: Sequence[Data],
                  fmt: encoding.PromptFormat = encoding.DEFAULT_FORMAT) -> Data:
  """The phase-2 problem pool (`task.rl_file` / `task.rl_size`), disjoint from `exclude`'s splits."""
  if cfg.rl_file:
    pool = load_file_split(tok, cfg, 'rl_file', fmt, traces=False, exclude=[t for d in exclude for t in d.tasks],
                           size=cfg.rl_size, seed=(cfg.seed, 2))
    return encode_split(tok, pool, cfg, traces=False, fmt=fmt)
  seen = {t['problem'] for d in exclude for t in d.tasks}
  pool, fresh = [], set()
  for t in tasks_lib.generate_dataset(cfg.domain, _per_level(cfg.rl_size, cfg), cfg.seed + 2, levels=cfg.levels):
    if t['problem'] not in seen and t['problem'] not in fresh:
      fresh.add(t['problem'])
      pool.append(t)
  if not pool:
    raise configlib.ConfigError(f'task.rl_size={cfg.rl_size}: no problem left after removing SFT and '
                                'held-out ones')
  return encode_split(tok, pool, cfg, traces=False, fmt=fmt)


def host_rewards(tok: Tokenizer, tasks: Sequence[dict], group_size: int, fns, weights=(), fmt=None):
  """Scores rollout rows with TRL-style reward functions (`tasks.reward_fns`), on host.

  Args:
    tok: the tokenizer.
    tasks: the B prompts' tasks; rows are prompt-major, `group_size` per task.
    fns: reward functions (`reward_fns.load_reward_fns(config.rl.reward_fns)`).
    weights: one per function (() = all 1).
    fmt: the run's prompt format (the `prompts` argument the functions get is its text).

  Returns:
    score(tokens_BxT, lengths_B) -> (verifier scores [B] int, rewards [B] float, metrics): the
    verifier score as `host_scorer` gives it (for accuracy metrics), the weighted sum of the
    functions, and `reward_fn/<name>` (mean of each function over the batch).
  """
  from rlm_jax.tasks import reward_fns  # pylint: disable=g-import-not-at-top
  fmt = fmt or encoding.DEFAULT_FORMAT
  rows = [tasks[r // group_size] for r in range(len(tasks) * group_size)]
  prompts = [encoding.prompt_text(tok, t, fmt) for t in rows]
  w = np.ones(len(fns)) if not weights else np.asarray(weights, np.float64)
  verifier = host_scorer(tok, tasks, group_size)

  def score(tokens_BxT: np.ndarray, lengths_B: np.ndarray):
    completions = [tok.decode(tokens_BxT[r, :n]) for r, n in enumerate(lengths_B)]
    columns = dict(reward_fns.columns_of(rows), completion_tokens=[int(n) for n in lengths_B])
    per_FxB = reward_fns.score(fns, prompts, completions, **columns)
    reward = np.nansum(w[:, None] * per_FxB, axis=0)
    metrics = {f'reward_fn/{getattr(f, "spec", getattr(f, "__name__", i))}': float(np.nanmean(v)) if np.isfinite(v).any()
               else float('nan') for i, (f, v) in enumerate(zip(fns, per_FxB))}
    return verifier(tokens_BxT, lengths_B), reward.astype(np.float32), metrics

  return score


def host_scorer(tok: Tokenizer, tasks: Sequence[dict], group_size: int):
  """Scores rollout rows (prompt-major, `group_size` per task) with the task verifiers.

  A row that did not end in EOS (cut at the length limit) scores -1, as on device.
  """

  def score(tokens_BxT: np.ndarray, lengths_B: np.ndarray) -> np.ndarray:
    out = np.empty(len(lengths_B), np.int32)
    for r, n in enumerate(lengths_B):
      if n == 0 or tokens_BxT[r, n - 1] != tok.eos_id:
        out[r] = -1
      else:
        out[r] = tasks_lib.verify(tasks[r // group_size], tok.decode(tokens_BxT[r, :n]))
    return out

  return score
