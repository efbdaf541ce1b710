"""Phase 2: a GRPO iteration as ONE compiled program (purejaxrl style).

rollout (G samples per prompt, on-device sampler) -> jittable reward -> group advantages ->
num_iterations (μ) clipped-surrogate updates that reuse the rollout with π_old log-probs.
Nothing leaves the device between the stages; the host only dispatches and logs.

Log-probs in the loss are those of the untempered policy (the same quantity the sampler
returns), so with μ = 1 the ratio is exactly 1 and the update is the plain policy gradient of
the clipped objective. Dynamic sampling keeps shapes fixed: groups whose rewards are all equal
are masked out of the loss (their advantages are 0 anyway) instead of being resampled.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlm_jax.models.transformer import positions_from_mask
from rlm_jax.sampling.sampler import SampleOutput, SamplingConfig, StopReason, generate
from rlm_jax.training import advantages, losses
from rlm_jax.training.rewards import RewardConfig, final_step_score, score_to_reward
from rlm_jax.training.state import TrainState, all_finite, apply_gradients


@dataclasses.dataclass(frozen=True)
class GRPOSetup:
  """Everything static about a GRPO iteration (hashable: it keys the compile cache)."""

  group_size: int
  loss: losses.GRPOConfig
  sampling: SamplingConfig
  reward: RewardConfig
  step_id: int
  # Jittable verifier: (SampleOutput, batch with rows repeated G times) -> scores in {-1, 0, 1, 2}.
  # None: the final step must equal batch['answer'] (`final_step_score`).
  score_fn: Callable[[SampleOutput, dict], jax.Array] | None = None


def answer_match_score(out: SampleOutput, batch: dict, step_id: int) -> jax.Array:
  return final_step_score(out.tokens_BxT, out.lengths_B, out.stop_reason_B, batch['answer'],
                          batch['answer_len'], step_id)


def completion_logprobs(graphdef, params, seq_BxL, seq_mask_BxL, prompt_len: int):
  """log π(completion tokens) and entropies for sequences laid out as [prompt | completion]."""
  model = nnx.merge(graphdef, params)
  logits = model(seq_BxL, positions_from_mask(seq_mask_BxL), seq_mask_BxL).logits_BxLxV
  logits_BxTxV = logits[:, prompt_len - 1 : -1]
  targets_BxT = seq_BxL[:, prompt_len:]
  return losses.token_logprobs(logits_BxTxV, targets_BxT), losses.token_entropy(logits_BxTxV)


def rollout(graphdef, params, batch: dict, key: jax.Array, setup: GRPOSetup) -> dict:
  """Samples G completions per prompt and scores them. Rows are prompt-major: [B·G]."""
  batch = jax.tree.map(lambda x: jnp.repeat(x, setup.group_size, axis=0), batch)
  prompt, prompt_mask = batch['prompt'], batch['prompt_mask']
  out = generate(graphdef, params, prompt, prompt_mask, key, setup.sampling)
  if setup.score_fn is None:
    score = answer_match_score(out, batch, setup.step_id)
  else:
    score = setup.score_fn(out, batch)
  t = out.tokens_BxT.shape[1]
  completion_mask = jnp.arange(t)[None] < out.lengths_B[:, None]
  return {
      'prompt': prompt, 'prompt_mask': prompt_mask, 'tokens': out.tokens_BxT,
      'completion_mask': completion_mask, 'lengths': out.lengths_B,
      'truncated': out.stop_reason_B == StopReason.LENGTH, 'score': score,
      'reward': score_to_reward(score, setup.reward), 'sample_logprobs': out.logprobs_BxT,
  }


def grpo_iteration(graphdef, tx: optax.GradientTransformation, setup: GRPOSetup, state: TrainState,
                   ref_params, batch: dict, key: jax.Array):
  """Rollout, rewards, advantages and μ updates.

  Args:
    graphdef: policy graph (static).
    tx: optimizer (static).
    setup: static GRPO settings.
    state: TrainState of the policy (donated).
    ref_params: frozen reference policy params, or None when setup.loss.beta == 0.
    batch: prompt [B, Lp] (left-padded), prompt_mask, answer [B, A], answer_len [B].
    key: PRNG key for the rollout.

  Returns:
    (new_state, metrics) with scalar metrics.
  """
  cfg = setup.loss
  b = batch['prompt'].shape[0]
  g = setup.group_size
  ro = rollout(graphdef, state.params, batch, key, setup)
  lp = ro['prompt'].shape[1]
  reward = ro['reward']
  if cfg.overlong_buffer:
    reward = reward + advantages.overlong_penalty(ro['lengths'], cfg.max_completion_length,
                                                  cfg.overlong_buffer, cfg.overlong_penalty_factor)
  reward_BxG = reward.reshape(b, g)
  adv = advantages.group_advantages(reward_BxG, cfg.scale_rewards).reshape(b * g)
  mask = ro['completion_mask']
  if cfg.dynamic_sampling:
    keep_B = advantages.dynamic_sampling_mask(reward_BxG)
    mask = mask & jnp.repeat(keep_B, g)[:, None]

  seq = jnp.concatenate([ro['prompt'], ro['tokens']], axis=1)
  seq_mask = jnp.concatenate([ro['prompt_mask'], ro['completion_mask']], axis=1)
  logp_fn = lambda p: completion_logprobs(graphdef, p, seq, seq_mask, lp)
  old_logp = jax.lax.stop_gradient(logp_fn(state.params)[0]) if cfg.num_iterations > 1 else None
  ref_logp = jax.lax.stop_gradient(logp_fn(ref_params)[0]) if cfg.beta > 0 else None

  def loss_fn(params):
    logp, entropy = logp_fn(params)
    loss, aux = losses.grpo_loss(logp, old_logp, ref_logp, adv, mask, ro['truncated'], cfg)
    aux['entropy'] = jnp.sum(entropy * mask) / jnp.maximum(mask.sum(), 1)
    return loss, aux

  def update(st: TrainState, _):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(st.params)
    finite = jnp.isfinite(loss) & all_finite(grads)
    new = apply_gradients(st, grads, tx)
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, st)
    return new, dict(aux, loss=loss, grad_norm=optax.global_norm(grads), finite=finite)

  state, aux = jax.lax.scan(update, state, None, length=cfg.num_iterations)
  aux = jax.tree.map(lambda x: x[-1], aux)
  solved = (ro['score'] == 2).astype(jnp.float32)
  metrics = dict(
      aux,
      reward=reward.mean(),
      accuracy=solved.mean(),
      invalid=(ro['score'] < 0).mean(),
      completion_length=ro['lengths'].mean(),
      truncated=ro['truncated'].mean(),
      solve_all=jnp.mean(jnp.all(solved.reshape(b, g) > 0, axis=1)),
      solve_none=jnp.mean(jnp.all(solved.reshape(b, g) == 0, axis=1)),
      finite=jnp.all(aux['finite']),
  )
  return state, metrics


grpo_iteration_jit = jax.jit(grpo_iteration, static_argnums=(0, 1, 2), donate_argnums=(3,))
