"""EM policy gradient: one compiled program that learns a one-token bandit; M-step by hand."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlm_jax.models import transformer as tfm
from rlm_jax.sampling.sampler import SamplingConfig
from rlm_jax.training import em, grpo
from rlm_jax.training.rewards import RewardConfig
from rlm_jax.training.state import OptimConfig, create_train_state, make_optimizer

CFG = tfm.ModelConfig(vocab_size=8, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32)
GOOD = 5


def _first_token_score(out, batch):
  return jnp.where(out.tokens_BxT[:, 0] == GOOD, 2, 0)


def _setup(max_new_tokens=3, **kw):
  kw.setdefault('score_fn', _first_token_score)
  return em.EMSetup(group_size=8, sampling=SamplingConfig(max_new_tokens=max_new_tokens, eos_id=2, pad_id=0),
                    reward=RewardConfig(), step_id=3, **kw)


def _batch(b=4):
  return {'prompt': jnp.ones((b, 2), jnp.int32), 'prompt_mask': jnp.ones((b, 2), bool)}


def _p_good(gdef, params):
  logits = nnx.merge(gdef, params)(jnp.ones((1, 2), jnp.int32)).logits_BxLxV[0, -1]
  return float(jax.nn.softmax(logits)[GOOD])


def test_em_pg_learns_a_one_token_bandit_in_one_compile():
  gdef, params = nnx.split(tfm.init_model(CFG, seed=0))
  tx = make_optimizer(OptimConfig(learning_rate=3e-2, grad_clip=0.0))
  setup = _setup(weights='raw', num_m_steps=2)
  p0 = _p_good(gdef, params)
  state = create_train_state(params, tx)
  step = jax.jit(chex.assert_max_traces(em.em_iteration, n=1), static_argnums=(0, 1, 2), donate_argnums=(3,))
  for i in range(12):
    state, m = step(gdef, tx, setup, state, _batch(), jax.random.key(i))
  chex.clear_trace_counter()
  p1 = _p_good(gdef, state.params)
  assert p0 < 0.3 and p1 > 0.8, (p0, p1)
  assert int(state.step) == 24
  assert float(m['accuracy']) > 0.6 and bool(m['finite'])
  # M-steps on fixed samples raise their weighted likelihood: the loss falls within an iteration.
  assert float(m['loss']) < float(m['loss_first'])


def test_m_step_gradient_is_the_reward_weighted_likelihood_gradient():
  """num_m_steps = 1 with plain SGD (lr 1): Δθ = ∇ mean_k w_k log π(y_k). With one-token
  completions and 'centered' weights that is checked against an explicit sum over the
  sampled tokens, recomputed here from the same rollout."""
  gdef, params = nnx.split(tfm.init_model(CFG, seed=1))
  tx = optax.sgd(1.0)
  setup = _setup(max_new_tokens=1, weights='centered', num_m_steps=1)
  key = jax.random.key(3)
  ro = grpo.rollout_jit(gdef, params, _batch(), key, setup)
  r = np.asarray(ro['reward']).reshape(4, 8)
  w = (r - r.mean(axis=1, keepdims=True)).reshape(-1)
  assert np.abs(w).sum() > 0  # the draw has mixed rewards

  def objective(p):
    logits = nnx.merge(gdef, p)(ro['prompt'], mask_BxL=ro['prompt_mask']).logits_BxLxV[:, -1]
    logp = jax.nn.log_softmax(logits)[jnp.arange(32), ro['tokens'][:, 0]]
    return jnp.mean(jnp.asarray(w) * logp)

  grad = jax.jit(jax.grad(objective))(params)  # jitted: op by op compiles far more
  want = jax.tree.map(lambda p, g: p + g, params, grad)
  state, m = em.em_iteration_jit(gdef, tx, setup, create_train_state(jax.tree.map(jnp.copy, params), tx),
                                 _batch(), key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), jax.tree.map(np.asarray, want),
               jax.tree.map(np.asarray, state.params))
  np.testing.assert_allclose(float(m['reward']), r.mean(), atol=1e-6)
  np.testing.assert_allclose(float(m['weight_mean']), 0.0, atol=1e-6)


def test_bad_setup_names_the_field():
  with pytest.raises(ValueError, match="EMSetup.weights must be one of"):
    _setup(weights='softmax')
  with pytest.raises(ValueError, match="EMSetup.num_m_steps"):
    _setup(num_m_steps=0)
