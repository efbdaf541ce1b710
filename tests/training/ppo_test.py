"""PPO iteration: one compiled program that learns a one-token bandit, with a value head."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlm_jax.models import transformer as tfm
from rlm_jax.sampling.sampler import SamplingConfig
from rlm_jax.training import losses, ppo
from rlm_jax.training.rewards import RewardConfig
from rlm_jax.training.state import OptimConfig, create_train_state, make_optimizer

CFG = tfm.ModelConfig(vocab_size=8, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32,
                      value_head='sigmoid')
GOOD = 5  # the rewarded first token


def _first_token_score(out, batch):
  return jnp.where(out.tokens_BxT[:, 0] == GOOD, 2, 0)


def _setup(reward=RewardConfig(correct=1.0, wrong=-1.0, invalid=-1.0), max_new_tokens=3, **kw):
  loss_kw = dict(num_ppo_epochs=2, kl_coef=0.0, vf_coef=0.5, entropy_coef=0.0, gamma=1.0, lam=0.95)
  loss_kw.update(kw.pop('loss', {}))
  kw.setdefault('score_fn', _first_token_score)
  return ppo.PPOSetup(loss=losses.PPOConfig(**loss_kw),
                      sampling=SamplingConfig(max_new_tokens=max_new_tokens, eos_id=2, pad_id=0, temperature=1.0),
                      reward=reward, step_id=3, **kw)


def _batch(b=8):
  return {'prompt': jnp.ones((b, 2), jnp.int32), 'prompt_mask': jnp.ones((b, 2), bool)}


def _probe(gdef, params):
  out = nnx.merge(gdef, params)(jnp.ones((1, 2), jnp.int32))
  return float(jax.nn.softmax(out.logits_BxLxV[0, -1])[GOOD]), float(out.values_BxL[0, -1])


def test_ppo_learns_a_one_token_bandit_in_one_compile():
  gdef, params = nnx.split(tfm.init_model(CFG, seed=0))
  tx = make_optimizer(OptimConfig(learning_rate=3e-2, grad_clip=0.0))
  setup = _setup(group_size=4, num_minibatches=2)
  p0, _ = _probe(gdef, params)
  state = create_train_state(params, tx)
  step = jax.jit(chex.assert_max_traces(ppo.ppo_iteration, n=1), static_argnums=(0, 1, 2), donate_argnums=(3,))
  for i in range(12):
    state, m = step(gdef, tx, setup, state, None, _batch(), jax.random.key(i))
  chex.clear_trace_counter()
  p1, v1 = _probe(gdef, state.params)
  assert p0 < 0.3 and p1 > 0.8, (p0, p1)
  assert int(state.step) == 12 * 2 * 2  # iterations x epochs x minibatches
  assert float(m['accuracy']) > 0.6 and bool(m['finite'])
  # The critic follows the policy: V(prompt) ~ E[r] = 2p - 1 > 0 (it started near 0).
  assert v1 > 0.2, v1


def test_rewards_returns_and_losses_of_a_rollout_by_hand():
  """One-token completions from one shared prompt: every row's V(s_0) is v0, the value at the
  last prompt token. With reward 1 and a KL penalty (k1 per token, reference = another init),
  row i's return is R_i = 1 - c·kl_i (γ = λ = 1, T = 1), so mean R = 1 - c·mean kl; the
  unwhitened advantage is R_i - v0, hence the first update's pg loss is -(mean R - v0)
  (ratio 1), and its value loss 0.5·mean (v0 - R_i)^2 >= 0.5 (v0 - mean R)^2."""
  gdef, params = nnx.split(tfm.init_model(CFG, seed=3))
  ref = nnx.split(tfm.init_model(CFG, seed=4))[1]
  _, v0 = _probe(gdef, params)
  c = 0.05
  tx = make_optimizer(OptimConfig(learning_rate=1e-3, grad_clip=0.0))
  setup = _setup(score_fn=lambda out, batch: jnp.full(out.lengths_B.shape, 2), max_new_tokens=1,
                 whiten_advantages=False, loss=dict(num_ppo_epochs=1, kl_coef=c))
  state, m = ppo.ppo_iteration_jit(gdef, tx, setup, create_train_state(params, tx), ref, _batch(),
                                   jax.random.key(0))
  assert float(m['reward']) == 1.0 and float(m['completion_length']) == 1.0
  kl = float(m['kl'])
  assert abs(kl) > 1e-4  # the reference really differs
  mean_r = 1.0 - c * kl
  np.testing.assert_allclose(float(m['value_mean']), v0, atol=1e-6)
  np.testing.assert_allclose(float(m['return_mean']), mean_r, atol=1e-6)
  np.testing.assert_allclose(float(m['pg_loss']), -(mean_r - v0), atol=1e-6)
  assert float(m['ratio_mean']) == pytest.approx(1.0, abs=1e-6)
  assert float(m['vf_loss']) >= 0.5 * (v0 - mean_r) ** 2 - 1e-7
  # The update moved the critic toward the return.
  assert _probe(gdef, state.params)[1] > v0


def test_bad_setups_fail_with_one_clear_message():
  tx = make_optimizer(OptimConfig())
  gdef, params = nnx.split(tfm.init_model(CFG, seed=0))
  state = create_train_state(params, tx)
  with pytest.raises(ValueError, match=r"rewards outside \[-1, 1\]"):
    ppo.ppo_iteration(gdef, tx, _setup(reward=RewardConfig(correct=2.0)), state, None, _batch(), jax.random.key(0))
  with pytest.raises(ValueError, match='kl_coef=0.1 needs ref_params'):
    ppo.ppo_iteration(gdef, tx, _setup(loss=dict(kl_coef=0.1)), state, None, _batch(), jax.random.key(0))
  with pytest.raises(ValueError, match='does not divide'):
    ppo.ppo_iteration(gdef, tx, _setup(num_minibatches=3), state, None, _batch(), jax.random.key(0))
  no_value = tfm.ModelConfig(**{**CFG.__dict__, 'value_head': 'none'})
  gdef2, params2 = nnx.split(tfm.init_model(no_value, seed=0))
  with pytest.raises(ValueError, match='both heads'):
    ppo.ppo_iteration(gdef2, tx, _setup(), create_train_state(params2, tx), None, _batch(), jax.random.key(0))


def test_actor_critic_params_take_the_policy_trunk_and_keep_the_value_head():
  policy_cfg = tfm.ModelConfig(**{**CFG.__dict__, 'value_head': 'none'})
  _, pol = nnx.split(tfm.init_model(policy_cfg, seed=5))
  gdef, ac = nnx.split(tfm.init_model(CFG, seed=6))
  merged = ppo.actor_critic_params(ac, pol)
  tokens = jnp.array([[1, 4, 3, 5]])
  want = nnx.merge(nnx.split(tfm.init_model(policy_cfg, seed=0))[0], pol)(tokens).logits_BxLxV
  got = nnx.merge(gdef, merged)(tokens)
  np.testing.assert_allclose(got.logits_BxLxV, want, atol=1e-6)
  np.testing.assert_array_equal(merged['value_head']['w2'][...], ac['value_head']['w2'][...])
  small = tfm.ModelConfig(**{**policy_cfg.__dict__, 'd_ff': 16})
  with pytest.raises(ValueError, match=r'/layers/0/mlp/w_\w+ has shape \(16, 16\) in the policy'):
    ppo.actor_critic_params(ac, nnx.split(tfm.init_model(small, seed=0))[1])


def test_old_logprobs_and_values_from_the_sampler_equal_a_recomputing_forward():
  """π_old and V_old read from the decode (the default) give the iteration that a forward pass
  over the rollout gives (`recompute_old=True`): the same metrics and updated weights, with a
  KL penalty, GAE over several tokens and EOS stops (rows of different lengths)."""
  gdef, params = nnx.split(tfm.init_model(CFG, seed=5))
  ref = nnx.split(tfm.init_model(CFG, seed=6))[1]
  tx = make_optimizer(OptimConfig(learning_rate=1e-2, grad_clip=0.0))
  run = lambda recompute: ppo.ppo_iteration_jit(
      gdef, tx, _setup(max_new_tokens=4, group_size=2, loss=dict(kl_coef=0.05), recompute_old=recompute),
      create_train_state(jax.tree.map(jnp.copy, params), tx), ref, _batch(), jax.random.key(2))
  (s_a, m_a), (s_b, m_b) = run(False), run(True)
  assert 1.0 < float(m_a['completion_length']) < 4.0  # some rows stopped at EOS
  for k in ('reward', 'kl', 'value_mean', 'return_mean', 'explained_variance', 'pg_loss', 'vf_loss', 'loss'):
    np.testing.assert_allclose(float(m_a[k]), float(m_b[k]), rtol=1e-4, atol=1e-6, err_msg=k)
  chex.assert_trees_all_close(s_a.params, s_b.params, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match='recompute_old must be True or False'):
    _setup(recompute_old='yes')
