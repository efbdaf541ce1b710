"""Blueprint operators as pure functions on fixed-shape arrays.

Generate and Evaluate are the model callables (`base.PolicyFn`, `base.ValueFn`); this module
holds what the strategies do with their outputs: merging duplicate candidates, priors over the
unique ones, Select scores (PUCT / UCT on min-max normalised q), Backpropagate (x1's TD form and
the running mean), Prune (keep the top k) and Aggregate (majority vote over final answers).
"""

from __future__ import annotations

import collections
import typing
from typing import Callable, Hashable, Optional, Sequence

import jax
import jax.numpy as jnp

_NEG = -1e30


Prior = typing.Literal['empirical', 'logprob', 'logprob_per_token', 'uniform']
PRIORS = typing.get_args(Prior)


def merge_duplicates(tokens_MxKxL, valid_MxK):
  """Finds identical sibling candidates: the first of each group stays and counts the others.

  Args:
    tokens_MxKxL: candidate tokens (same padding convention for all, so equal steps are equal
      arrays).
    valid_MxK: candidates that exist.

  Returns:
    (keep_MxK, count_MxK): which candidates stay, and how many valid candidates each kept one
    stands for (itself included; 0 where not kept).
  """
  valid_MxK = valid_MxK.astype(bool)
  k = tokens_MxKxL.shape[1]
  same_MxKxK = jnp.all(tokens_MxKxL[:, :, None, :] == tokens_MxKxL[:, None, :, :], axis=-1)
  same_MxKxK &= valid_MxK[:, :, None] & valid_MxK[:, None, :]
  earlier_KxK = jnp.tril(jnp.ones((k, k), bool), -1)  # [i, j]: j < i
  dup_MxK = jnp.any(same_MxKxK & earlier_KxK[None], axis=-1)
  keep_MxK = valid_MxK & ~dup_MxK
  count_MxK = jnp.where(keep_MxK, same_MxKxK.sum(axis=-1), 0).astype(jnp.int32)
  return keep_MxK, count_MxK


def step_priors(logprob_MxK, keep_MxK, kind: str = 'empirical', temperature: float = 1.0, *,
                count_MxK=None, lengths_MxK=None):
  """Prior over the unique sibling candidates of one expansion.

  The K candidates were sampled from pi, so a step with probability pi shows up about K pi
  times. Summing pi over duplicates (or taking pi over the sampled set) weights it by about
  count * pi, i.e. pi twice. 'empirical' is the sample's own estimate of pi (Sampled MuZero:
  with proposal = pi the prior is the empirical share); 'logprob' renormalises pi over the
  unique candidates, each counted once.

  Args:
    logprob_MxK: log pi of each candidate step (sum over its tokens).
    keep_MxK: the unique candidates that become children (`merge_duplicates`).
    kind: 'empirical' (count / number of valid samples), 'logprob' (softmax of
      logprob / temperature over the unique candidates), 'logprob_per_token' (the same with
      logprob / length: long steps are not penalised for their length) or 'uniform'.
    temperature: > 0; larger flattens the 'logprob' priors.
    count_MxK: samples each kept candidate stands for (default 1 each: no merging).
    lengths_MxK: tokens per candidate (needed by 'logprob_per_token').

  Returns:
    prior_MxK, summing to 1 over the kept candidates (0 elsewhere).
  """
  keep_MxK = keep_MxK.astype(bool)
  if count_MxK is None:
    count_MxK = keep_MxK.astype(jnp.int32)
  if kind == 'empirical':
    c = jnp.where(keep_MxK, count_MxK, 0).astype(jnp.float32)
    return c / jnp.maximum(c.sum(axis=-1, keepdims=True), 1.0)
  if kind == 'logprob':
    logits = jnp.where(keep_MxK, logprob_MxK / temperature, _NEG)
  elif kind == 'logprob_per_token':
    if lengths_MxK is None:
      raise ValueError("prior kind 'logprob_per_token' needs lengths_MxK")
    per_token = logprob_MxK / jnp.maximum(lengths_MxK, 1).astype(jnp.float32)
    logits = jnp.where(keep_MxK, per_token / temperature, _NEG)
  elif kind == 'uniform':
    logits = jnp.where(keep_MxK, 0.0, _NEG)
  else:
    raise ValueError(f"prior kind '{kind}': must be one of {PRIORS}")
  p = jax.nn.softmax(logits, axis=-1)
  return jnp.where(keep_MxK, p, 0.0)


def normalize_q(q, q_min, q_max):
  """Min-max normalisation to [0, 1] (MuZero MinMaxStats); 0.5 while all q are equal."""
  span = q_max - q_min
  return jnp.where(span > 0, (q - q_min) / jnp.where(span > 0, span, 1.0), 0.5)


def puct_scores(qn_K, prior_K, visits_K, parent_visits, c1: float, c2: float):
  """AlphaZero / MuZero PUCT: q + P * sqrt(N(s)) / (1 + N(c)) * (c1 + log((N(s) + c2 + 1) / c2)).

  Args:
    qn_K: normalised q of the children (any leading batch dims).
    prior_K: prior of the children.
    visits_K: N(c), float (virtual visits included).
    parent_visits: N(s), broadcastable against the leading dims.
    c1, c2: exploration constants (1.25, 19652).

  Returns:
    scores_K.
  """
  n_s = jnp.asarray(parent_visits, jnp.float32)[..., None]
  explore = jnp.sqrt(n_s) / (1.0 + visits_K) * (c1 + jnp.log((n_s + c2 + 1.0) / c2))
  return qn_K + prior_K * explore


def uct_scores(qn_K, visits_K, parent_visits, c: float):
  """UCT: q + c * sqrt(ln N(s) / N(c)); an unvisited child scores +inf."""
  n_s = jnp.asarray(parent_visits, jnp.float32)[..., None]
  bonus = c * jnp.sqrt(jnp.log(jnp.maximum(n_s, 1.0)) / jnp.maximum(visits_K, 1e-9))
  return jnp.where(visits_K > 0, qn_K + bonus, jnp.inf)


SHORT_AXIS = 32  # the longest axis short_sum / short_max / short_any / short_argmax unroll


def _unrolled(x, op, reduce):
  n = x.shape[-1]
  if n > SHORT_AXIS:
    return reduce(x, -1)
  total = x[..., 0]
  for i in range(1, n):  # static length: unrolled at trace time
    total = op(total, x[..., i])
  return total


def short_sum(x):
  """Sum over a short last axis (the K children of a node, the W walkers) as elementwise adds.

  XLA:CPU hands a reduce (or a dot) to a library kernel whose fixed cost, ~10-50 µs, is many
  times that of adding 16 numbers per row; the adds fuse into one loop with their inputs (the
  search's backup and selection, `benchmarks/search.py` part (a)). Axes longer than SHORT_AXIS
  use jnp.sum;
  `short_max` and `short_any` likewise.
  """
  return _unrolled(x, jnp.add, jnp.sum)


def short_max(x):
  return _unrolled(x, jnp.maximum, jnp.max)


def short_any(x):
  return _unrolled(x, jnp.logical_or, jnp.any)


def short_argmax(x):
  """argmax over a short last axis (first maximum on ties) as a chain of compares and selects,
  for `short_sum`'s reason (the variadic reduce of jnp.argmax is a slow kernel on XLA:CPU).
  NaN never wins (jnp.argmax would return it); longer axes use jnp.argmax."""
  n = x.shape[-1]
  if n > SHORT_AXIS:
    return jnp.argmax(x, -1).astype(jnp.int32)
  best, idx = x[..., 0], jnp.zeros(x.shape[:-1], jnp.int32)
  for i in range(1, n):
    better = x[..., i] > best
    best, idx = jnp.where(better, x[..., i], best), jnp.where(better, i, idx)
  return idx


def backup_td(q_old, child_q_K, child_visits_K, valid_K, gamma: float, lam: float):
  """x1's TD backup: q <- (1 - lam) q + lam * gamma * sum_c N(c) q(c) / sum_c N(c)."""
  w = jnp.where(valid_K, child_visits_K.astype(jnp.float32), 0.0)
  target = gamma * short_sum(w * jnp.where(valid_K, child_q_K, 0.0)) / jnp.maximum(short_sum(w), 1.0)
  return (1.0 - lam) * q_old + lam * target


def backup_mean(value0, child_q_K, child_visits_K, valid_K, gamma: float):
  """Running mean (MuZero) of every evaluation of the node's state, discounted once.

  q = gamma * (v0 + sum_c N(c) q(c)) / (1 + sum_c N(c)): the node's own evaluation v0 and
  every child q estimate V(node state) (a child's q is Q(state, step) = r + gamma V(child)),
  so their mean is V(state) and gamma turns it into the q of the step into the node, the same
  form a fresh child gets (gamma * v0). Each child's q is itself such a mean over N(c)
  evaluations.
  """
  w = jnp.where(valid_K, child_visits_K.astype(jnp.float32), 0.0)
  total = value0 + short_sum(w * jnp.where(valid_K, child_q_K, 0.0))
  return gamma * total / (1.0 + short_sum(w))


def prune(scores_BxM, valid_BxM, k: int):
  """Keeps the k best valid candidates per row (ties: lower index first).

  Returns:
    (index_Bxk, kept_Bxk): candidate indices, and whether each kept slot holds a valid one.
  """
  # A large finite stand-in keeps invalid entries orderable behind every valid one.
  masked = jnp.where(valid_BxM, scores_BxM, _NEG)
  _, idx = jax.lax.top_k(masked, k)
  kept = jnp.take_along_axis(valid_BxM, idx, axis=1)
  return idx, kept


# ------------------------------------------------------------------------------------------
# Aggregate: majority vote over final answers.


def answer_spans(tokens_MxL, mask_MxL, marker_ids: Sequence[int], span_len: int, *, pad_id: int,
                 stop_ids: Sequence[int], stop_mask_MxL: Optional[jax.Array] = None):
  """The final-answer token span of each completion, for device-side voting.

  The span starts after the last occurrence of `marker_ids` (e.g. the tokens of 'Answer:'),
  or after the last stop token that is not the final one when `marker_ids` is empty (= the
  last step), and ends before the next stop token (EOS / step delimiter). It is cut or padded
  to `span_len`. Put a trailing space into the marker ids if answers follow 'Answer: '.

  Args:
    tokens_MxL: right-padded completions.
    mask_MxL: True on real tokens.
    marker_ids: token ids that introduce the answer; () to use the last step.
    span_len: width of the returned span.
    pad_id: filler.
    stop_ids: tokens that end a span (EOS, step delimiter).
    stop_mask_MxL: optional extra stop positions, e.g. `StepEnds.mask` of a BPE tokenizer,
      whose step delimiter merges into or splits over tokens (no single delimiter id).

  Returns:
    (span_MxS, found_M): the spans (pad-filled) and whether a marker was found (always True
    without a marker).
  """
  m, l = tokens_MxL.shape
  mask_MxL = mask_MxL.astype(bool)
  is_stop = jnp.zeros((m, l), bool)
  for s in stop_ids:
    is_stop |= tokens_MxL == s
  if stop_mask_MxL is not None:
    is_stop |= jnp.asarray(stop_mask_MxL, bool)
  pos_L = jnp.arange(l)
  if marker_ids:
    n = len(marker_ids)
    hit = jnp.ones((m, l), bool)
    for i, t in enumerate(marker_ids):
      shifted = jnp.concatenate([tokens_MxL[:, i:], jnp.full((m, i), pad_id, tokens_MxL.dtype)], 1)
      smask = jnp.concatenate([mask_MxL[:, i:], jnp.zeros((m, i), bool)], 1)
      hit &= (shifted == t) & smask
    found = hit.any(axis=1)
    start = jnp.max(jnp.where(hit, pos_L, -1), axis=1) + n
  else:
    # Stops that are followed by at least one more real token start a new step.
    nxt_real = jnp.concatenate([mask_MxL[:, 1:], jnp.zeros((m, 1), bool)], axis=1)
    inner_stop = is_stop & mask_MxL & nxt_real
    start = jnp.max(jnp.where(inner_stop, pos_L, -1), axis=1) + 1
    found = jnp.ones((m,), bool)
  idx = start[:, None] + jnp.arange(span_len)[None, :]
  inside = idx < l
  tok = jnp.take_along_axis(tokens_MxL, jnp.clip(idx, 0, l - 1), axis=1)
  ok = inside & jnp.take_along_axis(mask_MxL & ~is_stop, jnp.clip(idx, 0, l - 1), axis=1)
  ok = jnp.cumprod(ok, axis=1).astype(bool)  # the span ends at the first stop / pad
  span = jnp.where(ok & found[:, None], tok, pad_id)
  return span, found


def majority_vote(span_BxNxS, valid_BxN, weights_BxN: Optional[jax.Array] = None):
  """Majority vote among N candidates per problem, comparing answer spans exactly.

  Args:
    span_BxNxS: answer spans (equal answers are equal arrays).
    valid_BxN: candidates that may vote (e.g. an answer was found).
    weights_BxN: optional vote weights (e.g. ORM scores); default 1 per candidate.

  Returns:
    (winner_B, votes_BxN): index of a candidate carrying the winning answer (the first such
    candidate; ties between answers go to the answer whose first candidate comes first), and
    the total vote of each candidate's answer. winner is 0 when no candidate is valid.
  """
  valid_BxN = valid_BxN.astype(bool)
  w = jnp.ones(valid_BxN.shape, jnp.float32) if weights_BxN is None else weights_BxN.astype(jnp.float32)
  w = jnp.where(valid_BxN, w, 0.0)
  same = jnp.all(span_BxNxS[:, :, None, :] == span_BxNxS[:, None, :, :], axis=-1)
  same &= valid_BxN[:, :, None] & valid_BxN[:, None, :]
  votes = jnp.einsum('bij,bj->bi', same.astype(jnp.float32), w)
  votes = jnp.where(valid_BxN, votes, -1.0)
  return jnp.argmax(votes, axis=1).astype(jnp.int32), votes


def majority_vote_host(answers: Sequence[Optional[Hashable]],
                       weights: Optional[Sequence[float]] = None) -> int:
  """Host-side vote over already-extracted answers (None = no answer). Returns the index of the
  first candidate with the winning answer, or -1 when no candidate has an answer."""
  tally: dict = collections.OrderedDict()
  first: dict = {}
  for i, a in enumerate(answers):
    if a is None:
      continue
    tally[a] = tally.get(a, 0.0) + (1.0 if weights is None else float(weights[i]))
    first.setdefault(a, i)
  if not tally:
    return -1
  best = max(tally.values())
  return min(first[a] for a, v in tally.items() if v == best)


def vote_texts(texts: Sequence[str], answer_fn: Callable[[str], Optional[Hashable]],
               weights: Optional[Sequence[float]] = None) -> int:
  """Self-consistency for text tasks: `answer_fn(text)` extracts a hashable final answer."""
  return majority_vote_host([answer_fn(t) for t in texts], weights)
