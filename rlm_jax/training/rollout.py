"""What GRPO, RLOO, PPO and EM-PG share: the on-policy rollout (G completions per prompt,
scored) and the log-probs of its completions under the policy.

Each prompt is prefilled once and its KV cache shared by its G samples (`num_samples`); rows
come back prompt-major [B·G]. What it needs of the algorithm's static setup is the
`RolloutSetup` protocol below (GRPOSetup, PPOSetup and EMSetup have these fields).
"""

from __future__ import annotations

from typing import Callable, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from rlm_jax.data.steps import StepEnds
from rlm_jax.models.transformer import KVCache, positions_from_mask
from rlm_jax.sampling.sampler import SampleOutput, SamplingConfig, StopReason, generate
from rlm_jax.training import losses
from rlm_jax.training.rewards import RewardConfig, final_step_score, score_to_reward


class RolloutSetup(Protocol):
  group_size: int  # G samples per prompt
  sampling: SamplingConfig
  reward: RewardConfig  # verifier score -> reward
  step_id: int  # step delimiter of the default final-step match
  step_ends: StepEnds | None  # the tokenizer's step-end tables (None: only step_id ends a step)
  # Jittable verifier: (SampleOutput, batch with rows repeated G times) -> scores in {-1, 0, 1, 2};
  # None: the final step must equal batch['answer'] (`answer_match_score`).
  score_fn: Callable[[SampleOutput, dict], jax.Array] | None


def step_ends_of(setup: RolloutSetup) -> StepEnds | int:
  """What ends a step for `setup`: its `step_ends` tables, else its `step_id`."""
  return setup.step_id if setup.step_ends is None else setup.step_ends


def answer_match_score(out: SampleOutput, batch: dict, step_id: StepEnds | int) -> jax.Array:
  return final_step_score(out.tokens_BxT, out.lengths_B, out.stop_reason_B, batch['answer'],
                          batch['answer_len'], step_id)


def rollout(graphdef, params, batch: dict, key: jax.Array, setup: RolloutSetup, *,
            return_values: bool = False) -> dict:
  """Samples G completions per prompt and scores them. Rows are prompt-major: [B·G].

  Args:
    graphdef, params: the policy.
    batch: prompt [B, Lp] (left-padded), prompt_mask, plus what the scorer reads (answer [B, A],
      answer_len [B] for the default).
    key: PRNG key of the sampler.
    setup: a `RolloutSetup`.
    return_values: the policy has a value head (actor-critic): also return its values, read
      from the decode (static).

  Returns:
    dict of [B·G, ...] rows: prompt, prompt_mask, tokens, completion_mask, lengths, truncated,
    score, reward, sample_logprobs (tempered, as the losses use them); with `return_values`,
    state_values [B·G, T]: V(s_t), the value of the state before completion token t (the last
    prompt token's for t = 0; 0 past the completion).
  """
  out = generate(graphdef, params, batch['prompt'], batch['prompt_mask'], key, setup.sampling,
                 num_samples=setup.group_size, tempered_logprobs=True, return_values=return_values)
  batch = jax.tree.map(lambda x: jnp.repeat(x, setup.group_size, axis=0), batch)
  prompt, prompt_mask = batch['prompt'], batch['prompt_mask']
  if setup.score_fn is None:
    score = answer_match_score(out, batch, step_ends_of(setup))
  else:
    score = setup.score_fn(out, batch)
  t = out.tokens_BxT.shape[1]
  completion_mask = jnp.arange(t)[None] < out.lengths_B[:, None]
  ro = {
      'prompt': prompt, 'prompt_mask': prompt_mask, 'tokens': out.tokens_BxT,
      'completion_mask': completion_mask, 'lengths': out.lengths_B,
      'truncated': out.stop_reason_B == StopReason.LENGTH, 'score': score,
      'reward': score_to_reward(score, setup.reward), 'sample_logprobs': out.logprobs_BxT,
  }
  if return_values:  # V(s_t) is the value after token t - 1
    before_BxT = jnp.concatenate([out.prompt_values_B[:, None], out.values_BxT[:, :-1]], axis=1)
    ro['state_values'] = jnp.where(completion_mask, before_BxT, 0.0)
  return ro


def head_model(graphdef, params):
  """The plain `Transformer` behind a policy (LoRA adapters folded into its weights), so
  callers can run the trunk and the LM head separately."""
  model = nnx.merge(graphdef, params)
  if hasattr(model, 'effective_base'):  # LoraTransformer: W + scale·A·B, gradients reach A, B
    model = nnx.merge(*model.effective_base())
  return model


def completion_logprobs(graphdef, params, seq_BxL, seq_mask_BxL, prompt_len: int,
                        temperature: float = 1.0, chunk_tokens: int = 1024, group_size: int = 1):
  """log π(completion tokens) and entropies for sequences laid out as [prompt | completion].

  The LM head runs only over the positions that predict completion tokens, in chunks
  (`losses.lm_head_logprobs`): no [B, L, V] logits; the last layer too, but for its keys and
  values (`Transformer(hidden_from=...)`).

  With `group_size = G > 1` the rows come in runs of G that share one prompt (a rollout's
  prompt-major layout): each prompt runs through the trunk once and its keys and values are
  broadcast to its G completions (`shared_prompt_hidden`), the same numbers up to float
  rounding with (B/G)·Lp + B·T token positions instead of B·(Lp + T). Gradients reach the
  prompt's positions summed over the group, as the repeated rows would give them.

  Args:
    graphdef, params: the policy.
    seq_BxL, seq_mask_BxL: [prompt | completion] tokens and their mask.
    prompt_len: Lp, the prompt width (static).
    temperature: T of the policy softmax(logits / T) (static); the rollout's
      `logprob_temperature(sampling)`.
    chunk_tokens: positions per LM-head chunk (static; 0 = one chunk).
    group_size: G, rows per shared prompt (static; 1 = every row on its own).

  Returns:
    (logp_BxT, entropy_BxT) float32, T = L - prompt_len columns.
  """
  model = head_model(graphdef, params)
  hidden_BxTxD = completion_hidden(model, seq_BxL, seq_mask_BxL, prompt_len, group_size)
  return losses.lm_head_logprobs(hidden_BxTxD, model.lm_head_DxV(), seq_BxL[:, prompt_len:], temperature,
                                 chunk_tokens)


def completion_hidden(model, seq_BxL, seq_mask_BxL, prompt_len: int, group_size: int = 1) -> jax.Array:
  """Final-norm hidden states [B, L - Lp, D] at positions Lp-1 .. L-2, those that predict the
  completion tokens: one forward whose last layer starts at the last prompt position (nothing
  before it reaches a loss), or with `group_size > 1` `shared_prompt_hidden`."""
  if group_size > 1:
    return shared_prompt_hidden(model, seq_BxL, seq_mask_BxL, prompt_len, group_size)
  out = model(seq_BxL, positions_from_mask(seq_mask_BxL), seq_mask_BxL, logits='none', values='none',
              hidden_from=prompt_len - 1)
  return out.hidden_BxLxD[:, :-1]


def shared_prompt_hidden(model, seq_BxL, seq_mask_BxL, prompt_len: int, group_size: int) -> jax.Array:
  """Final-norm hidden states at positions Lp-1 .. L-2 (those predicting the completion), with
  each prompt computed once for the G rows that share it.

  The first row of each run of G holds the prompt (the others are assumed equal to it, as in
  a rollout). A prefill of those B/G prompts fills a KV cache of L slots, broadcast to the B
  rows; the completions then run as one chunk at cache index Lp against it. The position
  predicting the first completion token is the prompt's last, shared by the group.

  Returns:
    [B, L - Lp, D] in the compute dtype.
  """
  b, length = seq_BxL.shape
  g, lp = group_size, prompt_len
  if b % g:
    raise ValueError(f'shared_prompt_hidden: {b} rows are not runs of group_size={g}')
  positions_BxL = positions_from_mask(seq_mask_BxL)
  first = lambda x: x[::g, :lp]  # the group's prompt (row b·G)
  cache = KVCache.zeros(model.cfg, b // g, length)
  pre = model(first(seq_BxL), first(positions_BxL), first(seq_mask_BxL), cache=cache, cache_index=0, logits='none',
              values='none')
  rep = lambda x: jnp.repeat(x, g, axis=0)
  out = model(seq_BxL[:, lp:], positions_BxL[:, lp:], seq_mask_BxL[:, lp:], cache=jax.tree.map(rep, pre.cache),
              cache_index=lp, logits='none', values='none')
  return jnp.concatenate([rep(pre.hidden_BxLxD[:, -1:]), out.hidden_BxLxD[:, :-1]], axis=1)
