"""Search trees as exported (the TREE format of `files`): structure, the answer's path, layout.

Plain Python and NumPy on the node lists; drawing is in `plots`, tables in `frames`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np


def children_of(tree: Mapping) -> dict[int, list[int]]:
  """Node id -> child ids in ascending order."""
  kids: dict[int, list[int]] = {n['id']: [] for n in tree['nodes']}
  for n in tree['nodes']:
    if n['parent'] != -1:
      kids[n['parent']].append(n['id'])
  return {k: sorted(v) for k, v in kids.items()}


def node_q(node: Mapping) -> float:
  """A node's q as a float; NaN where the export has none."""
  return float('nan') if node['q'] is None else float(node['q'])


def chosen_path(tree: Mapping) -> list[int]:
  """Node ids of the answer's path, root first.

  The tree's own "chosen_path" when present; else MCTS's 'best_terminal' rule
  (`search.mcts.answer_leaf`): the terminal node with the highest q (ties: lowest id), or, with
  no terminal node, descend from the root by visits (ties: higher q, then lower id).
  """
  if tree.get('chosen_path'):
    return [int(i) for i in tree['chosen_path']]
  by_id = {n['id']: n for n in tree['nodes']}
  terminals = [n for n in tree['nodes'] if n['terminal'] and n['parent'] != -1]
  if terminals:
    best = max(terminals, key=lambda n: (np.nan_to_num(node_q(n), nan=-np.inf), -n['id']))
    path = [best['id']]
    while by_id[path[-1]]['parent'] != -1:
      path.append(by_id[path[-1]]['parent'])
    return path[::-1]
  kids = children_of(tree)
  node = next(n['id'] for n in tree['nodes'] if n['parent'] == -1)
  path = [node]
  while kids[node]:
    node = max(kids[node], key=lambda c: (by_id[c]['visits'], np.nan_to_num(node_q(by_id[c]), nan=-np.inf), -c))
    path.append(node)
  return path


def pick_tree(trees: Sequence[Mapping]) -> int:
  """Index of the most instructive tree: the largest whose answer was solved (score 2), else the
  largest (ties: the first)."""
  if not trees:
    raise ValueError('pick_tree: no trees')
  key = lambda i: (trees[i].get('score') == 2, len(trees[i]['nodes']), -i)
  return max(range(len(trees)), key=key)


class TreeLayout(NamedTuple):
  """Drawing coordinates, aligned with `tree['nodes']` (N nodes, E = N - 1 edges)."""

  x_N: np.ndarray  # leaves at 0, 1, 2, ... in depth-first order; a parent above its children
  y_N: np.ndarray  # -depth
  edges_Ex2: np.ndarray  # (parent row, child row) into the node list


def tree_layout(tree: Mapping) -> TreeLayout:
  """Tidy layout: leaves spaced 1 apart in depth-first order (children by id), each parent
  centred over its first and last child, depth downwards."""
  nodes = tree['nodes']
  row = {n['id']: i for i, n in enumerate(nodes)}
  kids = children_of(tree)
  root = next(n['id'] for n in nodes if n['parent'] == -1)
  x = np.zeros(len(nodes))
  next_leaf = 0
  # Iterative post-order: deep trees would hit Python's recursion limit.
  stack = [(root, False)]
  while stack:
    node, done = stack.pop()
    if kids[node] and not done:
      stack.append((node, True))
      stack.extend((c, False) for c in reversed(kids[node]))
    elif kids[node]:
      x[row[node]] = 0.5 * (x[row[kids[node][0]]] + x[row[kids[node][-1]]])
    else:
      x[row[node]] = next_leaf
      next_leaf += 1
  y = -np.asarray([n['depth'] for n in nodes], dtype=np.float64)
  edges = np.asarray([(row[n['parent']], i) for i, n in enumerate(nodes) if n['parent'] != -1],
                     dtype=np.int64).reshape(-1, 2)
  return TreeLayout(x, y, edges)
