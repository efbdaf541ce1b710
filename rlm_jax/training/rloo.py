"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024; TRL's RLOOTrainer).

For the G completions of one prompt, sample i's advantage is its reward minus the mean reward
of the other G − 1 samples,

    Â_i = r_i − (Σ_j r_j − r_i) / (G − 1) = G / (G − 1) · (r_i − mean_j r_j),

the same for every token of the sample (optionally divided by the batch std of the
advantages, TRL's `normalize_advantages`). Everything else is the GRPO iteration: the same
rollout, the clipped surrogate over μ = `num_iterations` updates and token-level loss
normalisation (`loss_type`). `beta` > 0 adds the k3 KL to the reference policy in the loss,
as GRPO here does (TRL's RLOO subtracts β·KL from the reward instead).
"""

from __future__ import annotations

import dataclasses
import functools
import jax.numpy as jnp

from rlm_jax.training import grpo, losses, phase


@dataclasses.dataclass(frozen=True)
class RLOOConfig:
  """`config.rl.rloo`; loss knobs as in `losses.GRPOConfig`."""

  loss_type: losses.LossType = 'dapo'
  epsilon: float = 0.2
  epsilon_high: float = 0.2
  beta: float = 0.0
  num_iterations: int = 1
  mask_truncated_completions: bool = False
  normalize_advantages: bool = False


def rloo_advantages(rewards_BxG, normalize: bool = False, eps: float = 1e-4):
  """Leave-one-out advantages [B, G] (see the module docstring); G >= 2."""
  r_BxG = jnp.asarray(rewards_BxG, jnp.float32)
  g = r_BxG.shape[1]
  baseline_BxG = (r_BxG.sum(axis=1, keepdims=True) - r_BxG) / (g - 1)
  adv_BxG = r_BxG - baseline_BxG
  if normalize:
    adv_BxG = adv_BxG / (jnp.std(adv_BxG) + eps)
  return adv_BxG


def _advantage_fn(reward_BxG, rollout, normalize: bool):
  del rollout
  return rloo_advantages(reward_BxG, normalize).reshape(-1)


def build_phase(ctx, section: RLOOConfig):
  if ctx.rl.group_size < 2:
    raise ValueError(f'rl.group_size={ctx.rl.group_size}: RLOO needs >= 2 samples per prompt')
  loss = losses.GRPOConfig(scale_rewards='none', loss_type=section.loss_type, epsilon=section.epsilon,
                           epsilon_high=section.epsilon_high, beta=section.beta,
                           num_iterations=section.num_iterations,
                           mask_truncated_completions=section.mask_truncated_completions,
                           max_completion_length=ctx.task.completion_len)
  fn = functools.partial(_advantage_fn, normalize=section.normalize_advantages)
  return grpo.build_phase(ctx, loss, advantage_fn=fn)


ALGORITHM = phase.Algorithm(name='rloo', config=RLOOConfig, build=build_phase,
                            capabilities=frozenset(phase.CAPABILITIES))
