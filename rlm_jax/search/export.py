"""Search trees out: JSON for analysis, per-step training targets for the value / PRM and policy.

`tree_to_json` writes one tree (one problem) as plain JSON. `path_targets` linearises a path
(the chosen answer, the best terminal, ...) into per-step targets: the node q-values as value /
PRM labels, and the one-step TD advantages Â(s_i) = r_i + gamma v(s_{i+1}) - v(s_i) with
v(s_{i+1}) = q(s_i) / gamma (`step_td_advantages` below, same conventions as
the tree: the q of a node is Q of the step into it, a terminal node's q is its reward).
`node_targets` gives targets over every node instead of one path (expert iteration): the
policy target of each step as its visit share (or softmax of q) among its siblings, and a
Monte Carlo value of each node's state from the verified terminals below it.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlm_jax.search import tree as tree_lib


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


def step_td_advantages(rewards_BxS, q_BxS, gamma, valid_BxS=None, v0_B=None, terminal_B=None):
  """One-step TD advantages of reasoning steps from MCTS q-values (blueprint, App. C).

  Â(s_i) = r_i + γ·v(s_{i+1}) − v(s_i), with v(s_{i+1}) = q(s_i)/γ.

  Convention: s_i is the state *before* step i (s_0 = the question), and q_BxS[:, i] = q(s_i)
  is the q-value stored on the tree node that step i creates, i.e. Q(s_i, step_i). So
    γ·v(s_{i+1}) = q_i                      (successor value, for every non-final step)
    v(s_i)       = q_{i-1}/γ  for i >= 1,   v(s_0) = v0_B (e.g. root q / γ; 0 if None)
  The final valid step of a terminal path leads to a terminal state, whose value is 0, so
  there γ·v(s_{i+1}) = 0 and Â = r_last − q_{last-1}/γ. This avoids counting the terminal
  reward twice when the terminal node's q already equals its reward (as in x1).

  Args:
    rewards_BxS: reward of each step (usually 0 except the terminal step).
    q_BxS: q-values of the nodes along each path.
    gamma: discount in (0, 1].
    valid_BxS: optional bool mask; valid steps must be a prefix of each row.
    v0_B: optional value of the question state s_0.
    terminal_B: optional bool, whether each path ends in a terminal step (default all True);
      a non-terminal (cut-off) path bootstraps with its last q.

  Returns:
    adv_BxS float32 (0 on invalid steps).
  """
  if not 0.0 < gamma <= 1.0:
    raise ValueError(f"gamma must be in (0, 1], got {gamma}")
  r_BxS = jnp.asarray(rewards_BxS, jnp.float32)
  q_BxS = jnp.asarray(q_BxS, jnp.float32)
  bsz = r_BxS.shape[0]
  valid_BxS = (jnp.ones(r_BxS.shape, bool) if valid_BxS is None else jnp.asarray(valid_BxS, bool))
  v0_B = jnp.zeros((bsz,), jnp.float32) if v0_B is None else jnp.asarray(v0_B, jnp.float32)
  terminal_B = jnp.ones((bsz,), bool) if terminal_B is None else jnp.asarray(terminal_B, bool)
  v_BxS = jnp.concatenate([v0_B[:, None], q_BxS[:, :-1] / gamma], axis=1)
  next_valid_BxS = jnp.concatenate([valid_BxS[:, 1:], jnp.zeros((bsz, 1), bool)], axis=1)
  is_last_BxS = valid_BxS & ~next_valid_BxS
  succ_BxS = jnp.where(is_last_BxS & terminal_B[:, None], 0.0, q_BxS)
  return jnp.where(valid_BxS, r_BxS + succ_BxS - v_BxS, 0.0)


# ------------------------------------------------------------------------------------------
# Targets over every node of a tree (expert iteration: AlphaZero / ExIt / ReST-MCTS*).


class NodeTargets(NamedTuple):
  """Per-node training targets of B trees (`node_targets`).

  weight_BxN: policy target of the step into each node: its share among its siblings (visit
    share or softmax of q), 0 for the root, unused slots and children of ineligible parents.
    The shares of an eligible parent's children sum to 1.
  value_BxN: Monte Carlo value of each node's state (`mc_values`); 0 where value_valid is False.
  value_valid_BxN: the node has a Monte Carlo value and enough visits (verified terminals
    always: their return is exact).
  solved_BxN: a verified solution (reward >= 1) lies in the node's subtree (the node is on a
    solved path).
  """

  weight_BxN: jax.Array
  value_BxN: jax.Array
  value_valid_BxN: jax.Array
  solved_BxN: jax.Array


def _used(tree: tree_lib.Tree):
  return jnp.arange(tree.num_slots)[None, :] < tree.num_nodes_B[:, None]


def _scatter_to_parent(tree: tree_lib.Tree, x_BxN, op: str):
  """Per-parent sum / max of `x_BxN` over each node's children, read back at the children:
  out[b, c] = reduce over siblings c' of c (the root and unused slots get the identity)."""
  b, n = x_BxN.shape
  bb = jnp.arange(b)[:, None]
  child = _used(tree) & (tree.parent_BxN >= 0)
  tgt = jnp.where(child, tree.parent_BxN, n)  # n = dropped
  if op == 'sum':
    red = jnp.zeros((b, n), x_BxN.dtype).at[bb, tgt].add(jnp.where(child, x_BxN, 0), mode='drop')
  else:
    red = jnp.full((b, n), -jnp.inf, x_BxN.dtype).at[bb, tgt].max(jnp.where(child, x_BxN, -jnp.inf), mode='drop')
  return red[bb, jnp.maximum(tree.parent_BxN, 0)], child


def sibling_shares(tree: tree_lib.Tree, kind: str = 'visits', temperature: float = 1.0,
                   min_parent_visits: int = 1) -> jax.Array:
  """Policy targets over the children of every expanded node (jittable, no loop over nodes).

  'visits' is AlphaZero's target: N(c) / sum of N over c's siblings (c included), which is
  N(c) / (N(parent) - 1) in a finished tree. 'q_softmax' is softmax(q / temperature) over the
  siblings: it sharpens towards the best-valued step whatever the visit budget was.

  Args:
    tree: search trees.
    kind: 'visits' or 'q_softmax'.
    temperature: softmax temperature of 'q_softmax' (> 0).
    min_parent_visits: children of a node with fewer visits get weight 0 (a node expanded
      once and never re-entered has uniform visit shares: no search happened below it).

  Returns:
    weight_BxN float32 (the root, unused slots and children of ineligible parents get 0).
  """
  if kind not in ('visits', 'q_softmax'):
    raise ValueError(f"sibling_shares: kind='{kind}' must be 'visits' or 'q_softmax'")
  if temperature <= 0:
    raise ValueError(f'sibling_shares: temperature={temperature} must be > 0')
  bb = jnp.arange(tree.batch_size)[:, None]
  if kind == 'visits':
    x_BxN = tree.visits_BxN.astype(jnp.float32)
  else:
    z_BxN = tree.q_BxN.astype(jnp.float32) / temperature
    zmax_BxN, _ = _scatter_to_parent(tree, z_BxN, 'max')  # per-parent max: a stable softmax
    x_BxN = jnp.exp(z_BxN - jnp.where(jnp.isfinite(zmax_BxN), zmax_BxN, 0.0))
  total_BxN, child_BxN = _scatter_to_parent(tree, x_BxN, 'sum')
  parent_visits_BxN = tree.visits_BxN[bb, jnp.maximum(tree.parent_BxN, 0)]
  ok_BxN = child_BxN & (parent_visits_BxN >= min_parent_visits) & (total_BxN > 0)
  return jnp.where(ok_BxN, x_BxN / jnp.where(ok_BxN, total_BxN, 1.0), 0.0)


def mc_values(tree: tree_lib.Tree, gamma: float, max_depth: int):
  """Monte Carlo value of every node's state from the verified terminals below it (jittable).

  Each evaluation of a verified terminal t (reward not NaN; a re-visit evaluates it again, so
  t counts N(t) times) backs its reward up to every ancestor s, discounted as the tree's q
  is (a node's q is gamma times its state value, a terminal's q its reward):
    V(s) = sum_t N(t) gamma^(d(t) - d(s) - 1) r(t) / sum_t N(t)   (s not terminal),
    V(t) = r(t)                                                   (t terminal, verified).
  With gamma = 1 this is the mean verified outcome of the subtree. Unlike the tree's q it
  holds no value-model estimate: nodes with no verified terminal below have no value.

  Args:
    tree: search trees (rewards of terminals from the verifier).
    gamma: the search's discount.
    max_depth: the search's max_depth (D).

  Returns:
    (value_BxN, has_BxN, solved_BxN): the values (0 where has is False), whether a verified
    terminal lies in the subtree, and whether one with reward >= 1 does.
  """
  b, n = tree.batch_size, tree.num_slots
  r_BxN = tree.reward_BxN
  term_BxN = _used(tree) & tree.terminal_BxN & ~jnp.isnan(r_BxN) & (jnp.arange(n)[None] > tree_lib.ROOT)
  r_BxN = jnp.where(term_BxN, r_BxN, 0.0)
  w_BxN = jnp.where(term_BxN, tree.visits_BxN, 0).astype(jnp.float32)
  win_BxN = term_BxN & (r_BxN >= 1.0)
  # Ancestors of every terminal: path_MxD[:, j] is the node at depth j + 1, the root is depth 0.
  b_M = jnp.repeat(jnp.arange(b), n)
  path_MxD = tree_lib.path_by_depth(tree, b_M, jnp.arange(b * n) % n, max_depth)
  anc_MxD1 = jnp.concatenate([jnp.zeros((b * n, 1), jnp.int32), path_MxD], axis=1)
  d_M = tree.depth_BxN.reshape(-1)
  j_D1 = jnp.arange(max_depth + 1)
  above_MxD1 = (j_D1[None] < d_M[:, None]) & term_BxN.reshape(-1)[:, None]  # strict ancestors
  disc_MxD1 = jnp.asarray(gamma, jnp.float32) ** jnp.maximum(d_M[:, None] - j_D1[None] - 1, 0)
  tgt_MxD1 = jnp.where(above_MxD1, anc_MxD1, n)  # n = dropped
  b_MxD1 = jnp.broadcast_to(b_M[:, None], tgt_MxD1.shape)
  add = lambda x_MxD1: jnp.zeros((b, n), jnp.float32).at[b_MxD1, tgt_MxD1].add(x_MxD1, mode='drop')
  w_MxD1 = jnp.broadcast_to(w_BxN.reshape(-1)[:, None], tgt_MxD1.shape)
  num_BxN = add(w_MxD1 * disc_MxD1 * r_BxN.reshape(-1)[:, None])
  den_BxN = add(w_MxD1)
  wins_BxN = add(jnp.broadcast_to(win_BxN.reshape(-1)[:, None], tgt_MxD1.shape).astype(jnp.float32))
  has_BxN = (den_BxN > 0) | term_BxN
  value_BxN = jnp.where(term_BxN, r_BxN, num_BxN / jnp.maximum(den_BxN, 1e-30))
  return (jnp.where(has_BxN, value_BxN, 0.0), has_BxN, (wins_BxN > 0) | win_BxN)


def sibling_advantages(tree: tree_lib.Tree, value_BxN, valid_BxN) -> jax.Array:
  """Step advantages against the siblings' mean (jittable, no loop over nodes):

    A(c) = V(c) - mean of V over the valued siblings of c (c included),

  for every child c with a value whose parent has at least two valued children (0 elsewhere).
  With V the Monte Carlo outcome of each subtree (`mc_values`, gamma = 1) this is the tree's
  own policy-gradient signal: steps whose subtrees were solved more often than their siblings'
  get A > 0, the rest A < 0, and the advantages of one parent's children sum to 0.

  Args:
    tree: search trees.
    value_BxN: a value per node (e.g. `mc_values`).
    valid_BxN: bool, which nodes have one.

  Returns:
    adv_BxN float32.
  """
  valid_BxN = jnp.asarray(valid_BxN, bool) & _used(tree) & (tree.parent_BxN >= 0)
  v_BxN = jnp.where(valid_BxN, jnp.asarray(value_BxN, jnp.float32), 0.0)
  total_BxN, child_BxN = _scatter_to_parent(tree, v_BxN, 'sum')
  count_BxN, _ = _scatter_to_parent(tree, valid_BxN.astype(jnp.float32), 'sum')
  ok_BxN = valid_BxN & child_BxN & (count_BxN >= 2)
  return jnp.where(ok_BxN, v_BxN - total_BxN / jnp.maximum(count_BxN, 1.0), 0.0)


def node_targets(tree: tree_lib.Tree, gamma: float, max_depth: int, *, kind: str = 'visits',
                 temperature: float = 1.0, min_visits: int = 1, min_parent_visits: int = 1) -> NodeTargets:
  """Policy and value targets over every node of every tree (jittable; see `sibling_shares`
  and `mc_values`). Non-terminal nodes with fewer than `min_visits` visits get no value
  target (too few evaluations below them); verified terminals always do.

  kind='advantage' makes the policy weight a signed advantage (`sibling_advantages` of the
  undiscounted Monte Carlo outcomes of the nodes that have a value target) instead of a share:
  the steps that lost to their siblings become negatives."""
  value_BxN, has_BxN, solved_BxN = mc_values(tree, gamma, max_depth)
  exact_BxN = tree.terminal_BxN & ~jnp.isnan(tree.reward_BxN)
  enough_BxN = (tree.visits_BxN >= min_visits) | exact_BxN
  valid_BxN = has_BxN & enough_BxN & (jnp.arange(tree.num_slots)[None] > 0)
  if kind == 'advantage':
    # Outcomes, not discounted values: with gamma < 1 a failed step whose failure comes later
    # would look better than a sibling that fails at once.
    outcome_BxN = value_BxN if gamma == 1.0 else mc_values(tree, 1.0, max_depth)[0]
    weight_BxN = sibling_advantages(tree, outcome_BxN, valid_BxN)
  else:
    weight_BxN = sibling_shares(tree, kind, temperature, min_parent_visits)
  return NodeTargets(weight_BxN, jnp.where(valid_BxN, value_BxN, 0.0), valid_BxN, solved_BxN)
