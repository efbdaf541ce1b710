"""Step-level beam search on the toy task: PRM guidance finds the path, counters, early stop."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlm_jax.search import beam
from rlm_jax.search import toy
from rlm_jax.search import tree as tree_lib

TASK = toy.ToyTask(num_actions=3, horizon=3, enumerate=True, value_confidence=0.8, reward_kind='path')


def _run(task, cfg, params, n, with_value=True):
  f = jax.jit(functools.partial(beam.beam_search, model=toy.make_model(task, with_value=with_value),
                                config=cfg))
  return f(params, jax.random.key(0), *toy.prompts(n, task))


def test_value_guided_beam_finds_target_and_counts_compute():
  n = 5
  params = toy.make_params(jax.random.key(1), n, TASK, skill=0.0, noise=1.0)
  cfg = beam.BeamConfig(beam_width=2, expansions=3, max_depth=3)
  res = _run(TASK, cfg, params, n)
  got = np.asarray(res.tokens_BxL)[:, 0:6:2] - TASK.first_id
  np.testing.assert_array_equal(got, np.asarray(params['target']))
  np.testing.assert_allclose(res.score_B, 1.0)
  assert np.asarray(res.terminal_B).all()
  assert tree_lib.invariant_errors(res.tree) == []
  # Level 0: 3 children of the root; levels 1, 2: 2 beams x 3.
  np.testing.assert_array_equal(res.tree.num_nodes_B, 1 + 3 + 6 + 6)
  np.testing.assert_array_equal(res.policy_tokens_B, (3 + 6 + 6) * 2)
  # root value + 15 samples + values of the 9 non-terminal children (terminals: verifier).
  np.testing.assert_array_equal(res.model_calls_B, 1 + 15 + 9)


def test_without_value_the_beam_is_blind():
  n = 12
  params = toy.make_params(jax.random.key(1), n, TASK, skill=0.0, noise=1.0)
  res = _run(TASK, beam.BeamConfig(beam_width=2, expansions=3, max_depth=3), params, n, with_value=False)
  # All non-terminal scores tie at 0, so the kept beams are the first candidates, not the target.
  hits = (np.asarray(res.score_B) == 1.0).mean()
  assert hits < 0.5


def test_stops_when_all_beams_finished():
  task = toy.ToyTask(num_actions=3, horizon=2, enumerate=True, value_confidence=0.8)
  params = toy.make_params(jax.random.key(2), 3, task)
  res = _run(task, beam.BeamConfig(beam_width=2, expansions=3, max_depth=5), params, 3)
  np.testing.assert_array_equal(res.tree.num_nodes_B, 1 + 3 + 6)  # no level after depth 2
  assert np.asarray(res.terminal_B).all()
  np.testing.assert_array_equal(res.lengths_B, 4)


def test_min_score_is_the_lowest_value_on_the_path():
  task = toy.ToyTask(num_actions=3, horizon=3, enumerate=True, value_confidence=0.8, value_noise=0.1)
  params = toy.make_params(jax.random.key(3), 2, task)
  res = _run(task, beam.BeamConfig(beam_width=2, expansions=3, max_depth=3, score='min'), params, 2)
  t = tree_lib.to_numpy(res.tree)
  for b in range(2):
    node, vals = int(res.extra['leaf_B'][b]), []
    while node > 0:
      vals.append(t.value_BxN[b, node])
      node = t.parent_BxN[b, node]
    assert float(res.score_B[b]) == pytest.approx(min(vals), abs=1e-6)


def test_finished_answer_is_kept_when_a_live_beam_scores_higher():
  """Width 1, two actions. Level 0: node 1 ends the solution (value .5, reward +1), node 2 goes
  on (value .9). Level 1 expands node 2 into terminal nodes 5 / 6 (values .1 / .2, reward -1).
  The old prune ranked node 1 against node 2 for the single slot and lost it, answering node 6
  (score .2, wrong); kept apart, node 1 (.5) beats both late answers."""
  a, depth = 2, 3
  model = toy.make_table_model(a, depth)
  params = toy.table_params(a, depth, {
      1: dict(terminal=True, value=0.5, reward=1.0), 2: dict(value=0.9),
      5: dict(terminal=True, value=0.1), 6: dict(terminal=True, value=0.2)})
  cfg = beam.BeamConfig(beam_width=1, expansions=2, max_depth=depth)
  blind = model._replace(reward_fn=None)  # inference: terminal steps are scored by the PRM
  res = jax.jit(functools.partial(beam.beam_search, model=blind, config=cfg))(
      params, jax.random.key(0), *toy.prompts(1, TASK))
  np.testing.assert_array_equal(res.tokens_BxL[0, :2], [TASK.first_id + 0, TASK.eos_id])
  assert int(res.lengths_B[0]) == 2 and bool(res.terminal_B[0])
  assert float(res.score_B[0]) == pytest.approx(0.5)
  mask = np.arange(res.tokens_BxL.shape[1]) < np.asarray(res.lengths_B)[:, None]
  assert float(model.reward_fn(params, res.tokens_BxL, mask, jnp.zeros(1, jnp.int32))[0]) == 1.0
  assert tree_lib.invariant_errors(res.tree) == []
  # Level 0: root -> 2 candidates; level 1: only the live beam (node 2) -> 2; 2 tokens each.
  assert int(res.policy_tokens_B[0]) == 8 and int(res.tree.num_nodes_B[0]) == 5


def test_config_errors():
  with pytest.raises(ValueError, match="beam.score='avg'"):
    beam.BeamConfig(score='avg')
  with pytest.raises(ValueError, match='beam.beam_width=0'):
    beam.BeamConfig(beam_width=0)
