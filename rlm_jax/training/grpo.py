"""Phase 2: a GRPO iteration as ONE compiled program (purejaxrl style).

rollout (G samples per prompt, on-device sampler) -> jittable reward -> group advantages ->
num_iterations (μ) clipped-surrogate updates that reuse the rollout with π_old log-probs.
Nothing leaves the device between the stages; the host only dispatches and logs.

Scale knobs:
  * `GRPOSetup.microbatches = k`: each of the μ updates accumulates gradients over k
    microbatches of the B·G rollout rows (`state.accumulate_gradients`), and the π_old / π_ref
    log-probs are computed k microbatches at a time. 'dapo', 'grpo' and 'dr_grpo' give the
    full-batch gradient (dapo's token sum is divided by the global token count / k); 'bnpo'
    normalises per microbatch, as TRL does with gradient accumulation.
  * Rollout and training on different meshes (`grpo_iteration_on_meshes`): the params are
    resharded explicitly to the rollout layout, sampled from in their own compiled program,
    and the rollout is resharded back to the training batch layout for the update program.
    With one mesh, `grpo_iteration_jit` stays the single compiled program.

Temperature. The rollout samples from softmax(logits / T) (T = `sampling.temperature`), so
the loss differentiates the log-probs of that same tempered policy, and π_old is the
sampler's log-probs of it (as TRL divides logits by T): with μ = 1 the ratio is exactly 1 and
the update is the policy gradient of the policy that produced the samples. Untempered
log-probs would give the gradient of another policy whenever T ≠ 1. For μ > 1, π_old comes
from the sampler (no extra forward pass) unless `recompute_old_logp`.

`loss.mask_constant_groups` is DAPO's dynamic-sampling filter without the refill: shapes stay
fixed, so groups whose rewards are all equal are masked out of the loss (their advantages are
0 anyway) instead of being replaced by newly sampled groups.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rlm_jax import sharding
from rlm_jax.data.steps import StepEnds
from rlm_jax.sampling.sampler import SampleOutput, SamplingConfig, logprob_temperature
from rlm_jax.training import advantages, losses
from rlm_jax.training.rollout import (answer_match_score, completion_logprobs, head_model,  # noqa: F401
                                     rollout)
from rlm_jax.training.rewards import RewardConfig, score_to_reward
from rlm_jax.training.state import (TrainState, accumulate_gradients, all_finite, apply_gradients,
                                    map_microbatches)


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
  # Gradient accumulation: each update runs over `microbatches` slices of the B·G rows
  # (B·G must be divisible by it); 1 = the whole rollout at once.
  microbatches: int = 1
  # μ > 1: recompute π_old with a forward pass over the rollout instead of taking the
  # sampler's log-probs (equal up to float error; set it when the sampler's numerics differ
  # from the update's, e.g. a rollout mesh with other precision).
  recompute_old_logp: bool = False
  # Advantages from (reward_BxG, rollout dict) -> [B·G] (one per completion) or [B·G, T]
  # (per token); None = `advantages.group_advantages(reward_BxG, loss.scale_rewards)`.
  # Rewards already include the overlong penalty. Must be jittable.
  advantage_fn: Callable[[jax.Array, dict], jax.Array] | None = None
  # Positions per LM-head chunk in the update's log-prob passes (`losses.lm_head_logprobs`);
  # 0 = the whole completion at once.
  logprob_chunk_tokens: int = 1024
  # The tokenizer's step-end tables for the default final-step match (`StepEnds.of(tok)`: a BPE
  # delimiter merges or splits); None: a step ends at `step_id` only.
  step_ends: StepEnds | None = None
  # The update's log-prob passes run each prompt once for its G completions (its keys and
  # values broadcast; `rollout.completion_logprobs(group_size=...)`); False: every row whole.
  shared_prompt: bool = True

  def __post_init__(self):
    if not isinstance(self.microbatches, int) or self.microbatches < 1:
      raise ValueError(f'GRPOSetup.microbatches must be an int >= 1, got {self.microbatches!r}')
    if not isinstance(self.logprob_chunk_tokens, int) or self.logprob_chunk_tokens < 0:
      raise ValueError(f'GRPOSetup.logprob_chunk_tokens must be an int >= 0, got {self.logprob_chunk_tokens!r}')
    for name in ('recompute_old_logp', 'shared_prompt'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'GRPOSetup.{name} must be True or False, got {getattr(self, name)!r}')

  @property
  def prompt_group(self) -> int:
    """Rows per shared prompt inside one microbatch: microbatches take every k-th row
    (`split_microbatches`), so each holds G/k rows of every prompt when k divides G."""
    g, k = self.group_size, self.microbatches
    return g // k if self.shared_prompt and g % k == 0 else 1


def grpo_update(graphdef, tx: optax.GradientTransformation, setup: GRPOSetup, state: TrainState,
                ref_params, ro: dict):
  """Advantages and μ clipped-surrogate updates on one rollout (the second half of an iteration).

  Args:
    graphdef: policy graph (static).
    tx: optimizer (static).
    setup: static GRPO settings (loss, group size, microbatches).
    state: TrainState of the policy (donated by `grpo_update_jit`).
    ref_params: frozen reference policy params, or None when setup.loss.beta == 0.
    ro: the output of `rollout`, rows prompt-major [B·G].

  Returns:
    (new_state, metrics) with scalar metrics.
  """
  cfg = setup.loss
  g, k = setup.group_size, setup.microbatches
  b = ro['prompt'].shape[0] // g
  lp = ro['prompt'].shape[1]
  reward = ro['reward']
  if cfg.overlong_buffer:
    reward = reward + advantages.overlong_penalty(ro['lengths'], cfg.max_completion_length,
                                                  cfg.overlong_buffer, cfg.overlong_penalty_factor)
  reward_BxG = reward.reshape(b, g)
  if setup.advantage_fn is None:
    adv = advantages.group_advantages(reward_BxG, cfg.scale_rewards).reshape(b * g)
  else:
    adv = jnp.asarray(setup.advantage_fn(reward_BxG, ro), jnp.float32)
    if adv.shape not in ((b * g,), ro['tokens'].shape):
      raise ValueError(f'GRPOSetup.advantage_fn returned shape {adv.shape}, expected ({b * g},) '
                       f'or {ro["tokens"].shape} (B·G rows, or B·G x T tokens)')
  mask = ro['completion_mask']
  if cfg.mask_constant_groups:  # no refill: the batch just loses those groups
    keep_B = advantages.mixed_reward_groups(reward_BxG)
    mask = mask & jnp.repeat(keep_B, g)[:, None]

  rows = {
      'seq': jnp.concatenate([ro['prompt'], ro['tokens']], axis=1),
      'seq_mask': jnp.concatenate([ro['prompt_mask'], ro['completion_mask']], axis=1),
      'adv': adv, 'mask': mask, 'truncated': ro['truncated'],
  }
  temp = logprob_temperature(setup.sampling)
  logp_fn = lambda p, r: completion_logprobs(graphdef, p, r['seq'], r['seq_mask'], lp, temp,
                                             setup.logprob_chunk_tokens, setup.prompt_group)
  frozen_logp = lambda p: jax.lax.stop_gradient(
      map_microbatches(lambda r: logp_fn(p, r)[0], rows, k))
  if cfg.num_iterations > 1 and setup.recompute_old_logp:
    rows['old_logp'] = frozen_logp(state.params)
  elif cfg.num_iterations > 1:  # the sampler's log-probs of the same tempered policy
    rows['old_logp'] = jnp.where(ro['completion_mask'], ro['sample_logprobs'], 0.0)
  if cfg.beta > 0:
    rows['ref_logp'] = frozen_logp(ref_params)

  # Global normalisers, so that the mean over k microbatches is the full-batch loss.
  loss_mask = mask.astype(jnp.float32)
  if cfg.mask_truncated_completions:
    loss_mask = loss_mask * (1.0 - ro['truncated'].astype(jnp.float32))[:, None]
  n_loss_tok = loss_mask.sum()
  n_mask_tok = jnp.maximum(mask.astype(jnp.float32).sum(), 1.0)

  def loss_fn(params, r):
    logp, entropy = logp_fn(params, r)
    loss, aux = losses.grpo_loss(logp, r.get('old_logp'), r.get('ref_logp'), r['adv'], r['mask'],
                                 r['truncated'], cfg, num_items=None if k == 1 else n_loss_tok / k)
    if k > 1:  # token means of this microbatch -> shares of the whole batch's token mean
      w = jnp.maximum(aux['num_tokens'], 1.0) * k / jnp.maximum(n_loss_tok, 1.0)
      aux = {key: v * w for key, v in aux.items() if key != 'num_tokens'} | {
          'num_tokens': aux['num_tokens'] * k}
    aux['entropy'] = jnp.sum(entropy * r['mask']) / (n_mask_tok / k)
    return loss, aux

  def update(st: TrainState, _):
    (loss, aux), grads = accumulate_gradients(loss_fn, st.params, rows, k)
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
  ro = rollout(graphdef, state.params, batch, key, setup)
  return grpo_update(graphdef, tx, setup, state, ref_params, ro)


grpo_iteration_jit = jax.jit(grpo_iteration, static_argnums=(0, 1, 2), donate_argnums=(3,))
rollout_jit = jax.jit(rollout, static_argnums=(0, 4))
grpo_update_jit = jax.jit(grpo_update, static_argnums=(0, 1, 2), donate_argnums=(3,))


# ----------------------------------------------------------------------------------------
# Rewards computed on host (text verifiers).


def no_device_score(out: SampleOutput, batch: dict) -> jax.Array:
  """`GRPOSetup.score_fn` for the host path: the rollout skips the on-device answer match."""
  del batch
  return jnp.zeros(out.lengths_B.shape, jnp.int32)


HostScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


def grpo_iteration_host_scored(graphdef, tx: optax.GradientTransformation, setup: GRPOSetup,
                               state: TrainState, ref_params, batch: dict, key: jax.Array,
                               score_host: HostScorer):
  """A GRPO iteration whose rewards come from a host verifier (e.g. GSM8K, LaTeX answers).

  Two compiled programs instead of one: the rollout, then the update. In between, the
  completions' token ids (and nothing else) are pulled to host once, `score_host` turns them
  into verifier scores, and the scores go back as a [B·G] int array.

  Args:
    graphdef, tx, state, ref_params, batch, key: as for `grpo_iteration`.
    setup: as for `grpo_iteration`; its `score_fn` is replaced by `no_device_score`.
    score_host: (tokens [B·G, T], lengths [B·G]) numpy -> scores [B·G] in {-1, 0, 1, 2}
      (`rlm_jax.tasks.verify` scale; rewards then follow `setup.reward`), or a tuple
      (scores, rewards [B·G] float, metrics dict of host floats) when reward functions give
      the rewards themselves (`experiment.data.host_rewards`). Rows are prompt-major, G per prompt.

  Returns:
    (new_state, metrics) as `grpo_iteration`, plus the scorer's metrics.
  """
  setup = dataclasses.replace(setup, score_fn=no_device_score)
  ro = rollout_jit(graphdef, state.params, batch, key, setup)
  ro, host_metrics = score_on_host(ro, setup, score_host)
  state, metrics = grpo_update_jit(graphdef, tx, setup, state, ref_params, ro)
  return state, dict(metrics, **host_metrics)


def score_on_host(ro: dict, setup: GRPOSetup, score_host: HostScorer) -> tuple[dict, dict]:
  """The rollout `ro` with `score` and `reward` from `score_host` (see
  `grpo_iteration_host_scored`): the completions' token ids pulled to host once, the scores
  put back with the rollout's sharding. Returns (ro, the scorer's metrics)."""
  if jax.process_count() > 1:  # every process scores the whole batch (the verifier is cheap)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    tokens, lengths = multihost_utils.process_allgather((ro['tokens'], ro['lengths']), tiled=True)
  else:
    tokens, lengths = jax.device_get((ro['tokens'], ro['lengths']))
  out = score_host(np.asarray(tokens), np.asarray(lengths))
  score, reward, host_metrics = out if isinstance(out, tuple) else (out, None, {})
  score = np.asarray(score, np.int32)
  if score.shape != lengths.shape or (reward is not None and np.shape(reward) != lengths.shape):
    raise ValueError(f'score_host returned shapes {score.shape}, {np.shape(reward)}; expected {lengths.shape}')
  score = jax.device_put(score, ro['score'].sharding)
  if reward is None:
    reward = score_to_reward(score, setup.reward)
  else:
    reward = jax.device_put(np.asarray(reward, np.float32), ro['score'].sharding)
  return dict(ro, score=score, reward=reward), host_metrics


# ----------------------------------------------------------------------------------------
# Rollout on its own mesh.


@dataclasses.dataclass(frozen=True)
class Placement:
  """A mesh and the logical -> mesh rule table used on it."""

  mesh: Mesh
  rules: sharding.Rules


def reshard_params(params, placement: Placement):
  """Explicit copy of an nnx state into the layout its logical axes get on `placement`.

  Args:
    params: nnx.State whose Variables carry `logical_axes`.
    placement: target mesh and rules.

  Returns:
    The same values, `jax.device_put` to `sharding.state_shardings(params, mesh, rules)`.
  """
  return jax.device_put(params, sharding.state_shardings(params, placement.mesh, placement.rules))


def reshard_rows(batch: dict, placement: Placement) -> dict:
  """Puts every leaf [B, ...] with its leading dim laid out as 'batch' on `placement`.

  Unlike `sharding.shard_batch`, a B that does not divide the batch mesh axes is not an
  error: that dim loses mesh axes until it does (at worst replicated), as `constrain` does.
  """

  def put(x):
    axes = ('batch',) + (None,) * (x.ndim - 1) if x.ndim else ()
    spec = sharding.logical_to_spec(axes, placement.rules, placement.mesh, x.shape)
    return jax.device_put(x, NamedSharding(placement.mesh, spec))

  return jax.tree.map(put, batch)


def rollout_on_mesh(graphdef, params, batch: dict, key: jax.Array, setup: GRPOSetup,
                    rollout_at: Placement, train_at: Placement) -> dict:
  """`rollout` with the policy resharded to `rollout_at`, outputs back on `train_at`.

  Args:
    graphdef, params: the policy, laid out for training.
    batch, key, setup: as for `rollout`.
    rollout_at: mesh + rules the sampler runs with (params, prompts and the activation
      constraints inside the sampler follow them).
    train_at: mesh + rules of the update; the returned rows are laid out as its 'batch'.

  Returns:
    The rollout dict of `rollout`, rows [B·G] sharded for the update.
  """
  params_r = reshard_params(params, rollout_at)
  batch_r = reshard_rows(batch, rollout_at)
  key_r = jax.device_put(key, NamedSharding(rollout_at.mesh, P()))
  with sharding.use_mesh_rules(rollout_at.mesh, rollout_at.rules):
    ro = rollout_jit(graphdef, params_r, batch_r, key_r, setup)
  return reshard_rows(ro, train_at)


def grpo_iteration_on_meshes(graphdef, tx: optax.GradientTransformation, setup: GRPOSetup,
                             state: TrainState, ref_params, batch: dict, key: jax.Array,
                             rollout_at: Placement, train_at: Placement):
  """`grpo_iteration` with the rollout on its own mesh: two compiled programs and two reshards.

  Same arguments and results as `grpo_iteration` (state donated), plus the two placements
  (see `rollout_on_mesh`). The training state stays on `train_at`. With the same key, the
  rollout and the update equal those of `grpo_iteration_jit` up to float reassociation
  (random bits do not depend on the sharding).
  """
  ro = rollout_on_mesh(graphdef, state.params, batch, key, setup, rollout_at, train_at)
  with sharding.use_mesh_rules(train_at.mesh, train_at.rules):
    return grpo_update_jit(graphdef, tx, setup, state, ref_params, ro)


# --- experiment phase ---------------------------------------------------------------------
# How an experiment runs GRPO as phase 2 (`training/phase.py`, `training/algorithms.py`).


def build_phase(ctx, section: losses.GRPOConfig, advantage_fn=None):
  """The GRPO phase: state, compiled step and batches from a `phase.PhaseContext`.

  `advantage_fn` replaces the group-normalised advantages (`GRPOSetup.advantage_fn`; RLOO
  builds its phase this way).
  """
  from rlm_jax.training import phase  # pylint: disable=g-import-not-at-top
  from rlm_jax.training.state import create_train_state  # pylint: disable=g-import-not-at-top
  rl = ctx.rl
  graphdef, params = ctx.policy
  tx = ctx.models.optimizer(rl.optim, params)
  extra = {} if advantage_fn is None else {'advantage_fn': advantage_fn}
  setup = GRPOSetup(group_size=rl.group_size, loss=section, sampling=ctx.sampling, reward=rl.reward,
                    step_id=ctx.tok.step_id, step_ends=StepEnds.of(ctx.tok), microbatches=rl.microbatches,
                    recompute_old_logp=rl.recompute_old_logp, logprob_chunk_tokens=rl.logprob_chunk_tokens,
                    shared_prompt=rl.shared_prompt, **extra)
  # The policy state is donated; the reference keeps its own copy.
  ref = jax.tree.map(jnp.copy, params) if section.beta > 0 else None
  state = create_train_state(params, tx, ctx.mesh, ctx.rules)
  key = lambda i: phase.iteration_key(ctx.seed, 3, i)
  if rl.reward_on == 'host':
    def step(st, b, i):
      scorer = ctx.host_scorer([ctx.pool.tasks[j] for j in ctx.prompts(i)], rl.group_size)
      return grpo_iteration_host_scored(graphdef, tx, setup, st, ref, b, key(i), scorer)
  elif ctx.rollout_at is None:  # one compiled program per iteration
    step = lambda st, b, i: grpo_iteration_jit(graphdef, tx, setup, st, ref, b, key(i))
  else:
    train_at = Placement(ctx.mesh, ctx.rules)
    step = lambda st, b, i: grpo_iteration_on_meshes(graphdef, tx, setup, st, ref, b, key(i), ctx.rollout_at,
                                                     train_at)
  return phase.Phase(state=state, step=step, batch=lambda i: ctx.device_batch(ctx.pool.prompt_batch(), ctx.prompts(i)),
                     policy=lambda st: (graphdef, st.params))


def _algorithm():
  from rlm_jax.training import phase  # pylint: disable=g-import-not-at-top
  return phase.Algorithm(name='grpo', config=losses.GRPOConfig, build=build_phase,
                         capabilities=frozenset(phase.CAPABILITIES))


ALGORITHM = _algorithm()
