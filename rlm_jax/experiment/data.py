"""The data splits of an experiment: SFT traces, held-out problems, the phase-2 problem pool.

Every split is tokenised once on host (numpy) by `encode_split`; batches are cut from these
arrays by row indices that are functions of (seed, step).
"""

from __future__ import annotations

import dataclasses
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


def encode_split(tok: Tokenizer, ts: Sequence[dict], cfg, traces: bool = True) -> Data:
  """Prompts, canonical final steps and (with `traces`) SFT sequences of a list of tasks.

  `cfg` is the `task` section (prompt_len, completion_len, answer_len).
  """
  prompt, mask = encoding.encode_prompts(tok, ts, cfg.prompt_len)
  answer, answer_len = encoding.encode_answers(tok, ['Answer: ' + tasks_lib.answer_text(t) for t in ts],
                                               cfg.answer_len)
  sft = encoding.encode_sft(tok, ts, cfg.prompt_len + cfg.completion_len) if traces else {}
  return Data(list(ts), prompt, mask, answer, answer_len, sft)


def build_data(tok: Tokenizer, cfg, eval_size: int) -> tuple[Data, Data]:
  """(SFT split, held-out split) of the `task` section `cfg`."""
  train = tasks_lib.generate_dataset(cfg.domain, _per_level(cfg.train_size, cfg), cfg.seed, levels=cfg.levels)
  seen = {t['problem'] for t in train}
  held = [t for t in tasks_lib.generate_dataset(cfg.domain, _per_level(4 * eval_size, cfg), cfg.seed + 1,
                                                levels=cfg.levels) if t['problem'] not in seen]
  if not held:
    raise configlib.ConfigError(f'task.domain={cfg.domain}: no held-out problem left after removing the '
                                f'{len(seen)} training problems')
  rng = np.random.default_rng(cfg.seed)
  held = [held[i] for i in sorted(rng.choice(len(held), min(eval_size, len(held)), replace=False))]
  return encode_split(tok, train, cfg), encode_split(tok, held, cfg)


def build_rl_pool(tok: Tokenizer, cfg, exclude: Sequence[Data]) -> Data:
  """The phase-2 problem pool (`task.rl_size`), disjoint from the splits in `exclude`."""
  seen = {t['problem'] for d in exclude for t in d.tasks}
  pool, fresh = [], set()
  for t in tasks_lib.generate_dataset(cfg.domain, _per_level(cfg.rl_size, cfg), cfg.seed + 2, levels=cfg.levels):
    if t['problem'] not in seen and t['problem'] not in fresh:
      fresh.add(t['problem'])
      pool.append(t)
  if not pool:
    raise configlib.ConfigError(f'task.rl_size={cfg.rl_size}: no problem left after removing SFT and '
                                'held-out ones')
  return encode_split(tok, pool, cfg, traces=False)


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
