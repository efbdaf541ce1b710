"""Advantage estimators: GRPO group baselines, DAPO filters, process supervision, GAE, tree TD.

Pure, jittable functions on arrays. Python-level arguments (strings, ints) are static: validate
them eagerly, then trace only array code.

Standard deviations are unbiased (Bessel's correction, divide by n - 1), as in TRL's GRPO
(`trl.trainer.utils.nanstd` and `torch.std`), so advantages match TRL number for number. With
G = 2 and rewards (1, 0) this gives ±0.7071, not ±1. A group with one valid sample has std 0.
"""

import typing
from typing import Literal

import jax
import jax.numpy as jnp

# MCTS step advantages live with the tree targets they come from; re-exported here.
from rlm_jax.search.export import step_td_advantages  # noqa: F401

ScaleRewards = Literal["group", "batch", "none"]
SCALE_REWARDS = typing.get_args(ScaleRewards)
EmWeights = Literal["raw", "centered", "normalized"]
EM_WEIGHT_KINDS = typing.get_args(EmWeights)


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _masked_mean_std(x, valid, axis):
  """Mean and unbiased std of `x` over `axis` where `valid`; std is 0 with < 2 values."""
  n = valid.sum(axis=axis, keepdims=True)
  mean = jnp.where(valid, x, 0.0).sum(axis=axis, keepdims=True) / jnp.maximum(n, 1.0)
  sq = jnp.where(valid, (x - mean) ** 2, 0.0).sum(axis=axis, keepdims=True)
  std = jnp.sqrt(sq / jnp.maximum(n - 1.0, 1.0))
  return mean, jnp.where(n > 1, std, 0.0)


def _valid_or_ones(valid, shape):
  return jnp.ones(shape, bool) if valid is None else jnp.asarray(valid, bool)


def group_advantages(rewards_BxG, scale_rewards="group", eps=1e-4, valid_BxG=None):
  """GRPO outcome advantages: reward minus group mean, optionally scaled (as TRL).

  adv = (r - mean_group(r)) / (std + eps), with std the group's std ('group'), the std of all
  valid rewards in the batch ('batch', PPO-Lite), or no scaling at all ('none', Dr. GRPO).
  The mean is always per group, as in TRL.

  Args:
    rewards_BxG: rewards of G completions for each of B prompts.
    scale_rewards: 'group' | 'batch' | 'none'.
    eps: added to the std before dividing (TRL uses 1e-4).
    valid_BxG: optional bool mask; invalid entries are ignored by the statistics and get 0.

  Returns:
    adv_BxG float32.
  """
  if scale_rewards not in SCALE_REWARDS:
    raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
  r_BxG = _f32(rewards_BxG)
  valid_BxG = _valid_or_ones(valid_BxG, r_BxG.shape)
  mean_Bx1, std_Bx1 = _masked_mean_std(r_BxG, valid_BxG, axis=1)
  adv_BxG = r_BxG - mean_Bx1
  if scale_rewards == "group":
    adv_BxG = adv_BxG / (std_Bx1 + eps)
  elif scale_rewards == "batch":
    _, std = _masked_mean_std(r_BxG, valid_BxG, axis=(0, 1))
    adv_BxG = adv_BxG / (std + eps)
  return jnp.where(valid_BxG, adv_BxG, 0.0)


def mixed_reward_groups(rewards_BxG, atol=1e-6, valid_BxG=None):
  """Which groups have rewards that are not all equal (the filter of DAPO dynamic sampling).

  A group where every completion gets the same reward has zero advantage everywhere and
  only dilutes the batch. DAPO drops such groups and samples new ones until the batch is
  full; with fixed shapes `GRPOConfig.mask_constant_groups` only masks them.

  Args:
    rewards_BxG: rewards.
    atol: groups with max - min <= atol count as constant.
    valid_BxG: optional bool mask of completions that count.

  Returns:
    keep_B bool.
  """
  r_BxG = _f32(rewards_BxG)
  valid_BxG = _valid_or_ones(valid_BxG, r_BxG.shape)
  hi_B = jnp.where(valid_BxG, r_BxG, -jnp.inf).max(axis=1)
  lo_B = jnp.where(valid_BxG, r_BxG, jnp.inf).min(axis=1)
  return (hi_B - lo_B) > atol  # a group with no valid entry gives -inf -> dropped


def overlong_penalty(lengths_B, max_completion_length, overlong_buffer, penalty_factor):
  """DAPO soft overlong punishment (DAPO eq. 13, TRL `get_soft_overlong_punishment`), in tokens.

  penalty = 0                                      if L <= Lmax - buffer
          = factor * ((Lmax - buffer) - L) / buffer  if Lmax - buffer < L <= Lmax
          = -factor                                 if L > Lmax
  With buffer = 0 only L > Lmax is punished.

  Args:
    lengths_B: completion lengths in tokens (int).
    max_completion_length: Lmax (python int).
    overlong_buffer: buffer length in tokens (python int, 0 <= buffer <= Lmax).
    penalty_factor: penalty at L = Lmax (positive number; the result is <= 0).

  Returns:
    penalty_B float32, to be added to the rewards.
  """
  if not 0 <= overlong_buffer <= max_completion_length:
    raise ValueError(
        f"overlong_buffer must be in [0, max_completion_length={max_completion_length}], "
        f"got {overlong_buffer}")
  length_B = _f32(lengths_B)
  start = max_completion_length - overlong_buffer
  ramp_B = (start - length_B) / max(overlong_buffer, 1)
  ramp_B = jnp.clip(ramp_B, -1.0, 0.0) if overlong_buffer > 0 else jnp.zeros_like(length_B)
  return penalty_factor * jnp.where(length_B > max_completion_length, -1.0, ramp_B)


def process_advantages(step_rewards_BxGxS, step_valid_BxGxS, token_step_BxGxL, eps=1e-4):
  """Process-supervised GRPO advantages (DeepSeekMath §4.1.3).

  Step rewards are normalised over all valid steps of all G completions of a prompt:
  r~ = (r - mean) / (std + eps). A token's advantage is the sum of the normalised rewards of
  its own step and every later step of the same completion.

  Args:
    step_rewards_BxGxS: PRM reward of step s of completion g of prompt b.
    step_valid_BxGxS: bool, which steps exist.
    token_step_BxGxL: int, step index of each completion token; -1 for padding.
    eps: added to the std.

  Returns:
    adv_BxGxL float32 (0 on padding tokens).
  """
  r_BxGxS = _f32(step_rewards_BxGxS)
  valid_BxGxS = jnp.asarray(step_valid_BxGxS, bool)
  mean, std = _masked_mean_std(r_BxGxS, valid_BxGxS, axis=(1, 2))
  norm_BxGxS = jnp.where(valid_BxGxS, (r_BxGxS - mean) / (std + eps), 0.0)
  togo_BxGxS = jnp.cumsum(norm_BxGxS[..., ::-1], axis=-1)[..., ::-1]
  step_BxGxL = jnp.asarray(token_step_BxGxL, jnp.int32)
  adv_BxGxL = jnp.take_along_axis(togo_BxGxS, jnp.maximum(step_BxGxL, 0), axis=-1)
  return jnp.where(step_BxGxL >= 0, adv_BxGxL, 0.0)


def gae(rewards_BxT, values_BxT, valid_BxT, gamma, lam, last_value_B=None):
  """Generalised advantage estimation with a backward `lax.scan`.

  delta_t = r_t + gamma * V_next - V_t,  A_t = delta_t + gamma * lam * A_next,  R_t = A_t + V_t.
  Invalid (padding) positions are skipped: each valid position links to the next *valid*
  one, so right-, left- or interior padding all give the same result as the unpadded row.
  After the last valid position, V_next = last_value_B (bootstrap for a cut-off rollout) or
  0 (the episode ended). TRL's PPO loop instead links position t to t + 1 unconditionally and
  relies on values being zeroed after the sequence end; for right padding the two agree.

  Args:
    rewards_BxT, values_BxT: per-position rewards and value estimates.
    valid_BxT: bool mask of real positions.
    gamma, lam: discount and GAE lambda.
    last_value_B: optional value of the state after the last valid position.

  Returns:
    (adv_BxT, returns_BxT) float32, both 0 on invalid positions.
  """
  r_TxB = _f32(rewards_BxT).T
  v_TxB = _f32(values_BxT).T
  valid_TxB = jnp.asarray(valid_BxT, bool).T
  b = r_TxB.shape[1]
  next_v_B = jnp.zeros((b,), jnp.float32) if last_value_B is None else _f32(last_value_B)

  def step(carry, x):
    next_adv_B, next_v_B = carry
    r_B, v_B, ok_B = x
    delta_B = r_B + gamma * next_v_B - v_B
    adv_B = jnp.where(ok_B, delta_B + gamma * lam * next_adv_B, 0.0)
    carry = (jnp.where(ok_B, adv_B, next_adv_B), jnp.where(ok_B, v_B, next_v_B))
    return carry, adv_B

  init = (jnp.zeros((b,), jnp.float32), next_v_B)
  _, adv_TxB = jax.lax.scan(step, init, (r_TxB, v_TxB, valid_TxB), reverse=True)
  adv_BxT = adv_TxB.T
  returns_BxT = jnp.where(valid_TxB.T, adv_BxT + v_TxB.T, 0.0)
  return adv_BxT, returns_BxT


def em_weights(rewards_BxG, kind="raw", eps=1e-4, valid_BxG=None):
  """Per-sample weights for the EM policy gradient (arXiv 2504.18587).

  'raw': w = r;  'centered': w = r − group mean;  'normalized': w = (r − mean)/(std + eps)
  (identical to `group_advantages(..., 'group')`).

  Args:
    rewards_BxG: rewards.
    kind: 'raw' | 'centered' | 'normalized'.
    eps: added to the std for 'normalized'.
    valid_BxG: optional bool mask; invalid entries get weight 0.

  Returns:
    w_BxG float32.
  """
  if kind not in EM_WEIGHT_KINDS:
    raise ValueError(f"em weight kind must be one of {EM_WEIGHT_KINDS}, got {kind!r}")
  if kind == "raw":
    r_BxG = _f32(rewards_BxG)
    return jnp.where(_valid_or_ones(valid_BxG, r_BxG.shape), r_BxG, 0.0)
  scale = "group" if kind == "normalized" else "none"
  return group_advantages(rewards_BxG, scale, eps, valid_BxG)


def masked_whiten(x_BxL, mask_BxL, shift_mean=True, eps=1e-8):
  """Whiten `x` over masked entries (TRL `masked_whiten`: unbiased variance); 0 elsewhere."""
  x_BxL = _f32(x_BxL)
  mask_BxL = jnp.asarray(mask_BxL, bool)
  mean, std = _masked_mean_std(x_BxL, mask_BxL, axis=(0, 1))
  out_BxL = (x_BxL - mean) * jax.lax.rsqrt(std**2 + eps)
  if not shift_mean:
    out_BxL = out_BxL + mean
  return jnp.where(mask_BxL, out_BxL, 0.0)
