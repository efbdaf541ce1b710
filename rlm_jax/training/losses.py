"""Training losses: SFT, GRPO family, PPO, EM policy gradient, value / PRM / ORM regression.

Pure, jittable functions of arrays (log-probs, values, masks), not of parameters: the trainer
composes `model forward -> token_logprobs -> loss`. Everything accumulates in float32. Masked
positions never affect a result or a gradient: inputs are zeroed there with `jnp.where` before
any arithmetic, so even inf/nan garbage in padding stays out (the "double where" rule).
Configs are frozen dataclasses (hashable, so they can be static jit arguments).

Knob names follow TRL (`trl.GRPOConfig`, `trl.experimental.ppo.PPOConfig`) so that results
compare. Where the code differs from TRL, the docstring says so.
"""

import dataclasses
import typing
from typing import Literal

import jax
import jax.numpy as jnp

from rlm_jax.training import advantages

LossType = Literal["grpo", "dapo", "dr_grpo", "bnpo"]
LOSS_TYPES = typing.get_args(LossType)
ValueMode = Literal["mse", "bce"]
VALUE_MODES = typing.get_args(ValueMode)
EmNormalize = Literal["sequence_sum", "token_mean"]
EM_NORMALIZE = typing.get_args(EmNormalize)


def _check(ok, msg):
  if not ok:
    raise ValueError(msg)


def _f32(x):
  return jnp.asarray(x, jnp.float32)


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """GRPO-family knobs, named and defaulted as in TRL's GRPOConfig.

  Built from a ConfigDict with `configlib.from_config(GRPOConfig, cfg.grpo, 'grpo')`; direct
  construction validates the same way.

  epsilon_high=None means "same as epsilon" (TRL); after construction it is always a float.
  mask_constant_groups / overlong_buffer / overlong_penalty_factor are the DAPO extras (TRL
  provides the overlong term as a reward function instead); overlong_buffer=0 turns it off.
  mask_constant_groups is the fixed-shape half of DAPO's dynamic sampling: groups whose G
  rewards are all equal are masked out of the loss (their tokens stop counting in the token
  normalisers), but they are not replaced by newly sampled groups, so the batch shrinks.
  """
  scale_rewards: advantages.ScaleRewards = "group"
  loss_type: LossType = "dapo"
  epsilon: float = 0.2
  epsilon_high: float | None = None
  beta: float = 0.0
  num_iterations: int = 1
  mask_truncated_completions: bool = False
  max_completion_length: int = 512
  mask_constant_groups: bool = False
  overlong_buffer: int = 0
  overlong_penalty_factor: float = 1.0

  def __post_init__(self):
    if self.epsilon_high is None:
      object.__setattr__(self, "epsilon_high", self.epsilon)
    _check(self.scale_rewards in advantages.SCALE_REWARDS,
           f"GRPOConfig.scale_rewards must be one of {advantages.SCALE_REWARDS}, "
           f"got {self.scale_rewards!r}")
    _check(self.loss_type in LOSS_TYPES,
           f"GRPOConfig.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
    _check(0.0 <= self.epsilon < 1.0, f"GRPOConfig.epsilon must be in [0, 1), got {self.epsilon}")
    _check(self.epsilon_high >= 0.0,
           f"GRPOConfig.epsilon_high must be >= 0 or None, got {self.epsilon_high}")
    _check(self.beta >= 0.0, f"GRPOConfig.beta must be >= 0, got {self.beta}")
    _check(isinstance(self.num_iterations, int) and self.num_iterations >= 1,
           f"GRPOConfig.num_iterations must be an int >= 1, got {self.num_iterations!r}")
    _check(isinstance(self.mask_truncated_completions, bool),
           "GRPOConfig.mask_truncated_completions must be True or False, "
           f"got {self.mask_truncated_completions!r}")
    _check(isinstance(self.max_completion_length, int) and self.max_completion_length >= 1,
           f"GRPOConfig.max_completion_length must be an int >= 1, "
           f"got {self.max_completion_length!r}")
    _check(isinstance(self.mask_constant_groups, bool),
           f"GRPOConfig.mask_constant_groups must be True or False, got {self.mask_constant_groups!r}")
    _check(isinstance(self.overlong_buffer, int)
           and 0 <= self.overlong_buffer <= self.max_completion_length,
           "GRPOConfig.overlong_buffer must be an int in [0, max_completion_length], "
           f"got {self.overlong_buffer!r}")
    _check(self.overlong_penalty_factor >= 0.0,
           f"GRPOConfig.overlong_penalty_factor must be >= 0, got {self.overlong_penalty_factor}")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """PPO knobs, named and defaulted as in TRL's PPOConfig (entropy_coef as in TRL's GRPO).

  cliprange_value=None disables value clipping (TRL always clips).
  """
  cliprange: float = 0.2
  cliprange_value: float | None = 0.2
  vf_coef: float = 0.1
  entropy_coef: float = 0.0
  gamma: float = 1.0
  lam: float = 0.95
  kl_coef: float = 0.05
  num_ppo_epochs: int = 4
  whiten_rewards: bool = False

  def __post_init__(self):
    _check(0.0 <= self.cliprange < 1.0,
           f"PPOConfig.cliprange must be in [0, 1), got {self.cliprange}")
    _check(self.cliprange_value is None or self.cliprange_value >= 0.0,
           f"PPOConfig.cliprange_value must be >= 0 or None, got {self.cliprange_value}")
    _check(self.vf_coef >= 0.0, f"PPOConfig.vf_coef must be >= 0, got {self.vf_coef}")
    _check(self.entropy_coef >= 0.0,
           f"PPOConfig.entropy_coef must be >= 0, got {self.entropy_coef}")
    _check(0.0 < self.gamma <= 1.0, f"PPOConfig.gamma must be in (0, 1], got {self.gamma}")
    _check(0.0 <= self.lam <= 1.0, f"PPOConfig.lam must be in [0, 1], got {self.lam}")
    _check(self.kl_coef >= 0.0, f"PPOConfig.kl_coef must be >= 0, got {self.kl_coef}")
    _check(isinstance(self.num_ppo_epochs, int) and self.num_ppo_epochs >= 1,
           f"PPOConfig.num_ppo_epochs must be an int >= 1, got {self.num_ppo_epochs!r}")
    _check(isinstance(self.whiten_rewards, bool),
           f"PPOConfig.whiten_rewards must be True or False, got {self.whiten_rewards!r}")


# --- helpers ---------------------------------------------------------------------------------

def _masked(x, mask):
  """x where mask, else 0 (also blocks nan/inf in the unmasked branch from gradients)."""
  return jnp.where(mask > 0, _f32(x), 0.0)


def _masked_mean(x, mask):
  return _masked(x, mask).sum() / jnp.maximum(_f32(mask).sum(), 1.0)


def token_logprobs(logits_BxLxV, targets_BxL):
  """log softmax(logits)[target] per position, in float32.

  Computed as logit[target] - logsumexp(logits) so no [B, L, V] log-prob tensor is kept.
  Targets must already be aligned with logits (logits at t predict targets at t).

  Returns:
    logp_BxL float32.
  """
  logits_BxLxV = _f32(logits_BxLxV)
  picked_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  return picked_BxL - jax.nn.logsumexp(logits_BxLxV, axis=-1)


def token_entropy(logits_BxLxV):
  """Entropy of softmax(logits) per position, in float32: logsumexp(z) - sum p z.

  Returns:
    ent_BxL float32.
  """
  z_BxLxV = _f32(logits_BxLxV)
  p_BxLxV = jax.nn.softmax(z_BxLxV, axis=-1)
  return jax.nn.logsumexp(z_BxLxV, axis=-1) - (p_BxLxV * z_BxLxV).sum(-1)


def lm_head_logprobs(h_BxTxD, w_DxV, targets_BxT, temperature=1.0, chunk_tokens=1024):
  """log softmax(h·W / T)[target] and the entropy per position, LM head applied in chunks.

  Equals `token_logprobs` / `token_entropy` of the logits h·W / T, but a float32 [B, T, V]
  array never exists whole: `lax.map` runs over chunks of C positions (all B rows per chunk,
  so a batch-sharded h stays sharded), and `jax.checkpoint` makes the backward pass recompute
  each chunk's logits instead of storing them. Peak memory holds one [B, C, V] chunk.

  Args:
    h_BxTxD: final-norm hidden states at the positions that predict the targets.
    w_DxV: LM-head weight (`Transformer.lm_head_DxV()`).
    targets_BxT: int target ids aligned with h.
    temperature: T (python float; static).
    chunk_tokens: about how many positions (B·C) one chunk holds; C = max(1, chunk_tokens // B).
      0 = one chunk (the plain computation).

  Returns:
    (logp_BxT, entropy_BxT) float32.
  """
  b, t, d = h_BxTxD.shape
  c = t if chunk_tokens <= 0 else max(1, min(t, chunk_tokens // max(b, 1)))
  n = -(-t // c)

  def head(h_BxCxD, tg_BxC):
    z_BxCxV = _f32(h_BxCxD @ w_DxV)
    if temperature != 1.0:
      z_BxCxV = z_BxCxV / temperature
    lse_BxC = jax.nn.logsumexp(z_BxCxV, axis=-1)
    picked_BxC = jnp.take_along_axis(z_BxCxV, tg_BxC[..., None], axis=-1)[..., 0]
    p_BxCxV = jnp.exp(z_BxCxV - lse_BxC[..., None])
    return picked_BxC - lse_BxC, lse_BxC - (p_BxCxV * z_BxCxV).sum(-1)

  if n == 1:
    return head(h_BxTxD, targets_BxT)
  pad = n * c - t  # padded positions predict target 0; they are cut off below
  h_NxBxCxD = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, d).swapaxes(0, 1)
  tg_NxBxC = jnp.pad(targets_BxT, ((0, 0), (0, pad))).reshape(b, n, c).swapaxes(0, 1)
  logp_NxBxC, ent_NxBxC = jax.lax.map(jax.checkpoint(lambda a: head(*a)), (h_NxBxCxD, tg_NxBxC))
  unchunk = lambda x_NxBxC: x_NxBxC.swapaxes(0, 1).reshape(b, n * c)[:, :t]
  return unchunk(logp_NxBxC), unchunk(ent_NxBxC)


# --- SFT -------------------------------------------------------------------------------------

def sft_loss(logits_BxLxV, targets_BxL, loss_mask_BxL):
  """Completion-only cross-entropy: token mean of -log p(target) over loss_mask.

  Args:
    logits_BxLxV: next-token logits aligned with targets.
    targets_BxL: int target ids.
    loss_mask_BxL: 1 on completion tokens that count (prompt and padding 0).

  Returns:
    (loss, aux) with aux = {'num_tokens', 'accuracy'} (greedy next-token accuracy on the mask).
  """
  logp_BxL = token_logprobs(logits_BxLxV, targets_BxL)
  loss = -_masked_mean(logp_BxL, loss_mask_BxL)
  hit_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
  aux = {"num_tokens": _f32(loss_mask_BxL).sum(), "accuracy": _masked_mean(hit_BxL, loss_mask_BxL)}
  return loss, aux


# --- GRPO family -----------------------------------------------------------------------------

def grpo_loss(logp_BxL, old_logp_BxL, ref_logp_BxL, adv, mask_BxL, truncated_B, cfg,
              num_items=None):
  """GRPO / DAPO / Dr.GRPO / BNPO clipped surrogate with a k3 KL penalty (TRL `_compute_loss`).

  per token: -min(ρ·A, clip(ρ, 1-ε, 1+ε_high)·A) + β·(exp(Δ) - Δ - 1),
  ρ = exp(logp - old_logp), Δ = ref_logp - logp. Aggregation by cfg.loss_type:
    grpo:    mean over the B rows of each row's token mean (rows with no tokens count as 0,
             and still count in B, as in TRL).
    bnpo:    sum over tokens / number of valid tokens in *this* batch.
    dapo:    sum over tokens / num_items, the valid-token count of the whole accumulated
             batch. num_items=None uses this batch's count (then dapo == bnpo). When the trainer
             splits one update into k microbatches and averages their gradients, pass
             num_items = (valid tokens in all k microbatches) / k, which reproduces TRL's
             global-token normaliser exactly; bnpo always normalises per microbatch (TRL).
    dr_grpo: sum over tokens / (B · cfg.max_completion_length).
  TRL divides grpo/bnpo/dr_grpo by the gradient-accumulation steps inside the loss; here that
  is the trainer's averaging of microbatch gradients.

  Args:
    logp_BxL: log π_θ of the completion tokens (differentiated).
    old_logp_BxL: log π_old from the rollout policy; None means π_old = stop_gradient(π_θ)
      (num_iterations = 1, TRL's shortcut): ρ = 1 but its gradient is ∇log π.
    ref_logp_BxL: log π_ref, or None when cfg.beta == 0.
    adv: adv_B (one advantage per completion) or adv_BxL (per token, e.g. process supervision).
    mask_BxL: 1 on completion tokens.
    truncated_B: bool, completion hit the length limit without EOS; with
      cfg.mask_truncated_completions its tokens are dropped (also from the token counts).
    cfg: GRPOConfig.
    num_items: optional token count for 'dapo' (see above).

  Returns:
    (loss, aux) with aux = {'kl', 'clip_low', 'clip_high', 'clip_region', 'ratio_mean',
    'num_tokens'}: token means over the batch's valid tokens (TRL's logged metrics); kl is 0
    without a reference.
  """
  _check(cfg.beta == 0.0 or ref_logp_BxL is not None,
         f"grpo_loss: GRPOConfig.beta={cfg.beta} needs ref_logp_BxL, got None")
  mask_BxL = _f32(mask_BxL)
  if cfg.mask_truncated_completions:
    mask_BxL = mask_BxL * (1.0 - _f32(truncated_B))[:, None]
  logp_BxL = _masked(logp_BxL, mask_BxL)
  if old_logp_BxL is None:
    old_logp_BxL = jax.lax.stop_gradient(logp_BxL)
  old_logp_BxL = _masked(old_logp_BxL, mask_BxL)
  adv = _f32(adv)
  adv_BxL = _masked(adv[:, None] if adv.ndim == 1 else adv, mask_BxL)

  ratio_BxL = jnp.exp(logp_BxL - old_logp_BxL)
  clipped_BxL = jnp.clip(ratio_BxL, 1.0 - cfg.epsilon, 1.0 + cfg.epsilon_high)
  per_tok_BxL = -jnp.minimum(ratio_BxL * adv_BxL, clipped_BxL * adv_BxL)
  kl_BxL = jnp.zeros_like(logp_BxL)
  if ref_logp_BxL is not None:
    delta_BxL = _masked(ref_logp_BxL, mask_BxL) - logp_BxL
    kl_BxL = jnp.exp(delta_BxL) - delta_BxL - 1.0
  if cfg.beta != 0.0:
    per_tok_BxL = per_tok_BxL + cfg.beta * kl_BxL
  per_tok_BxL = per_tok_BxL * mask_BxL  # a fractional mask acts as token weights

  n_tok = mask_BxL.sum()
  if cfg.loss_type == "grpo":
    loss = (per_tok_BxL.sum(-1) / jnp.maximum(mask_BxL.sum(-1), 1.0)).mean()
  elif cfg.loss_type == "bnpo":
    loss = per_tok_BxL.sum() / jnp.maximum(n_tok, 1.0)
  elif cfg.loss_type == "dapo":
    denom = n_tok if num_items is None else _f32(num_items)
    loss = per_tok_BxL.sum() / jnp.maximum(denom, 1.0)
  else:  # dr_grpo
    loss = per_tok_BxL.sum() / (mask_BxL.shape[0] * cfg.max_completion_length)

  low_BxL = (ratio_BxL < 1.0 - cfg.epsilon) & (adv_BxL < 0)
  high_BxL = (ratio_BxL > 1.0 + cfg.epsilon_high) & (adv_BxL > 0)
  aux = {
      "kl": _masked_mean(jax.lax.stop_gradient(kl_BxL), mask_BxL),
      "clip_low": _masked_mean(low_BxL, mask_BxL),
      "clip_high": _masked_mean(high_BxL, mask_BxL),
      "clip_region": _masked_mean(low_BxL | high_BxL, mask_BxL),
      "ratio_mean": _masked_mean(jax.lax.stop_gradient(ratio_BxL), mask_BxL),
      "num_tokens": n_tok,
  }
  return loss, aux


# --- PPO -------------------------------------------------------------------------------------

def ppo_loss(logp_BxL, old_logp_BxL, adv_BxL, values_BxL, old_values_BxL, returns_BxL,
             mask_BxL, entropy_BxL, cfg):
  """PPO actor-critic loss (TRL's PPO trainer, plus an entropy bonus).

  pg  = token mean of max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)),  ρ = exp(logp - old_logp)
  vf  = 0.5 · token mean of max((v - R)², (v_clip - R)²),
        v_clip = old_v + clip(v - old_v, -cliprange_value, +cliprange_value)
  loss = pg + vf_coef·vf - entropy_coef·token mean of entropy.
  Token means run over all valid tokens of the batch. TRL masks values with a mask one token
  longer than the policy mask; here one mask serves both (the trainer chooses it).

  Args:
    logp_BxL, old_logp_BxL: log π_θ and rollout log π_old of the tokens.
    adv_BxL, returns_BxL: from `advantages.gae` (whitening is the trainer's choice).
    values_BxL, old_values_BxL: current and rollout value predictions.
    mask_BxL: 1 on completion tokens.
    entropy_BxL: per-token policy entropy (`token_entropy`); may be None if entropy_coef == 0.
    cfg: PPOConfig.

  Returns:
    (loss, aux) with aux = {'pg_loss', 'vf_loss', 'entropy', 'pg_clipfrac', 'vf_clipfrac',
    'ratio_mean', 'approx_kl'}.
  """
  _check(cfg.entropy_coef == 0.0 or entropy_BxL is not None,
         f"ppo_loss: PPOConfig.entropy_coef={cfg.entropy_coef} needs entropy_BxL, got None")
  mask_BxL = _f32(mask_BxL)
  logp_BxL = _masked(logp_BxL, mask_BxL)
  log_ratio_BxL = logp_BxL - _masked(old_logp_BxL, mask_BxL)
  ratio_BxL = jnp.exp(log_ratio_BxL)
  adv_BxL = _masked(adv_BxL, mask_BxL)
  pg1_BxL = -adv_BxL * ratio_BxL
  pg2_BxL = -adv_BxL * jnp.clip(ratio_BxL, 1.0 - cfg.cliprange, 1.0 + cfg.cliprange)
  pg_loss = _masked_mean(jnp.maximum(pg1_BxL, pg2_BxL), mask_BxL)

  v_BxL = _masked(values_BxL, mask_BxL)
  old_v_BxL = _masked(old_values_BxL, mask_BxL)
  ret_BxL = _masked(returns_BxL, mask_BxL)
  vf1_BxL = (v_BxL - ret_BxL) ** 2
  if cfg.cliprange_value is None:
    vf2_BxL = vf1_BxL
  else:
    v_clip_BxL = old_v_BxL + jnp.clip(v_BxL - old_v_BxL, -cfg.cliprange_value, cfg.cliprange_value)
    vf2_BxL = (v_clip_BxL - ret_BxL) ** 2
  vf_loss = 0.5 * _masked_mean(jnp.maximum(vf1_BxL, vf2_BxL), mask_BxL)

  entropy = 0.0 if entropy_BxL is None else _masked_mean(entropy_BxL, mask_BxL)
  loss = pg_loss + cfg.vf_coef * vf_loss - cfg.entropy_coef * entropy
  sg = jax.lax.stop_gradient
  aux = {
      "pg_loss": sg(pg_loss),
      "vf_loss": sg(vf_loss),
      "entropy": sg(jnp.asarray(entropy, jnp.float32)),
      "pg_clipfrac": _masked_mean(pg2_BxL > pg1_BxL, mask_BxL),
      "vf_clipfrac": _masked_mean(vf2_BxL > vf1_BxL, mask_BxL),
      "ratio_mean": _masked_mean(sg(ratio_BxL), mask_BxL),
      "approx_kl": 0.5 * _masked_mean(sg(log_ratio_BxL) ** 2, mask_BxL),
  }
  return loss, aux


# --- EM policy gradient ----------------------------------------------------------------------

def em_pg_loss(logp_BxL, weights_B, mask_BxL, normalize="sequence_sum", neg_logp_floor=-5.0):
  """EM policy gradient M-step (arXiv 2504.18587): reward-weighted log-likelihood.

  sequence_sum: L = -mean_k w_k Σ_t ℓ_kt        (the paper's objective; mean over B rows)
  token_mean:   L = -Σ_k w_k Σ_t ℓ_kt / Σ_k |y_k|  (length-normalised variant)
  No importance ratio, no clipping; the weights are constants (stop_gradient).

  ℓ_kt = log π(y_kt) where w_k >= 0, and max(log π(y_kt), neg_logp_floor) where w_k < 0.
  With a negative weight ('centered' / 'normalized' weights, or negative rewards) the term
  |w_k|·log π(y_kt) is minimised by driving π(y_kt) to 0, so the plain objective has no lower
  bound: the M-step can spend every update pushing already-unlikely tokens further down and
  blow the log-probs up. The floor stops that per token: once a token of a negatively weighted
  sample is below exp(floor) it gets no gradient, and L >= Σ |w_k|·|floor| terms is bounded.
  Above the floor the gradient is the paper's. Positive weights are never clipped (their
  terms are bounded by log π <= 0 already).

  Args:
    logp_BxL: log π_θ of the sampled tokens.
    weights_B: per-sample weights (`advantages.em_weights`).
    mask_BxL: 1 on completion tokens.
    normalize: 'sequence_sum' | 'token_mean'.
    neg_logp_floor: log-prob floor for tokens of negatively weighted samples (< 0), or None
      for the unbounded plain objective.

  Returns:
    (loss, aux) with aux = {'nll_mean' (token mean of -log π), 'weight_mean',
    'floored_frac' (fraction of valid tokens held at the floor)}.
  """
  _check(normalize in EM_NORMALIZE,
         f"em_pg_loss: normalize must be one of {EM_NORMALIZE}, got {normalize!r}")
  _check(neg_logp_floor is None or neg_logp_floor < 0,
         f"em_pg_loss: neg_logp_floor must be < 0 or None, got {neg_logp_floor!r}")
  mask_BxL = _f32(mask_BxL)
  logp_BxL = _masked(logp_BxL, mask_BxL)
  w_B = jax.lax.stop_gradient(_f32(weights_B))
  term_BxL, floored_BxL = logp_BxL, jnp.zeros_like(logp_BxL)
  if neg_logp_floor is not None:
    floored_BxL = (w_B[:, None] < 0) & (logp_BxL < neg_logp_floor) & (mask_BxL > 0)
    term_BxL = jnp.where(w_B[:, None] < 0, jnp.maximum(logp_BxL, neg_logp_floor), logp_BxL)
  weighted_B = w_B * _masked(term_BxL, mask_BxL).sum(-1)
  if normalize == "sequence_sum":
    loss = -weighted_B.mean()
  else:
    loss = -weighted_B.sum() / jnp.maximum(mask_BxL.sum(), 1.0)
  aux = {"nll_mean": -_masked_mean(jax.lax.stop_gradient(logp_BxL), mask_BxL),
         "weight_mean": w_B.mean(), "floored_frac": _masked_mean(floored_BxL, mask_BxL)}
  return loss, aux


# --- value / PRM / ORM -----------------------------------------------------------------------

def value_loss(pred_BxL, targets_BxL, mask_BxL, mode="mse"):
  """Value / PRM / ORM regression, token mean over mask.

  mode 'mse': pred already in [-1, 1] (the head applies 2σ(z) - 1), targets in [-1, 1];
              loss = mean (pred - target)².
  mode 'bce': pred are raw logits z, targets in [0, 1] (V = σ(z) = P(correct));
              loss = mean softplus(z) - target·z  (= BCE(σ(z), target), computed stably).
  For a PRM the mask is 1 only on step-separator tokens (see `prm_targets`); for an ORM only
  on the last completion token; for a token-level value model on every completion token.

  Returns:
    (loss, aux) with aux = {'num_tokens', 'accuracy'}: accuracy is sign agreement
    (pred > 0 vs target > 0) for mse and (z > 0 vs target > 0.5) for bce.
  """
  _check(mode in VALUE_MODES, f"value_loss: mode must be one of {VALUE_MODES}, got {mode!r}")
  mask_BxL = _f32(mask_BxL)
  pred_BxL = _masked(pred_BxL, mask_BxL)
  t_BxL = _masked(targets_BxL, mask_BxL)
  if mode == "mse":
    per_tok_BxL = (pred_BxL - t_BxL) ** 2
    hit_BxL = (pred_BxL > 0) == (t_BxL > 0)
  else:
    per_tok_BxL = jax.nn.softplus(pred_BxL) - t_BxL * pred_BxL
    hit_BxL = (pred_BxL > 0) == (t_BxL > 0.5)
  loss = _masked_mean(per_tok_BxL, mask_BxL)
  return loss, {"num_tokens": mask_BxL.sum(), "accuracy": _masked_mean(hit_BxL, mask_BxL)}


def prm_targets(tokens_BxL, step_token_id, step_labels_BxS, step_valid_BxS=None):
  """Scatter per-step labels onto step-separator tokens (TRL PRM data layout).

  The k-th occurrence of `step_token_id` in a row gets step_labels_BxS[:, k]; every other
  position, separators beyond S, and steps marked invalid get mask 0 (and target 0).

  Args:
    tokens_BxL: int token ids (completion, or prompt + completion if the prompt has no
      separator tokens).
    step_token_id: id of the step separator.
    step_labels_BxS: label of each step.
    step_valid_BxS: optional bool mask of labelled steps.

  Returns:
    (targets_BxL float32, mask_BxL float32).
  """
  labels_BxS = _f32(step_labels_BxS)
  s = labels_BxS.shape[1]
  is_sep_BxL = tokens_BxL == step_token_id
  k_BxL = jnp.cumsum(is_sep_BxL, axis=-1) - 1
  k_clip_BxL = jnp.clip(k_BxL, 0, s - 1)
  ok_BxL = is_sep_BxL & (k_BxL < s)
  if step_valid_BxS is not None:
    valid_BxS = jnp.asarray(step_valid_BxS, bool)
    ok_BxL = ok_BxL & jnp.take_along_axis(valid_BxS, k_clip_BxL, axis=-1)
  targets_BxL = jnp.take_along_axis(labels_BxS, k_clip_BxL, axis=-1)
  return jnp.where(ok_BxL, targets_BxL, 0.0), ok_BxL.astype(jnp.float32)
