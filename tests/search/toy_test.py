"""The scripted toy task behaves as documented (tests and benchmarks rely on it)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from rlm_jax.search import toy
from rlm_jax.search import tree as tree_lib
from rlm_jax.search.base import NodeBatch

TASK = toy.ToyTask(num_actions=3, horizon=3, value_confidence=0.5)
PARAMS = {'target': jnp.array([[2, 0, 1]]), 'logits': jnp.array([[[0.0, 0.0, 9.0], [9.0, 0.0, 0.0],
                                                                   [0.0, 9.0, 0.0]]])}


def _state(actions, gap=0):
  """Right-aligned node state for a path of actions (optionally with padding gaps)."""
  toks = [TASK.first_id + 3]
  for j, a in enumerate(actions):
    toks += [TASK.first_id + a] + [TASK.pad_id] * gap + [TASK.step_id]
  t = 12
  row = np.full((1, t), TASK.pad_id, np.int32)
  row[0, t - len(toks):] = toks
  return NodeBatch(jnp.asarray(row), jnp.asarray(row != TASK.pad_id), jnp.array([len(actions)]), jnp.array([0]))


def test_policy_follows_logits_until_a_wrong_step():
  model = toy.make_model(TASK)
  s = model.policy_fn(PARAMS, jax.random.key(0), _state([2]), 1, to_end=True, greedy=True)
  np.testing.assert_array_equal(s.tokens_MxKxL[0, 0], [20, 3, 21, 2, 0, 0])  # actions 0 then 1, EOS, padding
  assert bool(s.terminal_MxK[0, 0]) and int(s.lengths_MxK[0, 0]) == 4
  # After a wrong first step the policy is lost: uniform logits, so greedy takes action 0.
  s = model.policy_fn(PARAMS, jax.random.key(0), _state([1]), 1, to_end=True, greedy=True)
  np.testing.assert_array_equal(s.tokens_MxKxL[0, 0], [20, 3, 20, 2, 0, 0])
  np.testing.assert_allclose(s.logprob_MxK[0, 0], 2 * np.log(1 / 3), rtol=1e-5)


def test_value_reads_each_step_end_and_tolerates_gaps():
  model = toy.make_model(TASK)
  v = model.value_fn(PARAMS, _state([2, 1]))
  assert float(v[0, -3]) == 0.5 and float(v[0, -1]) == -0.5  # after step 1 right, after step 2 wrong
  gapped = model.value_fn(PARAMS, _state([2, 1], gap=1))
  assert float(gapped[0, -1]) == -0.5


def test_reward_final_and_path():
  sol = lambda acts, end=TASK.eos_id: [x for j, a in enumerate(acts) for x in
                                       (TASK.first_id + a, end if j == len(acts) - 1 else TASK.step_id)]
  rows = [sol([2, 0, 1]), sol([0, 0, 1]), sol([2, 0, 0]), sol([2, 0, 1], end=TASK.step_id)]
  tok, mask, _ = tree_lib.pack(jnp.asarray(rows), jnp.ones((4, 6), bool), 0, align='left')
  final = toy.make_model(TASK).reward_fn(PARAMS, tok, mask, jnp.zeros(4, jnp.int32))
  np.testing.assert_array_equal(final, [1, 1, -1, -1])
  path = toy.make_model(dataclasses.replace(TASK, reward_kind='path')).reward_fn(PARAMS, tok, mask, jnp.zeros(4, jnp.int32))
  np.testing.assert_array_equal(path, [1, -1, -1, -1])


def test_table_model_reads_its_tables():
  """Two actions, depth 2: nodes 0; 1, 2; 3..6 (child a of n is 2n + 1 + a)."""
  params = toy.table_params(2, 2, {2: dict(value=0.7, logprob=-0.1), 5: dict(terminal=True, value=-0.2, reward=1.0),
                                   1: dict(terminal=True, value=0.3)})
  np.testing.assert_array_equal(toy.table_node_ids(2, jnp.array([[1, 0], [0, 1]]), jnp.array([[True, True], [True, False]])),
                                [5, 1])
  model = toy.make_table_model(2, 2)
  root = NodeBatch(jnp.array([[23, 23]]), jnp.ones((1, 2), bool), jnp.array([0]), jnp.array([0]))
  s = model.policy_fn(params, jax.random.key(0), root, 3, to_end=False, greedy=False)
  np.testing.assert_array_equal(s.tokens_MxKxL[0], [[20, 2], [21, 3], [20, 2]])  # action k mod 2; node 1 ends
  np.testing.assert_array_equal(s.terminal_MxK[0], [True, False, True])
  np.testing.assert_allclose(s.logprob_MxK[0], [np.log(0.5), -0.1, np.log(0.5)], rtol=1e-6)
  # Completion from the root: action 0 (node 1) is terminal, so it stops after one step.
  c = model.policy_fn(params, jax.random.key(0), root, 1, to_end=True, greedy=True)
  np.testing.assert_array_equal(c.tokens_MxKxL[0, 0], [20, 2, 0, 0])
  state = NodeBatch(jnp.array([[23, 21, 3, 20, 2]]), jnp.ones((1, 5), bool), jnp.array([2]), jnp.array([0]))
  np.testing.assert_allclose(model.value_fn(params, state)[0], [0.0, 0.0, 0.7, 0.7, -0.2], atol=1e-6)
  sol = jnp.array([[21, 3, 20, 2], [21, 3, 21, 2]])
  np.testing.assert_array_equal(model.reward_fn(params, sol, jnp.ones((2, 4), bool), jnp.zeros(2, jnp.int32)),
                                [1.0, -1.0])
