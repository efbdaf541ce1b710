"""Phase 2: a PPO (actor-critic) iteration as ONE compiled program.

One model carries both heads (`lm_head=True`, `value_head='sigmoid'|'logit'`). An iteration:
rollout (G samples per prompt, on-device sampler) -> jittable verifier score -> per-token
rewards (sparse terminal reward + optional KL penalty to a frozen reference) -> GAE(γ, λ) with
the value head's predictions (π_old and V_old as the sampler computed them while decoding:
no forward pass before the updates) -> `num_ppo_epochs` passes (lax.scan) over `num_minibatches`
shuffled minibatches of the clipped policy + clipped value loss − entropy bonus.

Token t of a completion is the action taken in state "prompt + tokens < t". Its log-prob and
its value V(s_t) both come from the hidden state of the token before it (the last prompt token
for t = 0), as in TRL's PPO trainer. Rewards (as TRL): r_t = −kl_coef·(log π_old − log π_ref)
on every completion token, plus the terminal reward on the last generated token; GAE links
valid tokens only and treats the end of the completion as terminal (V = 0 after it).

Reward scale. With `value_head='sigmoid'` the value is 2σ(z) − 1 ∈ (−1, 1), so returns must
lie in [−1, 1]: keep every RewardConfig entry in [−1, 1] (e.g. correct 1, wrong −1 or 0,
invalid −1) and kl_coef small enough that the summed KL penalty stays well below 1; this is
checked for the RewardConfig when the iteration is traced. With `value_head='logit'` the raw
head output z is used as an unbounded linear value (MSE regression), so any reward scale
works. Advantages are whitened over the batch by default (TRL), which makes the policy step
independent of the reward scale.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlm_jax.data.steps import StepEnds
from rlm_jax.sampling.sampler import SampleOutput, SamplingConfig, logprob_temperature
from rlm_jax.training import advantages, losses
from rlm_jax.training.rollout import completion_hidden, head_model, rollout
from rlm_jax.training.rewards import RewardConfig
from rlm_jax.training.state import TrainState, all_finite, apply_gradients


@dataclasses.dataclass(frozen=True)
class PPOSetup:
  """Everything static about a PPO iteration (hashable: it keys the compile cache).

  group_size: completions per prompt (1 = classic PPO; > 1 only enlarges the batch, the
    baseline is the value head).
  num_minibatches: each PPO epoch splits the B·G rollouts into this many shuffled
    minibatches (one optimizer step each); B·G must be divisible by it.
  shuffle: what a minibatch is drawn as: 'rows' (rollouts one by one, as TRL) or 'groups'
    (each prompt's G rollouts together, B divisible by num_minibatches): then the minibatch
    passes, too, run each prompt once for its G completions (`shared_prompt`).
  whiten_advantages: normalise advantages over the valid tokens of the batch (TRL does).
  """

  loss: losses.PPOConfig
  sampling: SamplingConfig
  reward: RewardConfig
  step_id: int
  group_size: int = 1
  num_minibatches: int = 1
  shuffle: str = 'rows'
  whiten_advantages: bool = True
  # Jittable verifier: (SampleOutput, batch with rows repeated G times) -> scores in {-1, 0, 1, 2}.
  # None: the final step must equal batch['answer'] (`rewards.final_step_score`).
  score_fn: Callable[[SampleOutput, dict], jax.Array] | None = None
  # Positions per LM-head chunk in the log-prob passes (`losses.lm_head_logprobs`); 0 = all.
  logprob_chunk_tokens: int = 1024
  # The tokenizer's step-end tables for the default final-step match (`StepEnds.of(tok)`: a BPE
  # delimiter merges or splits); None: a step ends at `step_id` only.
  step_ends: StepEnds | None = None
  # π_old and V_old by a forward pass over the rollout instead of the sampler's own log-probs
  # and values (equal up to float error; set it when the sampler's numerics differ from the
  # update's, e.g. a rollout mesh with other precision).
  recompute_old: bool = False
  # The forward passes run each prompt once for its G completions (`rollout.shared_prompt_hidden`)
  # when the update takes whole groups (num_minibatches = 1 or shuffle='groups'; shuffled rows
  # split the groups); False: every row whole.
  shared_prompt: bool = True

  def __post_init__(self):
    for name in ('recompute_old', 'shared_prompt'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'PPOSetup.{name} must be True or False, got {getattr(self, name)!r}')
    if not isinstance(self.logprob_chunk_tokens, int) or self.logprob_chunk_tokens < 0:
      raise ValueError(f'PPOSetup.logprob_chunk_tokens must be an int >= 0, got {self.logprob_chunk_tokens!r}')
    if not isinstance(self.group_size, int) or self.group_size < 1:
      raise ValueError(f'PPOSetup.group_size must be an int >= 1, got {self.group_size!r}')
    if not isinstance(self.num_minibatches, int) or self.num_minibatches < 1:
      raise ValueError(f'PPOSetup.num_minibatches must be an int >= 1, got {self.num_minibatches!r}')
    if self.shuffle not in ('rows', 'groups'):
      raise ValueError(f"PPOSetup.shuffle='{self.shuffle}': must be 'rows' or 'groups'")


def actor_critic_params(actor_critic: nnx.State, policy: nnx.State) -> nnx.State:
  """Actor-critic params that take the trunk and LM head from a trained policy (e.g. after SFT)
  and keep the actor-critic's own (freshly initialised) value head.

  Args:
    actor_critic: params of a model with `value_head != 'none'` (`nnx.split(model)[1]`).
    policy: params of the same architecture without a value head.

  Returns:
    A new State shaped like `actor_critic`; the inputs are not modified.
  """
  ac, pol = actor_critic.to_pure_dict(), policy.to_pure_dict()

  def merge(a, b, path):
    if isinstance(b, dict):
      if not isinstance(a, dict):
        raise ValueError(f'actor_critic_params: policy has a subtree at {path or "/"} where the '
                         'actor-critic has a leaf')
      out = dict(a)
      for key, sub in b.items():
        if key not in a:
          raise ValueError(f'actor_critic_params: policy parameter {path}/{key} is not in the actor-critic')
        out[key] = merge(a[key], sub, f'{path}/{key}')
      return out
    if jnp.shape(a) != jnp.shape(b):
      raise ValueError(f'actor_critic_params: {path} has shape {jnp.shape(b)} in the policy, '
                       f'{jnp.shape(a)} in the actor-critic')
    return b

  out = jax.tree.map(lambda x: x, actor_critic)
  nnx.replace_by_pure_dict(out, merge(ac, pol, ''))
  return out


def _check_model(model, setup: PPOSetup, ref_params):
  cfg = model.cfg
  if not cfg.lm_head or cfg.value_head == 'none':
    raise ValueError("PPO needs one model with both heads: model.lm_head=True and "
                     f"model.value_head='sigmoid' or 'logit' (got lm_head={cfg.lm_head}, "
                     f"value_head='{cfg.value_head}')")
  r = setup.reward
  if cfg.value_head == 'sigmoid' and max(abs(r.correct), abs(r.wrong), abs(r.invalid)) > 1.0:
    raise ValueError(f"PPO with value_head='sigmoid' predicts values in (-1, 1), but the reward "
                     f"config {r} has rewards outside [-1, 1]; rescale them or use value_head='logit'")
  if setup.loss.kl_coef > 0 and ref_params is None:
    raise ValueError(f'PPOConfig.kl_coef={setup.loss.kl_coef} needs ref_params, got None')


def forward(graphdef, params, seq_BxL, seq_mask_BxL, prompt_len: int, temperature: float = 1.0,
            chunk_tokens: int = 1024, group_size: int = 1):
  """log π, entropy and V(s_t) for the completion tokens of [prompt | completion] rows.

  π is the tempered policy softmax(logits / temperature) the rollout samples from. The LM
  head runs over completion positions only, in chunks of `chunk_tokens` (`losses.lm_head_logprobs`).
  `group_size` = G > 1: rows come in runs of G sharing one prompt, run once for the G
  (`rollout.shared_prompt_hidden`).

  Returns:
    (logp_BxT, entropy_BxT, values_BxT) float32, T = seq length − prompt_len.
  """
  model = head_model(graphdef, params)
  hidden_BxTxD = completion_hidden(model, seq_BxL, seq_mask_BxL, prompt_len, group_size)
  logp_BxT, entropy_BxT = losses.lm_head_logprobs(hidden_BxTxD, model.lm_head_DxV(), seq_BxL[:, prompt_len:],
                                                  temperature, chunk_tokens)
  values_BxT = model.value_head(hidden_BxTxD).astype(jnp.float32)
  return logp_BxT, entropy_BxT, values_BxT


def ppo_iteration(graphdef, tx: optax.GradientTransformation, setup: PPOSetup, state: TrainState,
                  ref_params, batch: dict, key: jax.Array):
  """Rollout, rewards, GAE and num_ppo_epochs × num_minibatches PPO updates.

  Args:
    graphdef: actor-critic graph (static): LM head and value head.
    tx: optimizer (static).
    setup: static PPO settings.
    state: TrainState of the actor-critic (donated by `ppo_iteration_jit`).
    ref_params: frozen reference policy params (same graph), or None when kl_coef == 0.
    batch: prompt [B, Lp] (left-padded), prompt_mask, plus what the scorer reads (answer
      [B, A], answer_len [B] for the default).
    key: PRNG key; split into the rollout key and the minibatch-shuffle key.

  Returns:
    (new_state, metrics) with scalar metrics: reward, accuracy, invalid, completion_length,
    truncated, kl (summed per completion, π_old vs π_ref), value_mean, return_mean,
    explained_variance, and the last update's loss, pg_loss, vf_loss, entropy, pg_clipfrac,
    vf_clipfrac, ratio_mean, approx_kl, grad_norm; finite (all updates finite).
  """
  cfg = setup.loss
  _check_model(nnx.merge(graphdef, state.params), setup, ref_params)
  n = batch['prompt'].shape[0] * setup.group_size
  if n % setup.num_minibatches:
    raise ValueError(f'PPOSetup.num_minibatches={setup.num_minibatches} does not divide the '
                     f'{n} rollouts (batch × group_size)')
  if setup.shuffle == 'groups' and (n // setup.group_size) % setup.num_minibatches:
    raise ValueError(f"PPOSetup.num_minibatches={setup.num_minibatches} does not divide the "
                     f"{n // setup.group_size} prompt groups (shuffle='groups')")
  k_roll, k_shuffle = jax.random.split(key)
  ro = rollout(graphdef, state.params, batch, k_roll, setup, return_values=not setup.recompute_old)
  lp = ro['prompt'].shape[1]
  mask_BxT = ro['completion_mask']
  seq = jnp.concatenate([ro['prompt'], ro['tokens']], axis=1)
  seq_mask = jnp.concatenate([ro['prompt_mask'], mask_BxT], axis=1)

  sg = jax.lax.stop_gradient
  temp, chunk = logprob_temperature(setup.sampling), setup.logprob_chunk_tokens
  nmb = setup.num_minibatches
  group = setup.group_size if setup.shared_prompt else 1
  whole_groups = nmb == 1 or setup.shuffle == 'groups'  # minibatches hold each prompt's G rows together
  forward_all = lambda p: forward(graphdef, p, seq, seq_mask, lp, temp, chunk, group)
  if setup.recompute_old:
    old_logp_BxT, _, old_v_BxT = sg(forward_all(state.params))
  else:  # the decode computed both: the tempered log-probs it sampled with, the value head at each state
    old_logp_BxT = jnp.where(mask_BxT, ro['sample_logprobs'], 0.0)
    old_v_BxT = ro['state_values']
  kl_BxT = jnp.zeros_like(old_logp_BxT)
  if cfg.kl_coef > 0:
    ref_logp_BxT = sg(forward_all(ref_params)[0])
    kl_BxT = jnp.where(mask_BxT, old_logp_BxT - ref_logp_BxT, 0.0)
  t = mask_BxT.shape[1]
  last_BxT = jnp.arange(t)[None] == (ro['lengths'] - 1)[:, None]
  rewards_BxT = -cfg.kl_coef * kl_BxT + jnp.where(last_BxT, ro['reward'][:, None], 0.0)
  if cfg.whiten_rewards:
    rewards_BxT = advantages.masked_whiten(rewards_BxT, mask_BxT, shift_mean=False)
  adv_BxT, returns_BxT = advantages.gae(rewards_BxT, old_v_BxT, mask_BxT, cfg.gamma, cfg.lam)
  if setup.whiten_advantages:
    adv_BxT = advantages.masked_whiten(adv_BxT, mask_BxT)

  data = {'seq': seq, 'seq_mask': seq_mask, 'mask': mask_BxT, 'old_logp': old_logp_BxT,
          'old_v': old_v_BxT, 'adv': adv_BxT, 'returns': returns_BxT}

  def loss_fn(params, mb):
    logp, entropy, values = forward(graphdef, params, mb['seq'], mb['seq_mask'], lp, temp, chunk,
                                    group if whole_groups else 1)
    return losses.ppo_loss(logp, mb['old_logp'], mb['adv'], values, mb['old_v'], mb['returns'],
                           mb['mask'], entropy, cfg)

  def update(st: TrainState, mb):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(st.params, mb)
    finite = jnp.isfinite(loss) & all_finite(grads)
    new = apply_gradients(st, grads, tx)
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, st)
    return new, dict(aux, loss=loss, grad_norm=optax.global_norm(grads), finite=finite)

  def epoch(st: TrainState, k):
    if nmb == 1:
      perm = jnp.arange(n)
    elif setup.shuffle == 'groups':  # prompts shuffled, each group's rows kept in order
      g = setup.group_size
      perm = (jax.random.permutation(k, n // g)[:, None] * g + jnp.arange(g)).reshape(n)
    else:
      perm = jax.random.permutation(k, n)
    mbs = jax.tree.map(lambda x: x[perm].reshape((nmb, n // nmb) + x.shape[1:]), data)
    return jax.lax.scan(update, st, mbs)

  state, aux = jax.lax.scan(epoch, state, jax.random.split(k_shuffle, cfg.num_ppo_epochs))
  finite = jnp.all(aux['finite'])
  aux = jax.tree.map(lambda x: x[-1, -1], aux)

  valid = mask_BxT.astype(jnp.float32)
  n_tok = jnp.maximum(valid.sum(), 1.0)
  tok_mean = lambda x: jnp.sum(jnp.where(mask_BxT, x, 0.0)) / n_tok
  resid_var = tok_mean((returns_BxT - old_v_BxT - tok_mean(returns_BxT - old_v_BxT)) ** 2)
  ret_var = tok_mean((returns_BxT - tok_mean(returns_BxT)) ** 2)
  metrics = dict(
      aux,
      reward=ro['reward'].mean(),
      accuracy=(ro['score'] == 2).mean(),
      invalid=(ro['score'] < 0).mean(),
      completion_length=ro['lengths'].mean(),
      truncated=ro['truncated'].mean(),
      kl=kl_BxT.sum(axis=1).mean(),
      value_mean=tok_mean(old_v_BxT),
      return_mean=tok_mean(returns_BxT),
      explained_variance=1.0 - resid_var / jnp.maximum(ret_var, 1e-8),
      finite=finite,
  )
  return state, metrics


ppo_iteration_jit = jax.jit(ppo_iteration, static_argnums=(0, 1, 2), donate_argnums=(3,))


# --- experiment phase ---------------------------------------------------------------------
# How an experiment runs PPO as phase 2 (`training/phase.py`, `training/algorithms.py`).


@dataclasses.dataclass(frozen=True)
class PPOSection(losses.PPOConfig):
  """`config.rl.ppo`: the loss knobs of `losses.PPOConfig` plus the batching of `PPOSetup`."""

  num_minibatches: int = 1
  shuffle: str = 'rows'
  whiten_advantages: bool = True

  def __post_init__(self):
    super().__post_init__()
    if self.shuffle not in ('rows', 'groups'):
      raise ValueError(f"shuffle='{self.shuffle}': must be 'rows' or 'groups'")


def build_phase(ctx, section: PPOSection):
  """The actor-critic (the SFT policy plus a fresh 'sigmoid' value head) and its PPO step."""
  from rlm_jax.training import phase  # pylint: disable=g-import-not-at-top
  from rlm_jax.training.state import create_train_state  # pylint: disable=g-import-not-at-top
  rl = ctx.rl
  graphdef, params = ctx.models.actor_critic(ctx.policy[1], head=ALGORITHM.policy_head)
  tx = ctx.models.optimizer(rl.optim, params)
  ref = jax.tree.map(jnp.copy, params) if section.kl_coef > 0 else None
  setup = PPOSetup(loss=section, sampling=ctx.sampling, reward=rl.reward, step_id=ctx.tok.step_id,
                   step_ends=StepEnds.of(ctx.tok), group_size=rl.group_size,
                   num_minibatches=section.num_minibatches, shuffle=section.shuffle,
                   whiten_advantages=section.whiten_advantages,
                   logprob_chunk_tokens=rl.logprob_chunk_tokens, recompute_old=rl.recompute_old_logp,
                   shared_prompt=rl.shared_prompt)
  state = create_train_state(params, tx, ctx.mesh, ctx.rules)
  step = lambda st, b, i: ppo_iteration_jit(graphdef, tx, setup, st, ref, b, phase.iteration_key(ctx.seed, 3, i))
  return phase.Phase(state=state, step=step, batch=lambda i: ctx.device_batch(ctx.pool.prompt_batch(), ctx.prompts(i)),
                     policy=lambda st: (graphdef, st.params))


def _algorithm():
  from rlm_jax.training import phase  # pylint: disable=g-import-not-at-top
  return phase.Algorithm(name='ppo', config=PPOSection, build=build_phase, policy_head='sigmoid')


ALGORITHM = _algorithm()
