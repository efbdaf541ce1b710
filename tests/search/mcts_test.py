"""MCTS on the scripted toy task: hand-computed trees, known answers, invariants, golden tree."""
import dataclasses
import functools
import json
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlm_jax.search import export
from rlm_jax.search import mcts as mcts_lib
from rlm_jax.search import toy
from rlm_jax.search import tree as tree_lib

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden', 'mcts_toy.json')


@functools.lru_cache(maxsize=None)
def _search(task: toy.ToyTask, config: mcts_lib.MCTSConfig, with_value=True, with_reward=True):
  model = toy.make_model(task, with_value=with_value, with_reward=with_reward)
  return jax.jit(functools.partial(mcts_lib.mcts_search, model=model, config=config))


def _np(tree):
  return tree_lib.to_numpy(tree)


# ------------------------------------------------------------------------------------------
# A two-level tree computed by hand.

EXACT_TASK = toy.ToyTask(num_actions=2, horizon=2, enumerate=True, value_confidence=0.4)
EXACT_PARAMS = {'target': jnp.array([[1, 0]]), 'logits': jnp.array([[[0.0, 1.0], [0.5, 0.0]]])}


@pytest.mark.parametrize('backup', ['td', 'mean'])
def test_two_simulations_by_hand(backup):
  """Sim 0 expands the root into a (wrong, value -c) and b (right, +c), whose q are gamma times
  their values; PUCT then picks b (normalised q (1 -+ gamma c) / 2 on the fixed [-1, 1]
  bounds, and the larger prior), whose children are terminal with rewards +1 / -1."""
  cfg = mcts_lib.MCTSConfig(num_simulations=2, num_children=2, num_walkers=1, max_depth=2, gamma=0.9,
                            backup=backup, prior='logprob')  # enumerated steps: pi, not a sample share
  pr, pm = toy.prompts(1, EXACT_TASK)
  res = _search(EXACT_TASK, cfg)(EXACT_PARAMS, jax.random.key(0), pr, pm)
  t = _np(res.tree)
  c, g = 0.4, 0.9
  assert int(t.num_nodes_B[0]) == 5
  np.testing.assert_array_equal(t.parent_BxN[0], [-1, 0, 0, 2, 2])
  np.testing.assert_array_equal(t.visits_BxN[0], [5, 1, 3, 1, 1])
  e = math.e
  np.testing.assert_allclose(t.prior_BxN[0, 1:3], [1 / (1 + e), e / (1 + e)], rtol=1e-5)
  np.testing.assert_allclose(t.reward_BxN[0, 3:], [1.0, -1.0])
  np.testing.assert_allclose(t.value_BxN[0, 1:3], [-c, c], atol=1e-6)
  if backup == 'td':  # q(s) = gamma * sum N q / sum N
    want = [g * (1 * -g * c + 3 * 0.0) / 4, -g * c, 0.0, 1.0, -1.0]
  else:  # q(s) = gamma * (v0 + sum N q) / (1 + sum N), v0(root) = 0
    q2 = g * (c + (1.0 - 1.0)) / 3
    want = [g * (0.0 + 1 * -g * c + 3 * q2) / 5, -g * c, q2, 1.0, -1.0]
  np.testing.assert_allclose(t.q_BxN[0], want, atol=1e-6)
  # best terminal = node 3: actions (1, 0).
  np.testing.assert_array_equal(res.tokens_BxL[0], [21, 3, 20, 2])
  assert float(res.score_B[0]) == 1.0 and bool(res.terminal_B[0])
  # 2 expansions x 2 candidates x 2 tokens; calls: root value + 4 samples + 2 non-terminal values.
  assert int(res.policy_tokens_B[0]) == 8
  assert int(res.model_calls_B[0]) == 1 + 4 + 2


# ------------------------------------------------------------------------------------------
# Search fixes, each on numbers computed by hand.


def _hand_tree(q, prior, visits, first_child=None, num_children=None):
  """One tree: the root (node 0) and its children 1..n-1 at depth 1, unexpanded."""
  n = len(q)
  t = tree_lib.empty(*toy.prompts(1, EXACT_TASK), jnp.array([0]), num_nodes=n + 4, step_len=2, pad_id=0,
                     root_value_B=jnp.zeros((1,)))
  pad = lambda x, fill: jnp.asarray(np.array([list(x) + [fill] * 4]))
  return t.replace(
      parent_BxN=pad([-1] + [0] * (n - 1), -1), depth_BxN=pad([0] + [1] * (n - 1), 0),
      visits_BxN=pad(visits, 0), q_BxN=pad(q, 0.0).astype(jnp.float32),
      prior_BxN=pad(prior, 0.0).astype(jnp.float32),
      first_child_BxN=pad(first_child or [1] + [-1] * (n - 1), -1),
      num_children_BxN=pad(num_children or [n - 1] + [0] * (n - 1), 0),
      num_nodes_B=jnp.array([n]), q_min_B=jnp.array([min(q[1:])]), q_max_B=jnp.array([max(q[1:])]))


def test_virtual_loss_weighs_a_pending_expansion_like_its_k_visits():
  """Root (3 visits) with children a (q .96) and b (q -.6), 1 visit and prior .5 each; K = 2.

  Normalised q (fixed bounds): a .98, b .2; pb = c1 + log((N + c2 + 1) / c2) ~ 1.2502.
  Walker 1: a 0.98 + .5 sqrt(3) / 2 pb = 1.521 > b 0.2 + .541 -> a, an expansion that will
  add K = 2 visits. Walker 2 with that virtual loss (v = 2 virtual visits of value 0):
  a .98 / 3 + .5 sqrt(5) / 4 pb = .676 < b .2 + .5 sqrt(5) / 2 pb = .899 -> b. With the old
  single virtual visit: a .49 + .5 * 2 / 3 pb = .907 > b .2 + .625 = .825, so walker 2 landed
  on a again and sat the simulation out.
  """
  tree = _hand_tree(q=[0.0, 0.96, -0.6], prior=[1.0, 0.5, 0.5], visits=[3, 1, 1])
  cfg = mcts_lib.MCTSConfig(num_children=2, num_walkers=2, max_depth=3)
  paths = np.asarray(jax.jit(mcts_lib.select_leaves, static_argnums=1)(tree, cfg))
  np.testing.assert_array_equal(paths[0, :, :2], [[0, 1], [0, 2]])
  expand, revisit = mcts_lib.walker_roles(tree, jnp.asarray(paths), cfg)
  np.testing.assert_array_equal(expand, [[True, True]])
  # One virtual visit per walker (virtual_loss = 1 / K) reproduces the old collision.
  half = dataclasses.replace(cfg, virtual_loss=0.5)
  paths = np.asarray(jax.jit(mcts_lib.select_leaves, static_argnums=1)(tree, half))
  np.testing.assert_array_equal(paths[0, :, :2], [[0, 1], [0, 1]])
  expand, revisit = mcts_lib.walker_roles(tree, jnp.asarray(paths), half)
  np.testing.assert_array_equal(expand | revisit, [[True, False]])  # walker 2 idles


def test_fixed_q_bounds_versus_running_min_max():
  """Children q .30 / .34 with priors .8 / .2, 1 visit each, root 3 visits; explore term
  prior * sqrt(3) / 2 * pb = .866 / .217. Fixed [-1, 1]: qn .65 / .67 -> 1.516 vs .887,
  picks the likely step; running bounds [.30, .34] stretch the .04 gap to qn 0 / 1 ->
  .866 vs 1.217, picks the other."""
  tree = _hand_tree(q=[0.0, 0.30, 0.34], prior=[1.0, 0.8, 0.2], visits=[3, 1, 1])
  pick = lambda cfg: int(np.asarray(jax.jit(mcts_lib.select_leaves, static_argnums=1)(tree, cfg))[0, 0, 1])
  assert pick(mcts_lib.MCTSConfig(num_children=2, max_depth=3)) == 1  # default: fixed
  assert pick(mcts_lib.MCTSConfig(num_children=2, max_depth=3, q_bounds='running')) == 2


def test_running_bounds_ignore_the_root():
  """The root's value (+.5 + the toy's 0) is nobody's sibling: after one simulation the running
  bounds are the children's q, gamma * (-c, +c) = (-.36, .36), not [-.36, .5]."""
  base = toy.make_model(EXACT_TASK)

  def value_fn(params, nodes):
    return base.value_fn(params, nodes) + jnp.where(nodes.depth_M == 0, 0.5, 0.0)[:, None]

  cfg = mcts_lib.MCTSConfig(num_simulations=1, num_children=2, max_depth=2, gamma=0.9, q_bounds='running')
  res = jax.jit(functools.partial(mcts_lib.mcts_search, model=base._replace(value_fn=value_fn), config=cfg))(
      EXACT_PARAMS, jax.random.key(0), *toy.prompts(1, EXACT_TASK))
  np.testing.assert_allclose([res.tree.q_min_B[0], res.tree.q_max_B[0]], [-0.36, 0.36], atol=1e-6)
  np.testing.assert_allclose(res.tree.q_BxN[0, 0], 0.9 * (-0.4 * 0.9 + 0.4 * 0.9) / 2, atol=1e-6)


@pytest.mark.parametrize('prior, want', [
    # Candidates are actions (0, 1, 0), pi = (1, e) / (1 + e). Old rule, softmax over the 3
    # samples then summed: 2 pi0 / (2 pi0 + pi1) = 2 / (2 + e).
    ('logprob', [1 / (1 + math.e), math.e / (1 + math.e)]),  # pi over the unique steps
    ('empirical', [2 / 3, 1 / 3]),  # share of the 3 samples
    ('uniform', [0.5, 0.5]),
])
def test_priors_over_unique_children(prior, want):
  cfg = mcts_lib.MCTSConfig(num_simulations=1, num_children=3, max_depth=2, prior=prior)
  res = _search(EXACT_TASK, cfg)(EXACT_PARAMS, jax.random.key(0), *toy.prompts(1, EXACT_TASK))
  assert int(res.tree.num_nodes_B[0]) == 3  # the duplicate of action 0 was merged
  np.testing.assert_allclose(res.tree.prior_BxN[0, 1:3], want, rtol=1e-5)


@pytest.mark.parametrize('backup', ['td', 'mean'])
def test_expanding_a_node_keeps_its_q_under_an_exact_value_model(backup):
  """A = 3 actions, H = 2, final-action reward: every depth-1 state has 3 enumerated terminal
  children, one +1 and two -1, so its exact value is -1/3, which the scripted value model
  returns for every state. Sim 0 creates 3 depth-1 children with q = gamma * (-1/3); sim 1
  expands the first (largest prior): its q = gamma * mean(+1, -1, -1) (td) or
  gamma * (-1/3 + 3 * (-1/3)) / 4 (mean) = gamma * (-1/3) as well. The old rule (fresh
  q = V, -1/3) put the expanded node at -.3 and its siblings at -.333."""
  task = toy.ToyTask(num_actions=3, horizon=2, enumerate=True, value_confidence=0.0)
  base = toy.make_model(task)
  model = base._replace(value_fn=lambda params, nodes: jnp.full(nodes.tokens_MxT.shape, -1 / 3, jnp.float32))
  params = {'target': jnp.array([[1, 2]]), 'logits': jnp.array([[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])}
  g = 0.9
  cfg = mcts_lib.MCTSConfig(num_simulations=2, num_children=3, max_depth=2, gamma=g, backup=backup,
                            prior='logprob')
  res = jax.jit(functools.partial(mcts_lib.mcts_search, model=model, config=cfg))(
      params, jax.random.key(0), *toy.prompts(1, task))
  t = _np(res.tree)
  np.testing.assert_array_equal(t.first_child_BxN[0, :4], [1, 4, -1, -1])
  np.testing.assert_allclose(t.reward_BxN[0, 4:7], [-1.0, -1.0, 1.0])
  np.testing.assert_allclose(t.q_BxN[0, 1:4], [-g / 3] * 3, atol=1e-6)
  np.testing.assert_array_equal(t.visits_BxN[0, :4], [7, 4, 1, 1])
  root = g * (-g / 3) if backup == 'td' else g * (-1 / 3 + 6 * (-g / 3)) / 7
  np.testing.assert_allclose(t.q_BxN[0, 0], root, atol=1e-6)


def test_gumbel_root_pick_by_hand():
  """Root children q .2 / .6 / -.4, equal priors; fixed bounds give qn .6 / .8 / .3 and
  sigma = (50 + max N) * .1 * qn = 3.06 / 4.08 / 1.53 with one simulation each. Only children
  with the schedule's simulation count compete: all three -> node 2; node 2 already ahead ->
  node 1; Gumbel noise 5 on node 3 lifts it to 6.53 -> node 3."""
  tree = _hand_tree(q=[0.0, 0.2, 0.6, -0.4], prior=[1.0, 1 / 3, 1 / 3, 1 / 3], visits=[4, 1, 1, 1])
  cfg = mcts_lib.MCTSConfig(num_children=3, max_depth=3, root_selection='gumbel')
  pick = lambda g, sims, considered: int(mcts_lib.gumbel_root_pick(
      tree, jnp.array([g], jnp.float32), jnp.array([sims]), jnp.array([considered]), cfg)[0])
  assert pick([0.0, 0.0, 0.0], [1, 1, 1], 1) == 2
  assert pick([0.0, 0.0, 0.0], [1, 2, 1], 1) == 1
  assert pick([0.0, 0.0, 5.0], [1, 1, 1], 1) == 3
  with pytest.raises(ValueError, match='root_selection=gumbel needs num_walkers=1'):
    mcts_lib.MCTSConfig(root_selection='gumbel', num_walkers=2)


def test_gumbel_root_spreads_simulations_by_sequential_halving():
  """K = 3 enumerated root children (actions 0, 1 wrong, 2 right), S = 1 + 6, PRM values
  +-c = .5 everywhere (no verifier), gamma .96. The schedule (mctx) considers 0, 0, 0, 1, 1, 2
  simulations: each child is entered once (q: gamma^2 (-.5) = -.461 for the wrong ones,
  gamma^2 (.5 - .5 - .5) / 3 = -.154 for the right one); the two best by q get one more
  (the right one, then the first wrong one on the tie; the right one drops to -.24); the
  better of those two one more: 2 / 1 / 3 simulations."""
  task = toy.ToyTask(num_actions=3, horizon=3, enumerate=True, value_confidence=0.5)
  params = {'target': jnp.array([[2, 0, 1]]), 'logits': jnp.zeros((1, 3, 3))}
  cfg = mcts_lib.MCTSConfig(num_simulations=7, num_children=3, max_depth=3, root_selection='gumbel',
                            gumbel_scale=0.0, prior='logprob')
  res = _search(task, cfg, with_reward=False)(params, jax.random.key(0), *toy.prompts(1, task))
  assert tree_lib.invariant_errors(res.tree) == []
  np.testing.assert_array_equal(res.extra['root_sims_BxK'], [[2, 1, 3]])
  g = 0.96
  np.testing.assert_allclose(res.tree.q_BxN[0, 2], g * g * -0.5, atol=1e-5)


def test_idle_walkers_reach_the_policy_as_empty_rows():
  """Simulation 0 has one leaf (the root) for W = 3 walkers: walkers 2 and 3 idle, and their
  rows reach the policy with an empty state (the sampler stops such rows before decoding)."""
  seen = []
  base = toy.make_model(EXACT_TASK)

  def policy_fn(params, key, nodes, num, *, to_end, greedy):
    jax.debug.callback(lambda live: seen.append(np.asarray(live)), nodes.mask_MxT.any(axis=1))
    return base.policy_fn(params, key, nodes, num, to_end=to_end, greedy=greedy)

  cfg = mcts_lib.MCTSConfig(num_simulations=1, num_children=2, num_walkers=3, max_depth=2)
  res = jax.jit(functools.partial(mcts_lib.mcts_search, model=base._replace(policy_fn=policy_fn), config=cfg))(
      EXACT_PARAMS, jax.random.key(0), *toy.prompts(1, EXACT_TASK))
  jax.block_until_ready(res.tree.q_BxN)
  assert len(seen) == 1
  np.testing.assert_array_equal(seen[0], [True, False, False])
  assert int(res.tree.num_nodes_B[0]) == 3 and int(res.policy_tokens_B[0]) == 4


# ------------------------------------------------------------------------------------------
# Known answer: the only +1 leaf among 27 must be found by search.

NEEDLE_TASK = toy.ToyTask(num_actions=3, horizon=3, enumerate=True, value_confidence=0.0,
                          reward_kind='path')


def _needle_params(n):
  params = toy.make_params(jax.random.key(3), n, NEEDLE_TASK, skill=0.0, noise=0.0)
  return params  # flat priors, uninformative values: only search finds the target


def test_finds_needle_path_with_several_walkers():
  n, sims, walkers = 6, 8, 4
  cfg = mcts_lib.MCTSConfig(num_simulations=sims, num_children=3, num_walkers=walkers, max_depth=3,
                            gamma=1.0)
  params = _needle_params(n)
  pr, pm = toy.prompts(n, NEEDLE_TASK)
  res = _search(NEEDLE_TASK, cfg)(params, jax.random.key(0), pr, pm)
  target = np.asarray(params['target'])
  got = np.asarray(res.tokens_BxL)[:, 0:6:2] - NEEDLE_TASK.first_id
  np.testing.assert_array_equal(got, target)
  np.testing.assert_allclose(res.score_B, 1.0)
  assert tree_lib.invariant_errors(res.tree) == []
  # The walkers spread: more than one expansion per simulation on average.
  expansions = (np.asarray(res.tree.first_child_BxN) >= 0).sum(axis=1)
  assert (expansions > sims).all()


def test_visits_concentrate_on_optimal_branch_as_simulations_grow():
  n = 6
  params = _needle_params(n)
  pr, pm = toy.prompts(n, NEEDLE_TASK)
  shares = []
  for sims in (16, 48):
    cfg = mcts_lib.MCTSConfig(num_simulations=sims, num_children=3, num_walkers=1, max_depth=3, gamma=1.0,
                              answer='most_visited')
    res = _search(NEEDLE_TASK, cfg)(params, jax.random.key(0), pr, pm)
    t = _np(res.tree)
    target0 = np.asarray(params['target'])[:, 0]
    best_child = 1 + target0  # enumerate: child k of the root is action k
    share = t.visits_BxN[np.arange(n), best_child] / (t.visits_BxN[:, 0] - 1)
    shares.append(share)
  assert (shares[1] > shares[0]).all(), shares
  assert (shares[1] > 0.6).all(), shares
  # With S=48 the most-visited path is the target path (one walker per tree).
  got = np.asarray(res.tokens_BxL)[:, 0:6:2] - NEEDLE_TASK.first_id
  np.testing.assert_array_equal(got, np.asarray(params['target']))


# ------------------------------------------------------------------------------------------
# Sampled candidates (duplicates), several walkers: invariants, determinism, traces, golden.

SAMPLED_TASK = toy.ToyTask(num_actions=3, horizon=3, value_confidence=0.5, value_noise=0.2)
SAMPLED_CFG = mcts_lib.MCTSConfig(num_simulations=6, num_children=3, num_walkers=2, max_depth=3,
                                  gamma=0.96, td_lambda=0.8)
_SAMPLED_MODEL = toy.make_model(SAMPLED_TASK)


@jax.jit
@chex.assert_max_traces(n=1)
def _sampled_run(params, key, pr, pm):
  return mcts_lib.mcts_search(params, key, pr, pm, model=_SAMPLED_MODEL, config=SAMPLED_CFG)


def _sampled(key, seed=1):
  params = toy.make_params(jax.random.key(seed), 4, SAMPLED_TASK, skill=1.0, noise=1.0)
  return params, _sampled_run(params, key, *toy.prompts(4, SAMPLED_TASK))


def test_invariants_and_duplicate_merging():
  _, res = _sampled(jax.random.key(0))
  assert tree_lib.invariant_errors(res.tree) == []
  t = _np(res.tree)
  merged = False
  for b in range(4):
    for s in range(int(t.num_nodes_B[b])):
      first, cnt = t.first_child_BxN[b, s], t.num_children_BxN[b, s]
      if first < 0:
        continue
      steps = [tuple(t.step_tokens_BxNxL[b, c]) for c in range(first, first + cnt)]
      assert len(set(steps)) == len(steps), 'identical siblings were not merged'
      np.testing.assert_allclose(t.prior_BxN[b, first:first + cnt].sum(), 1.0, rtol=1e-5)
      merged |= cnt < SAMPLED_CFG.num_children
  assert merged, 'expected the 3-action sampler to produce duplicates'
  # Every terminal node sits at depth 3 and carries the verifier reward as its q.
  for b in range(4):
    n = int(t.num_nodes_B[b])
    term = t.terminal_BxN[b, :n]
    assert (t.depth_BxN[b, :n][term] == 3).all()
    np.testing.assert_array_equal(t.q_BxN[b, :n][term], t.reward_BxN[b, :n][term])


def test_deterministic_given_key_traced_once():
  """Same key -> same tree; another key or other weights -> another tree; one trace for all
  calls with these shapes (the trace counter on `_sampled_run` raises otherwise)."""
  _, a = _sampled(jax.random.key(5))
  _, b = _sampled(jax.random.key(5))
  _, c = _sampled(jax.random.key(6))
  _, d = _sampled(jax.random.key(5), seed=2)
  chex.assert_trees_all_equal(a.tree, b.tree)
  assert not np.array_equal(np.asarray(a.tree.step_tokens_BxNxL), np.asarray(c.tree.step_tokens_BxNxL))
  assert not np.array_equal(np.asarray(a.tree.q_BxN), np.asarray(d.tree.q_BxN))


# The toy's value noise (a sin hash times 43758) turns last-bit differences in sin into other
# values, and XLA rounds sin differently at other optimisation levels: the golden tree holds
# the default level's (3) search, while conftest.py compiles everything else at level 0.
_golden_run = jax.jit(functools.partial(mcts_lib.mcts_search, model=_SAMPLED_MODEL, config=SAMPLED_CFG),
                      compiler_options={'xla_backend_optimization_level': 3})


def test_golden_tree():
  """Regression against a stored tree (regenerate: RLM_UPDATE_GOLDEN=1 pytest ...)."""
  params = toy.make_params(jax.random.key(1), 4, SAMPLED_TASK, skill=1.0, noise=1.0)  # as `_sampled`
  res = _golden_run(params, jax.random.key(0), *toy.prompts(4, SAMPLED_TASK))
  got = [export.tree_to_json(res.tree, b) for b in range(2)]  # two of the four trees
  if os.environ.get('RLM_UPDATE_GOLDEN'):
    with open(GOLDEN, 'w') as f:
      json.dump(got, f, indent=1)
  with open(GOLDEN) as f:
    want = json.load(f)
  for g, w in zip(got, want):
    assert g['num_nodes'] == w['num_nodes']
    for gn, wn in zip(g['nodes'], w['nodes']):
      for k in ('id', 'parent', 'depth', 'text', 'visits', 'terminal', 'children'):
        assert gn[k] == wn[k], (gn['id'], k)
      for k in ('q', 'value', 'prior', 'logprob', 'reward'):
        if wn[k] is None:
          assert gn[k] is None
        else:
          assert gn[k] == pytest.approx(wn[k], abs=1e-5), (gn['id'], k)


def test_state_width_does_not_change_the_golden_tree():
  """The golden search (default widths; the golden file holds a full-width search, so they
  match it) with one state width per depth, the root's prompt-only one included: the same
  tree and answer, bit for bit."""
  params, res = _sampled(jax.random.key(0))
  other = _search(SAMPLED_TASK, dataclasses.replace(SAMPLED_CFG, state_width='depth'))(
      params, jax.random.key(0), *toy.prompts(4, SAMPLED_TASK))
  assert int(res.tree.depth_BxN.max()) == SAMPLED_CFG.max_depth
  chex.assert_trees_all_equal(res.replace(extra=None), other.replace(extra=None))
  for name in ('leaf_B', 'root_sims_BxK'):
    np.testing.assert_array_equal(other.extra[name], res.extra[name])
  np.testing.assert_array_equal(res.extra['state_depth_S'], [1, 1, 2, 2, 2, 2])  # depth 0 at width 1
  np.testing.assert_array_equal(other.extra['state_depth_S'], [0, 1, 2, 2, 2, 2])


# ------------------------------------------------------------------------------------------
# Rollouts, inference mode, answers.


def test_rollouts_mix_in_with_alpha():
  """Without a value model q_model = 0, so a non-terminal child's value is alpha * mean of
  its rollout rewards; with the 'final' reward and a deterministic policy those are known."""
  task = toy.ToyTask(num_actions=2, horizon=2, enumerate=True, value_confidence=0.0)
  cfg = mcts_lib.MCTSConfig(num_simulations=1, num_children=2, num_walkers=1, max_depth=2,
                            num_rollouts=2, rollout_weight=0.25)
  params = {'target': jnp.array([[1, 0]]), 'logits': jnp.array([[[0.0, 5.0], [5.0, 0.0]]])}
  pr, pm = toy.prompts(1, task)
  res = _search(task, cfg, with_value=False)(params, jax.random.key(0), pr, pm)
  t = _np(res.tree)
  # Rollouts from child a=0 (a wrong step: the policy is lost, uniform) and a=1 (right step:
  # the policy picks action 0 with prob 0.993). Their rewards are +-1; check the mixing rule
  # against the counts: value = 0.25 * mean(r), r in {-1, +1}.
  for node in (1, 2):
    assert t.value_BxN[0, node] * 4 in (-1.0, 0.0, 1.0)
  assert t.value_BxN[0, 2] == pytest.approx(0.25)  # both rollouts right (p = 0.993^2)
  # Spent: 2 candidates + 2x2 rollouts of 1 step (2 tokens each); calls: 2 + 4 (no value model).
  assert int(res.policy_tokens_B[0]) == 2 * 2 + 4 * 2
  assert int(res.model_calls_B[0]) == 2 + 4


def test_inference_mode_scores_terminals_with_value_model():
  task = toy.ToyTask(num_actions=2, horizon=2, enumerate=True, value_confidence=0.4)
  cfg = mcts_lib.MCTSConfig(num_simulations=2, num_children=2, num_walkers=1, max_depth=2, gamma=0.9)
  res = _search(task, cfg, with_reward=False)(EXACT_PARAMS, jax.random.key(0), *toy.prompts(1, task))
  t = _np(res.tree)
  np.testing.assert_allclose(t.q_BxN[0, 3:5], [0.4, -0.4])  # PRM on the final step, not +-1
  assert np.isnan(t.reward_BxN[0, 3:5]).all()
  # Value calls for every child now: 1 + 4 samples + 4 values.
  assert int(res.model_calls_B[0]) == 9


def test_max_depth_caps_paths_with_uct():
  task = toy.ToyTask(num_actions=2, horizon=4, enumerate=True, value_confidence=0.2)
  cfg = mcts_lib.MCTSConfig(num_simulations=8, num_children=2, num_walkers=2, max_depth=2, selection='uct',
                            backup='mean')
  params = toy.make_params(jax.random.key(0), 2, task)
  res = _search(task, cfg)(params, jax.random.key(0), *toy.prompts(2, task))
  t = _np(res.tree)
  assert t.depth_BxN.max() == 2
  assert not t.terminal_BxN.any()  # horizon 4 is never reached
  assert tree_lib.invariant_errors(res.tree) == []
  # No terminal: the answer falls back to the most-visited path, a depth-2 leaf.
  assert (np.asarray(res.lengths_B) == 4).all() and not np.asarray(res.terminal_B).any()
  # Both depth-1 nodes were expanded: the walkers spread over the root's two children.
  assert (t.first_child_BxN[:, 1:3] >= 0).all()


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match=r"mcts.backup='x'"):
    mcts_lib.MCTSConfig(backup='x')
  with pytest.raises(ValueError, match='mcts.num_walkers=0'):
    mcts_lib.MCTSConfig(num_walkers=0)
  with pytest.raises(ValueError, match='mcts.gamma=0'):
    mcts_lib.MCTSConfig(gamma=0.0)
