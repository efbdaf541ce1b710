"""GRPO iteration: one compiled program, learns a bandit, no-ops on constant rewards."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
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
