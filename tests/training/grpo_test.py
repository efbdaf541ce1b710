"""GRPO iteration: one compiled program, learns a bandit, no-ops on constant rewards."""
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
  setup = lambda k: grpo.GRPOSetup(group_size=4, loss=loss, sampling=sampling, reward=RewardConfig(),
                                   step_id=3, microbatches=k)
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
  with pytest.raises(ValueError, match=r'score_host returned shape \(3,\), expected \(32,\)'):
    grpo.grpo_iteration_host_scored(gdef, tx, _setup(), host, None, _batch(), jax.random.key(5),
                                    lambda t, n: np.zeros(3))
