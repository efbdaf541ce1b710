"""Targets over every node of a tree (`export.node_targets`): hand-computed on a fixed tree, and
checked against a host walk on the MCTS trees of the toy task stored by mcts_test."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlm_jax.search import export
from rlm_jax.search import tree as tree_lib

PAD = 0
# Jitted once per static setting: eager dispatch of the scatter ops is slower than a compile.
shares = jax.jit(export.sibling_shares, static_argnums=(1, 2, 3))
mc_values = jax.jit(export.mc_values, static_argnums=(1, 2))
node_targets = jax.jit(export.node_targets, static_argnums=(1, 2),
                       static_argnames=('kind', 'temperature', 'min_visits', 'min_parent_visits'))


def test_policy_targets_are_the_visit_shares_of_siblings(hand_tree):
  tree = hand_tree
  assert tree_lib.invariant_errors(tree) == []
  w = shares(tree, 'visits', 1.0, 1)
  # root's children 1, 2: visits 1, 4 of 5; node 2's children 3, 4: visits 2, 1 of 3; node 5 alone.
  want = [0.0, 1 / 5, 4 / 5, 2 / 3, 1 / 3, 1.0, 0.0]
  np.testing.assert_allclose(w, [want, want], rtol=1e-6)
  # Parents with fewer than 3 visits (node 3: 2) give no target.
  w3 = shares(tree, 'visits', 1.0, 3)
  np.testing.assert_allclose(w3[0], [0.0, 0.2, 0.8, 2 / 3, 1 / 3, 0.0, 0.0], rtol=1e-6)


def test_q_softmax_targets(hand_tree):
  tree = hand_tree
  w = shares(tree, 'q_softmax', 0.5, 1)
  # softmax(q / 0.5) over siblings: root's children q -0.2, 0.6; node 2's 0.8, -1.0.
  e = np.exp
  want = [0.0, e(-0.4) / (e(-0.4) + e(1.2)), e(1.2) / (e(-0.4) + e(1.2)),
          e(1.6) / (e(1.6) + e(-2.0)), e(-2.0) / (e(1.6) + e(-2.0)), 1.0, 0.0]
  np.testing.assert_allclose(w[0], want, rtol=1e-5)
  np.testing.assert_allclose(w[0, 1], 0.16798, atol=1e-5)
  with pytest.raises(ValueError, match='kind'):
    export.sibling_shares(tree, 'prior')


def test_mc_values_are_discounted_means_of_verified_outcomes(hand_tree):
  tree = hand_tree
  g = 0.96
  v, has, solved = mc_values(tree, g, 3)
  # Node 3 (depth 2) sees node 5 (depth 3, +1) one step below: V = +1. Node 2 (depth 1) sees
  # node 4 (-1, one step) and node 5 (+1, two steps): (-1 + 0.96) / 2. The root: (-0.96 +
  # 0.96^2) / 2. Node 1 has no terminal below it; terminals are their reward.
  np.testing.assert_allclose(v[0], [(-g + g * g) / 2, 0.0, (-1 + g) / 2, 1.0, -1.0, 1.0, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(has[0], [True, False, True, True, True, True, False])
  np.testing.assert_array_equal(solved[0], [True, False, True, True, False, True, False])
  np.testing.assert_allclose(v[1], [(-g - g * g) / 2, 0.0, (-1 - g) / 2, -1.0, -1.0, -1.0, 0.0], rtol=1e-6)
  assert not np.asarray(solved[1]).any()
  # A re-visited terminal backs its reward up once per evaluation: node 4 seen 3 times.
  t2 = tree.replace(visits_BxN=tree.visits_BxN.at[:, 4].set(3).at[:, 2].set(6).at[:, 0].set(8))
  v2, _, _ = mc_values(t2, 1.0, 3)
  np.testing.assert_allclose(v2[0, 2], (3 * -1 + 1) / 4, rtol=1e-6)


def test_node_targets_exclude_nodes_under_min_visits(hand_tree):
  tree = hand_tree
  tg = node_targets(tree, 1.0, 3, min_visits=3)
  # Node 3 (2 visits) is dropped; node 2 (4 visits) and the verified terminals stay; the root,
  # node 1 (no terminal below) and the unused slot have no value target.
  np.testing.assert_array_equal(tg.value_valid_BxN[0], [False, False, True, False, True, True, False])
  np.testing.assert_allclose(tg.value_BxN[0], [0.0, 0.0, 0.0, 0.0, -1.0, 1.0, 0.0], atol=1e-6)
  tg2 = node_targets(tree, 1.0, 3, min_visits=2)
  np.testing.assert_array_equal(tg2.value_valid_BxN[0], [False, False, True, True, True, True, False])


GOLDEN = os.path.join(os.path.dirname(__file__), 'golden', 'mcts_toy.json')
GAMMA, DEPTH = 0.96, 3  # mcts_test.SAMPLED_CFG, which searched the golden trees


def golden_trees():
  """The two MCTS trees of the toy task stored by mcts_test (sampled steps, duplicates merged,
  two walkers) as Tree arrays (only the fields the targets read)."""
  with open(GOLDEN) as f:
    recs = json.load(f)
  b, n = len(recs), max(r['num_nodes'] for r in recs)
  prompt = jnp.ones((b, 1), jnp.int32)
  t = tree_lib.empty(prompt, prompt > 0, jnp.arange(b), num_nodes=n, step_len=1, pad_id=PAD,
                     root_value_B=jnp.zeros(b))
  a = {k: np.array(np.asarray(getattr(t, k))) for k in ('parent_BxN', 'depth_BxN', 'visits_BxN', 'q_BxN',
                                                       'reward_BxN', 'terminal_BxN', 'first_child_BxN',
                                                       'num_children_BxN')}
  for i, r in enumerate(recs):
    for nd in r['nodes']:
      c = nd['id']
      a['parent_BxN'][i, c], a['depth_BxN'][i, c], a['visits_BxN'][i, c] = nd['parent'], nd['depth'], nd['visits']
      a['q_BxN'][i, c], a['terminal_BxN'][i, c] = nd['q'], nd['terminal']
      a['reward_BxN'][i, c] = np.nan if nd['reward'] is None else nd['reward']
      if nd['children']:
        a['first_child_BxN'][i, c], a['num_children_BxN'][i, c] = nd['children'][0], len(nd['children'])
  return t.replace(num_nodes_B=jnp.array([r['num_nodes'] for r in recs]), **{k: jnp.asarray(v) for k, v in a.items()})


def test_on_searched_toy_trees_shares_are_visit_fractions_and_mc_values_match_a_host_walk():
  tree = golden_trees()
  assert tree_lib.invariant_errors(tree) == []
  t = tree_lib.to_numpy(tree)
  w = np.asarray(shares(tree, 'visits', 1.0, 1))
  for b in range(t.parent_BxN.shape[0]):
    for s in range(int(t.num_nodes_B[b])):
      first, cnt = int(t.first_child_BxN[b, s]), int(t.num_children_BxN[b, s])
      if first >= 0:
        np.testing.assert_allclose(w[b, first:first + cnt].sum(), 1.0, rtol=1e-5)
        np.testing.assert_allclose(w[b, first:first + cnt],
                                   t.visits_BxN[b, first:first + cnt] / (t.visits_BxN[b, s] - 1), rtol=1e-5)
  # A host reference for the Monte Carlo values: walk every terminal's ancestors.
  v, has, _ = mc_values(tree, GAMMA, DEPTH)
  checked = 0
  for b in range(t.parent_BxN.shape[0]):
    num, den = {}, {}
    for c in range(1, int(t.num_nodes_B[b])):
      if t.terminal_BxN[b, c] and not np.isnan(t.reward_BxN[b, c]):
        a = int(t.parent_BxN[b, c])
        while a >= 0:
          k = int(t.depth_BxN[b, c]) - int(t.depth_BxN[b, a]) - 1
          num[a] = num.get(a, 0.0) + t.visits_BxN[b, c] * GAMMA ** k * t.reward_BxN[b, c]
          den[a] = den.get(a, 0.0) + t.visits_BxN[b, c]
          a = int(t.parent_BxN[b, a])
    for a in den:
      if not t.terminal_BxN[b, a]:
        np.testing.assert_allclose(v[b, a], num[a] / den[a], rtol=1e-5, atol=1e-6)
    assert set(np.nonzero(np.asarray(has[b]) & ~t.terminal_BxN[b])[0]) == set(den)
    checked += len(den)
  assert checked >= 4  # the golden trees hold verified terminals under several nodes
