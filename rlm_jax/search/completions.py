"""Strategies over whole completions sampled from the question: chain, best-of-N, self-consistency.

All sample with ONE policy call (`to_end=True`, B*N rows) and score with at most ONE value
call, and return the common `SearchResult`.

* chain: one greedy or sampled completion (the CoT baseline).
* best-of-N: N completions, the best by verifier reward, ORM (value at the last token),
  PRM-min (lowest value over the step ends), PRM-last (value at the last step end) or the
  policy's mean token log-prob (no value model needed).
* self-consistency: N completions, majority vote over their final-answer token spans (on
  device); `vote_texts` in `operators` votes on host with a text `answer_fn` instead.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp

from rlm_jax.data.steps import as_step_ends
from rlm_jax.search import expansion
from rlm_jax.search import operators
from rlm_jax.search import tree as tree_lib
from rlm_jax.search.base import NodeBatch, Params, SearchModel, SearchResult

SCORERS = ('reward', 'orm', 'prm_min', 'prm_last', 'logprob')


class Completions(NamedTuple):
  tokens_BxNxL: jax.Array  # right-padded, no prompt
  mask_BxNxL: jax.Array
  lengths_BxN: jax.Array
  logprob_BxN: jax.Array
  terminal_BxN: jax.Array
  # Value (reward units) at every token, read from the policy's decode (actor-critic); None:
  # the value model scores the completions.
  values_BxNxL: Optional[jax.Array] = None


def sample_completions(params: Params, key: jax.Array, model: SearchModel, roots: NodeBatch, num: int,
                       greedy: bool) -> Completions:
  """N completions per question in one policy call."""
  out = model.policy_fn(params, key, roots, num, to_end=True, greedy=greedy)
  lc = out.tokens_MxKxL.shape[-1]
  mask = jnp.arange(lc) < out.lengths_MxK[..., None]
  return Completions(out.tokens_MxKxL, mask, out.lengths_MxK, out.logprob_MxK, out.terminal_MxK,
                     out.values_MxKxL)


def _flat(x):
  return x.reshape((-1,) + x.shape[2:])


def check_scorer(model: SearchModel, scorer: str) -> None:
  """Fails early (before any sampling) when the model lacks what `scorer` reads."""
  if scorer not in SCORERS:
    raise ValueError(f"scorer '{scorer}': must be one of {SCORERS}")
  if scorer == 'reward' and model.reward_fn is None:
    raise ValueError("scorer 'reward' needs a reward_fn (verifier) in the SearchModel")
  if scorer in ('orm', 'prm_min', 'prm_last') and model.value_fn is None:
    raise ValueError(f"scorer '{scorer}' needs a value_fn (value model / PRM) in the SearchModel")


def score_completions(params: Params, model: SearchModel, roots: NodeBatch, comp: Completions,
                      scorer: str):
  """Scores of N completions per question: (score_BxN, value_calls_BxN)."""
  b, n, lc = comp.tokens_BxNxL.shape
  check_scorer(model, scorer)
  problem = jnp.repeat(roots.problem_M, n)
  if scorer == 'logprob':  # the policy's own confidence: mean log-prob per token
    return comp.logprob_BxN / jnp.maximum(comp.lengths_BxN, 1), jnp.zeros((b, n), jnp.int32)
  if scorer == 'reward':
    r = model.reward_fn(params, _flat(comp.tokens_BxNxL), _flat(comp.mask_BxNxL), problem)
    return r.reshape(b, n).astype(jnp.float32), jnp.zeros((b, n), jnp.int32)
  tok = _flat(comp.tokens_BxNxL)
  step = model.step_id if model.step_ends is None else model.step_ends
  c_mask = _flat(comp.mask_BxNxL)
  is_end = c_mask & (as_step_ends(step).mask(tok, c_mask) | (tok == model.eos_id))
  if comp.values_BxNxL is not None:  # values read from the decode: no value pass
    return _decode_scores(_flat(comp.values_BxNxL), is_end, _flat(comp.lengths_BxN), scorer).reshape(b, n), \
        jnp.zeros((b, n), jnp.int32)
  if model.extension_value_fn is not None:  # each question's prompt read once for its N completions
    values, own = model.extension_value_fn(params, roots, comp.tokens_BxNxL, comp.mask_BxNxL)
    v = _decode_scores(_flat(values), is_end, _flat(comp.lengths_BxN), scorer)
    v = jnp.where(_flat(comp.lengths_BxN) > 0, v, jnp.repeat(own, n))
    return v.reshape(b, n), jnp.ones((b, n), jnp.int32)
  p_tok = jnp.repeat(roots.tokens_MxT, n, axis=0)
  p_mask = jnp.repeat(roots.mask_MxT, n, axis=0)
  full, full_mask, _ = tree_lib.pack(jnp.concatenate([p_tok, tok], 1),
                                     jnp.concatenate([p_mask, _flat(comp.mask_BxNxL)], 1),
                                     model.pad_id, align='right')
  depth = (roots.depth_M[:, None] + is_end.reshape(b, n, lc).sum(-1)).reshape(-1)
  values = model.value_fn(params, NodeBatch(full, full_mask, depth.astype(jnp.int32), problem))
  calls = jnp.ones((b, n), jnp.int32)
  if scorer == 'orm':
    return values[:, -1].reshape(b, n), calls
  # Step ends of the completion, in the packed (right-aligned) layout.
  t = full.shape[1]
  end_mask, _, _ = tree_lib.pack(is_end, _flat(comp.mask_BxNxL), False, align='right')
  end_mask = jnp.concatenate([jnp.zeros((b * n, t - lc), bool), end_mask], axis=1)
  if scorer == 'prm_min':
    v = jnp.min(jnp.where(end_mask, values, jnp.inf), axis=1)
  else:  # prm_last
    last = jnp.max(jnp.where(end_mask, jnp.arange(t), -1), axis=1)
    v = jnp.take_along_axis(values, jnp.clip(last, 0, t - 1)[:, None], axis=1)[:, 0]
  # A completion without any step end (cut inside its first step) gets its last value.
  v = jnp.where(end_mask.any(axis=1), v, values[:, -1])
  return v.reshape(b, n), calls


def _decode_scores(values_MxL, is_end_MxL, lengths_M, scorer: str) -> jax.Array:
  """The value scorers on per-token values in the completion's own (left-aligned) layout."""
  l = values_MxL.shape[1]
  last_tok = jnp.take_along_axis(values_MxL, jnp.clip(lengths_M - 1, 0, l - 1)[:, None], axis=1)[:, 0]
  if scorer == 'orm':
    return last_tok
  if scorer == 'prm_min':
    v = jnp.min(jnp.where(is_end_MxL, values_MxL, jnp.inf), axis=1)
  else:  # prm_last
    last = jnp.max(jnp.where(is_end_MxL, jnp.arange(l), -1), axis=1)
    v = jnp.take_along_axis(values_MxL, jnp.clip(last, 0, l - 1)[:, None], axis=1)[:, 0]
  return jnp.where(is_end_MxL.any(axis=1), v, last_tok)


def _result(comp: Completions, pick_B, score_B, policy_tokens_B, model_calls_B, extra) -> SearchResult:
  take = lambda x: jnp.take_along_axis(x, pick_B.reshape((-1, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]
  return SearchResult(tokens_BxL=take(comp.tokens_BxNxL), lengths_B=take(comp.lengths_BxN),
                      score_B=score_B, terminal_B=take(comp.terminal_BxN),
                      policy_tokens_B=policy_tokens_B.astype(jnp.int32),
                      model_calls_B=model_calls_B.astype(jnp.int32), tree=None, extra=extra)


def _roots(prompt_BxLp, prompt_mask_BxLp, problem_B, model):
  b = prompt_BxLp.shape[0]
  if problem_B is None:
    problem_B = jnp.arange(b, dtype=jnp.int32)
  return expansion.root_nodes(prompt_BxLp, prompt_mask_BxLp, problem_B, model.pad_id)


# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChainConfig:
  """greedy: argmax decoding (else one sample). score: 'none' or a scorer of `SCORERS`."""

  greedy: bool = True
  score: Literal['none', 'reward', 'orm', 'prm_min', 'prm_last', 'logprob'] = 'none'

  def __post_init__(self):
    if self.score not in ('none',) + SCORERS:
      raise ValueError(f"chain.score='{self.score}': must be one of {('none',) + SCORERS}")


def chain(params: Params, key: jax.Array, prompt_BxLp, prompt_mask_BxLp, *, model: SearchModel,
          config: ChainConfig, problem_B: Optional[jax.Array] = None) -> SearchResult:
  """One completion per question (greedy or sampled); score 0 unless `config.score` is set.

  Args/Returns as `mcts.mcts_search`; tokens_BxL has the policy's completion width.
  """
  if config.score != 'none':
    check_scorer(model, config.score)
  roots = _roots(prompt_BxLp, prompt_mask_BxLp, problem_B, model)
  comp = sample_completions(params, key, model, roots, 1, config.greedy)
  b = prompt_BxLp.shape[0]
  calls = jnp.ones((b,), jnp.int32)
  if config.score == 'none':
    score = jnp.zeros((b,), jnp.float32)
  else:
    s, c = score_completions(params, model, roots, comp, config.score)
    score, calls = s[:, 0], calls + c[:, 0]
  return _result(comp, jnp.zeros((b,), jnp.int32), score, comp.lengths_BxN[:, 0], calls, {})


@dataclasses.dataclass(frozen=True)
class BestOfNConfig:
  """num_samples: N. scorer: how completions are ranked (see module docstring)."""

  num_samples: int = 8
  scorer: Literal['reward', 'orm', 'prm_min', 'prm_last', 'logprob'] = 'orm'

  def __post_init__(self):
    if self.num_samples < 1:
      raise ValueError(f'best_of_n.num_samples={self.num_samples}: must be >= 1')
    if self.scorer not in SCORERS:
      raise ValueError(f"best_of_n.scorer='{self.scorer}': must be one of {SCORERS}")


def best_of_n(params: Params, key: jax.Array, prompt_BxLp, prompt_mask_BxLp, *, model: SearchModel,
              config: BestOfNConfig, problem_B: Optional[jax.Array] = None) -> SearchResult:
  """N sampled completions per question; returns the best-scoring one (ties: the first).

  Returns:
    SearchResult; `extra` holds all candidates (`tokens_BxNxL`, `lengths_BxN`, `scores_BxN`).
  """
  check_scorer(model, config.scorer)
  roots = _roots(prompt_BxLp, prompt_mask_BxLp, problem_B, model)
  comp = sample_completions(params, key, model, roots, config.num_samples, greedy=False)
  scores, vcalls = score_completions(params, model, roots, comp, config.scorer)
  pick = jnp.argmax(scores, axis=1).astype(jnp.int32)
  extra = {'tokens_BxNxL': comp.tokens_BxNxL, 'lengths_BxN': comp.lengths_BxN, 'scores_BxN': scores}
  return _result(comp, pick, jnp.max(scores, axis=1), comp.lengths_BxN.sum(1),
                 config.num_samples + vcalls.sum(1), extra)


@dataclasses.dataclass(frozen=True)
class SelfConsistencyConfig:
  """Majority vote over N completions.

  Attributes:
    num_samples: N.
    answer_marker_ids: tokens that introduce the final answer (e.g. 'Answer: '); () = the
      last step is the answer.
    answer_len: tokens of an answer span that are compared.
    only_finished: only completions that ended with EOS vote.
    weighting: 'none' (one vote each) or 'orm' (vote weight (v + 1) / 2 from the value model).
  """

  num_samples: int = 8
  answer_marker_ids: tuple[int, ...] = ()
  answer_len: int = 16
  only_finished: bool = True
  weighting: Literal['none', 'orm'] = 'none'

  def __post_init__(self):
    if self.num_samples < 1:
      raise ValueError(f'self_consistency.num_samples={self.num_samples}: must be >= 1')
    if self.answer_len < 1:
      raise ValueError(f'self_consistency.answer_len={self.answer_len}: must be >= 1')
    if self.weighting not in ('none', 'orm'):
      raise ValueError(f"self_consistency.weighting='{self.weighting}': must be 'none' or 'orm'")


def self_consistency(params: Params, key: jax.Array, prompt_BxLp, prompt_mask_BxLp, *,
                     model: SearchModel, config: SelfConsistencyConfig,
                     problem_B: Optional[jax.Array] = None) -> SearchResult:
  """N sampled completions; returns one carrying the most frequent final answer.

  score_B is the winning answer's share of the votes cast (0 when nobody voted).
  `extra` holds the candidates, their answer spans and votes.
  """
  b, n = prompt_BxLp.shape[0], config.num_samples
  if config.weighting == 'orm':
    check_scorer(model, 'orm')
  roots = _roots(prompt_BxLp, prompt_mask_BxLp, problem_B, model)
  comp = sample_completions(params, key, model, roots, n, greedy=False)
  tok_MxL, mask_MxL = _flat(comp.tokens_BxNxL), _flat(comp.mask_BxNxL)
  ends_MxL = None if model.step_ends is None else model.step_ends.mask(tok_MxL, mask_MxL)  # BPE delimiters
  spans, found = operators.answer_spans(tok_MxL, mask_MxL, config.answer_marker_ids, config.answer_len,
                                        pad_id=model.pad_id, stop_ids=(model.eos_id, model.step_id),
                                        stop_mask_MxL=ends_MxL)
  spans = spans.reshape(b, n, -1)
  valid = found.reshape(b, n)
  if config.only_finished:
    valid &= comp.terminal_BxN
  calls = jnp.full((b,), n, jnp.int32)
  weights = None
  if config.weighting == 'orm':
    v, c = score_completions(params, model, roots, comp, 'orm')
    weights, calls = (v + 1.0) / 2.0, calls + c.sum(1)
  winner, votes = operators.majority_vote(spans, valid, weights)
  w = jnp.ones((b, n)) if weights is None else weights
  cast = jnp.where(valid, w, 0.0).sum(1)
  share = jnp.where(cast > 0, jnp.take_along_axis(votes, winner[:, None], 1)[:, 0] / jnp.maximum(cast, 1e-9), 0.0)
  extra = {'tokens_BxNxL': comp.tokens_BxNxL, 'lengths_BxN': comp.lengths_BxN, 'spans_BxNxS': spans,
           'valid_BxN': valid, 'votes_BxN': votes}
  return _result(comp, winner, share, comp.lengths_BxN.sum(1), calls, extra)
