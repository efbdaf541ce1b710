"""Search trees out: JSON for analysis, per-step training targets for the value / PRM and policy.

`tree_to_json` writes one tree (one problem) as plain JSON. `path_targets` linearises a path
(the chosen answer, the best terminal, ...) into per-step targets: the node q-values as value /
PRM labels, and the one-step TD advantages Â(s_i) = r_i + gamma v(s_{i+1}) - v(s_i) with
v(s_{i+1}) = q(s_i) / gamma (`training.advantages.step_td_advantages`, same conventions as
the tree: the q of a node is Q of the step into it, a terminal node's q is its reward).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlm_jax.search import tree as tree_lib
from rlm_jax.training.advantages import step_td_advantages


def _num(x) -> Optional[float]:
  x = float(x)
  return None if math.isnan(x) else round(x, 6)


def tree_to_json(tree: tree_lib.Tree, index: int,
                 decode: Optional[Callable[[Sequence[int]], str]] = None) -> dict:
  """One problem's tree as a JSON-ready dict.

  Args:
    tree: the search trees (device or host arrays).
    index: which problem (row of the batch).
    decode: token ids -> text (e.g. `tokenizer.decode`); None keeps the ids as lists.

  Returns:
    {'prompt', 'num_nodes', 'nodes': [{'id', 'parent', 'depth', 'text', 'visits', 'q', 'value',
    'prior', 'logprob', 'terminal', 'reward', 'children'}]}, nodes in index order; 'reward' is
    null where no verifier ran.
  """
  t = tree_lib.to_numpy(jax.tree.map(lambda x: x[index], tree))
  n = int(t.num_nodes_B)
  text = (lambda ids: decode([int(i) for i in ids])) if decode else (lambda ids: [int(i) for i in ids])
  prompt = t.prompt_BxLp[t.prompt_mask_BxLp]
  nodes = []
  for i in range(n):
    length = int(t.step_len_BxN[i])
    step = t.step_tokens_BxNxL[i, t.step_tokens_BxNxL.shape[1] - length:] if length else []
    first, cnt = int(t.first_child_BxN[i]), int(t.num_children_BxN[i])
    nodes.append({
        'id': i, 'parent': int(t.parent_BxN[i]), 'depth': int(t.depth_BxN[i]), 'text': text(step),
        'visits': int(t.visits_BxN[i]), 'q': _num(t.q_BxN[i]), 'value': _num(t.value_BxN[i]),
        'prior': _num(t.prior_BxN[i]), 'logprob': _num(t.logprob_BxN[i]),
        'terminal': bool(t.terminal_BxN[i]), 'reward': _num(t.reward_BxN[i]),
        'children': list(range(first, first + cnt)) if first >= 0 else []})
  return {'prompt': text(prompt), 'problem': int(t.problem_B), 'num_nodes': n, 'nodes': nodes}


class StepTargets(NamedTuple):
  """Per-step targets along one path per problem (S = max_depth steps).

  q_BxS: q of the node each step creates (value / PRM label of that step).
  reward_BxS: reward of each step (the terminal step's verifier reward, or its q when no
    verifier ran; 0 elsewhere).
  adv_BxS: one-step TD advantages.
  valid_BxS: steps on the path.
  node_BxS: tree node of each step (-1 past the path).
  terminal_B: the path ends in a terminal step.
  """

  q_BxS: jax.Array
  reward_BxS: jax.Array
  adv_BxS: jax.Array
  valid_BxS: jax.Array
  node_BxS: jax.Array
  terminal_B: jax.Array


def path_targets(tree: tree_lib.Tree, leaf_B: jax.Array, gamma: float, max_depth: int) -> StepTargets:
  """Training targets along the path root -> leaf_B of every tree (jittable).

  Args:
    tree: search trees.
    leaf_B: last node of the path (e.g. `result.extra['leaf_B']`, `best_terminal_leaf`).
    gamma: the search's discount.
    max_depth: the search's max_depth (S).

  Returns:
    StepTargets; v(s_0) is the root's q / gamma.
  """
  b = leaf_B.shape[0]
  bi = jnp.arange(b)
  node = tree_lib.path_by_depth(tree, bi, leaf_B, max_depth)
  valid = node >= 0
  nc = jnp.maximum(node, 0)
  q = jnp.where(valid, tree.q_BxN[bi[:, None], nc], 0.0)
  terminal = tree.terminal_BxN[bi, leaf_B] & (leaf_B > 0)
  depth = tree.depth_BxN[bi, leaf_B]
  last = jnp.arange(max_depth)[None, :] == (depth - 1)[:, None]
  r_leaf = tree.reward_BxN[bi, leaf_B]
  r_leaf = jnp.where(jnp.isnan(r_leaf), tree.q_BxN[bi, leaf_B], r_leaf)
  reward = jnp.where(last & terminal[:, None], r_leaf[:, None], 0.0)
  adv = step_td_advantages(reward, q, gamma, valid_BxS=valid, v0_B=tree.q_BxN[:, 0] / gamma,
                           terminal_B=terminal)
  return StepTargets(q, reward, adv, valid, jnp.where(valid, node, tree_lib.NO_NODE), terminal)


def targets_to_records(tree: tree_lib.Tree, targets: StepTargets,
                       decode: Callable[[Sequence[int]], str]) -> list[dict]:
  """PRM-style records (as TRL): {'prompt', 'completions': [step texts], 'labels': [q], 'advantages'}."""
  t = tree_lib.to_numpy(tree)
  tg = jax.tree.map(np.asarray, targets)
  out = []
  for b in range(tg.q_BxS.shape[0]):
    steps, labels, advs = [], [], []
    for s in np.nonzero(tg.valid_BxS[b])[0]:
      node = int(tg.node_BxS[b, s])
      length = int(t.step_len_BxN[b, node])
      ids = t.step_tokens_BxNxL[b, node, t.step_tokens_BxNxL.shape[2] - length:]
      steps.append(decode([int(i) for i in ids]))
      labels.append(float(tg.q_BxS[b, s]))
      advs.append(float(tg.adv_BxS[b, s]))
    prompt = decode([int(i) for i in t.prompt_BxLp[b][t.prompt_mask_BxLp[b]]])
    out.append({'prompt': prompt, 'completions': steps, 'labels': labels, 'advantages': advs,
                'terminal': bool(tg.terminal_B[b])})
  return out
