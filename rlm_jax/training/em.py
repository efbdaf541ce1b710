"""Phase 2: an EM policy-gradient iteration (arXiv 2504.18587) as ONE compiled program.

E-step: the on-device sampler draws G rationales per prompt and the jittable verifier scores
them. M-step: `num_m_steps` optimizer steps (lax.scan) on the reward-weighted log-likelihood
L = −mean_k w_k Σ_t log π_θ(y_kt | x, y_k<t), with w from `advantages.em_weights`: 'raw'
(w = r; with {0, 1} rewards this is fine-tuning on the correct samples), 'centered'
(r − group mean) or 'normalized' ((r − mean) / std, as GRPO). The samples stay fixed while
θ moves (off-policy): no importance ratio, no clipping, no reference model. The likelihood
is that of the tempered policy softmax(logits / T) the E-step samples from (T =
`sampling.temperature`), as in GRPO/PPO.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from rlm_jax.data.steps import StepEnds
from rlm_jax.sampling.sampler import SampleOutput, SamplingConfig, logprob_temperature
from rlm_jax.training import advantages, losses
from rlm_jax.training.rollout import completion_logprobs, rollout
from rlm_jax.training.rewards import RewardConfig
from rlm_jax.training.state import TrainState, all_finite, apply_gradients


@dataclasses.dataclass(frozen=True)
class EMSetup:
  """Everything static about an EM-PG iteration (hashable: it keys the compile cache).

  group_size: G rationales sampled per prompt (E-step); the sampling temperature sets how
    diverse they are.
  weights: 'raw' | 'centered' | 'normalized' (`advantages.em_weights`).
  normalize: 'sequence_sum' (the paper's objective) | 'token_mean' (`losses.em_pg_loss`).
  num_m_steps: optimizer steps on one E-step's samples.
  """

  group_size: int
  sampling: SamplingConfig
  reward: RewardConfig
  step_id: int
  weights: advantages.EmWeights = 'raw'
  normalize: losses.EmNormalize = 'sequence_sum'
  num_m_steps: int = 1
  # Jittable verifier: (SampleOutput, batch with rows repeated G times) -> scores in {-1, 0, 1, 2}.
  # None: the final step must equal batch['answer'] (`rewards.final_step_score`).
  score_fn: Callable[[SampleOutput, dict], jax.Array] | None = None
  # Tokens of negatively weighted samples stop getting pushed down below this log-prob
  # (`losses.em_pg_loss`: bounds the objective); None = the unbounded plain objective.
  neg_logp_floor: float | None = -5.0
  # Positions per LM-head chunk in the M-step's log-prob pass (`losses.lm_head_logprobs`).
  logprob_chunk_tokens: int = 1024
  # The tokenizer's step-end tables for the default final-step match (`StepEnds.of(tok)`: a BPE
  # delimiter merges or splits); None: a step ends at `step_id` only.
  step_ends: StepEnds | None = None
  # The M-step's log-prob pass runs each prompt once for its G samples (`completion_logprobs`).
  shared_prompt: bool = True

  def __post_init__(self):
    if not isinstance(self.logprob_chunk_tokens, int) or self.logprob_chunk_tokens < 0:
      raise ValueError(f'EMSetup.logprob_chunk_tokens must be an int >= 0, got {self.logprob_chunk_tokens!r}')
    if not isinstance(self.group_size, int) or self.group_size < 1:
      raise ValueError(f'EMSetup.group_size must be an int >= 1, got {self.group_size!r}')
    if self.weights not in advantages.EM_WEIGHT_KINDS:
      raise ValueError(f'EMSetup.weights must be one of {advantages.EM_WEIGHT_KINDS}, got {self.weights!r}')
    if self.normalize not in losses.EM_NORMALIZE:
      raise ValueError(f'EMSetup.normalize must be one of {losses.EM_NORMALIZE}, got {self.normalize!r}')
    if self.neg_logp_floor is not None and not self.neg_logp_floor < 0:
      raise ValueError(f'EMSetup.neg_logp_floor must be < 0 or None, got {self.neg_logp_floor!r}')
    if not isinstance(self.num_m_steps, int) or self.num_m_steps < 1:
      raise ValueError(f'EMSetup.num_m_steps must be an int >= 1, got {self.num_m_steps!r}')


def em_iteration(graphdef, tx: optax.GradientTransformation, setup: EMSetup, state: TrainState,
                 batch: dict, key: jax.Array):
  """E-step (sample and score G rationales per prompt), then num_m_steps M-step updates.

  Args:
    graphdef: policy graph (static).
    tx: optimizer (static).
    setup: static EM settings.
    state: TrainState of the policy (donated by `em_iteration_jit`).
    batch: prompt [B, Lp] (left-padded), prompt_mask, plus what the scorer reads (answer
      [B, A], answer_len [B] for the default).
    key: PRNG key of the E-step sampling.

  Returns:
    (new_state, metrics) with scalar metrics: reward, accuracy, invalid, completion_length,
    truncated, solve_all, solve_none, weight_mean, weight_abs_mean, and the first and last
    M-step's loss / nll_mean (the drop shows how far the M-step moved), grad_norm (last),
    finite (all M-steps finite).
  """
  b, g = batch['prompt'].shape[0], setup.group_size
  ro = rollout(graphdef, state.params, batch, key, setup)
  lp = ro['prompt'].shape[1]
  reward_BxG = ro['reward'].reshape(b, g)
  w_B = advantages.em_weights(reward_BxG, setup.weights).reshape(b * g)
  mask = ro['completion_mask']
  seq = jnp.concatenate([ro['prompt'], ro['tokens']], axis=1)
  seq_mask = jnp.concatenate([ro['prompt_mask'], mask], axis=1)

  temp = logprob_temperature(setup.sampling)

  def loss_fn(params):
    logp, _ = completion_logprobs(graphdef, params, seq, seq_mask, lp, temp, setup.logprob_chunk_tokens,
                                  g if setup.shared_prompt else 1)
    return losses.em_pg_loss(logp, w_B, mask, setup.normalize, setup.neg_logp_floor)

  def m_step(st: TrainState, _):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(st.params)
    finite = jnp.isfinite(loss) & all_finite(grads)
    new = apply_gradients(st, grads, tx)
    new = jax.tree.map(lambda a, o: jnp.where(finite, a, o), new, st)
    return new, dict(loss=loss, nll_mean=aux['nll_mean'], grad_norm=optax.global_norm(grads),
                     finite=finite)

  state, aux = jax.lax.scan(m_step, state, None, length=setup.num_m_steps)
  solved_BxG = (ro['score'] == 2).reshape(b, g)
  metrics = dict(
      loss=aux['loss'][-1], loss_first=aux['loss'][0],
      nll_mean=aux['nll_mean'][-1], nll_mean_first=aux['nll_mean'][0],
      grad_norm=aux['grad_norm'][-1],
      reward=ro['reward'].mean(),
      accuracy=solved_BxG.mean(),
      invalid=(ro['score'] < 0).mean(),
      completion_length=ro['lengths'].mean(),
      truncated=ro['truncated'].mean(),
      solve_all=jnp.all(solved_BxG, axis=1).mean(),
      solve_none=jnp.all(~solved_BxG, axis=1).mean(),
      weight_mean=w_B.mean(),
      weight_abs_mean=jnp.abs(w_B).mean(),
      finite=jnp.all(aux['finite']),
  )
  return state, metrics


em_iteration_jit = jax.jit(em_iteration, static_argnums=(0, 1, 2), donate_argnums=(3,))


# --- experiment phase ---------------------------------------------------------------------
# How an experiment runs EM-PG as phase 2 (`training/phase.py`, `training/algorithms.py`).


@dataclasses.dataclass(frozen=True)
class EMConfig:
  """`config.rl.em` (see `EMSetup` for the meaning of each knob)."""

  weights: advantages.EmWeights = 'raw'
  normalize: losses.EmNormalize = 'sequence_sum'
  num_m_steps: int = 1
  neg_logp_floor: float | None = -5.0

  def __post_init__(self):
    if self.neg_logp_floor is not None and not self.neg_logp_floor < 0:
      raise ValueError(f'rl.em.neg_logp_floor={self.neg_logp_floor!r}: must be < 0 or None')


def build_phase(ctx, section: EMConfig):
  from rlm_jax.training import phase  # pylint: disable=g-import-not-at-top
  from rlm_jax.training.state import create_train_state  # pylint: disable=g-import-not-at-top
  rl = ctx.rl
  graphdef, params = ctx.policy
  tx = ctx.models.optimizer(rl.optim, params)
  setup = EMSetup(group_size=rl.group_size, sampling=ctx.sampling, reward=rl.reward, step_id=ctx.tok.step_id,
                  step_ends=StepEnds.of(ctx.tok), weights=section.weights, normalize=section.normalize,
                  num_m_steps=section.num_m_steps, neg_logp_floor=section.neg_logp_floor,
                  logprob_chunk_tokens=rl.logprob_chunk_tokens, shared_prompt=rl.shared_prompt)
  state = create_train_state(params, tx, ctx.mesh, ctx.rules)
  step = lambda st, b, i: em_iteration_jit(graphdef, tx, setup, st, b, phase.iteration_key(ctx.seed, 3, i))
  return phase.Phase(state=state, step=step, batch=lambda i: ctx.device_batch(ctx.pool.prompt_batch(), ctx.prompts(i)),
                     policy=lambda st: (graphdef, st.params))


def _algorithm():
  from rlm_jax.training import phase  # pylint: disable=g-import-not-at-top
  return phase.Algorithm(name='em', config=EMConfig, build=build_phase, capabilities=frozenset({'lora'}))


ALGORITHM = _algorithm()
