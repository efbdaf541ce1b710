"""MCTS over reasoning steps for B problems at once, as one traceable program.

One simulation, for all B trees together:
  1. Select: W walkers per tree descend from the root by PUCT (or UCT) on normalised q (fixed
     [-1, 1] reward bounds, or the tree's running min / max), one after the other; each walker
     puts a virtual loss on its path (virtual visits of normalised value 0, as many as the
     evaluations its leaf will add: K for an expansion, 1 for a re-visit) so the next one
     tends to pick a different leaf. Walkers that end on the same leaf as an earlier one sit
     this simulation out.
  2. Expand + Evaluate (`expansion.expand_and_evaluate`): each active leaf gets K sampled next
     steps, B*W*K rows in ONE policy call; identical siblings are merged and the prior is
     taken over the unique steps (empirical share or renormalised pi);
     children are scored in ONE value call (verifier reward at terminal steps in training mode,
     optional rollouts mixed in with weight alpha). A walker that ends on a terminal or
     depth-capped leaf re-visits it (its value is backed up again). A new child's q is
     gamma * V(child) (its reward if terminal), the same scale as an expanded node's q.
  3. Backpropagate level by level from the deepest leaf up to the root: visits += evaluations added
     below; q by x1's TD form `q <- (1-lam) q + lam gamma sum N(c) q(c) / sum N(c)` or by the
     running mean (config `backup`). Both recompute a node from its children, so several
     walkers sharing an ancestor write the same value. Both give q = gamma * (estimate of
     V(node state)), as a fresh node has.
Node states for the policy call are built from the selected paths (no parent walk), the
children's states from their parent's state plus the new step.
The tree starts as the evaluated root, so simulation 0 expands the root (its other W-1
walkers idle); one code path keeps the compiled program to one policy and one value call.

Why not mctx's loop: mctx expands one node per tree per simulation over a fixed action set,
carries `[B, N, A]` child tables through vmapped while-loops (cost grows with the tree), and
backs up one path per tree. An LM expansion samples K candidate steps (no fixed action set,
duplicates to merge), every child is evaluated when it is created, and several leaves per tree
must share one model call to fill an accelerator. Every per-simulation operation here touches
O(B*W*K*D) entries, never O(B*N). mctx's Gumbel root selection assumes a fixed action set with
known logits; here the root's unique sampled children play that set (`root_selection='gumbel'`,
with mctx's sequential-halving schedule), selection below the root stays PUCT / UCT. mctx's
`qtransform_by_min_max` normalises by the children of one node; the blueprint asks for a
running min/max over the tree (`q_bounds='running'`, kept in `Tree.q_min_B / q_max_B`); the
default uses the fixed reward range [-1, 1] instead, so the first few q values seen do not
stretch tiny differences to the whole [0, 1] range.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import jax
import jax.numpy as jnp

from rlm_jax import configlib
from mctx._src import seq_halving  # Sequential Halving's schedule (not re-exported by mctx)

from rlm_jax.search import expansion
from rlm_jax.search import operators
from rlm_jax.search import tree as tree_lib
from rlm_jax.search.base import Params, SearchModel, SearchResult


@dataclasses.dataclass(frozen=True)
class MCTSConfig:
  """MCTS knobs (static). Built from `config.search.mcts` by `search.config`.

  Attributes:
    num_simulations: S (simulation 0 expands the root).
    num_children: K candidate steps per expansion.
    num_walkers: W leaves expanded per tree per simulation (virtual loss spreads them).
    max_depth: D, steps per path; nodes at depth D are not expanded.
    selection: 'puct' (prior from the sampled steps) or 'uct'.
    c1, c2: PUCT constants (AlphaZero / MuZero).
    uct_c: UCT exploration constant.
    prior: over the unique children of an expansion: 'empirical' (share of the K samples that
      produced the step; unbiased for steps sampled from pi), 'logprob' (pi renormalised over
      the unique steps), 'logprob_per_token' (the same on log-prob per token, so long steps
      are not penalised for their length) or 'uniform'.
    prior_temperature: divides the step log-probs before the softmax ('logprob*' priors).
    q_bounds: how q is normalised to [0, 1] for selection: 'fixed' (the reward range [-1, 1]
      of `ValueFn`) or 'running' (min / max of the non-root q seen in the tree, MuZero).
    backup: 'td' (x1) or 'mean' (MuZero running mean).
    gamma: discount.
    td_lambda: x1's TD learning rate lambda (backup='td').
    virtual_loss: virtual visits (of normalised value 0) each walker puts on its path, per
      evaluation its leaf will add (K for an expansion, 1 for a re-visit, 0 when idle), so
      1.0 weighs a pending expansion like the real one it stands for.
    merge_duplicates: merge identical sibling steps.
    num_rollouts: R completions to the end per new non-terminal child (0 = none).
    rollout_weight: alpha in q = (1 - alpha) q_model + alpha mean(rollout rewards).
    answer: 'best_terminal' (highest q among terminal nodes; most-visited path if none) or
      'most_visited' (descend by visits).
    root_selection: 'puct', or 'gumbel': Gumbel MuZero's root (Danihelka et al. 2022, as
      mctx): the root's unique children are the candidates, Gumbel noise + log prior +
      sigma(q) ranks them and sequential halving spreads the simulations over them (one
      walker only); below the root selection stays `selection`. For small budgets.
    gumbel_scale: scale of the root's Gumbel noise (0: deterministic halving).
    state_width: the widths node states are built at for the model calls: 'halving' (a few
      widths, the smallest that holds the deepest expanding leaf), 'depth' (one per depth),
      'full' (always prompt + max_depth steps); see `expansion.state_depths`. The same
      search (log-probs up to float rounding) at another compute and compile time.
  """

  num_simulations: int = 16
  num_children: int = 4
  num_walkers: int = 1
  max_depth: int = 8
  selection: Literal['puct', 'uct'] = 'puct'
  c1: float = 1.25
  c2: float = 19652.0
  uct_c: float = 1.0
  prior: operators.Prior = 'empirical'
  prior_temperature: float = 1.0
  q_bounds: Literal['fixed', 'running'] = 'fixed'
  backup: Literal['td', 'mean'] = 'td'
  gamma: float = 0.96
  td_lambda: float = 1.0
  virtual_loss: float = 1.0
  merge_duplicates: bool = True
  num_rollouts: int = 0
  rollout_weight: float = 0.5
  answer: Literal['best_terminal', 'most_visited'] = 'best_terminal'
  root_selection: Literal['puct', 'gumbel'] = 'puct'
  gumbel_scale: float = 1.0
  state_width: expansion.StateWidth = 'halving'

  def __post_init__(self):
    for name in ('num_simulations', 'num_children', 'num_walkers', 'max_depth'):
      if getattr(self, name) < 1:
        raise ValueError(f'mcts.{name}={getattr(self, name)}: must be >= 1')
    configlib.check_literals(self, 'mcts')
    if not 0.0 < self.gamma <= 1.0:
      raise ValueError(f'mcts.gamma={self.gamma}: must be in (0, 1]')
    if not 0.0 <= self.td_lambda <= 1.0:
      raise ValueError(f'mcts.td_lambda={self.td_lambda}: must be in [0, 1]')
    if not 0.0 <= self.rollout_weight <= 1.0:
      raise ValueError(f'mcts.rollout_weight={self.rollout_weight}: must be in [0, 1]')
    if self.num_rollouts < 0:
      raise ValueError(f'mcts.num_rollouts={self.num_rollouts}: must be >= 0')
    if self.prior_temperature <= 0:
      raise ValueError(f'mcts.prior_temperature={self.prior_temperature}: must be > 0')
    if self.root_selection == 'gumbel' and self.num_walkers != 1:
      raise ValueError(f'mcts.root_selection=gumbel needs num_walkers=1 (sequential halving assigns '
                       f'one simulation at a time), got {self.num_walkers}')
    if self.virtual_loss < 0:
      raise ValueError(f'mcts.virtual_loss={self.virtual_loss}: must be >= 0')

  @property
  def num_nodes(self) -> int:
    """Slots per tree: the root and K per expansion (at most W expansions per simulation)."""
    return 1 + self.num_children * self.num_simulations * self.num_walkers

  def expand_options(self) -> expansion.ExpandOptions:
    return expansion.ExpandOptions(
        num_children=self.num_children, max_depth=self.max_depth, prior=self.prior,
        prior_temperature=self.prior_temperature, merge_duplicates=self.merge_duplicates,
        num_rollouts=self.num_rollouts, rollout_weight=self.rollout_weight, gamma=self.gamma,
        state_width=self.state_width)


# ------------------------------------------------------------------------------------------
# Select.


def q_bounds(tree: tree_lib.Tree, config: MCTSConfig):
  """(lo_B, hi_B) that map q to [0, 1] in selection (`config.q_bounds`)."""
  if config.q_bounds == 'fixed':
    ones = jnp.ones((tree.batch_size,), jnp.float32)
    return -ones, ones
  return tree.q_min_B, tree.q_max_B


def _child_scores(tree: tree_lib.Tree, b_R, node_R, config: MCTSConfig, vl_RxK=None, vl_R=None):
  """Selection scores of the K child slots of R nodes: (child_RxK, scores_RxK).

  `vl_RxK` / `vl_R`: virtual visits on the children / the node; they count as visits of
  normalised value 0.
  """
  k_K = jnp.arange(config.num_children)
  br = b_R[:, None]
  child_RxK = tree.first_child_BxN[b_R, node_R][:, None] + k_K
  valid_RxK = k_K < tree.num_children_BxN[b_R, node_R][:, None]
  child_c = jnp.where(valid_RxK, child_RxK, 0)
  n_c = tree.visits_BxN[br, child_c].astype(jnp.float32)
  n_s = tree.visits_BxN[b_R, node_R].astype(jnp.float32)
  lo_B, hi_B = q_bounds(tree, config)
  qn = operators.normalize_q(tree.q_BxN[br, child_c], lo_B[br], hi_B[br])
  if vl_RxK is not None:
    qn = n_c * qn / (n_c + vl_RxK)
    n_c, n_s = n_c + vl_RxK, n_s + vl_R
  if config.selection == 'puct':
    scores = operators.puct_scores(qn, tree.prior_BxN[br, child_c], n_c, n_s, config.c1, config.c2)
  else:
    scores = operators.uct_scores(qn, n_c, n_s, config.uct_c)
  return child_RxK, jnp.where(valid_RxK, scores, -jnp.inf)


def _descend(tree: tree_lib.Tree, prev_BxWxD1, vl_BxW, config: MCTSConfig, root_pick_B=None):
  """One walker per tree from the root to a leaf, seeing the virtual loss of earlier walkers.

  A node at depth d can only sit at position d of a path, so one comparison per earlier
  walker finds the virtual visits of a child.

  Args:
    tree: the trees.
    prev_BxWxD1: paths of the earlier walkers (-1 rows for walkers still to come), or None.
    vl_BxW: virtual visits each earlier walker puts on every node of its path (0 for the
      walkers still to come).
    config: selection knobs.
    root_pick_B: the root's child to enter (Gumbel root), or None to select it like any node.

  Returns:
    path_BxD1: node per depth (path[:, 0] = root), -1 past the leaf.
  """
  b, d_max = tree.batch_size, config.max_depth
  bi = jnp.arange(b)

  def body(c):
    i, node_B, path, done_B = c
    vl_BxK = vl_B = None
    if prev_BxWxD1 is not None:
      here = jax.lax.dynamic_index_in_dim(prev_BxWxD1, i, axis=2, keepdims=False)
      below = jax.lax.dynamic_index_in_dim(prev_BxWxD1, i + 1, axis=2, keepdims=False)
      first = tree.first_child_BxN[bi, node_B][:, None] + jnp.arange(config.num_children)
      hit_BxKxW = first[:, :, None] == below[:, None, :]
      vl_BxK = operators.short_sum(jnp.where(hit_BxKxW, vl_BxW[:, None, :], 0.0))
      vl_B = operators.short_sum(jnp.where(here == node_B[:, None], vl_BxW, 0.0))
    child_BxK, scores = _child_scores(tree, bi, node_B, config, vl_BxK, vl_B)
    pick = child_BxK[:, 0] + operators.short_argmax(scores)  # the K children are consecutive slots
    if root_pick_B is not None:
      pick = jnp.where(i == 0, root_pick_B, pick)
    node_B = jnp.where(done_B, node_B, pick)
    path = jax.lax.dynamic_update_index_in_dim(path, jnp.where(done_B, -1, node_B), i + 1, axis=1)
    done_B = done_B | (tree.first_child_BxN[bi, node_B] < 0)
    return i + 1, node_B, path, done_B

  node0 = jnp.zeros((b,), jnp.int32)
  path0 = jnp.full((b, d_max + 1), tree_lib.NO_NODE, jnp.int32).at[:, 0].set(0)
  done0 = tree.first_child_BxN[:, 0] < 0
  cond = lambda c: (c[0] < d_max) & ~jnp.all(c[3])
  return jax.lax.while_loop(cond, body, (jnp.array(0), node0, path0, done0))[2]


def walker_roles(tree: tree_lib.Tree, path_BxWxD1, config: MCTSConfig):
  """What each walker does with its leaf: (expand_BxW, revisit_BxW).

  A walker expands an unexpanded, non-terminal leaf above max_depth, re-visits a terminal or
  depth-capped one, and idles (neither) when an earlier walker of its tree holds the same leaf
  or its path is empty.
  """
  bb = jnp.arange(tree.batch_size)[:, None]
  leaf_BxW, depth_BxW = leaves_of(path_BxWxD1)
  w = leaf_BxW.shape[1]
  earlier = jnp.tril(jnp.ones((w, w), bool), -1)
  dup_BxW = jnp.any((leaf_BxW[:, :, None] == leaf_BxW[:, None, :]) & earlier[None], axis=2)
  active = ~dup_BxW & (depth_BxW >= 0)
  leaf_c = jnp.maximum(leaf_BxW, 0)
  can_expand = ~tree.terminal_BxN[bb, leaf_c] & (depth_BxW < config.max_depth)
  return active & can_expand, active & ~can_expand


def gumbel_root_pick(tree: tree_lib.Tree, gumbel_BxK, root_sims_BxK, considered_B, config: MCTSConfig):
  """The root child Gumbel MuZero's sequential halving visits next (mctx `gumbel_muzero_policy`).

  Among the root's children whose simulation count equals `considered_B` (the halving
  schedule's count for this simulation), the one maximising g + log prior + sigma(q), with
  sigma(q) = (50 + max N) * 0.1 * normalised q (mctx's `qtransform_completed_by_mix_value`
  constants; every child here has its own evaluation, so no q needs completing).

  Returns:
    child_B (a node index; garbage while the root is unexpanded, where it is not used).
  """
  b, k = gumbel_BxK.shape
  bi = jnp.arange(b)
  first = jnp.maximum(tree.first_child_BxN[:, tree_lib.ROOT], 0)
  child_BxK = first[:, None] + jnp.arange(k)
  valid = jnp.arange(k)[None, :] < tree.num_children_BxN[:, tree_lib.ROOT][:, None]
  child_c = jnp.where(valid, child_BxK, 0)
  lo_B, hi_B = q_bounds(tree, config)
  qn = operators.normalize_q(tree.q_BxN[bi[:, None], child_c], lo_B[:, None], hi_B[:, None])
  sigma = (50.0 + jnp.max(root_sims_BxK, axis=1, keepdims=True)) * 0.1 * qn
  logits = jnp.log(jnp.maximum(tree.prior_BxN[bi[:, None], child_c], 1e-30))
  score = seq_halving.score_considered(considered_B[:, None], gumbel_BxK, jnp.where(valid, logits, -1e9),
                                       sigma, root_sims_BxK)
  score = jnp.where(valid, score, -jnp.inf)
  return jnp.take_along_axis(child_BxK, jnp.argmax(score, axis=1)[:, None], axis=1)[:, 0]


def select_leaves(tree: tree_lib.Tree, config: MCTSConfig, root_pick_B=None):
  """W walkers per tree, one after the other, each seeing the earlier ones' virtual loss.

  Walker j's virtual loss is `virtual_loss` times the evaluations its leaf will add (K for an
  expansion, 1 for a re-visit, 0 when idle): the visits a real backup will add along its path.

  Returns:
    path_BxWxD1: each walker's path (node per depth, -1 past its leaf).
  """
  b, w, d1 = tree.batch_size, config.num_walkers, config.max_depth + 1
  if w == 1:
    return _descend(tree, None, None, config, root_pick_B)[:, None]

  def walker(j, paths):
    vl_BxW = jnp.zeros((b, w), jnp.float32)
    if config.virtual_loss > 0:
      expand_BxW, revisit_BxW = walker_roles(tree, paths, config)
      evals_BxW = jnp.where(expand_BxW, config.num_children, revisit_BxW.astype(jnp.int32))
      vl_BxW = config.virtual_loss * evals_BxW.astype(jnp.float32)
    return paths.at[:, j].set(_descend(tree, paths, vl_BxW, config))

  paths = jnp.full((b, w, d1), tree_lib.NO_NODE, jnp.int32)
  return jax.lax.fori_loop(0, w, walker, paths)


def leaves_of(path_BxWxD1):
  """Last node of each path: (leaf_BxW, depth_BxW)."""
  depth = jnp.sum(path_BxWxD1 >= 0, axis=-1) - 1
  leaf = jnp.take_along_axis(path_BxWxD1, depth[..., None], axis=-1)[..., 0]
  return leaf, depth


# ------------------------------------------------------------------------------------------
# Backpropagate.


def backpropagate(tree: tree_lib.Tree, path_BxWxD1, delta_BxW, config: MCTSConfig) -> tree_lib.Tree:
  """Adds `delta` visits along each walker's path and recomputes q bottom-up.

  The level loop reads the tree but does not write it: a child on a path (any walker's) takes
  the q just recomputed one level down, from the loop's `[D1, B, W]` carry, and the new q
  are written back with one scatter (and the running bounds updated once). The same values
  as writing each level into the tree before reading the next.

  Args:
    tree: trees whose new leaves / children are already written and evaluated.
    path_BxWxD1: node per depth per walker (-1 past its leaf).
    delta_BxW: evaluations the walker added below its leaf (number of new children, 1 for a
      re-visit, 0 for an idle walker).
    config: gamma, td_lambda, backup.

  Returns:
    The updated trees.
  """
  b, w, d1 = path_BxWxD1.shape
  k = config.num_children
  bb = jnp.arange(b)[:, None]
  live_BxWxD1 = (path_BxWxD1 >= 0) & (delta_BxW[..., None] > 0)
  idx = jnp.where(live_BxWxD1, path_BxWxD1, tree.num_slots).reshape(b, w * d1)
  visits = tree.visits_BxN.at[bb, idx].add(
      jnp.broadcast_to(delta_BxW[..., None], (b, w, d1)).reshape(b, w * d1), mode='drop')
  tree = tree.replace(visits_BxN=visits)

  # The path nodes' own entries, gathered once, level-major ([D1, B, W]: one slice per level).
  path = jnp.moveaxis(path_BxWxD1, 2, 0)
  node_c = jnp.maximum(path, 0)
  bn = bb.reshape(1, b, 1)
  first, n_kids = tree.first_child_BxN[bn, node_c], tree.num_children_BxN[bn, node_c]
  q_s, v_s = tree.q_BxN[bn, node_c], tree.value_BxN[bn, node_c]
  live = jnp.moveaxis(live_BxWxD1, 2, 0) & (first >= 0)  # leaves that were re-visited keep their q
  k_K = jnp.arange(k)
  bk = bb[..., None]

  def level(i, new_D1xBxW):
    depth = top - i
    below = jnp.minimum(depth + 1, d1 - 1)
    valid = k_K < n_kids[depth][..., None]
    kids = jnp.where(valid, first[depth][..., None] + k_K, 0)
    # The tree holds every child's q from before this backup; a child on a path (any
    # walker's) one level down takes the q just recomputed there.
    hit_BxWxKxW = ((kids[..., None] == path[below][:, None, None, :])
                   & (live[below] & (depth + 1 < d1))[:, None, None, :])
    fresh = operators.short_max(jnp.where(hit_BxWxKxW, new_D1xBxW[below][:, None, None, :], -jnp.inf))
    q_kids = jnp.where(operators.short_any(hit_BxWxKxW), fresh, tree.q_BxN[bk, kids])
    n_c = tree.visits_BxN[bk, kids]
    if config.backup == 'td':
      new = operators.backup_td(q_s[depth], q_kids, n_c, valid, config.gamma, config.td_lambda)
    else:
      new = operators.backup_mean(v_s[depth], q_kids, n_c, valid, config.gamma)
    return new_D1xBxW.at[depth].set(jnp.where(live[depth], new, q_s[depth]))

  # Start at the deepest live leaf (fori_loop with a traced bound is a while loop).
  _, leaf_depth = leaves_of(path_BxWxD1)
  top = jnp.max(jnp.where(delta_BxW > 0, leaf_depth, 0))
  new_D1xBxW = jax.lax.fori_loop(0, top + 1, level, q_s)
  tgt = jnp.where(live, path, tree.num_slots)
  seen = live & (jnp.arange(d1) > 0)[:, None, None]  # the root's q is never compared with a sibling
  return tree.replace(
      q_BxN=tree.q_BxN.at[bn, tgt].set(new_D1xBxW, mode='drop'),
      q_min_B=jnp.minimum(tree.q_min_B, jnp.min(jnp.where(seen, new_D1xBxW, jnp.inf), axis=(0, 2))),
      q_max_B=jnp.maximum(tree.q_max_B, jnp.max(jnp.where(seen, new_D1xBxW, -jnp.inf), axis=(0, 2))))


# ------------------------------------------------------------------------------------------
# Answer.


def most_visited_leaf(tree: tree_lib.Tree, num_children: int, max_depth: int):
  """Descends from the root by visit count (ties: higher q, then lower index): leaf_B."""
  b = tree.batch_size
  bi = jnp.arange(b)
  k_K = jnp.arange(num_children)

  def down(_, node_B):
    first = tree.first_child_BxN[bi, node_B]
    kids = first[:, None] + k_K
    valid = k_K < tree.num_children_BxN[bi, node_B][:, None]
    kids_c = jnp.where(valid, kids, 0)
    n = tree.visits_BxN[bi[:, None], kids_c].astype(jnp.float32)
    # q only breaks ties: squashed to well below one visit.
    key = jnp.where(valid, n + 1e-3 * jnp.tanh(tree.q_BxN[bi[:, None], kids_c]), -jnp.inf)
    pick = jnp.take_along_axis(kids, jnp.argmax(key, axis=1)[:, None], axis=1)[:, 0]
    return jnp.where(first >= 0, pick, node_B)

  return jax.lax.fori_loop(0, max_depth, down, jnp.zeros((b,), jnp.int32))


def best_terminal_leaf(tree: tree_lib.Tree):
  """Terminal node with the highest q per tree: (leaf_B, found_B)."""
  used = jnp.arange(tree.num_slots)[None, :] < tree.num_nodes_B[:, None]
  term = used & tree.terminal_BxN
  best = jnp.argmax(jnp.where(term, tree.q_BxN, -jnp.inf), axis=1).astype(jnp.int32)
  return best, term.any(axis=1)


def answer_leaf(tree: tree_lib.Tree, config: MCTSConfig):
  """The node whose path is the answer (config.answer)."""
  visited = most_visited_leaf(tree, config.num_children, config.max_depth)
  if config.answer == 'most_visited':
    return visited
  best, found = best_terminal_leaf(tree)
  return jnp.where(found, best, visited)


# ------------------------------------------------------------------------------------------
# The search.


def mcts_search(params: Params, key: jax.Array, prompt_BxLp: jax.Array, prompt_mask_BxLp: jax.Array, *,
         model: SearchModel, config: MCTSConfig,
         problem_B: Optional[jax.Array] = None) -> SearchResult:
  """Runs MCTS for B problems; traceable (the caller jits, e.g. with model/config static).

  Args:
    params: model parameters, passed to the callables (traced: new weights do not retrace).
    key: PRNG key, consumed; simulation s uses `fold_in(key, s)`.
    prompt_BxLp: questions, left-padded.
    prompt_mask_BxLp: True on real prompt tokens.
    model: the callables (`search.lm.make_search_model` or scripted ones).
    config: static search configuration.
    problem_B: problem id per row for the reward callable (default 0..B-1).

  Returns:
    SearchResult with the chosen path's steps (L = max_depth * step tokens), its q as score,
    the tree, and `extra = {'leaf_B': chosen node, 'root_sims_BxK': simulations that entered
    each root child slot, 'state_depth_S': the path length (steps) each simulation built its
    node states at}`.
  """
  b = prompt_BxLp.shape[0]
  if problem_B is None:
    problem_B = jnp.arange(b, dtype=jnp.int32)
  opts = config.expand_options()

  roots = expansion.root_nodes(prompt_BxLp, prompt_mask_BxLp, problem_B, model.pad_id)
  root_value_B = expansion.last_values(model, params, roots)
  counters = expansion.Counters(
      jnp.zeros((b,), jnp.int32),
      jnp.full((b,), 1 if model.value_fn is not None else 0, jnp.int32))
  # The step width comes from the policy itself; probe it without running it.
  probe = jax.eval_shape(
      lambda p, kk, n: model.policy_fn(p, kk, n, 1, to_end=False, greedy=False), params, key, roots)
  step_len = probe.tokens_MxKxL.shape[-1]
  tree = tree_lib.empty(roots.tokens_MxT, roots.mask_MxT, problem_B, config.num_nodes, step_len,
                        model.pad_id, root_value_B, gamma=config.gamma)

  gumbel = config.root_selection == 'gumbel'
  k = config.num_children
  if gumbel:
    # Simulation 0 expands the root; the halving schedule covers the S - 1 after it, per
    # number of unique root children (merging can leave fewer than K).
    table_NxS = jnp.asarray(seq_halving.get_table_of_considered_visits(k, max(config.num_simulations - 1, 1)),
                            jnp.int32)
    gumbel_BxK = config.gumbel_scale * jax.random.gumbel(
        jax.random.fold_in(key, config.num_simulations), (b, k), jnp.float32)

  depths_table = jnp.asarray(expansion.state_depths(config.max_depth, config.state_width), jnp.int32)

  def simulation(s, carry):
    tree, counters, root_sims_BxK, state_depth_S = carry
    root_pick = None
    if gumbel:
      n_B = tree.num_children_BxN[:, tree_lib.ROOT]
      considered_B = table_NxS[n_B, jnp.clip(s - 1, 0, table_NxS.shape[1] - 1)]
      root_pick = gumbel_root_pick(tree, gumbel_BxK, root_sims_BxK, considered_B, config)
    path_BxWxD1 = select_leaves(tree, config, root_pick)
    expand_BxW, revisit_BxW = walker_roles(tree, path_BxWxD1, config)
    depth_BxW = jnp.sum(path_BxWxD1 >= 0, axis=2) - 1
    state_depth_S = state_depth_S.at[s].set(depths_table[expansion.state_depth(opts, depth_BxW, expand_BxW)])
    tree, kids, c = expansion.expand_and_evaluate(
        params, jax.random.fold_in(key, s), tree, path_BxWxD1, expand_BxW, model=model, opts=opts)
    delta = jnp.where(expand_BxW, (kids >= 0).sum(axis=2), revisit_BxW.astype(jnp.int32))
    tree = backpropagate(tree, path_BxWxD1, delta.astype(jnp.int32), config)
    # Simulations through each root child (the counts sequential halving schedules by).
    slot_B = path_BxWxD1[:, 0, 1] - tree.first_child_BxN[:, tree_lib.ROOT]
    entered = (path_BxWxD1[:, 0, 1] >= 0)[:, None] & (jnp.arange(k)[None, :] == slot_B[:, None])
    return tree, counters + c, root_sims_BxK + entered.astype(jnp.int32), state_depth_S

  carry0 = (tree, counters, jnp.zeros((b, k), jnp.int32), jnp.zeros((config.num_simulations,), jnp.int32))
  tree, counters, root_sims_BxK, state_depth_S = jax.lax.fori_loop(0, config.num_simulations, simulation, carry0)

  leaf_B = answer_leaf(tree, config)
  bi = jnp.arange(b)
  tokens, _, lengths = tree_lib.solutions(tree, bi, leaf_B, config.max_depth, model.pad_id)
  return SearchResult(
      tokens_BxL=tokens, lengths_B=lengths, score_B=tree.q_BxN[bi, leaf_B],
      terminal_B=tree.terminal_BxN[bi, leaf_B], policy_tokens_B=counters.policy_tokens_B,
      model_calls_B=counters.model_calls_B, tree=tree,
      extra={'leaf_B': leaf_B, 'root_sims_BxK': root_sims_BxK, 'state_depth_S': state_depth_S})
