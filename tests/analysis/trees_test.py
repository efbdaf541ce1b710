"""rlm_jax.analysis.trees: layout and chosen path by hand, and the path against MCTS's own
answer on device."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rlm_jax.analysis import files
from rlm_jax.analysis import trees
from rlm_jax.search import export, mcts, toy


def test_children_of_sorts_by_id(hand):
  shuffled = {'nodes': [hand['nodes'][i] for i in (4, 2, 0, 3, 1)]}
  assert trees.children_of(shuffled) == {0: [1, 2], 1: [3, 4], 2: [], 3: [], 4: []}


def test_tree_layout_by_hand(hand):
  lay = trees.tree_layout(hand)
  # Leaves in depth-first order 3, 4, 2 sit at 0, 1, 2; node 1 over (0 + 1) / 2, root over (0.5 + 2) / 2.
  np.testing.assert_allclose(lay.x_N, [1.25, 0.5, 2.0, 0.0, 1.0])
  np.testing.assert_allclose(lay.y_N, [0, -1, -1, -2, -2])
  assert sorted(map(tuple, lay.edges_Ex2.tolist())) == [(0, 1), (0, 2), (1, 3), (1, 4)]
  # Node order in the file does not matter: same coordinates per id.
  shuffled = {'nodes': [hand['nodes'][i] for i in (4, 2, 0, 3, 1)]}
  lay2 = trees.tree_layout(shuffled)
  assert dict(zip([n['id'] for n in shuffled['nodes']], lay2.x_N)) == dict(zip(range(5), lay.x_N))


def test_tree_layout_of_a_deep_chain(node):
  """2000 steps deep: no recursion limit; every node of a chain sits over the one leaf."""
  chain = {'nodes': [node(i, i - 1, i, 1, 0.0) for i in range(2000)]}
  lay = trees.tree_layout(chain)
  assert lay.x_N.tolist() == [0.0] * 2000 and lay.y_N[-1] == -1999


def test_chosen_path_rules(hand):
  assert trees.chosen_path(hand) == [0, 1, 4]  # best terminal by q
  assert trees.chosen_path(dict(hand, chosen_path=[0, 2])) == [0, 2]  # the file's own path wins
  # No terminal: descend by visits; equal visits -> higher q; equal q -> lower id.
  no_term = {'nodes': [dict(n, terminal=False) for n in hand['nodes']]}
  assert trees.chosen_path(no_term) == [0, 1, 4]
  no_term['nodes'][4]['q'] = 0.2
  assert trees.chosen_path(no_term) == [0, 1, 3]
  # An unknown q (null) ranks below every known one.
  assert trees.chosen_path({'nodes': [dict(n, q=None) if n['id'] == 4 else n for n in hand['nodes']]}) == [0, 2]


def test_pick_tree(hand, node):
  small_solved = dict(hand, score=2)
  big_wrong = {'nodes': hand['nodes'] + [node(5, 3, 3, 1, 0.0)], 'score': 0}
  assert trees.pick_tree([big_wrong, small_solved]) == 1
  assert trees.pick_tree([dict(hand, score=0), big_wrong]) == 1


TOY = toy.ToyTask(num_actions=3, horizon=3, value_confidence=0.5, value_noise=0.2)
TOY_CFG = mcts.MCTSConfig(num_simulations=8, num_children=3, num_walkers=2, max_depth=3)


def test_chosen_path_matches_the_search_answer():
  """On exported trees without 'chosen_path', the answer node is the one MCTS's own rules pick
  on device: best terminal; most visited; best terminal with no terminal node (falls back)."""
  params = toy.make_params(jax.random.key(1), 4, TOY)
  search = jax.jit(functools.partial(mcts.mcts_search, model=toy.make_model(TOY), config=TOY_CFG))
  res = search(params, jax.random.key(3), *toy.prompts(4, TOY))
  no_term = res.tree.replace(terminal_BxN=jnp.zeros_like(res.tree.terminal_BxN))
  want = {'best_terminal': np.asarray(res.extra['leaf_B']),
          'most_visited': np.asarray(mcts.most_visited_leaf(res.tree, TOY_CFG.num_children, TOY_CFG.max_depth)),
          'fallback': np.asarray(mcts.answer_leaf(no_term, TOY_CFG))}
  assert (want['best_terminal'] != want['most_visited']).any(), 'pick a seed where the rules differ'
  for b in range(4):
    tree = export.tree_to_json(res.tree, b)
    files.validate_tree(tree)
    plain = {'nodes': [dict(n, terminal=False) for n in tree['nodes']]}
    got = {'best_terminal': trees.chosen_path(tree), 'most_visited': trees.chosen_path(plain),
           'fallback': trees.chosen_path(plain)}
    for rule, path in got.items():
      assert path[-1] == want[rule][b], (b, rule, path)
      assert path[0] == 0 and len(path) == tree['nodes'][path[-1]]['depth'] + 1
