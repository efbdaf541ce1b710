"""Held-out evaluation: sample on device, verify the decoded text on host with the task verifier.

Strategies that need only the policy: `greedy` and `self_consistency` (majority vote over the
final answers of K samples). Value-guided ones, which also need a value model / PRM, run the
searches of `rlm_jax.search` in fixed-shape chunks: `prm_best_of_n` (K sampled completions,
the best by the PRM, `prm_scorer`) and `prm_beam` (step-level beam search on the value of
each new step).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlm_jax import tasks as tasks_lib
from rlm_jax.data.tokenizer import Tokenizer
from rlm_jax.sampling.sampler import SamplingConfig, sample
from rlm_jax.search import lm as search_lm
from rlm_jax.search.beam import BeamConfig, beam_search
from rlm_jax.search.completions import BestOfNConfig, best_of_n
from rlm_jax.search.operators import vote_texts

POLICY_STRATEGIES = ('greedy', 'self_consistency')
VALUE_STRATEGIES = ('prm_best_of_n', 'prm_beam')  # need a value model / PRM
STRATEGIES = POLICY_STRATEGIES + VALUE_STRATEGIES


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Held-out evaluation. `strategies` from STRATEGIES; the value-guided ones are skipped
  where no value model exists (e.g. after SFT when only phase 2 trains one)."""

  size: int = 200  # held-out tasks
  batch_size: int = 100  # prompts per sampler call (fixed shape: the last chunk is padded)
  strategies: tuple[str, ...] = ('greedy', 'self_consistency')
  num_samples: int = 8  # K for self-consistency and prm_best_of_n
  temperature: float = 1.0
  prm_scorer: Literal['prm_min', 'prm_last', 'orm'] = 'prm_min'  # ranks prm_best_of_n
  beam_width: int = 4  # prm_beam: beams kept
  beam_expansions: int = 4  # prm_beam: steps sampled per beam and level
  step_tokens: int = 16  # prm_beam: most tokens per step
  max_depth: int = 6  # prm_beam: most steps

  def __post_init__(self):
    for name in self.strategies:
      if name not in STRATEGIES:
        raise ValueError(f"eval.strategies: unknown strategy '{name}' (allowed: {', '.join(STRATEGIES)})")
    for name in ('size', 'batch_size', 'num_samples', 'beam_width', 'beam_expansions', 'step_tokens',
                 'max_depth'):
      if getattr(self, name) < 1:
        raise ValueError(f'eval.{name}={getattr(self, name)}: must be >= 1')


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


@functools.lru_cache(maxsize=16)
def _value_search(name: str, policy_graphdef, value_graphdef, opts: search_lm.LMOptions,
                  ids: search_lm.TokenIds, config):
  """The jitted value-guided strategy (cached: each evaluation of a run reuses the program)."""
  model = search_lm.make_search_model(policy_graphdef, opts, ids, value_graphdef=value_graphdef)
  fn = best_of_n if name == 'prm_best_of_n' else beam_search
  return jax.jit(functools.partial(fn, model=model, config=config))


def search_texts(name: str, graphdef, params, value: tuple, tok: Tokenizer, prompt: np.ndarray,
                 prompt_mask: np.ndarray, max_new_tokens: int, cfg: 'EvalConfig', key: jax.Array) -> list[str]:
  """Decoded answers of a value-guided strategy, in fixed-shape chunks of prompts.

  Args:
    name: 'prm_best_of_n' or 'prm_beam'.
    graphdef, params: the policy.
    value: (graphdef, params) of the value model / PRM.
    tok, prompt, prompt_mask: tokenizer and left-padded prompts [B, Lp].
    max_new_tokens: completion budget of best-of-N.
    cfg: evaluation config (num_samples, prm_scorer, beam_*, step_tokens, max_depth, temperature).
    key: PRNG key; chunk c uses fold_in(key, c).

  Returns:
    One solution text per prompt (steps only, as `generate_texts`).
  """
  ids = search_lm.TokenIds.of(tok)
  opts = search_lm.LMOptions(step_tokens=cfg.step_tokens, completion_tokens=max_new_tokens,
                             temperature=cfg.temperature)
  if name == 'prm_best_of_n':
    config, per_prompt = BestOfNConfig(num_samples=cfg.num_samples, scorer=cfg.prm_scorer), cfg.num_samples
  elif name == 'prm_beam':
    config = BeamConfig(beam_width=cfg.beam_width, expansions=cfg.beam_expansions, max_depth=cfg.max_depth)
    per_prompt = cfg.beam_width * cfg.beam_expansions
  else:
    raise ValueError(f"search_texts: '{name}' is not one of {VALUE_STRATEGIES}")
  fn = _value_search(name, graphdef, value[0], opts, ids, config)
  size = max(1, cfg.batch_size // per_prompt)  # rows per policy call about eval.batch_size
  params_all = search_lm.LMParams(policy=params, value=value[1])
  n = prompt.shape[0]
  out: list[str] = []
  for c, (lo, hi) in enumerate(_chunks(n, size)):
    p, m = prompt[lo:hi], prompt_mask[lo:hi]
    pad = size - (hi - lo)
    if pad:  # keep one compiled shape
      p = np.concatenate([p, np.repeat(p[:1], pad, 0)])
      m = np.concatenate([m, np.repeat(m[:1], pad, 0)])
    res = fn(params_all, jax.random.fold_in(key, c), jnp.asarray(p), jnp.asarray(m))
    out += search_lm.decode_result(tok, res)[: hi - lo]
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
             prompt_mask: np.ndarray, max_new_tokens: int, cfg: EvalConfig, key: jax.Array,
             value: tuple | None = None) -> dict:
  """Runs each strategy of `cfg.strategies`; returns {'<strategy>/<metric>': value}.

  `value` = (graphdef, params) of the value model / PRM; without it the value-guided
  strategies are left out. Strategy s draws its randomness from fold_in(key, s).
  """
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
    elif name in VALUE_STRATEGIES:
      if value is None:
        continue
      outputs = search_texts(name, graphdef, params, value, tok, prompt, prompt_mask, max_new_tokens, cfg, k)
    else:
      raise ValueError(f"eval.strategies: unknown strategy '{name}' (allowed: {', '.join(STRATEGIES)})")
    for metric, v in score_outputs(tasks, outputs).items():
      results[f'{name}/{metric}'] = v
  return results
