"""Held-out evaluation: sample on device, verify the decoded text on host with the task verifier.

Strategies here are the cheap test-time ones that need only the policy: `greedy` and
`self_consistency` (majority vote over the final answers of K samples). Tree search lives in
`rlm_jax.search`; `evaluate` dispatches to it for the other names.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlm_jax import tasks as tasks_lib
from rlm_jax.data.tokenizer import Tokenizer
from rlm_jax.sampling.sampler import SamplingConfig, sample
from rlm_jax.search.operators import vote_texts


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  every: int = 0  # evaluate every N steps of a phase (0: only at phase ends)
  size: int = 200  # held-out tasks
  batch_size: int = 100  # prompts per sampler call (fixed shape: the last chunk is padded)
  strategies: tuple[str, ...] = ('greedy', 'self_consistency')
  num_samples: int = 8  # K for self-consistency
  temperature: float = 1.0


def _chunks(n: int, size: int):
  for start in range(0, n, size):
    yield start, min(start + size, n)


def generate_texts(graphdef, params, tok: Tokenizer, prompt: np.ndarray, prompt_mask: np.ndarray,
                   cfg: SamplingConfig, key: jax.Array, batch_size: int, repeats: int = 1) -> list[list[str]]:
  """Decoded completions, `repeats` per prompt, in fixed-shape chunks of `batch_size` prompts."""
  n = prompt.shape[0]
  out: list[list[str]] = []
  for c, (lo, hi) in enumerate(_chunks(n, batch_size)):
    p, m = prompt[lo:hi], prompt_mask[lo:hi]
    pad = batch_size - (hi - lo)
    if pad:  # keep one compiled shape: pad with copies of the first row
      p = np.concatenate([p, np.repeat(p[:1], pad, 0)])
      m = np.concatenate([m, np.repeat(m[:1], pad, 0)])
    p, m = np.repeat(p, repeats, 0), np.repeat(m, repeats, 0)
    res = sample(graphdef, params, jnp.asarray(p), jnp.asarray(m), jax.random.fold_in(key, c), cfg)
    toks, lens = jax.device_get((res.tokens_BxT, res.lengths_B))
    for i in range(hi - lo):
      rows = range(i * repeats, (i + 1) * repeats)
      out.append([tok.decode(toks[r, : lens[r]]) for r in rows])
  return out


def final_answer(text: str) -> str:
  """The text after the last 'Answer:' (the canonical final step), stripped; '' if none."""
  idx = text.rfind('Answer:')
  return text[idx + len('Answer:'):].strip() if idx >= 0 else ''


def majority_vote(texts: Sequence[str]) -> str:
  """The sample whose final answer is the most common one (the first sample if none has one)."""
  best = vote_texts(texts, lambda t: final_answer(t) or None)
  return texts[max(best, 0)] if texts else ''


def score_outputs(tasks: Sequence[dict], outputs: Sequence[str]) -> dict:
  """Accuracy (score 2), invalid rate and per-level accuracy with the host verifiers."""
  scores = np.asarray([tasks_lib.verify(t, o) for t, o in zip(tasks, outputs)])
  levels = np.asarray([t['level'] for t in tasks])
  res = {'accuracy': float(np.mean(scores == 2)), 'invalid': float(np.mean(scores < 0))}
  for lvl in sorted(set(levels.tolist())):
    res[f'accuracy_level{lvl}'] = float(np.mean(scores[levels == lvl] == 2))
  return res


def evaluate(graphdef, params, tok: Tokenizer, tasks: Sequence[dict], prompt: np.ndarray,
             prompt_mask: np.ndarray, max_new_tokens: int, cfg: EvalConfig, key: jax.Array) -> dict:
  """Runs each strategy of `cfg.strategies`; returns {'<strategy>/<metric>': value}."""
  results = {}
  base = dict(max_new_tokens=max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id, step_id=tok.step_id)
  for s, name in enumerate(cfg.strategies):
    k = jax.random.fold_in(key, s)
    if name == 'greedy':
      texts = generate_texts(graphdef, params, tok, prompt, prompt_mask, SamplingConfig(greedy=True, **base),
                             k, cfg.batch_size)
      outputs = [t[0] for t in texts]
    elif name == 'self_consistency':
      scfg = SamplingConfig(temperature=cfg.temperature, **base)
      texts = generate_texts(graphdef, params, tok, prompt, prompt_mask, scfg, k,
                             max(1, cfg.batch_size // cfg.num_samples), repeats=cfg.num_samples)
      outputs = [majority_vote(t) for t in texts]
    else:
      raise ValueError(f"eval.strategies: unknown strategy '{name}' (allowed: 'greedy', 'self_consistency')")
    for metric, value in score_outputs(tasks, outputs).items():
      results[f'{name}/{metric}'] = value
  return results
