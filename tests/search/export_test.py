"""Tree -> JSON and per-step training targets, on a hand-built tree."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from rlm_jax.search import export
from rlm_jax.search import tree as tree_lib

PAD = 0


def _tree():
  """root 0 -> {1, 2}; 2 -> {3, 4}; 3 -> {5 (terminal, reward 1)}; q values set by hand."""
  prompt = jnp.array([[PAD, 7, 8]])
  t = tree_lib.empty(prompt, prompt != PAD, jnp.array([0]), num_nodes=7, step_len=3, pad_id=PAD,
                     root_value_B=jnp.array([0.5]))
  steps = np.zeros((1, 7, 3), np.int32)
  lens = np.zeros((1, 7), np.int32)
  for node, toks in {1: [11, 3], 2: [21, 22, 3], 3: [31, 3], 4: [41, 2], 5: [51, 2]}.items():
    steps[0, node, 3 - len(toks):] = toks
    lens[0, node] = len(toks)
  a = lambda x: jnp.asarray(np.array([x]))
  return t.replace(
      parent_BxN=a([-1, 0, 0, 2, 2, 3, -1]), depth_BxN=a([0, 1, 1, 2, 2, 3, 0]),
      visits_BxN=a([6, 1, 4, 2, 1, 1, 0]), first_child_BxN=a([1, -1, 3, 5, -1, -1, -1]),
      num_children_BxN=a([2, 0, 2, 1, 0, 0, 0]),
      terminal_BxN=a([False, False, False, False, True, True, False]),
      q_BxN=a([0.5, -0.2, 0.6, 0.8, -1.0, 1.0, 0.0]).astype(jnp.float32),
      reward_BxN=a([np.nan, np.nan, np.nan, np.nan, -1.0, 1.0, np.nan]).astype(jnp.float32),
      prior_BxN=a([1.0, 0.3, 0.7, 0.5, 0.5, 1.0, 0.0]).astype(jnp.float32),
      step_tokens_BxNxL=jnp.asarray(steps), step_len_BxN=jnp.asarray(lens), num_nodes_B=jnp.array([6]))


def test_tree_to_json_fields_and_text():
  decode = lambda ids: ' '.join(str(i) for i in ids)
  out = export.tree_to_json(_tree(), 0, decode)
  json.dumps(out)  # plain JSON
  assert out['prompt'] == '7 8' and out['num_nodes'] == 6
  n2, n5 = out['nodes'][2], out['nodes'][5]
  assert n2 == {'id': 2, 'parent': 0, 'depth': 1, 'text': '21 22 3', 'visits': 4, 'q': 0.6, 'value': 0.0,
                'prior': 0.7, 'logprob': 0.0, 'terminal': False, 'reward': None, 'children': [3, 4]}
  assert n5['terminal'] and n5['reward'] == 1.0 and n5['children'] == [] and n5['text'] == '51 2'
  assert export.tree_to_json(_tree(), 0)['nodes'][1]['text'] == [11, 3]


def test_path_targets_by_hand():
  g = 0.9
  tg = export.path_targets(_tree(), jnp.array([5]), g, max_depth=4)
  np.testing.assert_array_equal(tg.node_BxS, [[2, 3, 5, -1]])
  np.testing.assert_allclose(tg.q_BxS, [[0.6, 0.8, 1.0, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(tg.reward_BxS, [[0, 0, 1.0, 0]])
  want = [0.6 - 0.5 / g, 0.8 - 0.6 / g, 1.0 - 0.8 / g, 0.0]
  np.testing.assert_allclose(tg.adv_BxS, [want], rtol=1e-5, atol=1e-6)
  assert bool(tg.terminal_B[0])
  # A cut-off path bootstraps with its last q instead of a reward.
  tg = export.path_targets(_tree(), jnp.array([3]), g, max_depth=4)
  np.testing.assert_allclose(tg.adv_BxS, [[0.6 - 0.5 / g, 0.8 - 0.6 / g, 0, 0]], rtol=1e-5, atol=1e-6)
  assert not bool(tg.terminal_B[0])


def test_records_for_prm_training():
  t = _tree()
  tg = export.path_targets(t, jnp.array([5]), 0.9, max_depth=4)
  rec = export.targets_to_records(t, tg, lambda ids: ''.join(chr(60 + i % 60) for i in ids))
  assert len(rec) == 1 and len(rec[0]['completions']) == 3
  assert rec[0]['labels'] == pytest.approx([0.6, 0.8, 1.0])
  assert rec[0]['terminal']
