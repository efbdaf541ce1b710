"""The search tree: a struct of preallocated `[B, N]` arrays, one tree per problem.

Node 0 is the root (the question). A node is a reasoning step; its state is "prompt + the steps
on its path". Layout choices, and why:

* Children of a node are created together by one expansion and get consecutive indices, so a
  node stores `first_child` and `num_children` instead of a `[B, N, K]` child table. Duplicate
  candidates are merged before indices are handed out, so the range has no holes. This keeps
  every per-node array `[B, N]` (K times less memory to carry through the search loop);
  `children_index` materialises the `[B, N, K]` view for analysis.
* Each node keeps only its own step tokens (`step_tokens_BxNxL`, left-padded within the L
  slots). The state of a batch of nodes is rebuilt on demand: gather the steps of the nodes
  on the path (`path_states`; MCTS and beam search already hold the paths, `node_states`
  walks parent pointers with `max_depth` gathers) and pack prompt + steps into one
  left-padded row; a new child's state is its parent's row plus its step. A stored per-node
  prefix would cost `N x (Lp + D*L)` tokens per tree and a copy on every expansion; the
  gather costs `M x D x L` per model call, noise next to the model itself.
* q conventions (x1 / blueprint App. C): `q` of a node is Q(parent state, step into the node)
  = r + gamma * V(node state); rewards come only at terminal steps, so a terminal node's q is
  its reward (or the value model's estimate of it), a fresh node's q is gamma times its value
  (`value`, the value model's V of its state) and an expanded node's q is gamma times the
  (weighted) mean of its children's q. Fresh and expanded siblings are thus on one scale, and
  q / gamma is the node's state value (what `export.path_targets` reads). The root's q is
  gamma * V(question) until it is expanded.
* `visits` counts evaluations in the subtree: a new node starts at 1 (its own evaluation) and
  every evaluation below it, or a re-visit of a terminal / depth-capped leaf, adds 1. Hence
  visits(s) = 1 + sum of visits over the children of every expanded node s.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from rlm_jax.search.base import NodeBatch

ROOT = 0
NO_NODE = -1


@chex.dataclass(frozen=True)
class Tree:
  """B search trees with room for N nodes each (see the module docstring).

  Attributes:
    parent_BxN: parent index; -1 for the root and for unused slots.
    depth_BxN: steps from the root.
    visits_BxN: evaluations in the subtree (0 = unused slot).
    q_BxN: backed-up Q of the step into the node.
    value_BxN: the node's first evaluation (value model, verifier reward, rollout mix).
    prior_BxN: prior of the step into the node, normalised over its siblings.
    logprob_BxN: log pi of the step's tokens (sum).
    reward_BxN: verifier reward of a terminal node; NaN where none was computed.
    terminal_BxN: the step ended the solution (EOS).
    first_child_BxN: index of the first child; -1 while the node is unexpanded.
    num_children_BxN: number of children (consecutive from first_child).
    step_tokens_BxNxL: the node's step, left-padded (its last token in the last slot).
    step_len_BxN: real tokens in the step.
    num_nodes_B: slots in use (nodes are 0 .. num_nodes - 1).
    prompt_BxLp, prompt_mask_BxLp: the question, left-padded.
    problem_B: problem id of each tree (handed to the reward callable).
    q_min_B, q_max_B: running min / max of every non-root q seen (+inf / -inf before the
      first), for normalising q in selection.
  """

  parent_BxN: jax.Array
  depth_BxN: jax.Array
  visits_BxN: jax.Array
  q_BxN: jax.Array
  value_BxN: jax.Array
  prior_BxN: jax.Array
  logprob_BxN: jax.Array
  reward_BxN: jax.Array
  terminal_BxN: jax.Array
  first_child_BxN: jax.Array
  num_children_BxN: jax.Array
  step_tokens_BxNxL: jax.Array
  step_len_BxN: jax.Array
  num_nodes_B: jax.Array
  prompt_BxLp: jax.Array
  prompt_mask_BxLp: jax.Array
  problem_B: jax.Array
  q_min_B: jax.Array
  q_max_B: jax.Array

  @property
  def batch_size(self) -> int:
    return self.parent_BxN.shape[0]

  @property
  def num_slots(self) -> int:
    return self.parent_BxN.shape[1]

  @property
  def step_len(self) -> int:
    return self.step_tokens_BxNxL.shape[2]


def empty(prompt_BxLp, prompt_mask_BxLp, problem_B, num_nodes: int, step_len: int, pad_id: int,
          root_value_B, gamma: float = 1.0) -> Tree:
  """A batch of trees holding only an evaluated, unexpanded root.

  Args:
    prompt_BxLp, prompt_mask_BxLp: left-padded questions.
    problem_B: int problem ids.
    num_nodes: slots per tree (N), the root included.
    step_len: L, tokens per step slot.
    pad_id: filler token.
    root_value_B: value of the question state (the root's value; its q is gamma times it).
    gamma: the search's discount.

  Returns:
    Tree with num_nodes_B = 1.
  """
  b, n = prompt_BxLp.shape[0], num_nodes
  root_value_B = root_value_B.astype(jnp.float32)
  f32 = lambda: jnp.zeros((b, n), jnp.float32)
  return Tree(
      parent_BxN=jnp.full((b, n), NO_NODE, jnp.int32),
      depth_BxN=jnp.zeros((b, n), jnp.int32),
      visits_BxN=jnp.zeros((b, n), jnp.int32).at[:, ROOT].set(1),
      q_BxN=f32().at[:, ROOT].set(gamma * root_value_B),
      value_BxN=f32().at[:, ROOT].set(root_value_B),
      prior_BxN=f32().at[:, ROOT].set(1.0),
      logprob_BxN=f32(),
      reward_BxN=jnp.full((b, n), jnp.nan, jnp.float32),
      terminal_BxN=jnp.zeros((b, n), bool),
      first_child_BxN=jnp.full((b, n), NO_NODE, jnp.int32),
      num_children_BxN=jnp.zeros((b, n), jnp.int32),
      step_tokens_BxNxL=jnp.full((b, n, step_len), pad_id, jnp.int32),
      step_len_BxN=jnp.zeros((b, n), jnp.int32),
      num_nodes_B=jnp.ones((b,), jnp.int32),
      prompt_BxLp=prompt_BxLp.astype(jnp.int32),
      prompt_mask_BxLp=prompt_mask_BxLp.astype(bool),
      problem_B=problem_B.astype(jnp.int32),
      # The root is nobody's sibling: its value does not widen the bounds.
      q_min_B=jnp.full((b,), jnp.inf, jnp.float32),
      q_max_B=jnp.full((b,), -jnp.inf, jnp.float32),
  )


# ------------------------------------------------------------------------------------------
# Token plumbing.


def pack(tokens_MxL, mask_MxL, pad_id: int, *, align: str):
  """Moves the real tokens of each row together, keeping their order.

  Args:
    tokens_MxL: int tokens with padding anywhere.
    mask_MxL: True on real tokens.
    pad_id: filler.
    align: 'left' (real tokens first: right-padded) or 'right' (real tokens last: left-padded,
      the layout of sampler prompts).

  Returns:
    (tokens_MxL, mask_MxL, lengths_M).
  """
  m, l = tokens_MxL.shape
  mask_MxL = mask_MxL.astype(bool)
  n_M = mask_MxL.sum(axis=1).astype(jnp.int32)
  rank_MxL = jnp.cumsum(mask_MxL, axis=1, dtype=jnp.int32) - 1
  if align == 'left':
    dest_MxL = rank_MxL
    out_mask = jnp.arange(l)[None, :] < n_M[:, None]
  elif align == 'right':
    dest_MxL = (l - n_M)[:, None] + rank_MxL
    out_mask = jnp.arange(l)[None, :] >= (l - n_M)[:, None]
  else:
    raise ValueError(f"pack: align='{align}' must be 'left' or 'right'")
  dest_MxL = jnp.where(mask_MxL, dest_MxL, l)  # out of bounds: dropped
  rows = jnp.arange(m)[:, None]
  out = jnp.full((m, l), pad_id, tokens_MxL.dtype).at[rows, dest_MxL].set(tokens_MxL, mode='drop')
  return out, out_mask, n_M


def left_pad_steps(tokens_MxKxL, lengths_MxK, pad_id: int):
  """Right-padded sampler output -> left-padded step slots (the stored layout)."""
  l = tokens_MxKxL.shape[-1]
  shift_MxK = l - lengths_MxK
  src = jnp.arange(l) - shift_MxK[..., None]
  valid = src >= 0
  out = jnp.take_along_axis(tokens_MxKxL, jnp.clip(src, 0, l - 1), axis=-1)
  return jnp.where(valid, out, pad_id)


def step_mask(tree: Tree, b_M, node_M):
  """Real-token mask of stored (left-padded) steps: `[..., L]`."""
  l = tree.step_len
  length = tree.step_len_BxN[b_M, node_M]
  return jnp.arange(l) >= (l - length)[..., None]


# ------------------------------------------------------------------------------------------
# Paths and node states.


def path_by_depth(tree: Tree, b_M, node_M, max_depth: int):
  """Nodes on the path root -> node, by depth.

  Args:
    tree: the trees.
    b_M: tree index of each query node.
    node_M: node index (its depth must be <= max_depth).
    max_depth: D.

  Returns:
    path_MxD: column j holds the path's node at depth j + 1, or -1 past the node's depth.
  """
  depth_M = tree.depth_BxN[b_M, node_M]

  def up(cur_M, _):
    parent_M = tree.parent_BxN[b_M, jnp.maximum(cur_M, 0)]
    nxt_M = jnp.where(cur_M > ROOT, parent_M, NO_NODE)
    return nxt_M, jnp.where(cur_M > ROOT, cur_M, NO_NODE)

  # anc[k] = ancestor k levels up (anc[0] = the node itself).
  _, anc_DxM = jax.lax.scan(up, node_M.astype(jnp.int32), None, length=max_depth)
  anc_MxD = anc_DxM.T
  j_D = jnp.arange(max_depth)
  idx_MxD = jnp.clip(depth_M[:, None] - 1 - j_D[None, :], 0, max_depth - 1)
  path_MxD = jnp.take_along_axis(anc_MxD, idx_MxD, axis=1)
  return jnp.where(j_D[None, :] < depth_M[:, None], path_MxD, NO_NODE)


def path_steps(tree: Tree, b_M, path_MxD):
  """Step tokens on the paths: (tokens_MxDxL, mask_MxDxL)."""
  node_MxD = jnp.maximum(path_MxD, 0)
  b_MxD = jnp.broadcast_to(b_M[:, None], node_MxD.shape)
  tokens = tree.step_tokens_BxNxL[b_MxD, node_MxD]
  mask = step_mask(tree, b_MxD, node_MxD) & (path_MxD >= 0)[..., None]
  return tokens, mask


def node_states(tree: Tree, b_M, node_M, max_depth: int, pad_id: int) -> NodeBatch:
  """The states of M nodes as left-padded token rows of width Lp + max_depth * L.

  Args:
    tree: the trees.
    b_M: tree of each node.
    node_M: node index (clipped to a valid slot by the caller; depth <= max_depth).
    max_depth: D.
    pad_id: filler token.

  Returns:
    NodeBatch (prompt + path steps, packed to the right; problem ids from the tree).
  """
  return path_states(tree, b_M, path_by_depth(tree, b_M, node_M, max_depth), pad_id)


def path_states(tree: Tree, b_M, path_MxD, pad_id: int) -> NodeBatch:
  """Like `node_states`, from known paths (`path_MxD[:, j]` = node at depth j + 1, or -1):
  selection already walked them, so no parent walk is needed."""
  m = path_MxD.shape[0]
  steps, smask = path_steps(tree, b_M, path_MxD)
  src = jnp.concatenate([tree.prompt_BxLp[b_M], steps.reshape(m, -1)], axis=1)
  src_mask = jnp.concatenate([tree.prompt_mask_BxLp[b_M], smask.reshape(m, -1)], axis=1)
  tokens, mask, _ = pack(src, src_mask, pad_id, align='right')
  depth_M = jnp.sum(path_MxD >= 0, axis=1).astype(jnp.int32)
  return NodeBatch(tokens, mask, depth_M, tree.problem_B[b_M])


def solutions(tree: Tree, b_M, node_M, max_depth: int, pad_id: int):
  """The steps on each node's path, concatenated and right-padded (no prompt).

  Returns:
    (tokens_MxL, mask_MxL, lengths_M) with L = max_depth * step_len.
  """
  m = node_M.shape[0]
  path_MxD = path_by_depth(tree, b_M, node_M, max_depth)
  steps, smask = path_steps(tree, b_M, path_MxD)
  return pack(steps.reshape(m, -1), smask.reshape(m, -1), pad_id, align='left')


def add_visits(tree: Tree, b_M, node_M, delta_M, max_depth: int) -> Tree:
  """Adds `delta_M` visits to each node and all its ancestors (the root included)."""
  path_MxD = path_by_depth(tree, b_M, node_M, max_depth)
  full = jnp.concatenate([jnp.zeros_like(path_MxD[:, :1]), path_MxD], axis=1)
  live = (full >= 0) & (delta_M[:, None] > 0)
  idx = jnp.where(live, full, tree.num_slots)
  b_MxD = jnp.broadcast_to(b_M[:, None], idx.shape)
  add = jnp.broadcast_to(delta_M[:, None], idx.shape).astype(jnp.int32)
  return tree.replace(visits_BxN=tree.visits_BxN.at[b_MxD, idx].add(add, mode='drop'))


def children_index(tree: Tree, num_children: int) -> jax.Array:
  """`[B, N, K]` child indices (-1 where a node has fewer than K children)."""
  k_K = jnp.arange(num_children)
  idx = tree.first_child_BxN[..., None] + k_K
  return jnp.where(k_K < tree.num_children_BxN[..., None], idx, NO_NODE)


# ------------------------------------------------------------------------------------------
# Host-side checks (tests, debugging).


def invariant_errors(tree: Tree, max_errors: int = 20) -> list[str]:
  """Structural invariants of a finished tree, checked on host. Returns violations (empty = ok).

  Checks, per tree: the root has no parent and depth 0; used slots are exactly
  0..num_nodes-1; children ranges of distinct nodes are disjoint and cover 1..num_nodes-1
  (so no node was written twice); parent and depth agree with the ranges; visits of an
  expanded node = 1 + sum over its children; terminal nodes have no children; unused slots
  are untouched.
  """
  t = jax.tree.map(np.asarray, tree)
  errors: list[str] = []

  def err(msg):
    if len(errors) < max_errors:
      errors.append(msg)

  for b in range(t.parent_BxN.shape[0]):
    n = int(t.num_nodes_B[b])
    if t.parent_BxN[b, 0] != NO_NODE or t.depth_BxN[b, 0] != 0:
      err(f'tree {b}: root has parent {t.parent_BxN[b, 0]} / depth {t.depth_BxN[b, 0]}')
    owner = np.full(n, -1)
    for s in range(n):
      first, cnt = int(t.first_child_BxN[b, s]), int(t.num_children_BxN[b, s])
      if first == NO_NODE:
        if cnt:
          err(f'tree {b} node {s}: {cnt} children but no first child')
        if t.visits_BxN[b, s] < 1:
          err(f'tree {b} node {s}: used leaf with {t.visits_BxN[b, s]} visits')
        continue
      if t.terminal_BxN[b, s]:
        err(f'tree {b} node {s}: terminal node was expanded')
      if cnt < 1 or first < 1 or first + cnt > n:
        err(f'tree {b} node {s}: children range [{first}, {first + cnt}) outside 1..{n - 1}')
        continue
      for c in range(first, first + cnt):
        if owner[c] != -1:
          err(f'tree {b} node {c}: child of both {owner[c]} and {s}')
        owner[c] = s
        if t.parent_BxN[b, c] != s:
          err(f'tree {b} node {c}: parent {t.parent_BxN[b, c]}, but in the range of {s}')
        if t.depth_BxN[b, c] != t.depth_BxN[b, s] + 1:
          err(f'tree {b} node {c}: depth {t.depth_BxN[b, c]} under depth {t.depth_BxN[b, s]}')
      kids = t.visits_BxN[b, first:first + cnt].sum()
      if t.visits_BxN[b, s] != 1 + kids:
        err(f'tree {b} node {s}: visits {t.visits_BxN[b, s]} != 1 + {kids} (children)')
    orphans = [c for c in range(1, n) if owner[c] == -1]
    if orphans:
      err(f'tree {b}: nodes {orphans[:5]} are in no children range')
    if n < t.parent_BxN.shape[1]:
      if (t.visits_BxN[b, n:] != 0).any() or (t.parent_BxN[b, n:] != NO_NODE).any():
        err(f'tree {b}: unused slots >= {n} were written')
  return errors


def to_numpy(tree: Tree) -> Any:
  return jax.tree.map(np.asarray, tree)
