"""Jittable outcome reward for synthetic tasks: match the final step against the answer tokens.

Synthetic tasks have a canonical final step ("Answer: X", see `rlm_jax.tasks.answer_text`), so
on device a completion is scored by comparing its last step with those tokens, which keeps a
whole GRPO iteration inside one compiled program. Scores use the verifier scale of
`rlm_jax.tasks.verify`: -1 invalid (no EOS: truncated or empty), 0 wrong, 2 solved. The match
is format-strict: the host verifier accepts more phrasings, so for text a model was not trained
to produce in this format use the host path (`rlm_jax.tasks.verify` on decoded text).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rlm_jax.data.steps import StepEnds, as_step_ends
from rlm_jax.sampling.sampler import StopReason
from rlm_jax.tasks.rewards import DEFAULT_REWARDS


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """Float reward per verifier score (-1 invalid, 0 wrong, 2 solved); defaults as the verify
  CLI's (`tasks.rewards.DEFAULT_REWARDS`)."""

  correct: float = DEFAULT_REWARDS[2]
  wrong: float = DEFAULT_REWARDS[0]
  invalid: float = DEFAULT_REWARDS[-1]


def final_step_score(
    tokens_BxT: jax.Array,
    lengths_B: jax.Array,
    stop_reason_B: jax.Array,
    answer_BxA: jax.Array,
    answer_len_B: jax.Array,
    step_id: StepEnds | int,
) -> jax.Array:
  """Verifier score of each completion: 2 if its last step equals the answer tokens.

  Args:
    tokens_BxT: sampled completions; the final token of a finished row is EOS.
    lengths_B: tokens generated (EOS included).
    stop_reason_B: `StopReason` codes; only EOS-terminated rows can be correct.
    answer_BxA: right-padded token ids of the canonical final step.
    answer_len_B: its length.
    step_id: the tokenizer's `StepEnds` (a delimiter that merges with or splits across
      tokens), or the step delimiter token.

  Returns:
    int32 scores in {-1, 0, 2}.
  """
  b, t = tokens_BxT.shape
  a = answer_BxA.shape[1]
  pos_T = jnp.arange(t)
  body_end_B = lengths_B - 1  # index of EOS
  is_delim_BxT = as_step_ends(step_id).mask(tokens_BxT, pos_T[None] < body_end_B[:, None])
  last_delim_B = jnp.max(jnp.where(is_delim_BxT, pos_T[None], -1), axis=1)
  start_B = last_delim_B + 1
  idx_BxA = jnp.clip(start_B[:, None] + jnp.arange(a)[None], 0, t - 1)
  seg_BxA = jnp.take_along_axis(tokens_BxT, idx_BxA, axis=1)
  in_answer_BxA = jnp.arange(a)[None] < answer_len_B[:, None]
  same = jnp.all(jnp.where(in_answer_BxA, seg_BxA == answer_BxA, True), axis=1)
  match_B = same & (body_end_B - start_B == answer_len_B)
  valid_B = stop_reason_B == StopReason.EOS
  return jnp.where(valid_B, jnp.where(match_B, 2, 0), -1).astype(jnp.int32)


def score_to_reward(score_B: jax.Array, cfg: RewardConfig) -> jax.Array:
  return jnp.where(score_B == 2, cfg.correct, jnp.where(score_B == 0, cfg.wrong, cfg.invalid)).astype(
      jnp.float32
  )
