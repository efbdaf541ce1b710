"""Tree layout: packing, paths, node states, solutions and the invariant checker."""
import jax.numpy as jnp
import numpy as np

from rlm_jax.search import tree as tree_lib

PAD = 0


def _hand_tree():
  """root 0 -> {1, 2}; 2 -> {3, 4}; 3 -> {5}. Steps (left-padded in 3 slots)."""
  prompt = jnp.array([[PAD, 7, 8]])
  t = tree_lib.empty(prompt, prompt != PAD, jnp.array([4]), num_nodes=7, step_len=3, pad_id=PAD,
                     root_value_B=jnp.array([0.25]))
  steps = np.zeros((1, 7, 3), np.int32)
  lens = np.zeros((1, 7), np.int32)
  for node, toks in {1: [11, 3], 2: [21, 22, 3], 3: [31, 3], 4: [41, 2], 5: [51, 2]}.items():
    steps[0, node, 3 - len(toks):] = toks
    lens[0, node] = len(toks)
  parent = np.array([[-1, 0, 0, 2, 2, 3, -1]])
  depth = np.array([[0, 1, 1, 2, 2, 3, 0]])
  visits = np.array([[6, 1, 4, 2, 1, 1, 0]])
  first = np.array([[1, -1, 3, 5, -1, -1, -1]])
  count = np.array([[2, 0, 2, 1, 0, 0, 0]])
  term = np.array([[False, False, False, False, True, True, False]])
  return t.replace(parent_BxN=jnp.asarray(parent), depth_BxN=jnp.asarray(depth),
                   visits_BxN=jnp.asarray(visits), first_child_BxN=jnp.asarray(first),
                   num_children_BxN=jnp.asarray(count), terminal_BxN=jnp.asarray(term),
                   step_tokens_BxNxL=jnp.asarray(steps), step_len_BxN=jnp.asarray(lens),
                   num_nodes_B=jnp.array([6]))


def test_pack_both_alignments():
  tok = jnp.array([[0, 5, 0, 6, 7, 0]])
  mask = tok != 0
  left, lmask, n = tree_lib.pack(tok, mask, PAD, align='left')
  np.testing.assert_array_equal(left, [[5, 6, 7, 0, 0, 0]])
  np.testing.assert_array_equal(lmask, [[1, 1, 1, 0, 0, 0]])
  right, rmask, _ = tree_lib.pack(tok, mask, PAD, align='right')
  np.testing.assert_array_equal(right, [[0, 0, 0, 5, 6, 7]])
  np.testing.assert_array_equal(rmask, [[0, 0, 0, 1, 1, 1]])
  assert int(n[0]) == 3


def test_left_pad_steps():
  tok = jnp.array([[[5, 3, 0, 0], [6, 7, 8, 2]]])
  out = tree_lib.left_pad_steps(tok, jnp.array([[2, 4]]), PAD)
  np.testing.assert_array_equal(out, [[[0, 0, 5, 3], [6, 7, 8, 2]]])


def test_paths_states_and_solutions():
  t = _hand_tree()
  b = jnp.zeros((4,), jnp.int32)
  nodes = jnp.array([0, 1, 4, 5])
  path = tree_lib.path_by_depth(t, b, nodes, 3)
  np.testing.assert_array_equal(path, [[-1, -1, -1], [1, -1, -1], [2, 4, -1], [2, 3, 5]])
  st = tree_lib.node_states(t, b, nodes, 3, PAD)
  width = 3 + 3 * 3
  assert st.tokens_MxT.shape == (4, width)
  want = [[7, 8], [7, 8, 11, 3], [7, 8, 21, 22, 3, 41, 2], [7, 8, 21, 22, 3, 31, 3, 51, 2]]
  for row, w in enumerate(want):
    np.testing.assert_array_equal(st.tokens_MxT[row, width - len(w):], w)
    assert int(st.mask_MxT[row].sum()) == len(w) and bool(st.mask_MxT[row, -1])
  np.testing.assert_array_equal(st.depth_M, [0, 1, 2, 3])
  np.testing.assert_array_equal(st.problem_M, [4, 4, 4, 4])
  sol, smask, lens = tree_lib.solutions(t, b, nodes, 3, PAD)
  np.testing.assert_array_equal(lens, [0, 2, 5, 7])
  np.testing.assert_array_equal(sol[3, :7], [21, 22, 3, 31, 3, 51, 2])
  assert not bool(smask[3, 7:].any())


def test_children_index_and_add_visits():
  t = _hand_tree()
  kids = tree_lib.children_index(t, 2)
  np.testing.assert_array_equal(kids[0, :4], [[1, 2], [-1, -1], [3, 4], [5, -1]])
  t2 = tree_lib.add_visits(t, jnp.array([0]), jnp.array([3]), jnp.array([2]), 3)
  np.testing.assert_array_equal(t2.visits_BxN[0, :6], [8, 1, 6, 4, 1, 1])


def test_invariants_accept_good_and_name_bad_trees():
  t = _hand_tree()
  assert tree_lib.invariant_errors(t) == []
  bad = t.replace(visits_BxN=t.visits_BxN.at[0, 2].set(5))
  assert any('node 2: visits 5 != 1 + 3' in e for e in tree_lib.invariant_errors(bad))
  bad = t.replace(parent_BxN=t.parent_BxN.at[0, 4].set(1))
  assert any('node 4: parent 1' in e for e in tree_lib.invariant_errors(bad))
  # Two expansions claiming the same slot = a node written twice.
  bad = t.replace(first_child_BxN=t.first_child_BxN.at[0, 1].set(2),
                  num_children_BxN=t.num_children_BxN.at[0, 1].set(1))
  assert any('child of both' in e for e in tree_lib.invariant_errors(bad))
  bad = t.replace(visits_BxN=t.visits_BxN.at[0, 6].set(1))
  assert any('unused slots' in e for e in tree_lib.invariant_errors(bad))
