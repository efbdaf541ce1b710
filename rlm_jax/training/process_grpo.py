"""Process-supervised GRPO (DeepSeekMath §4.1.3): a PRM scores every step of every rollout.

Per iteration, three compiled programs (with `rl.reward_on='host'` the verifier scores the
completions' text between the first two): the GRPO rollout; the PRM (the run's phase-1 value
model) read at each step end of the completions; the GRPO update with per-token advantages

    r~_{g,s} = (r_{g,s} − mean) / (std + eps)  over all steps s of all G completions of a prompt,
    Â_{g,t}  = Σ_{s ≥ step(t)} r~_{g,s}        (`advantages.process_advantages`),

where r_{g,s} is the PRM's value of step s in reward units ([−1, 1]). A step ends at the step
delimiter or at EOS (a completion cut at the length limit ends its last step there). With
`outcome_weight` w > 0 the verifier's reward is added to the final step's reward
(r_{g,last} + w·R_g), mixing process and outcome supervision.
"""

from __future__ import annotations

import dataclasses
import functools
import jax
import jax.numpy as jnp

from rlm_jax.data.steps import StepEnds, as_step_ends
from rlm_jax.training import advantages, grpo, losses, phase
from rlm_jax.training import value as value_lib


@dataclasses.dataclass(frozen=True)
class ProcessGRPOConfig:
  """`config.rl.process_grpo`: loss knobs as in `losses.GRPOConfig`, plus the step rewards.

  max_steps: S, steps scored per completion (later steps share the last one's advantage).
  outcome_weight: weight of the verifier reward added to the final step (0: PRM only).
  """

  loss_type: losses.LossType = 'dapo'
  epsilon: float = 0.2
  epsilon_high: float = 0.2
  beta: float = 0.0
  num_iterations: int = 1
  max_steps: int = 8
  outcome_weight: float = 0.0

  def __post_init__(self):
    if self.max_steps < 1:
      raise ValueError(f'process_grpo.max_steps={self.max_steps}: must be >= 1')


def step_layout(tokens_BxT, mask_BxT, step_id: StepEnds | int, eos_id: int, max_steps: int):
  """Where the steps of right-padded completions end.

  Args:
    tokens_BxT, mask_BxT: completions (no prompt: column 0 starts the first step).
    step_id: the tokenizer's `StepEnds` (delimiters found in decoded text) or the delimiter id.
    eos_id: EOS closes the final step.
    max_steps: S.

  Returns:
    end_BxT: bool, the token that closes a step (delimiter, EOS, or a cut completion's last token).
    token_step_BxT: int, the step of each token (clipped to max_steps − 1); −1 on padding.
  """
  mask_BxT = jnp.asarray(mask_BxT, bool)
  closes = as_step_ends(step_id).mask(tokens_BxT, mask_BxT) | (tokens_BxT == eos_id)
  last_BxT = mask_BxT & ~jnp.concatenate([mask_BxT[:, 1:], jnp.zeros_like(mask_BxT[:, :1])], axis=1)
  end_BxT = mask_BxT & (closes | last_BxT)
  before_BxT = jnp.cumsum(end_BxT, axis=1) - end_BxT  # step ends strictly before t
  token_step_BxT = jnp.where(mask_BxT, jnp.minimum(before_BxT, max_steps - 1), -1)
  return end_BxT, token_step_BxT


def step_rewards(values_BxT, end_BxT, token_step_BxT, max_steps: int):
  """[B, S] reward of each step (the value at its end token; with several ends clipped into
  the last slot, the last one counts) and [B, S] validity."""
  s_idx = jnp.where(end_BxT, token_step_BxT, max_steps)  # non-ends go to a dropped slot
  b = values_BxT.shape[0]
  rows = jnp.arange(b)[:, None]
  r_BxS1 = jnp.zeros((b, max_steps + 1), jnp.float32).at[rows, s_idx].set(values_BxT.astype(jnp.float32))
  valid_BxS1 = jnp.zeros((b, max_steps + 1), bool).at[rows, s_idx].set(True)
  return r_BxS1[:, :max_steps], valid_BxS1[:, :max_steps]


def score_steps(value_graphdef, value_params, ro: dict, step_id: StepEnds | int, eos_id: int, max_steps: int,
                outcome_weight: float) -> dict:
  """The rollout `ro` with its step rewards from the PRM (jittable; one forward pass)."""
  seq = jnp.concatenate([ro['prompt'], ro['tokens']], axis=1)
  seq_mask = jnp.concatenate([ro['prompt_mask'], ro['completion_mask']], axis=1)
  values_BxL = value_lib.predict(value_graphdef, value_params, seq, seq_mask)
  lp = ro['prompt'].shape[1]
  values_BxT = values_BxL[:, lp:]
  end_BxT, token_step_BxT = step_layout(ro['tokens'], ro['completion_mask'], step_id, eos_id, max_steps)
  r_BxS, valid_BxS = step_rewards(values_BxT, end_BxT, token_step_BxT, max_steps)
  if outcome_weight:
    last_B = jnp.maximum(jnp.sum(valid_BxS, axis=1) - 1, 0)
    r_BxS = r_BxS.at[jnp.arange(r_BxS.shape[0]), last_B].add(outcome_weight * ro['reward'])
  return dict(ro, step_reward=r_BxS, step_valid=valid_BxS, token_step=token_step_BxT)


def process_advantage_fn(reward_BxG, ro: dict):
  """`GRPOSetup.advantage_fn`: per-token advantages [B·G, T] from the scored steps."""
  b, g = reward_BxG.shape
  split = lambda x: x.reshape((b, g) + x.shape[1:])
  adv_BxGxT = advantages.process_advantages(split(ro['step_reward']), split(ro['step_valid']),
                                            split(ro['token_step']))
  return adv_BxGxT.reshape(b * g, -1)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6))
def _score_steps_jit(value_graphdef, value_params, ro, step_id, eos_id, max_steps, outcome_weight):
  return score_steps(value_graphdef, value_params, ro, step_id, eos_id, max_steps, outcome_weight)


def build_phase(ctx, section: ProcessGRPOConfig):
  from rlm_jax.training.state import create_train_state  # pylint: disable=g-import-not-at-top
  if ctx.value is None:
    raise ValueError("rl.algo='process_grpo' needs a PRM: set value.enabled=True")
  rl, tok = ctx.rl, ctx.tok
  step_ends = StepEnds.of(tok)
  vgd, vparams = ctx.value
  if nnx_head(vgd, vparams) == 'logit':  # 'bce' value models: map P(correct) logits to [-1, 1] first
    raise ValueError("rl.algo='process_grpo' reads PRM values in reward units: use value.mode='mse'")
  graphdef, params = ctx.policy
  tx = ctx.models.optimizer(rl.optim, params)
  loss = losses.GRPOConfig(scale_rewards='none', loss_type=section.loss_type, epsilon=section.epsilon,
                           epsilon_high=section.epsilon_high, beta=section.beta,
                           num_iterations=section.num_iterations, max_completion_length=ctx.task.completion_len)
  setup = grpo.GRPOSetup(group_size=rl.group_size, loss=loss, sampling=ctx.sampling, reward=rl.reward,
                         step_id=tok.step_id, step_ends=step_ends, microbatches=rl.microbatches,
                         recompute_old_logp=rl.recompute_old_logp, logprob_chunk_tokens=rl.logprob_chunk_tokens,
                         shared_prompt=rl.shared_prompt, advantage_fn=process_advantage_fn)
  host = rl.reward_on == 'host'  # the verifier's outcome from text (many right answers, e.g. Countdown)
  if host:
    setup = dataclasses.replace(setup, score_fn=grpo.no_device_score)
  ref = jax.tree.map(jnp.copy, params) if section.beta > 0 else None
  state = create_train_state(params, tx, ctx.mesh, ctx.rules)

  def step(st, b, i):
    ro = grpo.rollout_jit(graphdef, st.params, b, phase.iteration_key(ctx.seed, 3, i), setup)
    host_metrics = {}
    if host:
      scorer = ctx.host_scorer([ctx.pool.tasks[j] for j in ctx.prompts(i)], rl.group_size)
      ro, host_metrics = grpo.score_on_host(ro, setup, scorer)
    ro = _score_steps_jit(vgd, vparams, ro, step_ends, tok.eos_id, section.max_steps, section.outcome_weight)
    st, m = grpo.grpo_update_jit(graphdef, tx, setup, st, ref, ro)
    return st, dict(m, **host_metrics,
                    step_reward=jnp.sum(ro['step_reward']) / jnp.maximum(jnp.sum(ro['step_valid']), 1),
                    steps=jnp.mean(jnp.sum(ro['step_valid'], axis=1)))

  return phase.Phase(state=state, step=step, batch=lambda i: ctx.device_batch(ctx.pool.prompt_batch(), ctx.prompts(i)),
                     policy=lambda st: (graphdef, st.params))


def nnx_head(graphdef, params) -> str:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx.merge(graphdef, params).cfg.value_head


ALGORITHM = phase.Algorithm(name='process_grpo', config=ProcessGRPOConfig, build=build_phase,
                            capabilities=frozenset({'lora', 'microbatches', 'host_reward'}), requires_value=True)
