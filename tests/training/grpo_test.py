"""GRPO iteration: one compiled program, learns a bandit, no-ops on constant rewards."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlm_jax.models import transformer as tfm
from rlm_jax.sampling.sampler import SamplingConfig
from rlm_jax.training import grpo, losses
from rlm_jax.training.rewards import RewardConfig
from rlm_jax.training.state import OptimConfig, create_train_state, make_optimizer

CFG = tfm.ModelConfig(vocab_size=8, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32)
GOOD = 5  # the rewarded first token


def _first_token_score(out, batch):
  return jnp.where(out.tokens_BxT[:, 0] == GOOD, 2, 0)


def _setup(score_fn=_first_token_score, **loss_kw):
  loss = losses.GRPOConfig(max_completion_length=3, **loss_kw)
  sampling = SamplingConfig(max_new_tokens=3, eos_id=2, pad_id=0, temperature=1.0)
  return grpo.GRPOSetup(group_size=8, loss=loss, sampling=sampling, reward=RewardConfig(), step_id=3,
                        score_fn=score_fn)


def _batch(b=4):
  return {'prompt': jnp.ones((b, 2), jnp.int32), 'prompt_mask': jnp.ones((b, 2), bool),
          'answer': jnp.zeros((b, 1), jnp.int32), 'answer_len': jnp.ones((b,), jnp.int32)}


def _first_token_prob(gdef, params):
  logits = nnx.merge(gdef, params)(jnp.ones((1, 2), jnp.int32)).logits_BxLxV[0, -1]
  return float(jax.nn.softmax(logits)[GOOD])


def test_grpo_learns_a_one_token_bandit_in_one_compile():
  gdef, params = nnx.split(tfm.init_model(CFG, seed=0))
  tx = make_optimizer(OptimConfig(learning_rate=3e-2, grad_clip=0.0))
  setup = _setup(num_iterations=2, epsilon=0.2, epsilon_high=0.28)
  p0 = _first_token_prob(gdef, params)
  state = create_train_state(params, tx)
  step = jax.jit(chex.assert_max_traces(grpo.grpo_iteration, n=1), static_argnums=(0, 1, 2), donate_argnums=(3,))
  for i in range(15):
    state, m = step(gdef, tx, setup, state, None, _batch(), jax.random.key(i))
  chex.clear_trace_counter()
  p1 = _first_token_prob(gdef, state.params)
  assert p0 < 0.3 and p1 > 0.8, (p0, p1)
  assert int(state.step) == 30  # μ = 2 updates per iteration
  assert float(m['accuracy']) > 0.6


def test_constant_rewards_leave_params_unchanged():
  gdef, params = nnx.split(tfm.init_model(CFG, seed=1))
  tx = make_optimizer(OptimConfig(learning_rate=1e-1, grad_clip=0.0))
  setup = _setup(score_fn=lambda out, batch: jnp.full(out.lengths_B.shape, 2))
  before = jax.tree.map(np.asarray, params)
  state, m = grpo.grpo_iteration_jit(gdef, tx, setup, create_train_state(params, tx), None, _batch(),
                                     jax.random.key(0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), before, jax.tree.map(np.asarray, state.params))
  assert float(m['solve_all']) == 1.0 and float(m['reward']) == 1.0


def test_kl_to_reference_is_zero_when_policy_equals_reference():
  gdef, params = nnx.split(tfm.init_model(CFG, seed=2))
  ref = jax.tree.map(jnp.copy, params)
  tx = make_optimizer(OptimConfig(learning_rate=1e-3))
  setup = _setup(beta=0.1)
  _, m = grpo.grpo_iteration_jit(gdef, tx, setup, create_train_state(params, tx), ref, _batch(), jax.random.key(0))
  assert abs(float(m['kl'])) < 1e-6 and float(m['ratio_mean']) == 1.0


def _rollout(b=4, g=4, t=5, seed=0):
  """A fixed rollout with ragged completions (lengths 0..t) and mixed rewards."""
  r = np.random.default_rng(seed)
  n = b * g
  lengths = r.integers(0, t + 1, n)
  cm = np.arange(t)[None] < lengths[:, None]
  tokens = np.where(cm, r.integers(3, 8, (n, t)), 0)
  score = r.choice([0, 2], n)
  return {'prompt': jnp.ones((n, 2), jnp.int32), 'prompt_mask': jnp.ones((n, 2), bool),
          'tokens': jnp.asarray(tokens, jnp.int32), 'completion_mask': jnp.asarray(cm),
          'lengths': jnp.asarray(lengths, jnp.int32), 'truncated': jnp.asarray(lengths == t),
          'score': jnp.asarray(score, jnp.int32), 'reward': jnp.asarray(score / 2, jnp.float32),
          'sample_logprobs': jnp.zeros((n, t), jnp.float32)}


@pytest.mark.parametrize('loss_kw', [
    dict(loss_type='dapo', mask_truncated_completions=True, num_iterations=2, beta=0.1),
    # Per-sequence means need no re-weighting; slow only to keep the default suite short.
    pytest.param(dict(loss_type='grpo'), marks=pytest.mark.slow),
])
def test_microbatched_update_equals_the_full_batch_update(loss_kw):
  """k = 4 microbatches vs the whole rollout, SGD lr 1 (update = -grad): same params and
  metrics; the microbatched update compiles once for two rollouts."""
  import optax

  gdef, params = nnx.split(tfm.init_model(CFG, seed=4))
  ref = jax.tree.map(lambda x: x * 0.9, params) if loss_kw.get('beta') else None
  tx = optax.sgd(1.0)
  loss = losses.GRPOConfig(max_completion_length=5, **loss_kw)
  sampling = SamplingConfig(max_new_tokens=5, eos_id=2, pad_id=0)
  # The fixed rollout has no sampler log-probs: π_old is recomputed (microbatched).
  setup = lambda k: grpo.GRPOSetup(group_size=4, loss=loss, sampling=sampling, reward=RewardConfig(),
                                   step_id=3, microbatches=k, recompute_old_logp=True)
  copy = lambda: create_train_state(jax.tree.map(jnp.copy, params), tx)
  full, m1 = grpo.grpo_update_jit(gdef, tx, setup(1), copy(), ref, _rollout())
  step = jax.jit(chex.assert_max_traces(grpo.grpo_update, n=1), static_argnums=(0, 1, 2),
                 donate_argnums=(3,))
  acc, m4 = step(gdef, tx, setup(4), copy(), ref, _rollout())
  step(gdef, tx, setup(4), copy(), ref, _rollout(seed=1))
  chex.clear_trace_counter()
  for key in ('loss', 'entropy', 'kl', 'num_tokens', 'ratio_mean', 'grad_norm'):
    np.testing.assert_allclose(float(m4[key]), float(m1[key]), rtol=1e-5, atol=1e-7, err_msg=key)
  delta = lambda st: jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, st.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), delta(acc),
               delta(full))
  assert max(np.abs(x).max() for x in jax.tree.leaves(delta(full))) > 1e-2


def test_host_scored_iteration_equals_the_device_scored_one():
  """Same key and params: scoring on host (token ids pulled once) gives the same update."""
  gdef, params = nnx.split(tfm.init_model(CFG, seed=3))
  tx = make_optimizer(OptimConfig(learning_rate=1e-2, grad_clip=0.0))
  calls = []

  def host_first_token(tokens_BxT, lengths_B):
    calls.append(tokens_BxT.shape)
    assert isinstance(tokens_BxT, np.ndarray) and isinstance(lengths_B, np.ndarray)
    return np.where(tokens_BxT[:, 0] == GOOD, 2, 0)

  dev, m_dev = grpo.grpo_iteration_jit(gdef, tx, _setup(), create_train_state(jax.tree.map(jnp.copy, params), tx),
                                       None, _batch(), jax.random.key(4))
  host, m_host = grpo.grpo_iteration_host_scored(gdef, tx, _setup(), create_train_state(params, tx), None,
                                                 _batch(), jax.random.key(4), host_first_token)
  assert calls == [(32, 3)]  # once per iteration, B·G rows
  assert 0.0 < float(m_dev['accuracy']) < 1.0  # mixed rewards: the update is not a no-op
  assert float(m_host['accuracy']) == float(m_dev['accuracy'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), dev.params, host.params)
  with pytest.raises(ValueError, match=r'score_host returned shape.*\(3,\).*expected \(32,\)'):
    grpo.grpo_iteration_host_scored(gdef, tx, _setup(), host, None, _batch(), jax.random.key(5),
                                    lambda t, n: np.zeros(3))


def _tempered_setup(**loss_kw):
  loss = losses.GRPOConfig(max_completion_length=4, **loss_kw)
  sampling = SamplingConfig(max_new_tokens=4, eos_id=2, pad_id=0, temperature=0.5)
  return grpo.GRPOSetup(group_size=4, loss=loss, sampling=sampling, reward=RewardConfig(), step_id=3,
                        score_fn=_first_token_score)


def _tempered_objective(gdef, ro, adv, temperature):
  """-Σ_tokens A·log softmax(logits / T)[y] / n_tokens by a plain full forward (dapo, μ = 1)."""
  seq = jnp.concatenate([ro['prompt'], ro['tokens']], 1)
  seq_mask = jnp.concatenate([ro['prompt_mask'], ro['completion_mask']], 1)
  mask = ro['completion_mask'].astype(jnp.float32)

  def loss(p):
    logits = nnx.merge(gdef, p)(seq, mask_BxL=seq_mask).logits_BxLxV[:, 1:-1] / temperature
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), ro['tokens'][..., None], -1)[..., 0]
    return -jnp.sum(adv[:, None] * logp * mask) / mask.sum()

  return loss


def test_loss_differentiates_the_tempered_policy_that_sampled():
  """T = 0.5, μ = 1, SGD lr 1: the ratio is exactly 1 and Δθ = -∇ of the tempered policy's
  surrogate, -Σ A·log softmax(logits / T)[y] / n (autodiff of a plain forward here). The
  untempered log-probs give another gradient (checked to differ)."""
  import optax

  gdef, params = nnx.split(tfm.init_model(CFG, seed=5))
  setup = _tempered_setup(loss_type='dapo')
  ro = grpo.rollout_jit(gdef, params, _batch(), jax.random.key(6), setup)
  adv = losses.advantages.group_advantages(ro['reward'].reshape(4, 4)).reshape(16)
  assert float(jnp.abs(adv).sum()) > 0  # mixed rewards
  tx = optax.sgd(1.0)
  state, m = grpo.grpo_update_jit(gdef, tx, setup, create_train_state(jax.tree.map(jnp.copy, params), tx), None, ro)
  assert float(m['ratio_mean']) == 1.0
  grad = jax.jit(jax.grad(_tempered_objective(gdef, ro, adv, 0.5)))(params)  # jitted: op by op compiles far more
  got = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), state.params, params)
  jax.tree.map(lambda d, g: np.testing.assert_allclose(d, -np.asarray(g), rtol=1e-4, atol=1e-6), got, grad)
  untempered = jax.jit(jax.grad(_tempered_objective(gdef, ro, adv, 1.0)))(params)
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(untempered))) > 1e-3


def test_old_logprobs_from_the_sampler_equal_the_recomputed_ones():
  """μ = 2 at T = 0.5: the sampler's tempered log-probs agree with a forward pass over the
  rollout to 1e-5, and the update that reuses them equals the one that recomputes π_old."""
  import optax

  gdef, params = nnx.split(tfm.init_model(CFG, seed=7))
  setup = _tempered_setup(loss_type='dapo', num_iterations=2)
  ro = grpo.rollout_jit(gdef, params, _batch(), jax.random.key(8), setup)
  seq = jnp.concatenate([ro['prompt'], ro['tokens']], 1)
  seq_mask = jnp.concatenate([ro['prompt_mask'], ro['completion_mask']], 1)
  logp, _ = grpo.completion_logprobs(gdef, params, seq, seq_mask, 2, 0.5)
  cm = np.asarray(ro['completion_mask'])
  assert cm.sum() > 16
  np.testing.assert_allclose(np.asarray(ro['sample_logprobs'])[cm], np.asarray(logp)[cm], atol=1e-5)
  tx = optax.sgd(1.0)
  run = lambda st: grpo.grpo_update_jit(gdef, tx, st, create_train_state(jax.tree.map(jnp.copy, params), tx), None, ro)
  reused, m1 = run(setup)
  recomputed, m2 = run(dataclasses.replace(setup, recompute_old_logp=True))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), reused.params, recomputed.params)
  np.testing.assert_allclose(float(m1['loss']), float(m2['loss']), atol=1e-6)
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(reused.params), jax.tree.leaves(params))) > 1e-3


def test_advantage_fn_per_sequence_and_per_token():
  """advantage_fn replaces the group advantages. Per token: A = 1 on tokens equal to GOOD,
  -0.5 elsewhere; SGD lr 1, μ = 1, dapo: Δθ = -∇ of grpo_loss with those advantages (its
  gradient is -Σ A ∇log π / n). Per sequence: the default's group advantages returned by
  the hook give the default update."""
  import optax

  gdef, params = nnx.split(tfm.init_model(CFG, seed=9))
  tx = optax.sgd(1.0)
  ro = _rollout(seed=2)
  lm = lambda ro: (jnp.concatenate([ro['prompt'], ro['tokens']], 1),
                   jnp.concatenate([ro['prompt_mask'], ro['completion_mask']], 1))
  per_token = lambda r, ro: jnp.where(ro['tokens'] == GOOD, 1.0, -0.5)
  loss = losses.GRPOConfig(max_completion_length=5)
  setup = lambda fn: grpo.GRPOSetup(group_size=4, loss=loss, sampling=SamplingConfig(max_new_tokens=5, eos_id=2, pad_id=0),
                                    reward=RewardConfig(), step_id=3, advantage_fn=fn)
  copy = lambda: create_train_state(jax.tree.map(jnp.copy, params), tx)
  got, _ = grpo.grpo_update_jit(gdef, tx, setup(per_token), copy(), None, ro)

  def objective(p):
    seq, seq_mask = lm(ro)
    logp, _ = grpo.completion_logprobs(gdef, p, seq, seq_mask, 2)
    adv = per_token(None, ro)
    cm = ro['completion_mask'].astype(jnp.float32)
    return -jnp.sum(adv * logp * cm) / cm.sum()

  grad = jax.jit(jax.grad(objective))(params)  # jitted: op by op compiles far more
  jax.tree.map(lambda a, p, g: np.testing.assert_allclose(np.asarray(a) - np.asarray(p), -np.asarray(g), rtol=1e-4,
                                                          atol=1e-6), got.params, params, grad)
  default, _ = grpo.grpo_update_jit(gdef, tx, setup(None), copy(), None, ro)
  hook = lambda r, ro: losses.advantages.group_advantages(r).reshape(-1)
  hooked, _ = grpo.grpo_update_jit(gdef, tx, setup(hook), copy(), None, ro)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), default.params, hooked.params)
  with pytest.raises(ValueError, match=r'advantage_fn returned shape \(4, 4\), expected \(16,\) or \(16, 5\)'):
    grpo.grpo_update_jit(gdef, tx, setup(lambda r, ro: r), copy(), None, ro)
