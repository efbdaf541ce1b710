"""Adapter: Flax policy / value models + the sampler -> the `SearchModel` callables.

    model = lm.make_search_model(policy_graphdef, options, tok_ids, value_graphdef=vgd,
                                 reward_fn=reward)
    params = lm.LMParams(policy=policy_state, value=value_state, reward=answers)
    result = jax.jit(partial(mcts, model=model, config=cfg))(params, key, prompt, mask)

* Policy: ONE `sampler.generate` call with `num_samples=num`: each node state is prefilled
  once and its KV cache shared by its `num` rows (M * num rows, node-major; rows differ
  because every row draws its own tokens). A row whose state is empty (an idle walker) is
  done before decoding. `to_end=False` stops a
  row at a step end (`TokenIds.step_ends`: where the delimiter text is completed, even when a
  BPE tokenizer merges it with its neighbours or splits it over two tokens), `to_end=True` at
  EOS. The step's prior comes from the sampler's
  untempered log-probs.
* Value: a separate value model (`value_graphdef`), its head run at the last token of each
  node's state only (`last_value_fn`). New states (children, rollouts, completions) are
  scored by `extension_value_fn`: each parent's state is prefilled once into the value model's
  KV cache, broadcast to its K extensions, and only their new tokens run against it (an
  expansion reads M·(T + K·L) token positions instead of M·K·(T + L)). Or the policy's own
  value head (`value_from_policy=True`, actor-critic): then the value of a new step's end
  state is read from the decode that sampled it (the forward
  that writes the step's last token computes its hidden state), so an expansion runs no
  second model over the children. A 'logit' head (P(correct)) is mapped to reward units
  2 sigmoid(z) - 1 so every q lives in [-1, 1].
* Reward (training mode / data generation): `reward_fn(reward_params, tokens_BxL, mask_BxL,
  problem_idx_B) -> reward_B` on the solution tokens (right-padded, no prompt); the per-problem
  data (e.g. answer tokens) travels in `LMParams.reward`, so a new batch of problems does not
  recompile. `answer_reward_fn` is the one for synthetic tasks with a canonical final step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlm_jax.data.steps import StepEnds, as_step_ends
from rlm_jax.data.tokenizer import Tokenizer, pad_batch
from rlm_jax.models.transformer import KVCache, positions_from_mask
from rlm_jax.sampling import sampler as sampler_lib
from rlm_jax.search.base import NodeBatch, SearchModel, SearchResult, Steps


class LMParams(NamedTuple):
  """Everything traced that the LM callables read (a pytree)."""

  policy: Any  # nnx.State of the policy
  value: Any = None  # nnx.State of the value model (None: no separate value model)
  reward: Any = None  # per-problem data for the reward callable (e.g. answer tokens)


@dataclasses.dataclass(frozen=True)
class LMOptions:
  """How the policy samples (static).

  Attributes:
    step_tokens: most tokens per step (a longer step is cut and stays non-terminal).
    completion_tokens: most tokens per whole completion (chain, best-of-N, rollouts).
    temperature, top_k, top_p: sampling filters (priors use the untempered log-probs).
    value_from_policy: read values from the policy's value head instead of a value model.
  """

  step_tokens: int = 32
  completion_tokens: int = 128
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  value_from_policy: bool = False

  def __post_init__(self):
    if self.step_tokens < 1 or self.completion_tokens < 1:
      raise ValueError(f'lm.step_tokens={self.step_tokens} and lm.completion_tokens='
                       f'{self.completion_tokens} must be >= 1')


class TokenIds(NamedTuple):
  """Special tokens of the tokenizer, and its step-end tables (static: hashed by identity).

  `step_ends` None: a step ends at `step_id` only (scripted vocabularies); `of(tok)` fills it.
  """

  pad_id: int
  eos_id: int
  step_id: int
  step_ends: Optional[StepEnds] = None

  @classmethod
  def of(cls, tok: Tokenizer) -> 'TokenIds':
    return cls(tok.pad_id, tok.eos_id, tok.step_id, StepEnds.of(tok))

  @property
  def step(self) -> StepEnds | int:
    return self.step_id if self.step_ends is None else self.step_ends


def _values(graphdef, state, tokens_MxT, mask_MxT, where: str = 'all') -> jax.Array:
  """Value head output in reward units, at every position ('all': [M, T]) or the last one
  ('last': [M, 1]); the LM head of an actor-critic does not run."""
  model = nnx.merge(graphdef, state)
  if model.cfg.value_head == 'none':
    raise ValueError('value model has no value head (model.value_head is "none")')
  out = model(tokens_MxT, positions_from_mask(mask_MxT), mask_MxT, logits='none', values=where)
  return _reward_units(model.cfg, out.values_BxL)


def _extension_values(graphdef, state, nodes: NodeBatch, tokens_MxKxL, mask_MxKxL):
  """Values at every token of K extensions of each node and at the node's last token:
  (values_MxKxL, 0 on padding; values_M), the node's state prefilled once and its KV cache
  shared by its K extensions."""
  model = nnx.merge(graphdef, state)
  if model.cfg.value_head == 'none':
    raise ValueError('value model has no value head (model.value_head is "none")')
  (m, t), (_, k, l) = nodes.tokens_MxT.shape, tokens_MxKxL.shape
  pre = model(nodes.tokens_MxT, positions_from_mask(nodes.mask_MxT), nodes.mask_MxT,
              cache=KVCache.zeros(model.cfg, m, t + l), cache_index=0, logits='none', values='last')
  rep = lambda x: jnp.repeat(x, k, axis=0)
  mask = mask_MxKxL.reshape(m * k, l).astype(bool)
  start = rep(jnp.sum(nodes.mask_MxT, axis=1, dtype=jnp.int32))
  positions = start[:, None] + jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
  out = model(tokens_MxKxL.reshape(m * k, l), positions, mask, cache=jax.tree.map(rep, pre.cache), cache_index=t,
              logits='none', values='all')
  values = jnp.where(mask, _reward_units(model.cfg, out.values_BxL), 0.0)
  return values.reshape(m, k, l), _reward_units(model.cfg, pre.values_BxL[:, 0])


def _reward_units(cfg, v):
  v = v.astype(jnp.float32)
  return 2.0 * jax.nn.sigmoid(v) - 1.0 if cfg.value_head == 'logit' else v


def make_search_model(policy_graphdef: nnx.GraphDef, options: LMOptions, ids: TokenIds, *,
                      value_graphdef: Optional[nnx.GraphDef] = None,
                      reward_fn: Optional[Callable[..., jax.Array]] = None) -> SearchModel:
  """Builds the search callables from model graphs (the weights come later, in LMParams).

  Args:
    policy_graphdef: graph of the policy (`nnx.split(model)[0]`), with an LM head.
    options: sampling options.
    ids: pad / eos / step token ids of the tokenizer.
    value_graphdef: graph of a separate value model / PRM; None uses the policy's value head
      when `options.value_from_policy`, else there is no value model (searches then rely on
      the reward and rollouts only).
    reward_fn: jittable `(reward_params, tokens_BxL, mask_BxL, problem_idx_B) -> reward_B` in
      [-1, 1], or None (inference without a verifier).

  Returns:
    SearchModel whose callables take `LMParams`.
  """
  if value_graphdef is not None and options.value_from_policy:
    raise ValueError('give either value_graphdef or lm.value_from_policy=True, not both')

  def policy_fn(params: LMParams, key, nodes: NodeBatch, num: int, *, to_end: bool, greedy: bool) -> Steps:
    m = nodes.tokens_MxT.shape[0]
    cfg = sampler_lib.SamplingConfig(
        max_new_tokens=options.completion_tokens if to_end else options.step_tokens,
        eos_id=ids.eos_id, pad_id=ids.pad_id, step_id=ids.step_id, stop_at_step=not to_end,
        greedy=greedy, temperature=options.temperature, top_k=options.top_k, top_p=options.top_p)
    out = sampler_lib.generate(policy_graphdef, params.policy, nodes.tokens_MxT, nodes.mask_MxT, key, cfg,
                               num_samples=num, step_ends=ids.step_ends, return_values=options.value_from_policy)
    shape = lambda x: x.reshape((m, num) + x.shape[1:])
    value = values = None
    if options.value_from_policy:  # the value head at every generated token, from the decode itself
      units = functools.partial(_reward_units, nnx.merge(policy_graphdef, params.policy).cfg)
      t = out.values_BxT.shape[1]
      gen_BxT = jnp.arange(t)[None] < out.lengths_B[:, None]
      values_BxT = jnp.where(gen_BxT, units(out.values_BxT), 0.0)
      last = jnp.clip(out.lengths_B - 1, 0, t - 1)
      v_B = jnp.take_along_axis(values_BxT, last[:, None], axis=1)[:, 0]
      v_B = jnp.where(out.lengths_B > 0, v_B, units(out.prompt_values_B))  # nothing generated: the state itself
      value, values = shape(v_B), shape(values_BxT)
    return Steps(tokens_MxKxL=shape(out.tokens_BxT), lengths_MxK=shape(out.lengths_B),
                 logprob_MxK=shape(out.logprobs_BxT.sum(axis=1)),
                 terminal_MxK=shape(out.stop_reason_B == sampler_lib.StopReason.EOS), value_MxK=value,
                 values_MxKxL=values)

  value_fn = last_value_fn = extension_value_fn = None
  if value_graphdef is not None or options.value_from_policy:
    graphdef, which = (value_graphdef, 'value') if value_graphdef is not None else (policy_graphdef, 'policy')
    value_fn = lambda params, nodes: _values(graphdef, getattr(params, which), nodes.tokens_MxT, nodes.mask_MxT)
    last_value_fn = lambda params, nodes: _values(graphdef, getattr(params, which), nodes.tokens_MxT,
                                                  nodes.mask_MxT, 'last')[:, 0]
    extension_value_fn = lambda params, nodes, tokens, mask: _extension_values(graphdef, getattr(params, which),
                                                                               nodes, tokens, mask)

  search_reward = None
  if reward_fn is not None:
    search_reward = lambda params, tokens, mask, problem: reward_fn(params.reward, tokens, mask, problem)
  return SearchModel(policy_fn=policy_fn, value_fn=value_fn, reward_fn=search_reward,
                     pad_id=ids.pad_id, eos_id=ids.eos_id, step_id=ids.step_id, step_ends=ids.step_ends,
                     last_value_fn=last_value_fn, extension_value_fn=extension_value_fn)


# ------------------------------------------------------------------------------------------
# Synthetic tasks: reward by matching the canonical final step.


class AnswerTable(NamedTuple):
  """Canonical final-step tokens per problem ('Answer: X'), the `LMParams.reward` of
  `answer_reward_fn`."""

  answer_PxA: jax.Array
  answer_len_P: jax.Array


def answer_table(tok: Tokenizer, answers: Sequence[str], width: int) -> AnswerTable:
  """Tokenises final steps (e.g. 'Answer: ' + tasks.answer_text(task)), right-padded."""
  rows = [tok.encode(a) for a in answers]
  tokens, _ = pad_batch(rows, width, tok.pad_id, side='right', what='answer')
  return AnswerTable(jnp.asarray(tokens), jnp.asarray([len(r) for r in rows], jnp.int32))


def answer_reward_fn(ids: TokenIds) -> Callable[..., jax.Array]:
  """+1 when the solution ends with EOS and its last step equals the problem's answer tokens,
  -1 otherwise (wrong, unfinished or malformed). Same match as `training.rewards`."""

  def reward(table: AnswerTable, tokens_BxL, mask_BxL, problem_B):
    b, l = tokens_BxL.shape
    a = table.answer_PxA.shape[1]
    n_B = mask_BxL.sum(axis=1).astype(jnp.int32)
    pos = jnp.arange(l)
    last = jnp.take_along_axis(tokens_BxL, jnp.clip(n_B - 1, 0, l - 1)[:, None], axis=1)[:, 0]
    finished = (n_B > 0) & (last == ids.eos_id)
    delim = as_step_ends(ids.step).mask(tokens_BxL, pos[None] < (n_B - 1)[:, None])
    start = jnp.max(jnp.where(delim, pos[None], -1), axis=1) + 1
    seg = jnp.take_along_axis(tokens_BxL, jnp.clip(start[:, None] + jnp.arange(a), 0, l - 1), axis=1)
    ans, ans_len = table.answer_PxA[problem_B], table.answer_len_P[problem_B]
    inside = jnp.arange(a)[None] < ans_len[:, None]
    same = jnp.all(jnp.where(inside, seg == ans, True), axis=1) & ((n_B - 1) - start == ans_len)
    return jnp.where(finished & same, 1.0, -1.0)

  return reward


# ------------------------------------------------------------------------------------------
# Host helpers.


def decode_result(tok: Tokenizer, result: SearchResult) -> list[str]:
  """Text of each problem's chosen solution (step delimiters become the delimiter text)."""
  tokens, lengths = jax.device_get((result.tokens_BxL, result.lengths_B))
  return [tok.decode(np.asarray(tokens[i, : int(lengths[i])])) for i in range(len(lengths))]
