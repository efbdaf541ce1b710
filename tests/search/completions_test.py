"""Chain, best-of-N and self-consistency on scripted problems with known answers."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlm_jax.search import completions
from rlm_jax.search import toy
from rlm_jax.search.base import SearchModel, Steps

PAD, EOS, STEP = 0, 2, 3


def _fixed_model(cands, value_of_token=None, logprobs=None):
  """Policy that always returns the given completions; value = table[token before a step end]."""
  width = max(len(c) for c in cands)
  toks = np.zeros((len(cands), width), np.int32)
  for i, c in enumerate(cands):
    toks[i, :len(c)] = c
  toks = jnp.asarray(toks)
  lens = jnp.asarray([len(c) for c in cands], jnp.int32)
  term = jnp.asarray([c[-1] == EOS for c in cands])
  lp = jnp.zeros((len(cands),)) if logprobs is None else jnp.asarray(logprobs, jnp.float32)

  def policy_fn(params, key, nodes, num, *, to_end, greedy):
    assert to_end and num == len(cands)
    m = nodes.tokens_MxT.shape[0]
    tile = lambda x: jnp.broadcast_to(x, (m,) + x.shape)
    return Steps(tile(toks), tile(lens), tile(lp), tile(term))

  def value_fn(params, nodes):
    tok = nodes.tokens_MxT
    prev = jnp.concatenate([jnp.zeros_like(tok[:, :1]), tok[:, :-1]], axis=1)
    table = jnp.zeros((64,)).at[jnp.asarray(list(value_of_token))].set(jnp.asarray(list(value_of_token.values())))
    return table[prev]

  return SearchModel(policy_fn, value_fn if value_of_token else None, None, PAD, EOS, STEP)


PROMPT = (jnp.array([[PAD, 9, 9]]), jnp.array([[False, True, True]]))


def _run(fn, model, cfg, params=None, n=1):
  f = jax.jit(functools.partial(fn, model=model, config=cfg))
  return f(params, jax.random.key(0), *PROMPT)


def test_prm_min_last_and_orm_pick_differently():
  a, b, c, d = 10, 11, 12, 13
  # cand0: step values 0.9 then 0.1; cand1: -0.5 then 0.8.
  model = _fixed_model([[a, STEP, b, EOS], [c, STEP, d, EOS]], {a: 0.9, b: 0.1, c: -0.5, d: 0.8})
  picks = {}
  for scorer in ('prm_min', 'prm_last', 'orm'):
    res = _run(completions.best_of_n, model, completions.BestOfNConfig(num_samples=2, scorer=scorer))
    picks[scorer] = int(np.asarray(res.tokens_BxL)[0, 0])
    scores = np.asarray(res.extra['scores_BxN'])[0]
    if scorer == 'prm_min':
      np.testing.assert_allclose(scores, [0.1, -0.5], rtol=1e-6)
    else:
      np.testing.assert_allclose(scores, [0.1, 0.8], rtol=1e-6)
    assert int(res.model_calls_B[0]) == 2 + 2  # 2 samples + 2 value rows
    assert int(res.policy_tokens_B[0]) == 8
  assert picks == {'prm_min': a, 'prm_last': c, 'orm': c}


def test_logprob_scorer_is_mean_token_logprob():
  # -3 over 3 tokens beats -2.5 over 2 tokens; no value model, no value calls.
  model = _fixed_model([[10, 11, EOS], [12, EOS]], logprobs=[-3.0, -2.5])
  res = _run(completions.best_of_n, model, completions.BestOfNConfig(num_samples=2, scorer='logprob'))
  np.testing.assert_allclose(res.extra['scores_BxN'][0], [-1.0, -1.25])
  assert int(res.tokens_BxL[0, 0]) == 10 and int(res.model_calls_B[0]) == 2


def test_prm_last_ignores_a_truncated_tail():
  a, b, c = 10, 11, 12
  # cand0 was cut inside its second step: its last step end is after `a`.
  model = _fixed_model([[a, STEP, b, b], [c, STEP, b, EOS]], {a: 0.7, b: -0.9, c: 0.2})
  res = _run(completions.best_of_n, model, completions.BestOfNConfig(num_samples=2, scorer='prm_last'))
  np.testing.assert_allclose(res.extra['scores_BxN'][0], [0.7, -0.9], rtol=1e-6)
  assert not bool(res.terminal_B[0]) and int(res.tokens_BxL[0, 0]) == a


def test_self_consistency_majority_of_finished():
  A, COLON = 40, 41
  ans = lambda x, end=EOS: [10, STEP, A, COLON, x, end]
  cands = [ans(7), ans(8), ans(8), ans(9), ans(8, end=STEP)]  # the last one is unfinished
  model = _fixed_model(cands, {10: 0.0})
  cfg = completions.SelfConsistencyConfig(num_samples=5, answer_marker_ids=(A, COLON), answer_len=2)
  res = _run(completions.self_consistency, model, cfg)
  assert int(res.tokens_BxL[0, 4]) == 8 and bool(res.terminal_B[0])
  np.testing.assert_allclose(res.score_B, [0.5])  # 2 of the 4 finished votes
  np.testing.assert_array_equal(res.extra['valid_BxN'][0], [1, 1, 1, 1, 0])
  cfg_all = completions.SelfConsistencyConfig(num_samples=5, answer_marker_ids=(A, COLON), answer_len=2,
                                              only_finished=False)
  np.testing.assert_allclose(_run(completions.self_consistency, model, cfg_all).score_B, [0.6])
  assert int(res.model_calls_B[0]) == 5 and int(res.policy_tokens_B[0]) == 30


def test_self_consistency_orm_weighting_can_flip_the_vote():
  A, COLON = 40, 41
  # Two votes for 8 with value -1 (weight 0) against one vote for 7 with value 1 (weight 1).
  cands = [[11, STEP, A, COLON, 7, EOS], [12, STEP, A, COLON, 8, EOS], [12, STEP, A, COLON, 8, EOS]]
  model = _fixed_model(cands, {7: 1.0, 8: -1.0})
  cfg = completions.SelfConsistencyConfig(num_samples=3, answer_marker_ids=(A, COLON), answer_len=1,
                                          weighting='orm')
  res = _run(completions.self_consistency, model, cfg)
  assert int(res.tokens_BxL[0, 4]) == 7
  assert int(res.model_calls_B[0]) == 6


# ------------------------------------------------------------------------------------------
# On the toy task: greedy chain and best-of-N by verifier.

TASK = toy.ToyTask(num_actions=3, horizon=3)


def _greedy_reference(params):
  target, logits = np.asarray(params['target']), np.asarray(params['logits'])
  out = []
  for p in range(target.shape[0]):
    lost, acts = False, []
    for d in range(TASK.horizon):
      a = 0 if lost else int(np.argmax(logits[p, d]))
      lost |= a != target[p, d]
      acts.append(a)
    out.append(acts)
  return np.array(out)


def test_greedy_chain_follows_the_logit_table():
  n = 8
  params = toy.make_params(jax.random.key(4), n, TASK, skill=0.5, noise=1.0)
  res = jax.jit(functools.partial(completions.chain, model=toy.make_model(TASK),
                                  config=completions.ChainConfig(greedy=True, score='reward')))(
                                      params, jax.random.key(0), *toy.prompts(n, TASK))
  want = _greedy_reference(params)
  got = np.asarray(res.tokens_BxL)[:, 0:6:2] - TASK.first_id
  np.testing.assert_array_equal(got, want)
  right = want[:, -1] == np.asarray(params['target'])[:, -1]
  np.testing.assert_array_equal(res.score_B, np.where(right, 1.0, -1.0))
  np.testing.assert_array_equal(res.policy_tokens_B, 6)
  np.testing.assert_array_equal(res.model_calls_B, 1)


def test_best_of_n_by_reward_is_pass_at_n():
  n, k = 16, 6
  params = toy.make_params(jax.random.key(5), n, TASK, skill=0.5, noise=1.0)
  model = toy.make_model(TASK)
  res = jax.jit(functools.partial(completions.best_of_n, model=model,
                                  config=completions.BestOfNConfig(num_samples=k, scorer='reward')))(
                                      params, jax.random.key(1), *toy.prompts(n, TASK))
  cand = np.asarray(res.extra['tokens_BxNxL'])
  final = cand[:, :, 4] - TASK.first_id
  any_right = (final == np.asarray(params['target'])[:, None, 2]).any(axis=1)
  np.testing.assert_array_equal(np.asarray(res.score_B) == 1.0, any_right)
  assert any_right.any() and not any_right.all()  # the check is not vacuous
  np.testing.assert_array_equal(res.model_calls_B, k)  # the verifier is not a model call
  np.testing.assert_array_equal(res.policy_tokens_B, 6 * k)


def test_scorer_without_model_is_a_clear_error():
  model = toy.make_model(TASK, with_value=False, with_reward=False)
  params = toy.make_params(jax.random.key(0), 1, TASK)
  with pytest.raises(ValueError, match="scorer 'orm' needs a value_fn"):
    completions.best_of_n(params, jax.random.key(0), *toy.prompts(1, TASK), model=model,
                          config=completions.BestOfNConfig(num_samples=2, scorer='orm'))
  with pytest.raises(ValueError, match='best_of_n.scorer'):
    completions.BestOfNConfig(scorer='max')
