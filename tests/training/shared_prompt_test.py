"""The update's log-prob pass with each prompt run once for its G completions
(`rollout.completion_logprobs(group_size=G)`) against every row run whole."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlm_jax.models import transformer as tfm
from rlm_jax.sampling.sampler import SamplingConfig
from rlm_jax.training import grpo, losses
from rlm_jax.training.rewards import RewardConfig
from rlm_jax.training.rollout import completion_logprobs
from rlm_jax.training.state import create_train_state

CFG = tfm.ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
B, G, LP, T = 3, 4, 6, 5


def _rows(seed=0):
  """B prompts of 6, 3 and 2 real tokens (left-padded), each repeated G times, and G different
  completions per prompt, some ending early (mask off after their end)."""
  rng = np.random.default_rng(seed)
  prompt_len = np.array([6, 3, 2])
  prompt = rng.integers(3, CFG.vocab_size, (B, LP))
  prompt_mask = np.arange(LP)[None] >= LP - prompt_len[:, None]
  prompt = np.where(prompt_mask, prompt, 0)
  comp = rng.integers(3, CFG.vocab_size, (B * G, T))
  comp_len = rng.integers(1, T + 1, B * G)
  comp_mask = np.arange(T)[None] < comp_len[:, None]
  comp = np.where(comp_mask, comp, 0)
  seq = np.concatenate([np.repeat(prompt, G, 0), comp], 1)
  seq_mask = np.concatenate([np.repeat(prompt_mask, G, 0), comp_mask], 1)
  return jnp.asarray(seq, jnp.int32), jnp.asarray(seq_mask), jnp.asarray(comp_mask)


def test_shared_prompt_logprobs_and_gradients_equal_whole_rows(temperature=0.5):
  gdef, params = nnx.split(tfm.init_model(CFG, seed=3))
  seq, seq_mask, comp_mask = _rows()
  w = jnp.asarray(np.random.default_rng(1).normal(size=(B * G, T)), jnp.float32) * comp_mask

  def objective(p, g):
    logp, ent = completion_logprobs(gdef, p, seq, seq_mask, LP, temperature, 0, group_size=g)
    return jnp.sum(w * logp) + 0.1 * jnp.sum(ent * comp_mask), (logp, ent)

  run = jax.jit(jax.value_and_grad(objective, has_aux=True), static_argnums=1)
  (_, (logp1, ent1)), grad1 = run(params, 1)
  (_, (logp4, ent4)), grad4 = run(params, G)
  m = np.asarray(comp_mask)
  np.testing.assert_allclose(np.asarray(logp4)[m], np.asarray(logp1)[m], atol=1e-5)
  np.testing.assert_allclose(np.asarray(ent4)[m], np.asarray(ent1)[m], atol=1e-5)
  assert float(jnp.abs(logp1).max()) > 1.0  # real log-probs of a random model over 32 tokens
  # Gradients reach the prompt positions summed over the group (the embedding rows of prompt
  # tokens, every layer's weights) as the repeated rows give them.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grad4, grad1)
  assert float(jnp.abs(grad1['embed'][...][np.asarray(seq[0, :LP])]).max()) > 1e-4


def test_shared_prompt_needs_whole_groups():
  gdef, params = nnx.split(tfm.init_model(CFG, seed=3))
  seq, seq_mask, _ = _rows()
  with pytest.raises(ValueError, match='12 rows are not runs of group_size=5'):
    completion_logprobs(gdef, params, seq, seq_mask, LP, group_size=5)


def _setup(**kw):
  loss = losses.GRPOConfig(max_completion_length=T, beta=0.1, num_iterations=2)
  return grpo.GRPOSetup(group_size=G, loss=loss, sampling=SamplingConfig(max_new_tokens=T, eos_id=2, pad_id=0),
                        reward=RewardConfig(), step_id=1, **kw)


def test_prompt_group_inside_microbatches():
  """Microbatches take every k-th row: with k | G each holds G/k rows of every prompt."""
  assert [_setup(microbatches=k).prompt_group for k in (1, 2, 4, 3)] == [4, 2, 1, 1]
  assert _setup(shared_prompt=False).prompt_group == 1
  with pytest.raises(ValueError, match='GRPOSetup.shared_prompt must be True or False'):
    _setup(shared_prompt=1)


def test_grpo_update_with_shared_prompts_equals_whole_rows(microbatches=2):
  """μ = 2 with a KL to a reference model, Adam, 2 microbatches (each holding G/2 rows of
  every prompt): the update that runs each prompt once gives the parameters and metrics of the
  one that runs every row whole. (One microbatch: tests/training/grpo_test.py compares the
  update with the gradient of whole rows.)"""
  gdef, params = nnx.split(tfm.init_model(CFG, seed=4))
  _, ref = nnx.split(tfm.init_model(CFG, seed=5))
  seq, seq_mask, comp_mask = _rows(seed=2)
  rng = np.random.default_rng(3)
  ro = {'prompt': seq[:, :LP], 'prompt_mask': seq_mask[:, :LP], 'tokens': seq[:, LP:], 'completion_mask': comp_mask,
        'reward': jnp.asarray(rng.integers(0, 2, B * G), jnp.float32),
        'score': jnp.asarray(rng.integers(0, 3, B * G), jnp.int32),
        'lengths': comp_mask.sum(1), 'truncated': jnp.zeros(B * G, bool),
        'sample_logprobs': jnp.asarray(rng.normal(size=(B * G, T)) - 2.0, jnp.float32)}
  tx = optax.adam(1e-2)
  run = lambda setup: grpo.grpo_update_jit(gdef, tx, setup, create_train_state(jax.tree.map(jnp.copy, params), tx),
                                           ref, ro)
  shared, m1 = run(_setup(microbatches=microbatches))
  whole, m2 = run(_setup(microbatches=microbatches, shared_prompt=False))
  # Adam divides by sqrt(v): float rounding of near-zero gradients moves a weight by ~1e-6.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), shared.params, whole.params)
  for k in ('loss', 'kl', 'entropy'):
    np.testing.assert_allclose(float(m1[k]), float(m2[k]), rtol=1e-4, atol=1e-6)
  assert float(m1['kl']) > 1e-3  # the two models differ: the KL term is exercised
  moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(shared.params), jax.tree.leaves(params)))
  assert moved > 1e-3
  assert dataclasses.replace(_setup(), shared_prompt=False).prompt_group == 1


def test_ppo_forward_and_iteration_with_shared_prompts_equal_whole_rows():
  """The actor-critic's log-probs, entropies and values per completion token, and a whole PPO
  iteration (recomputed π_old / V_old, KL to a reference, 2 epochs of 3 minibatches of whole
  prompt groups, `shuffle='groups'`), agree with whole rows."""
  from rlm_jax.training import ppo  # pylint: disable=g-import-not-at-top

  cfg = tfm.ModelConfig(**{**CFG.__dict__, 'value_head': 'sigmoid'})
  gdef, params = nnx.split(tfm.init_model(cfg, seed=6))
  _, ref = nnx.split(tfm.init_model(cfg, seed=7))
  seq, seq_mask, comp_mask = _rows(seed=4)
  m = np.asarray(comp_mask)
  run = jax.jit(ppo.forward, static_argnums=(0, 4, 5, 6, 7))
  for a, b in zip(run(gdef, params, seq, seq_mask, LP, 0.7, 0, G), run(gdef, params, seq, seq_mask, LP, 0.7, 0, 1)):
    np.testing.assert_allclose(np.asarray(a)[m], np.asarray(b)[m], atol=1e-5)

  loss = losses.PPOConfig(num_ppo_epochs=2, kl_coef=0.05, vf_coef=0.5)
  setup = lambda shared: ppo.PPOSetup(loss=loss, sampling=SamplingConfig(max_new_tokens=T, eos_id=2, pad_id=0),
                                      reward=RewardConfig(correct=1.0, wrong=-1.0), step_id=1, group_size=G,
                                      recompute_old=True, shared_prompt=shared, num_minibatches=3,
                                      shuffle='groups',
                                      score_fn=lambda out, batch: jnp.where(out.tokens_BxT[:, 0] % 2 == 0, 2, 0))
  tx = optax.adam(1e-2)
  batch = {'prompt': seq[::G, :LP], 'prompt_mask': seq_mask[::G, :LP]}
  iterate = lambda shared: ppo.ppo_iteration_jit(gdef, tx, setup(shared), create_train_state(
      jax.tree.map(jnp.copy, params), tx), ref, batch, jax.random.key(3))
  (s1, m1), (s2, m2) = iterate(True), iterate(False)
  for k in ('reward', 'kl', 'value_mean', 'pg_loss', 'vf_loss', 'loss'):
    np.testing.assert_allclose(float(m1[k]), float(m2[k]), rtol=1e-4, atol=1e-6, err_msg=k)
  assert 0.0 < float(m1['reward'] + 1.0) / 2.0 < 1.0  # mixed rewards: a real policy gradient
  # 6 Adam steps at lr 1e-2 (2 epochs x 3 minibatches) carry float error: measured max 1.6e-5.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5), s1.params, s2.params)
