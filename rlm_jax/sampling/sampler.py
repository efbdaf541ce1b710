"""On-device batched sampler: one prefill, then a `lax.while_loop` decode over a KV cache.

Prompts come left-padded (`prompt_mask_BxLp` marks real tokens), so every row's last prompt
token sits in the last prompt slot and all rows decode in lock step. The cache lives inside
the compiled program as loop carry, so XLA updates it in place; nothing returns to the host
until the loop ends. The decode is one loop per cache size of `decode_spans`: the cache grows
as it fills, so a step attends over the slots up to the next size, not the whole cache. A row
stops on EOS, on the step delimiter (when `stop_at_step`), or after `max_new_tokens`; the
loops exit early once every row has stopped. `num_samples` draws
several completions per prompt from one prefill (shared prefix).

`generate` is traceable (use it inside larger jitted programs: GRPO iterations, MCTS);
`sample` is the same function jitted with the model graph and config static.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rlm_jax.data.steps import StepEnds
from rlm_jax.models.transformer import KVCache, decode_spans, positions_from_mask


class StopReason:
  LENGTH = 0  # hit max_new_tokens
  EOS = 1
  STEP = 2  # emitted the step delimiter (stop_at_step=True)
  EMPTY = 3  # the prompt had no tokens: nothing generated
  NAMES = ('length', 'eos', 'step', 'empty')


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick tokens. `greedy` ignores temperature/top_k/top_p."""

  max_new_tokens: int
  eos_id: int
  pad_id: int
  step_id: int = -1  # step delimiter; only used when stop_at_step (and no step_ends / step_table_V)
  stop_at_step: bool = False
  greedy: bool = False
  temperature: float = 1.0
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1 = off

  def __post_init__(self):
    if self.max_new_tokens < 0:
      raise ValueError(f'sampling.max_new_tokens={self.max_new_tokens}: must be >= 0')
    if not self.greedy and self.temperature <= 0:
      raise ValueError(f'sampling.temperature={self.temperature}: must be > 0 (or set greedy=True)')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'sampling.top_p={self.top_p}: must be in (0, 1]')
    if self.top_k < 0:
      raise ValueError(f'sampling.top_k={self.top_k}: must be >= 0')


class SampleOutput(NamedTuple):
  tokens_BxT: jax.Array  # int32, pad after the stop
  # float32 log pi(token) under the untempered model (under logits / T with
  # `tempered_logprobs=True`); 0 on padding
  logprobs_BxT: jax.Array
  lengths_B: jax.Array  # tokens generated, the stop token included
  stop_reason_B: jax.Array  # StopReason codes
  # With `return_values=True` (a model with a value head, e.g. an actor-critic): the value
  # head's output at each generated token (the value of the state that ends with it), 0 on
  # padding, and at the last prompt token. Read from the decode's own hidden states: the
  # forward that writes token t's keys and values computes them, so no second pass.
  values_BxT: jax.Array | None = None
  prompt_values_B: jax.Array | None = None


def filter_logits(logits_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Sets logits outside the top-k / nucleus (top-p) set to -inf."""
  neg_inf = jnp.finfo(logits_BxV.dtype).min
  if top_k > 0:
    kth_B = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_B, neg_inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    keep_BxV = mass_before_BxV < top_p
    cutoff_B = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_B, neg_inf, logits_BxV)
  return logits_BxV


def choose_tokens(logits_BxV: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
  if cfg.greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = filter_logits(logits_BxV / cfg.temperature, cfg.top_k, cfg.top_p)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


def logprob_temperature(cfg: SamplingConfig) -> float:
  """The temperature T of the distribution softmax(logits / T) that `cfg` samples from.

  Greedy decoding has no temperature: 1. RL losses use this T for π_θ and π_old, so that the
  policy they differentiate is the one the rollout sampled from (as TRL does).
  """
  return 1.0 if cfg.greedy else float(cfg.temperature)


def generate(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    prompt_BxLp: jax.Array,
    prompt_mask_BxLp: jax.Array,
    key: jax.Array,
    cfg: SamplingConfig,
    *,
    num_samples: int = 1,
    step_table_V: jax.Array | None = None,
    step_ends: StepEnds | None = None,
    tempered_logprobs: bool = False,
    return_values: bool = False,
) -> SampleOutput:
  """Samples up to `cfg.max_new_tokens` tokens for each left-padded prompt.

  With `num_samples = N > 1` each prompt is prefilled once and its KV cache (and last
  logits) broadcast to N rows, prompt-major: output row b·N + j is sample j of prompt b.
  For the same key that gives what N = 1 gives on `jnp.repeat(prompts, N, axis=0)` (log-probs
  up to float rounding: a matmul over B rows may round unlike one over B·N), without N
  prefills.

  Args:
    graphdef, state: the policy, split with `nnx.split` (must have an LM head).
    prompt_BxLp: int tokens, left-padded.
    prompt_mask_BxLp: True on real prompt tokens (a suffix of each row).
    key: PRNG key; token t of the batch uses `fold_in(key, t)`, so results do not depend on
      how the loop is compiled. Unused when `cfg.greedy`.
    cfg: static sampling configuration.
    num_samples: N completions per prompt (static).
    step_table_V: optional bool [V]: True for every token whose text contains the step
      delimiter (a BPE tokenizer merges it with its neighbours). With `cfg.stop_at_step` a
      row then stops after any such token instead of after `cfg.step_id`.
    step_ends: optional `StepEnds` of the tokenizer (closed over as constants, or traced):
      with `cfg.stop_at_step` a row stops where `step_ends.is_end` says a step ends, which
      also catches a delimiter split over two tokens ('\n', '\n'). The prompt's last token
      never completes a delimiter: each row starts a fresh step. Excludes `step_table_V`.
    tempered_logprobs: return log-probs of softmax(logits / T), T = `logprob_temperature(cfg)`
      (what RL losses need as π_old) instead of those of the untempered model (static).
    return_values: also return the value head's output at every generated token and at the
      last prompt token (`SampleOutput.values_BxT`, `prompt_values_B`; static). The model
      must have a value head; its cost is the head on one position per decode step.

  Returns:
    SampleOutput with B·N rows and T = cfg.max_new_tokens columns.
  """
  if cfg.stop_at_step and cfg.step_id < 0 and step_table_V is None and step_ends is None:
    raise ValueError('sampling.stop_at_step=True needs a step_id or a step_table_V')
  if step_table_V is not None and step_ends is not None:
    raise ValueError('generate: pass step_ends or step_table_V, not both')
  if not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f'generate(num_samples={num_samples!r}): must be an int >= 1')
  model = nnx.merge(graphdef, state)
  if return_values and model.cfg.value_head == 'none':
    raise ValueError("generate(return_values=True): the model has no value head (model.value_head='none')")
  b, lp = prompt_BxLp.shape
  t_max = cfg.max_new_tokens
  if step_table_V is not None and step_table_V.shape != (model.cfg.vocab_size,):
    raise ValueError(f'step_table_V has shape {step_table_V.shape}, expected ({model.cfg.vocab_size},)')
  if step_table_V is not None:  # one id table: the StepEnds of a delimiter that never splits
    none_KxV = jnp.zeros((0, model.cfg.vocab_size), bool)
    step_ends = StepEnds(jnp.asarray(step_table_V, bool), none_KxV, none_KxV, pad_id=cfg.pad_id)
  prompt_mask_BxLp = prompt_mask_BxLp.astype(bool)
  prompt_len_B = prompt_mask_BxLp.sum(axis=1).astype(jnp.int32)

  sizes = decode_spans(lp, t_max)  # the cache grows through these sizes as the decode fills it
  cache = KVCache.zeros(model.cfg, b, sizes[0])
  # The prefill needs the next-token logits of the last prompt slot only: no [B, Lp, V] head.
  heads = {'values': 'last'} if return_values else {}  # (a model without a `values` argument still works)
  out = model(prompt_BxLp, positions_from_mask(prompt_mask_BxLp), prompt_mask_BxLp, cache=cache, cache_index=0,
              logits='last', **heads)
  cache, logits_BxV = out.cache, out.logits_BxLxV[:, -1]
  prompt_values_B = out.values_BxL[:, -1].astype(jnp.float32) if return_values else jnp.zeros((b,), jnp.float32)
  if num_samples > 1:  # one prefill per distinct prompt, then N rows per prompt
    rep = lambda x: jnp.repeat(x, num_samples, axis=0)
    cache, logits_BxV, prompt_len_B, prompt_values_B = jax.tree.map(
        rep, (cache, logits_BxV, prompt_len_B, prompt_values_B))
    b = b * num_samples
  empty_B = prompt_len_B == 0
  logp_t = logprob_temperature(cfg) if tempered_logprobs else 1.0

  class Carry(NamedTuple):
    i: jax.Array
    cache: KVCache
    logits_BxV: jax.Array
    done_B: jax.Array
    tokens_BxT: jax.Array
    logprobs_BxT: jax.Array
    lengths_B: jax.Array
    reason_B: jax.Array
    values_BxT: jax.Array  # [B, 0] unless return_values

  def cond(c: Carry):
    return (c.i < t_max) & ~jnp.all(c.done_B)

  def body(c: Carry):
    tok_B = choose_tokens(c.logits_BxV, jax.random.fold_in(key, c.i), cfg)
    tok_B = jnp.where(c.done_B, cfg.pad_id, tok_B)
    scaled_BxV = c.logits_BxV / logp_t if logp_t != 1.0 else c.logits_BxV
    logp_B = jnp.take_along_axis(jax.nn.log_softmax(scaled_BxV, axis=-1), tok_B[:, None], axis=-1)[:, 0]
    logp_B = jnp.where(c.done_B, 0.0, logp_B)
    live_B = ~c.done_B
    is_eos_B = live_B & (tok_B == cfg.eos_id)
    if step_ends is not None:  # (a step_table_V arrives here as a StepEnds without split tables)
      if step_ends.splits:  # a row's previous token in this step (none at the first new token)
        prev_B = jax.lax.dynamic_index_in_dim(c.tokens_BxT, jnp.maximum(c.i - 1, 0), 1, keepdims=False)
        prev_B = jnp.where(c.i > 0, prev_B, step_ends.pad_id)
      else:
        prev_B = tok_B  # unused: every end is one token
      is_step_B = live_B & step_ends.is_end(prev_B, tok_B) & cfg.stop_at_step
    else:
      is_step_B = live_B & (tok_B == cfg.step_id) & cfg.stop_at_step
    reason_B = jnp.where(is_eos_B, StopReason.EOS, jnp.where(is_step_B, StopReason.STEP, c.reason_B))
    positions_Bx1 = (prompt_len_B + c.i)[:, None]
    step_out = model(tok_B[:, None], positions_Bx1, live_B[:, None], cache=c.cache, cache_index=lp + c.i)
    values_BxT = c.values_BxT
    if return_values:  # the value of the state ending with tok_B: this forward's hidden state
      v_B = jnp.where(live_B, step_out.values_BxL[:, -1].astype(jnp.float32), 0.0)
      values_BxT = values_BxT.at[:, c.i].set(v_B)
    return Carry(
        i=c.i + 1,
        cache=step_out.cache,
        logits_BxV=step_out.logits_BxLxV[:, -1],
        done_B=c.done_B | is_eos_B | is_step_B,
        tokens_BxT=c.tokens_BxT.at[:, c.i].set(tok_B),
        logprobs_BxT=c.logprobs_BxT.at[:, c.i].set(logp_B),
        lengths_B=c.lengths_B + live_B.astype(jnp.int32),
        reason_B=reason_B.astype(jnp.int32),
        values_BxT=values_BxT,
    )

  init = Carry(
      i=jnp.array(0, jnp.int32),
      cache=cache,
      logits_BxV=logits_BxV,
      done_B=empty_B,
      tokens_BxT=jnp.full((b, t_max), cfg.pad_id, jnp.int32),
      logprobs_BxT=jnp.zeros((b, t_max), jnp.float32),
      lengths_B=jnp.zeros((b,), jnp.int32),
      reason_B=jnp.where(empty_B, StopReason.EMPTY, StopReason.LENGTH).astype(jnp.int32),
      values_BxT=jnp.zeros((b, t_max if return_values else 0), jnp.float32),
  )
  final = init
  for size in sizes:  # one loop per cache size: a step attends over `size` slots, not lp + t_max
    fits = lambda c, size=size: cond(c) & (lp + c.i < size)
    final = jax.lax.while_loop(fits, body, final._replace(cache=final.cache.resize(size)))
  if not return_values:
    return SampleOutput(final.tokens_BxT, final.logprobs_BxT, final.lengths_B, final.reason_B)
  prompt_values_B = jnp.where(empty_B, 0.0, prompt_values_B)
  return SampleOutput(final.tokens_BxT, final.logprobs_BxT, final.lengths_B, final.reason_B, final.values_BxT,
                      prompt_values_B)


sample = jax.jit(generate, static_argnames=('graphdef', 'cfg', 'num_samples', 'tempered_logprobs', 'return_values'))
