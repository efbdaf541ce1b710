"""What a search strategy needs from the models, as typed callables, and what it returns.

The search code never sees a transformer. It receives a `SearchModel`: a policy callable that
samples next steps (or whole completions) for a batch of node states, a value callable that
scores prefixes, and optionally a verifier reward for finished solutions. `rlm_jax.search.lm`
builds these from Flax models and the sampler; tests and benchmarks script them directly.

Shape legend: B problems (one tree each), M nodes in one model call, T tokens of a node state,
K children per expansion (or samples per node), L tokens of a step / completion / solution.

Node states (`NodeBatch.tokens_MxT`) hold "prompt + the steps on the node's path". They are
right-aligned: the last column is the last real token of every row (what the sampler's prefill
and a value head read), earlier columns may contain padding gaps, marked False in `mask_MxT`.
The models are slot based (a padded slot is invisible, positions come from the mask), so gaps
change nothing in what they compute.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Protocol

import chex
import jax

from rlm_jax.data.steps import StepEnds

Params = Any


class NodeBatch(NamedTuple):
  """A batch of M node states handed to the model callables."""

  tokens_MxT: jax.Array  # int32, right-aligned prompt + path steps
  mask_MxT: jax.Array  # bool, True on real tokens
  depth_M: jax.Array  # int32, number of steps on the path (0 = the question)
  problem_M: jax.Array  # int32, id of the problem the node belongs to


class Steps(NamedTuple):
  """`num` sampled continuations for each of M nodes (a next step or a completion)."""

  tokens_MxKxL: jax.Array  # int32, right-padded; the stop token (step delimiter / EOS) included
  lengths_MxK: jax.Array  # int32, tokens generated (0 < length <= L)
  logprob_MxK: jax.Array  # float32, sum of log pi over the generated tokens
  terminal_MxK: jax.Array  # bool, the continuation ended the solution (EOS)
  # float32 value (reward units) of the state each continuation ends in, read from the
  # policy's own decode when it carries the value head (actor-critic); None: a value model
  # scores the new states (`SearchModel.value_fn`).
  value_MxK: Optional[jax.Array] = None
  # The same at every generated token (the value of the state ending there), 0 on padding.
  values_MxKxL: Optional[jax.Array] = None


class PolicyFn(Protocol):

  def __call__(self, params: Params, key: jax.Array, nodes: NodeBatch, num: int, *,
               to_end: bool, greedy: bool) -> Steps:
    """Samples `num` continuations per node in ONE batched call (M * num rows).

    `to_end=False`: one step each (stop at the step delimiter or EOS); `to_end=True`: a whole
    completion (stop at EOS). `greedy=True`: argmax decoding. `num`, `to_end`, `greedy` are
    static. The key is consumed.
    """


class ValueFn(Protocol):

  def __call__(self, params: Params, nodes: NodeBatch) -> jax.Array:
    """Per-position scores `values_MxT` in reward units ([-1, 1]: -1 wrong, +1 correct).

    Column t scores the prefix ending at token t (value model / PRM at a step delimiter, ORM at
    EOS). Searches read the last column; PRM-min reads every step end.
    """


class RewardFn(Protocol):

  def __call__(self, params: Params, tokens_MxL: jax.Array, mask_MxL: jax.Array,
               problem_M: jax.Array) -> jax.Array:
    """Verifier reward `reward_M` (same units as ValueFn) of finished solutions.

    `tokens_MxL` is the solution only (steps, no prompt), right-padded.
    """


class SearchModel(NamedTuple):
  """The models as seen by every strategy.

  Attributes:
    policy_fn: samples next steps / completions.
    value_fn: value model or PRM; None scores every prefix 0 (blind search, for tests).
    reward_fn: verifier reward of finished solutions ("training mode"); None scores terminal
      nodes with `value_fn` (inference without a verifier).
    pad_id, eos_id, step_id: special tokens of the tokenizer.
    step_ends: the tokenizer's step-end tables (`data.steps.StepEnds`; a BPE delimiter merges
      or splits); None: a step ends at `step_id` only.
    last_value_fn: `(params, nodes) -> values_M`, each node's value at its last token only
      (what a search reads), without the other positions' head; None: `value_fn(...)[:, -1]`.
    extension_value_fn: `(params, nodes, tokens_MxKxL, mask_MxKxL) -> (values_MxKxL, values_M)`:
      the value at every token of K extensions of each node (its children's steps, rollouts,
      completions; any padding layout, 0 on padding) and at the node's own last token, each
      node's state read once for its K extensions; None: `value_fn` over every extended state.
  """

  policy_fn: PolicyFn
  value_fn: Optional[ValueFn]
  reward_fn: Optional[RewardFn]
  pad_id: int
  eos_id: int
  step_id: int
  step_ends: Optional[StepEnds] = None
  last_value_fn: Optional[Callable[[Params, NodeBatch], jax.Array]] = None
  extension_value_fn: Optional[Callable[[Params, NodeBatch, jax.Array, jax.Array],
                                        tuple[jax.Array, jax.Array]]] = None


@chex.dataclass(frozen=True)
class SearchResult:
  """What every strategy returns, so strategies compare at equal compute.

  Attributes:
    tokens_BxL: the chosen solution per problem (steps only, no prompt), right-padded.
    lengths_B: its number of tokens.
    score_B: the strategy's score of it (q / value / reward / vote share, see the strategy).
    terminal_B: the solution ended with EOS.
    policy_tokens_B: tokens the policy generated for this problem (real rows only).
    model_calls_B: sequences sent through a model for this problem: one per sampled sequence
      (policy) plus one per scored sequence (value / PRM), real rows only.
    tree: the search tree (MCTS, beam search) or None.
    extra: strategy-specific arrays (candidates, votes, ...).
  """

  tokens_BxL: jax.Array
  lengths_B: jax.Array
  score_B: jax.Array
  terminal_B: jax.Array
  policy_tokens_B: jax.Array
  model_calls_B: jax.Array
  tree: Any = None
  extra: Any = None


Strategy = Callable[..., SearchResult]
