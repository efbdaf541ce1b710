"""Generate + Evaluate for a batch of leaves: one policy call, one value call, tree writes.

Shared by MCTS and beam search. For B trees with W leaves each, the policy samples K next steps
per leaf in ONE call (B*W*K rows); the new children get consecutive slots, are written into the
tree, and are scored in ONE value call (B*W*K rows). Terminal children are scored by the
verifier (training mode) or by the value model / PRM (inference); non-terminal children can mix
in rollouts to the end: q = (1 - alpha) q_model + alpha * mean(rollout rewards).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlm_jax.search import operators
from rlm_jax.search import tree as tree_lib
from rlm_jax.search.base import NodeBatch, Params, SearchModel


class Counters(NamedTuple):
  """Compute spent per problem (see `SearchResult`)."""

  policy_tokens_B: jax.Array
  model_calls_B: jax.Array

  @classmethod
  def zeros(cls, batch: int) -> 'Counters':
    z = jnp.zeros((batch,), jnp.int32)
    return cls(z, z)

  def __add__(self, other: 'Counters') -> 'Counters':
    return Counters(self.policy_tokens_B + other.policy_tokens_B,
                    self.model_calls_B + other.model_calls_B)


@dataclasses.dataclass(frozen=True)
class ExpandOptions:
  """The expansion knobs of a strategy config (static)."""

  num_children: int
  max_depth: int
  prior: str = 'empirical'
  prior_temperature: float = 1.0
  merge_duplicates: bool = True
  num_rollouts: int = 0
  rollout_weight: float = 0.0
  gamma: float = 1.0  # a new non-terminal child's q is gamma * its value (see `tree`)


def last_values(model: SearchModel, params: Params, nodes: NodeBatch) -> jax.Array:
  """Value / PRM score of each node's full state (last column); zeros without a value model."""
  if model.value_fn is None:
    return jnp.zeros(nodes.depth_M.shape, jnp.float32)
  return model.value_fn(params, nodes)[:, -1].astype(jnp.float32)


def root_nodes(prompt_BxLp, prompt_mask_BxLp, problem_B, pad_id: int) -> NodeBatch:
  tokens, mask, _ = tree_lib.pack(prompt_BxLp.astype(jnp.int32), prompt_mask_BxLp, pad_id, align='right')
  b = prompt_BxLp.shape[0]
  return NodeBatch(tokens, mask, jnp.zeros((b,), jnp.int32), problem_B.astype(jnp.int32))


def _solutions_of(nodes: NodeBatch, prompt_len_M, pad_id: int):
  """Steps-only rows (no prompt), right-padded: (tokens, mask)."""
  rank = jnp.cumsum(nodes.mask_MxT, axis=1)
  keep = nodes.mask_MxT & (rank > prompt_len_M[:, None])
  tokens, mask, _ = tree_lib.pack(nodes.tokens_MxT, keep, pad_id, align='left')
  return tokens, mask


def _rollout_values(params, key, model: SearchModel, sol, child_nodes: NodeBatch, opts):
  """Mean reward of R completions from each child: (mean_M, tokens_M, calls_M)."""
  r = opts.num_rollouts
  m = child_nodes.depth_M.shape[0]
  out = model.policy_fn(params, key, child_nodes, r, to_end=True, greedy=False)
  lc = out.tokens_MxKxL.shape[-1]
  comp = out.tokens_MxKxL.reshape(m * r, lc)
  comp_mask = jnp.arange(lc)[None, :] < out.lengths_MxK.reshape(m * r, 1)
  rep = lambda x: jnp.repeat(x, r, axis=0)
  if model.reward_fn is not None:
    sol, sol_mask = sol
    tok = jnp.concatenate([rep(sol), comp], axis=1)
    msk = jnp.concatenate([rep(sol_mask), comp_mask], axis=1)
    tok, msk, _ = tree_lib.pack(tok, msk, model.pad_id, align='left')
    rew = model.reward_fn(params, tok, msk, rep(child_nodes.problem_M)).astype(jnp.float32)
    calls_M = jnp.full((m,), r, jnp.int32)
  else:
    tok = jnp.concatenate([rep(child_nodes.tokens_MxT), comp], axis=1)
    msk = jnp.concatenate([rep(child_nodes.mask_MxT), comp_mask], axis=1)
    tok, msk, _ = tree_lib.pack(tok, msk, model.pad_id, align='right')
    full = NodeBatch(tok, msk, rep(child_nodes.depth_M), rep(child_nodes.problem_M))
    rew = last_values(model, params, full)
    calls_M = jnp.full((m,), r * (2 if model.value_fn is not None else 1), jnp.int32)
  mean_M = rew.reshape(m, r).mean(axis=1)
  return mean_M, out.lengths_MxK.sum(axis=1), calls_M


def expand_and_evaluate(params: Params, key: jax.Array, tree: tree_lib.Tree, path_BxWxD1, expand_BxW, *,
                        model: SearchModel, opts: ExpandOptions):
  """Expands W leaves per tree with K children each and evaluates the children.

  Args:
    params: model parameters (passed to the callables).
    key: PRNG key, consumed (policy and rollouts use independent sub-keys).
    tree: the trees; must have room for B*W*K more nodes.
    path_BxWxD1: root-to-leaf path per walker (node per depth 0..max_depth, -1 past the
      leaf); its last node is the leaf to expand.
    expand_BxW: which walkers really expand (each (tree, leaf) at most once, leaf unexpanded,
      non-terminal, depth < max_depth).
    model: the callables.
    opts: static expansion options.

  Returns:
    (tree, child_BxWxK, counters): updated trees, the new node indices (-1 where a candidate
    was not created: inactive walker or merged duplicate), and the compute spent.
  """
  b, w, d1 = path_BxWxD1.shape
  k = opts.num_children
  n_slots = tree.num_slots
  k_policy, k_roll = jax.random.split(key)
  depth_BxW = jnp.maximum(jnp.sum(path_BxWxD1 >= 0, axis=2) - 1, 0)  # empty path: inactive
  leaf_BxW = jnp.take_along_axis(path_BxWxD1, depth_BxW[..., None], axis=2)[..., 0]
  b_BxW = jnp.broadcast_to(jnp.arange(b)[:, None], (b, w))
  b_M = b_BxW.reshape(-1)
  nodes = tree_lib.path_states(tree, b_M, path_BxWxD1[:, :, 1:].reshape(b * w, d1 - 1), model.pad_id)
  # Idle walkers (duplicates, re-visits, empty beam slots) get an empty state: the sampler
  # marks such rows done before decoding, so they never keep the decode loop running.
  nodes = nodes._replace(mask_MxT=nodes.mask_MxT & expand_BxW.reshape(-1, 1))
  steps = model.policy_fn(params, k_policy, nodes, k, to_end=False, greedy=False)
  ls = steps.tokens_MxKxL.shape[-1]
  if ls != tree.step_len:
    raise ValueError(f'policy returned steps of {ls} tokens; the tree stores {tree.step_len}')
  tok_MxKxL = tree_lib.left_pad_steps(steps.tokens_MxKxL, steps.lengths_MxK, model.pad_id)
  active_MxK = jnp.broadcast_to(expand_BxW.reshape(-1, 1), (b * w, k))
  if opts.merge_duplicates:
    keep_MxK, count_MxK = operators.merge_duplicates(tok_MxKxL, active_MxK)
  else:
    keep_MxK, count_MxK = active_MxK, active_MxK.astype(jnp.int32)
  prior_MxK = operators.step_priors(steps.logprob_MxK, keep_MxK, opts.prior, opts.prior_temperature,
                                    count_MxK=count_MxK, lengths_MxK=steps.lengths_MxK)

  # Consecutive slots per tree, walker-major, so each leaf's children form one range.
  keep_BxWK = keep_MxK.reshape(b, w * k)
  rank_BxWK = jnp.cumsum(keep_BxWK, axis=1, dtype=jnp.int32) - 1
  ids_BxWK = tree.num_nodes_B[:, None] + rank_BxWK
  ids_BxWK = jnp.where(keep_BxWK, ids_BxWK, n_slots)  # out of bounds: the write is dropped
  count_BxW = keep_MxK.reshape(b, w, k).sum(axis=2).astype(jnp.int32)
  first_BxW = tree.num_nodes_B[:, None] + jnp.cumsum(count_BxW, axis=1) - count_BxW

  bb = jnp.broadcast_to(jnp.arange(b)[:, None], (b, w * k))
  parent_BxWK = jnp.repeat(leaf_BxW, k, axis=1)
  depth_BxWK = jnp.repeat(depth_BxW, k, axis=1) + 1
  term_BxWK = steps.terminal_MxK.reshape(b, w * k)
  at = lambda arr: arr.at[bb, ids_BxWK]
  leaf_ids = jnp.where(expand_BxW, leaf_BxW, n_slots)
  tree = tree.replace(
      parent_BxN=at(tree.parent_BxN).set(parent_BxWK, mode='drop'),
      depth_BxN=at(tree.depth_BxN).set(depth_BxWK, mode='drop'),
      visits_BxN=at(tree.visits_BxN).set(1, mode='drop'),
      prior_BxN=at(tree.prior_BxN).set(prior_MxK.reshape(b, w * k), mode='drop'),
      logprob_BxN=at(tree.logprob_BxN).set(steps.logprob_MxK.reshape(b, w * k), mode='drop'),
      terminal_BxN=at(tree.terminal_BxN).set(term_BxWK, mode='drop'),
      step_tokens_BxNxL=at(tree.step_tokens_BxNxL).set(tok_MxKxL.reshape(b, w * k, ls), mode='drop'),
      step_len_BxN=at(tree.step_len_BxN).set(steps.lengths_MxK.reshape(b, w * k), mode='drop'),
      first_child_BxN=tree.first_child_BxN.at[b_BxW, leaf_ids].set(first_BxW, mode='drop'),
      num_children_BxN=tree.num_children_BxN.at[b_BxW, leaf_ids].set(count_BxW, mode='drop'),
      num_nodes_B=tree.num_nodes_B + count_BxW.sum(axis=1),
  )

  # Evaluate the new children (ONE value call over all B*W*K rows). A child's state is its
  # parent's state plus its step: the parent row has at least L leading pads (its depth is
  # below max_depth), so dropping L columns and appending the step keeps the width.
  rep = lambda x: jnp.repeat(x, k, axis=0)
  smask_MxKxL = jnp.arange(ls) >= (ls - steps.lengths_MxK)[..., None]
  child_nodes = NodeBatch(
      tokens_MxT=jnp.concatenate([rep(nodes.tokens_MxT)[:, ls:], tok_MxKxL.reshape(b * w * k, ls)], axis=1),
      mask_MxT=jnp.concatenate([rep(nodes.mask_MxT)[:, ls:], smask_MxKxL.reshape(b * w * k, ls)], axis=1),
      depth_M=rep(nodes.depth_M) + 1, problem_M=rep(nodes.problem_M))
  q0_M = last_values(model, params, child_nodes)
  term_M = term_BxWK.reshape(-1)
  reward_M = jnp.full(term_M.shape, jnp.nan, jnp.float32)
  sol = None
  if model.reward_fn is not None:
    sol = _solutions_of(child_nodes, jnp.repeat(tree.prompt_mask_BxLp.sum(axis=1), w * k), model.pad_id)
    r_M = model.reward_fn(params, sol[0], sol[1], child_nodes.problem_M).astype(jnp.float32)
    reward_M = jnp.where(term_M, r_M, jnp.nan)
    q0_M = jnp.where(term_M, r_M, q0_M)
  keep_M = keep_BxWK.reshape(-1)
  roll_tokens_M = roll_calls_M = jnp.zeros(term_M.shape, jnp.int32)
  if opts.num_rollouts > 0 and opts.rollout_weight > 0:
    use = keep_M & ~term_M  # merged duplicates and terminal children need no rollout
    roll_from = child_nodes._replace(mask_MxT=child_nodes.mask_MxT & use[:, None])
    mean_M, roll_tokens_M, roll_calls_M = _rollout_values(params, k_roll, model, sol, roll_from, opts)
    a = opts.rollout_weight
    q0_M = jnp.where(term_M, q0_M, (1.0 - a) * q0_M + a * mean_M)
    roll_tokens_M, roll_calls_M = jnp.where(use, roll_tokens_M, 0), jnp.where(use, roll_calls_M, 0)
  v0_BxWK = q0_M.reshape(b, w * k)
  # q is Q(parent state, step) = r + gamma V(child state): the reward (or the value model's
  # estimate of it) for a terminal step, gamma times the value otherwise, the same scale as an
  # expanded sibling's gamma * mean(children q).
  q0_BxWK = jnp.where(term_BxWK, v0_BxWK, opts.gamma * v0_BxWK)
  tree = tree.replace(
      value_BxN=at(tree.value_BxN).set(v0_BxWK, mode='drop'),
      q_BxN=at(tree.q_BxN).set(q0_BxWK, mode='drop'),
      reward_BxN=at(tree.reward_BxN).set(reward_M.reshape(b, w * k), mode='drop'),
      q_min_B=jnp.minimum(tree.q_min_B, jnp.min(jnp.where(keep_BxWK, q0_BxWK, jnp.inf), axis=1)),
      q_max_B=jnp.maximum(tree.q_max_B, jnp.max(jnp.where(keep_BxWK, q0_BxWK, -jnp.inf), axis=1)),
  )

  # Compute spent: every sampled candidate of an expanding leaf (duplicates were generated
  # too), one value row per created child that needs the value model (the verifier is not a
  # model).
  gen_tokens_B = jnp.where(active_MxK, steps.lengths_MxK, 0).reshape(b, -1).sum(axis=1)
  gen_calls_B = active_MxK.reshape(b, -1).sum(axis=1)
  if model.value_fn is None:
    value_calls_B = jnp.zeros((b,), jnp.int32)
  elif model.reward_fn is None:
    value_calls_B = keep_BxWK.sum(axis=1)
  else:
    value_calls_B = (keep_BxWK & ~term_BxWK).sum(axis=1)
  counters = Counters(
      policy_tokens_B=(gen_tokens_B + roll_tokens_M.reshape(b, -1).sum(axis=1)).astype(jnp.int32),
      model_calls_B=(gen_calls_B + value_calls_B + roll_calls_M.reshape(b, -1).sum(axis=1)).astype(jnp.int32))
  child_BxWxK = jnp.where(keep_BxWK, ids_BxWK, tree_lib.NO_NODE).reshape(b, w, k)
  return tree, child_BxWxK, counters
