"""Generate + Evaluate for a batch of leaves: one policy call, one value call, tree writes.

Shared by MCTS and beam search. For B trees with W leaves each, the policy samples K next steps
per leaf in ONE call (B*W*K rows); the new children get consecutive slots, are written into the
tree, and are scored in ONE value call (B*W*K rows, each leaf's state read once for its K
children with `SearchModel.extension_value_fn`; none when the policy carries the value head:
its decode already computed each child's value, `lm.make_search_model`). Terminal
children are scored by the verifier (training mode) or by the value model / PRM (inference);
non-terminal children can mix in rollouts to the end:
q = (1 - alpha) q_model + alpha * mean(rollout rewards).

State width by depth: a leaf at depth d needs only Lp + d * L columns (its child one step
more), not the Lp + max_depth * L of the deepest node. Each expansion builds its leaves'
states at the smallest of a few static widths (`state_depths`) that holds the deepest of
them, chosen by `lax.switch`; every branch returns the same shapes (steps, values), so the
tree code does not see the width. The branches differ only in token arrays (the tree's step
tokens, gathered per path), so the switch copies nothing large. A per-node KV cache instead
would keep N x layers x (Lp + D * L) x 2 * kv_dim floats per tree (N times a decode's cache)
and would still leave the value model to read each new state in full.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple

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


StateWidth = Literal['halving', 'depth', 'full']


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
  state_width: StateWidth = 'halving'  # see `state_depths`


def state_depths(max_depth: int, mode: str) -> tuple[int, ...]:
  """The path lengths (in steps) at which expanding leaves' states are built (static).

  An expansion builds every leaf's state at the smallest listed length >= its deepest leaf:
  Lp + d * L columns for the leaves, one step more for their children. 'full': one width,
  Lp + max_depth * L, for every expansion; 'depth': one per depth 0 .. max_depth - 1;
  'halving': max_depth - 1 and its halves rounded up, down to 1 (depth 0, the root, is
  expanded once and takes the width of depth 1), so a state is at most twice as wide as its
  leaf needs. Each entry is one more copy of the model calls in the compiled program
  (compile time); an expansion runs one of them.
  """
  if mode == 'full':
    return (max_depth,)
  if mode == 'depth':
    return tuple(range(max_depth))
  if mode != 'halving':
    raise ValueError(f"state_width='{mode}': must be one of 'halving', 'depth', 'full'")
  depths, d = [max_depth - 1], max_depth - 1
  while d > 1:
    d = (d + 1) // 2
    depths.append(d)
  return tuple(sorted(set(depths)))


def state_depth(opts: ExpandOptions, depth_BxW, expand_BxW) -> jax.Array:
  """Index into `state_depths(...)` of the states an expansion builds: the first listed
  length that holds the deepest expanding leaf of the whole batch (traced int)."""
  depths = state_depths(opts.max_depth, opts.state_width)
  deepest = jnp.max(jnp.where(expand_BxW, depth_BxW, 0))
  return jnp.minimum(jnp.sum(jnp.asarray(depths) < deepest), len(depths) - 1).astype(jnp.int32)


def last_values(model: SearchModel, params: Params, nodes: NodeBatch) -> jax.Array:
  """Value / PRM score of each node's full state (last column); zeros without a value model."""
  if model.value_fn is None:
    return jnp.zeros(nodes.depth_M.shape, jnp.float32)
  if model.last_value_fn is not None:  # the head at the last token only
    return model.last_value_fn(params, nodes).astype(jnp.float32)
  return model.value_fn(params, nodes)[:, -1].astype(jnp.float32)


def end_values(model: SearchModel, params: Params, nodes: NodeBatch, tokens_MxKxL, mask_MxKxL) -> jax.Array:
  """Value of each node extended by each of its K extensions (any padding layout), at the
  extension's last token (the node's own value where it is empty): [M * K], node-major, from
  `model.extension_value_fn` (each node's state read once for its K extensions)."""
  m, k, l = tokens_MxKxL.shape
  values_MxKxL, own_M = model.extension_value_fn(params, nodes, tokens_MxKxL, mask_MxKxL)
  last = jnp.max(jnp.where(mask_MxKxL, jnp.arange(l), -1), axis=-1)
  v = jnp.take_along_axis(values_MxKxL, jnp.maximum(last, 0)[..., None], axis=-1)[..., 0]
  return jnp.where(last >= 0, v, own_M[:, None]).reshape(m * k).astype(jnp.float32)


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
  elif out.value_MxK is not None:  # the value of each rollout's end, read from its decode
    rew = out.value_MxK.reshape(m * r)
    calls_M = jnp.full((m,), r, jnp.int32)
  elif model.extension_value_fn is not None:  # each child's state read once for its R rollouts
    rew = end_values(model, params, child_nodes, out.tokens_MxKxL, comp_mask.reshape(m, r, lc))
    calls_M = jnp.full((m,), r * 2, jnp.int32)
  else:
    tok = jnp.concatenate([rep(child_nodes.tokens_MxT), comp], axis=1)
    msk = jnp.concatenate([rep(child_nodes.mask_MxT), comp_mask], axis=1)
    tok, msk, _ = tree_lib.pack(tok, msk, model.pad_id, align='right')
    full = NodeBatch(tok, msk, rep(child_nodes.depth_M), rep(child_nodes.problem_M))
    rew = last_values(model, params, full)
    calls_M = jnp.full((m,), r * (2 if model.value_fn is not None else 1), jnp.int32)
  mean_M = rew.reshape(m, r).mean(axis=1)
  return mean_M, out.lengths_MxK.sum(axis=1), calls_M


class _Evaluated(NamedTuple):
  """What an expansion gets from the models, in shapes that do not depend on the state width."""

  tokens_MxKxL: jax.Array  # the sampled steps, left-padded (the stored layout)
  lengths_MxK: jax.Array
  logprob_MxK: jax.Array
  terminal_MxK: jax.Array
  keep_MxK: jax.Array  # created (active walker, first of its duplicates)
  count_MxK: jax.Array  # samples merged into each kept candidate
  q0_M: jax.Array  # first evaluation of each child (node-major: row m * K + k)
  reward_M: jax.Array  # verifier reward of terminal children, NaN elsewhere
  roll_tokens_M: jax.Array
  roll_calls_M: jax.Array
  scored_M: jax.Array  # bool: a value model scored the child (not read from the decode)


def _sample_and_score(params: Params, key: jax.Array, tree: tree_lib.Tree, b_M, path_MxD, expand_M, *,
                      depth: int, model: SearchModel, opts: ExpandOptions) -> _Evaluated:
  """Generate + Evaluate for M leaves whose paths hold at most `depth` (static) steps.

  The leaves' states are Lp + depth * L wide, their children's one step wider (capped at
  Lp + max_depth * L, the widest state: a leaf below max_depth then has L leading pads to
  drop).
  """
  m = path_MxD.shape[0]
  k = opts.num_children
  k_policy, k_roll = jax.random.split(key)
  nodes = tree_lib.path_states(tree, b_M, path_MxD[:, :depth], model.pad_id)
  # Idle walkers (duplicates, re-visits, empty beam slots) get an empty state: the sampler
  # marks such rows done before decoding, so they never keep the decode loop running.
  nodes = nodes._replace(mask_MxT=nodes.mask_MxT & expand_M[:, None])
  steps = model.policy_fn(params, k_policy, nodes, k, to_end=False, greedy=False)
  ls = steps.tokens_MxKxL.shape[-1]
  if ls != tree.step_len:
    raise ValueError(f'policy returned steps of {ls} tokens; the tree stores {tree.step_len}')
  tok_MxKxL = tree_lib.left_pad_steps(steps.tokens_MxKxL, steps.lengths_MxK, model.pad_id)
  active_MxK = jnp.broadcast_to(expand_M[:, None], (m, k))
  if opts.merge_duplicates:
    keep_MxK, count_MxK = operators.merge_duplicates(tok_MxKxL, active_MxK)
  else:
    keep_MxK, count_MxK = active_MxK, active_MxK.astype(jnp.int32)

  # ONE value call over all M*K children. A child's state is its parent's state plus its step.
  t_full = tree.prompt_BxLp.shape[1] + opts.max_depth * ls
  drop = max(nodes.tokens_MxT.shape[1] + ls - t_full, 0)
  rep = lambda x: jnp.repeat(x, k, axis=0)
  smask_MxKxL = jnp.arange(ls) >= (ls - steps.lengths_MxK)[..., None]
  child_nodes = NodeBatch(
      tokens_MxT=jnp.concatenate([rep(nodes.tokens_MxT)[:, drop:], tok_MxKxL.reshape(m * k, ls)], axis=1),
      mask_MxT=jnp.concatenate([rep(nodes.mask_MxT)[:, drop:], smask_MxKxL.reshape(m * k, ls)], axis=1),
      depth_M=rep(nodes.depth_M) + 1, problem_M=rep(nodes.problem_M))
  if steps.value_MxK is not None:  # read from the policy's decode: no second pass over the children
    q0_M = steps.value_MxK.reshape(m * k).astype(jnp.float32)
    scored_M = jnp.zeros((m * k,), bool)
  else:
    if model.extension_value_fn is not None:  # each leaf's state read once for its K children
      q0_M = end_values(model, params, nodes, tok_MxKxL, smask_MxKxL)
    else:
      q0_M = last_values(model, params, child_nodes)
    scored_M = jnp.full((m * k,), model.value_fn is not None)
  term_M = steps.terminal_MxK.reshape(-1)
  reward_M = jnp.full(term_M.shape, jnp.nan, jnp.float32)
  sol = None
  if model.reward_fn is not None:
    sol = _solutions_of(child_nodes, rep(tree.prompt_mask_BxLp.sum(axis=1)[b_M]), model.pad_id)
    # The verifier sees solutions of one width (that of the widest state) whatever the branch.
    extra = t_full - child_nodes.tokens_MxT.shape[1]
    sol = (jnp.pad(sol[0], ((0, 0), (0, extra)), constant_values=model.pad_id),
           jnp.pad(sol[1], ((0, 0), (0, extra))))
    r_M = model.reward_fn(params, sol[0], sol[1], child_nodes.problem_M).astype(jnp.float32)
    reward_M = jnp.where(term_M, r_M, jnp.nan)
    q0_M = jnp.where(term_M, r_M, q0_M)
  roll_tokens_M = roll_calls_M = jnp.zeros(term_M.shape, jnp.int32)
  if opts.num_rollouts > 0 and opts.rollout_weight > 0:
    use = keep_MxK.reshape(-1) & ~term_M  # merged duplicates and terminal children need no rollout
    roll_from = child_nodes._replace(mask_MxT=child_nodes.mask_MxT & use[:, None])
    mean_M, roll_tokens_M, roll_calls_M = _rollout_values(params, k_roll, model, sol, roll_from, opts)
    a = opts.rollout_weight
    q0_M = jnp.where(term_M, q0_M, (1.0 - a) * q0_M + a * mean_M)
    roll_tokens_M, roll_calls_M = jnp.where(use, roll_tokens_M, 0), jnp.where(use, roll_calls_M, 0)
  return _Evaluated(tok_MxKxL, steps.lengths_MxK, steps.logprob_MxK, steps.terminal_MxK, keep_MxK, count_MxK,
                    q0_M, reward_M, roll_tokens_M, roll_calls_M, scored_M)


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
  depth_BxW = jnp.maximum(jnp.sum(path_BxWxD1 >= 0, axis=2) - 1, 0)  # empty path: inactive
  leaf_BxW = jnp.take_along_axis(path_BxWxD1, depth_BxW[..., None], axis=2)[..., 0]
  b_BxW = jnp.broadcast_to(jnp.arange(b)[:, None], (b, w))
  operands = (params, key, tree, b_BxW.reshape(-1), path_BxWxD1[:, :, 1:].reshape(b * w, d1 - 1),
              expand_BxW.reshape(-1))
  depths = state_depths(opts.max_depth, opts.state_width)
  branch = lambda d: functools.partial(_sample_and_score, depth=d, model=model, opts=opts)
  if len(depths) == 1:
    ev = branch(depths[0])(*operands)
  else:
    ev = jax.lax.switch(state_depth(opts, depth_BxW, expand_BxW), [branch(d) for d in depths], *operands)
  ls = ev.tokens_MxKxL.shape[-1]
  prior_MxK = operators.step_priors(ev.logprob_MxK, ev.keep_MxK, opts.prior, opts.prior_temperature,
                                    count_MxK=ev.count_MxK, lengths_MxK=ev.lengths_MxK)

  # Consecutive slots per tree, walker-major, so each leaf's children form one range.
  keep_BxWK = ev.keep_MxK.reshape(b, w * k)
  rank_BxWK = jnp.cumsum(keep_BxWK, axis=1, dtype=jnp.int32) - 1
  ids_BxWK = tree.num_nodes_B[:, None] + rank_BxWK
  ids_BxWK = jnp.where(keep_BxWK, ids_BxWK, n_slots)  # out of bounds: the write is dropped
  count_BxW = operators.short_sum(ev.keep_MxK.reshape(b, w, k).astype(jnp.int32))
  first_BxW = tree.num_nodes_B[:, None] + jnp.cumsum(count_BxW, axis=1) - count_BxW

  bb = jnp.broadcast_to(jnp.arange(b)[:, None], (b, w * k))
  parent_BxWK = jnp.repeat(leaf_BxW, k, axis=1)
  depth_BxWK = jnp.repeat(depth_BxW, k, axis=1) + 1
  term_BxWK = ev.terminal_MxK.reshape(b, w * k)
  # q is Q(parent state, step) = r + gamma V(child state): the reward (or the value model's
  # estimate of it) for a terminal step, gamma times the value otherwise, the same scale as an
  # expanded sibling's gamma * mean(children q).
  v0_BxWK = ev.q0_M.reshape(b, w * k)
  q0_BxWK = jnp.where(term_BxWK, v0_BxWK, opts.gamma * v0_BxWK)
  at = lambda arr: arr.at[bb, ids_BxWK]
  leaf_ids = jnp.where(expand_BxW, leaf_BxW, n_slots)
  tree = tree.replace(
      parent_BxN=at(tree.parent_BxN).set(parent_BxWK, mode='drop'),
      depth_BxN=at(tree.depth_BxN).set(depth_BxWK, mode='drop'),
      visits_BxN=at(tree.visits_BxN).set(1, mode='drop'),
      prior_BxN=at(tree.prior_BxN).set(prior_MxK.reshape(b, w * k), mode='drop'),
      logprob_BxN=at(tree.logprob_BxN).set(ev.logprob_MxK.reshape(b, w * k), mode='drop'),
      terminal_BxN=at(tree.terminal_BxN).set(term_BxWK, mode='drop'),
      step_tokens_BxNxL=at(tree.step_tokens_BxNxL).set(ev.tokens_MxKxL.reshape(b, w * k, ls), mode='drop'),
      step_len_BxN=at(tree.step_len_BxN).set(ev.lengths_MxK.reshape(b, w * k), mode='drop'),
      first_child_BxN=tree.first_child_BxN.at[b_BxW, leaf_ids].set(first_BxW, mode='drop'),
      num_children_BxN=tree.num_children_BxN.at[b_BxW, leaf_ids].set(count_BxW, mode='drop'),
      num_nodes_B=tree.num_nodes_B + count_BxW.sum(axis=1),
      value_BxN=at(tree.value_BxN).set(v0_BxWK, mode='drop'),
      q_BxN=at(tree.q_BxN).set(q0_BxWK, mode='drop'),
      reward_BxN=at(tree.reward_BxN).set(ev.reward_M.reshape(b, w * k), mode='drop'),
      q_min_B=jnp.minimum(tree.q_min_B, jnp.min(jnp.where(keep_BxWK, q0_BxWK, jnp.inf), axis=1)),
      q_max_B=jnp.maximum(tree.q_max_B, jnp.max(jnp.where(keep_BxWK, q0_BxWK, -jnp.inf), axis=1)),
  )

  # Compute spent: every sampled candidate of an expanding leaf (duplicates were generated
  # too), one value row per created child that needs the value model (the verifier is not a
  # model, and values read from the policy's decode cost no extra row).
  active_BxWK = jnp.repeat(expand_BxW, k, axis=1)
  gen_tokens_B = jnp.where(active_BxWK, ev.lengths_MxK.reshape(b, w * k), 0).sum(axis=1)
  gen_calls_B = active_BxWK.sum(axis=1)
  scored_BxWK = keep_BxWK & ev.scored_M.reshape(b, w * k)
  if model.reward_fn is not None:
    scored_BxWK = scored_BxWK & ~term_BxWK
  value_calls_B = scored_BxWK.sum(axis=1)
  counters = Counters(
      policy_tokens_B=(gen_tokens_B + ev.roll_tokens_M.reshape(b, -1).sum(axis=1)).astype(jnp.int32),
      model_calls_B=(gen_calls_B + value_calls_B + ev.roll_calls_M.reshape(b, -1).sum(axis=1)).astype(jnp.int32))
  child_BxWxK = jnp.where(keep_BxWK, ids_BxWK, tree_lib.NO_NODE).reshape(b, w, k)
  return tree, child_BxWxK, counters
