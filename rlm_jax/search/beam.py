"""Step-level beam search guided by the value model / PRM, on the same tree arrays as MCTS.

Search starts from one beam, the question. Every level expands each live beam with
`expansions` candidate steps (B*W*E rows, ONE policy call and ONE value call). A candidate is
finished when its step was terminal or it reached max_depth. Prune keeps the best beam_width
live candidates as the next beams, and, apart from them, the best beam_width finished ones
(terminal first, then the score), so a finished answer is never dropped for a live beam that
later ends worse. The loop stops once no beam is live. The answer is the best finished beam.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import jax
import jax.numpy as jnp

from rlm_jax import configlib
from rlm_jax.search import expansion
from rlm_jax.search import operators
from rlm_jax.search import tree as tree_lib
from rlm_jax.search.base import Params, SearchModel, SearchResult


@dataclasses.dataclass(frozen=True)
class BeamConfig:
  """Beam-search knobs (static).

  Attributes:
    beam_width: beams kept per problem.
    expansions: candidate steps sampled per beam and level.
    max_depth: steps per path.
    score: 'last' (value / PRM of the newest step; verifier reward at terminals in training
      mode) or 'min' (lowest such value along the path, PRM-min).
    merge_duplicates: merge identical sibling steps.
    state_width: the widths node states are built at ('halving', 'depth', 'full'; see
      `expansion.state_depths`): the same search (log-probs up to float rounding) at
      another compute and compile time.
  """

  beam_width: int = 4
  expansions: int = 4
  max_depth: int = 8
  score: Literal['last', 'min'] = 'last'
  merge_duplicates: bool = True
  state_width: expansion.StateWidth = 'halving'

  def __post_init__(self):
    for name in ('beam_width', 'expansions', 'max_depth'):
      if getattr(self, name) < 1:
        raise ValueError(f'beam.{name}={getattr(self, name)}: must be >= 1')
    configlib.check_literals(self, 'beam')

  @property
  def num_nodes(self) -> int:
    return 1 + self.max_depth * self.beam_width * self.expansions


def _leaves(paths_BxWxD1):
  """Last node of each beam path and its depth; (-1, -1) for an empty beam slot."""
  depth = jnp.sum(paths_BxWxD1 >= 0, axis=-1) - 1
  leaf = jnp.take_along_axis(paths_BxWxD1, jnp.maximum(depth, 0)[..., None], axis=-1)[..., 0]
  return jnp.where(depth >= 0, leaf, tree_lib.NO_NODE), depth


def _scores(tree: tree_lib.Tree, node_BxC, config: BeamConfig):
  b, c = node_BxC.shape
  bb = jnp.arange(b)[:, None]
  node = jnp.maximum(node_BxC, 0)
  if config.score == 'last':
    return tree.value_BxN[bb, node]
  b_M = jnp.broadcast_to(bb, (b, c)).reshape(-1)
  path = tree_lib.path_by_depth(tree, b_M, node.reshape(-1), config.max_depth)
  vals = tree.value_BxN[b_M[:, None], jnp.maximum(path, 0)]
  return jnp.min(jnp.where(path >= 0, vals, jnp.inf), axis=1).reshape(b, c)


def _answer_rank(tree: tree_lib.Tree, node_BxC, config: BeamConfig):
  """Ranking key of finished beams: terminal ones first, then the score; -inf for empty slots."""
  bb = jnp.arange(node_BxC.shape[0])[:, None]
  term = tree.terminal_BxN[bb, jnp.maximum(node_BxC, 0)]
  rank = _scores(tree, node_BxC, config) + jnp.where(term, 1e6, 0.0)
  return jnp.where(node_BxC >= 0, rank, -jnp.inf)


def beam_search(params: Params, key: jax.Array, prompt_BxLp, prompt_mask_BxLp, *, model: SearchModel,
                config: BeamConfig, problem_B: Optional[jax.Array] = None) -> SearchResult:
  """Runs step-level beam search for B problems; traceable.

  Args/Returns as `mcts.mcts_search`; score_B is the chosen beam's score, `extra['leaf_B']` its
  node and `extra['beams_BxW']` the finished beams kept (-1: empty slot).
  """
  b = prompt_BxLp.shape[0]
  wb, e, d = config.beam_width, config.expansions, config.max_depth
  if problem_B is None:
    problem_B = jnp.arange(b, dtype=jnp.int32)
  roots = expansion.root_nodes(prompt_BxLp, prompt_mask_BxLp, problem_B, model.pad_id)
  root_value = expansion.last_values(model, params, roots)
  probe = jax.eval_shape(
      lambda p, kk, n: model.policy_fn(p, kk, n, 1, to_end=False, greedy=False), params, key, roots)
  tree = tree_lib.empty(roots.tokens_MxT, roots.mask_MxT, problem_B, config.num_nodes,
                        probe.tokens_MxKxL.shape[-1], model.pad_id, root_value)
  counters = expansion.Counters(jnp.zeros((b,), jnp.int32),
                                jnp.full((b,), int(model.value_fn is not None), jnp.int32))
  opts = expansion.ExpandOptions(num_children=e, max_depth=d, merge_duplicates=config.merge_duplicates,
                                 state_width=config.state_width)
  bb = jnp.arange(b)[:, None]
  # Level 0: one beam, the question. A beam is its root-to-node path (node per depth).
  paths = jnp.full((b, wb, d + 1), tree_lib.NO_NODE, jnp.int32).at[:, 0, 0].set(0)
  done = jnp.full((b, wb), tree_lib.NO_NODE, jnp.int32)

  def cond(c):
    i, _, paths, _, _ = c
    return (i < d) & jnp.any(paths[:, :, 0] >= 0)

  def body(c):
    i, tree, paths, done, counters = c
    beams, depth = _leaves(paths)
    live = beams >= 0  # beams hold live paths only: finished ones moved to `done`
    tree, kids, spent = expansion.expand_and_evaluate(
        params, jax.random.fold_in(key, i), tree, paths, live, model=model, opts=opts)
    # Visits count evaluations below a node, as in MCTS trees (exported trees read the same).
    n_new = (kids >= 0).sum(axis=2)
    idx = jnp.where((paths >= 0) & (n_new[..., None] > 0), paths, tree.num_slots).reshape(b, -1)
    add = jnp.broadcast_to(n_new[..., None], paths.shape).reshape(b, -1)
    tree = tree.replace(visits_BxN=tree.visits_BxN.at[bb, idx].add(add, mode='drop'))
    # Every new child is its parent's path + itself.
    kid_BxC = kids.reshape(b, wb * e)
    kid_depth = jnp.repeat(depth, e, axis=1) + 1
    kid_paths = jnp.repeat(paths, e, axis=1)
    at_depth = jnp.arange(d + 1) == kid_depth[..., None]
    kid_paths = jnp.where(at_depth, kid_BxC[..., None], kid_paths)
    finished = (kid_BxC >= 0) & (tree.terminal_BxN[bb, jnp.maximum(kid_BxC, 0)] | (kid_depth >= d))
    going = (kid_BxC >= 0) & ~finished
    # Prune: live children compete for the beams; finished ones for the answer slots, so a
    # finished answer is never pushed out by a live beam that may end worse.
    idx, kept = operators.prune(_scores(tree, kid_BxC, config), going, wb)
    paths = jnp.take_along_axis(kid_paths, idx[..., None], axis=1)
    paths = jnp.where(kept[..., None], paths, tree_lib.NO_NODE)
    pool = jnp.concatenate([done, jnp.where(finished, kid_BxC, tree_lib.NO_NODE)], axis=1)
    idx, kept = operators.prune(_answer_rank(tree, pool, config), pool >= 0, wb)
    done = jnp.where(kept, jnp.take_along_axis(pool, idx, axis=1), tree_lib.NO_NODE)
    return i + 1, tree, paths, done, counters + spent

  _, tree, paths, done, counters = jax.lax.while_loop(
      cond, body, (jnp.array(0), tree, paths, done, counters))
  beams, _ = _leaves(paths)
  # Live beams are left only if no child ever finished (e.g. every candidate was cut).
  cand = jnp.concatenate([done, beams], axis=1)
  pick = jnp.argmax(_answer_rank(tree, cand, config), axis=1)
  leaf_B = jnp.maximum(jnp.take_along_axis(cand, pick[:, None], axis=1)[:, 0], 0)
  bi = jnp.arange(b)
  tokens, _, lengths = tree_lib.solutions(tree, bi, leaf_B, d, model.pad_id)
  return SearchResult(
      tokens_BxL=tokens, lengths_B=lengths, score_B=_scores(tree, leaf_B[:, None], config)[:, 0],
      terminal_B=tree.terminal_BxN[bi, leaf_B], policy_tokens_B=counters.policy_tokens_B,
      model_calls_B=counters.model_calls_B, tree=tree, extra={'leaf_B': leaf_B, 'beams_BxW': done})
