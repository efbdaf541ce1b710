"""AlphaZero-style training over reasoning steps (expert iteration): search -> replay buffer ->
distill + fit value.

One round is ONE compiled program (`alphazero_round_jit`):

  1. Search: MCTS (`search.mcts.mcts_search`) over P training problems with the current policy,
     the value model for non-terminal children (optional) and the verifier reward for terminal
     ones: the final step must equal the canonical answer (on device), or with
     `rl.reward_on='host'` the task verifier judges the decoded solution (`search.host_reward`:
     any right answer of a problem with many, e.g. Countdown).
  2. Restructure (`tree_rows`), by `policy_target`:
     * 'visits' / 'q_softmax' (AlphaZero, ExIt, ReST-MCTS*): every node of every tree is a row,
       prompt + the steps to its parent + its own step. Its policy weight is the step's visit
       share among its siblings (or softmax of q), so the tree's whole search distribution is
       distilled: several verified paths per problem, and steps into failed subtrees with the
       small weight their visits give them. Its value target (`value_target='mc'`) is the
       Monte Carlo value of the node's state, the discounted mean verified outcome of its
       subtree, for nodes with at least `min_visits` visits (`export.node_targets`).
     * 'best_path' (rejection-sampling fine-tuning): one row per tree, its best terminal path
       (a solved path whenever the search found one, else the most-visited path), weight 1
       when solved, each step's q (or Monte Carlo value) on its last token (`search_rows`).
     * 'advantage' (a policy gradient over the tree, with negatives): every node row whose
       step has a Monte Carlo outcome and a valued sibling carries the signed advantage
       A = outcome - mean of its siblings' outcomes (`export.sibling_advantages`), and the
       step's log-prob under the policy that searched.
     Labels are P(correct) = (v + 1) / 2, on the step's last token.
  3. Replay: the rows enter a fixed-size FIFO buffer of device arrays (`ReplayBuffer`).
  4. Policy distillation: `distill_steps` steps on buffer rows drawn in proportion to their
     weight (so the expected loss is the weighted cross-entropy), plus `kl_beta` times the KL
     of the policy to the frozen start policy on the rows' path positions (an anchor against
     forgetting what SFT taught). With 'advantage' the rows are drawn in proportion to |A| and
     each contributes the clipped surrogate -min(ρ·sign A, clip(ρ, 1 ± adv_clip)·sign A) of
     its step, ρ = (π / π_search)^(1/len) (a length-normalised step ratio), so the expected
     gradient is Σ A ∇ mean log π / Σ |A| at ρ = 1 and rows from earlier rounds are clipped.
  5. Value / PRM regression: `value_steps` steps on the buffer rows that carry a target.

The buffer is part of the state that the pipeline checkpoints each round, so a resumed run
continues with exactly the buffer it stopped with (nothing is rebuilt).

Shape legend: P problems per round, C buffer rows, L row tokens (prompt + D steps of T tokens),
N rows per optimizer step (tree nodes in `tree_rows`), S steps per path (= D, the search's
max_depth), M candidate rows of a round, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rlm_jax import configlib
from rlm_jax import sharding
from rlm_jax.search import export
from rlm_jax.search import host_reward
from rlm_jax.search import lm
from rlm_jax.search import mcts as mcts_lib
from rlm_jax.search import tree as tree_lib
from rlm_jax.training import labels as labels_lib
from rlm_jax.training import losses
from rlm_jax.training.state import OptimConfig, TrainState, accumulate_gradients, all_finite, apply_gradients
from rlm_jax.training.value import value_step


@dataclasses.dataclass(frozen=True)
class AlphaZeroConfig:
  """`rl.alphazero`: the knobs of the loop that `rl` does not already hold.

  The number of rounds is `rl.iterations`, problems searched per round
  `rl.prompts_per_iteration`, the distillation optimizer `rl.optim`, and expansion sampling
  `rl.temperature / top_k / top_p`. The value model is the one of the `value` section (trained
  in phase 1 when `value.enabled`).

  Attributes:
    mcts: the search (`search.mcts.MCTSConfig`); its `answer` is ignored, training always
      takes the best terminal path.
    step_tokens: most tokens per step (a longer step is cut).
    use_value_model: score non-terminal children with the value model (False: q = 0 until a
      verifier reward backs up; the value model is still trained for evaluation).
    buffer_size: C, rows kept (FIFO).
    distill_steps, distill_batch: SFT steps per round and rows per step (solved rows only).
    value_steps, value_batch: value steps per round and rows per step (all rows).
    value_optim: optimizer of the value model in this loop.
    policy_target: 'visits' (each node's step weighted by its visit share among its
      siblings: AlphaZero), 'q_softmax' (softmax of the siblings' q / q_temperature),
      'best_path' (the best terminal path of each solved tree, weight 1: rejection-sampling
      fine-tuning) or 'advantage' (every step with a Monte Carlo outcome against its
      siblings' mean: a policy gradient over the tree whose losing steps are pushed down).
    q_temperature: temperature of 'q_softmax'.
    adv_clip: with 'advantage', the clip range of the step ratio (PPO's epsilon).
    policy_min_visits: children of a node with fewer visits get no policy weight (a node
      expanded once and never re-entered has uniform shares); 1 keeps every expanded node.
    solved_trees_only: policy rows only from trees in which the search verified a solution
      (the shares of an unsolved tree follow the value model alone).
    value_target: 'mc' (Monte Carlo value from the verified terminals below the node) or 'q'
      (the tree's backed-up q, which mixes in the value model's own estimates).
    min_visits: with 'mc', non-terminal nodes with fewer visits get no value target
      (verified terminals always do: their return is exact).
    kl_beta: weight of KL(policy || start policy) in the distillation loss (0: no anchor and
      no reference forward pass).
    sft_mix: weight of the cross-entropy on `sft_mix_batch` solver traces of the SFT split,
      fresh rows each distillation step, added to the distillation loss (a data mix against
      forgetting, as expert-iteration and ReST-style loops keep the supervised data; 0: off).
  """

  mcts: mcts_lib.MCTSConfig = mcts_lib.MCTSConfig(num_simulations=8, num_children=4, num_walkers=2,
                                                  max_depth=6)
  step_tokens: int = 16
  use_value_model: bool = True
  buffer_size: int = 256
  distill_steps: int = 4
  distill_batch: int = 32
  value_steps: int = 4
  value_batch: int = 32
  value_optim: OptimConfig = OptimConfig()
  policy_target: Literal['visits', 'q_softmax', 'best_path', 'advantage'] = 'visits'
  q_temperature: float = 0.5
  adv_clip: float = 0.2
  policy_min_visits: int = 1
  solved_trees_only: bool = True
  value_target: Literal['mc', 'q'] = 'mc'
  min_visits: int = 2
  kl_beta: float = 0.0
  sft_mix: float = 0.0
  sft_mix_batch: int = 16

  def __post_init__(self):
    for name in ('step_tokens', 'buffer_size', 'distill_batch', 'value_batch', 'policy_min_visits', 'min_visits',
                 'sft_mix_batch'):
      if getattr(self, name) < 1:
        raise ValueError(f'alphazero.{name}={getattr(self, name)}: must be >= 1')
    for name in ('distill_steps', 'value_steps'):
      if getattr(self, name) < 0:
        raise ValueError(f'alphazero.{name}={getattr(self, name)}: must be >= 0')
    configlib.check_literals(self, 'alphazero')
    if self.q_temperature <= 0:
      raise ValueError(f'alphazero.q_temperature={self.q_temperature}: must be > 0')
    if self.kl_beta < 0:
      raise ValueError(f'alphazero.kl_beta={self.kl_beta}: must be >= 0')
    if not 0 < self.adv_clip < 1:
      raise ValueError(f'alphazero.adv_clip={self.adv_clip}: must be in (0, 1)')
    if self.sft_mix < 0:
      raise ValueError(f'alphazero.sft_mix={self.sft_mix}: must be >= 0')


@dataclasses.dataclass(frozen=True)
class AZSetup:
  """Static settings of one round (hashable: a static jit argument).

  search: MCTS config; lm: sampling of the expansions; ids: special tokens; prompt_len: Lp,
  width of the (left-padded) prompts, where completions start in buffer rows; value_mode:
  'mse' | 'bce' (`training.value`); reward: the terminal reward, None for the answer match on
  device (the batch's answer / answer_len) or a `host_reward.HostReward` (the verifier on host;
  the batch's `problem` holds each row's index into its tasks; hashed by identity, so rounds
  with the same one share a compiled program); the rest as in `AlphaZeroConfig`.
  """

  search: mcts_lib.MCTSConfig
  lm: lm.LMOptions
  ids: lm.TokenIds
  prompt_len: int
  value_mode: Literal['mse', 'bce']
  use_value_model: bool
  distill_steps: int
  distill_batch: int
  value_steps: int
  value_batch: int
  policy_target: str = 'visits'
  q_temperature: float = 0.5
  adv_clip: float = 0.2
  policy_min_visits: int = 1
  solved_trees_only: bool = True
  value_target: str = 'mc'
  min_visits: int = 2
  kl_beta: float = 0.0
  sft_mix: float = 0.0
  sft_mix_batch: int = 16
  reward: Any = None

  def row_len(self) -> int:
    """L of a buffer row: the prompt and max_depth step slots."""
    return self.prompt_len + self.search.max_depth * self.lm.step_tokens


# ------------------------------------------------------------------------------------------
# Replay buffer.


@flax.struct.dataclass
class ReplayBuffer:
  """C rows of step-labelled paths (device arrays, fixed shape).

  Rows use the layout of `labels.q_value_batch`: [left-padded prompt (Lp) | steps packed
  left | padding]; targets hold P(correct) on each labelled step's last token, target_mask
  marks them; policy_mask marks the positions whose next token the policy learns (aligned
  like `sft.sft_step`'s loss_mask) and weight_C how much the row counts.

  Attributes:
    tokens_CxL, mask_CxL: the sequences and their real tokens.
    targets_CxL, target_mask_CxL: value / PRM labels (float32).
    policy_mask_CxL: bool, t where token t + 1 is a policy target (a node row: its last
      step; a path row: the whole path).
    weight_C: policy weight (0: not a distillation row); a signed advantage with
      policy_target='advantage'.
    logp_C: log π of the row's policy-target tokens under the policy that searched (the
      behaviour policy of 'advantage'; 0 where unknown).
    solved_C: the row's last step lies on a verified-correct path.
    valid_C: the slot holds a row.
    next_: slot the next row goes to (FIFO: the oldest row is overwritten first).
    added: rows added since the start (the buffer holds min(added, C)).
  """

  tokens_CxL: jax.Array
  mask_CxL: jax.Array
  targets_CxL: jax.Array
  target_mask_CxL: jax.Array
  policy_mask_CxL: jax.Array
  weight_C: jax.Array
  logp_C: jax.Array
  solved_C: jax.Array
  valid_C: jax.Array
  next_: jax.Array
  added: jax.Array

  @property
  def capacity(self) -> int:
    return self.valid_C.shape[0]


def empty_buffer(capacity: int, length: int, pad_id: int) -> ReplayBuffer:
  """An empty buffer of `capacity` rows of `length` tokens."""
  if capacity < 1 or length < 1:
    raise ValueError(f'empty_buffer: capacity={capacity} and length={length} must be >= 1')
  zeros = lambda dtype: jnp.zeros((capacity, length), dtype)
  return ReplayBuffer(
      tokens_CxL=jnp.full((capacity, length), pad_id, jnp.int32), mask_CxL=zeros(bool),
      targets_CxL=zeros(jnp.float32), target_mask_CxL=zeros(jnp.float32), policy_mask_CxL=zeros(bool),
      weight_C=jnp.zeros((capacity,), jnp.float32), logp_C=jnp.zeros((capacity,), jnp.float32), solved_C=jnp.zeros((capacity,), bool),
      valid_C=jnp.zeros((capacity,), bool), next_=jnp.zeros((), jnp.int32), added=jnp.zeros((), jnp.int32))


def _replicated(x):
  # The buffer is small: keep it whole on every device, so each round returns it in the layout
  # it came in (no retrace of the round when the state goes around again).
  return sharding.constrain(x, (None,) * x.ndim)


ROW_KEYS = ('tokens', 'mask', 'targets', 'target_mask', 'policy_mask', 'weight', 'solved')


def buffer_add(buffer: ReplayBuffer, rows: dict, keep_P) -> ReplayBuffer:
  """Writes the kept rows, in order, into the next slots (FIFO, wrapping around). Jittable.

  When more than C rows are kept at once, only the last C of them are written.

  Args:
    buffer: the buffer.
    rows: dict tokens, mask, targets, target_mask, policy_mask ([P, L]), weight and solved
      [P] (`tree_rows`), and optionally logp [P] (0 when absent).
    keep_P: bool, which rows to add.

  Returns:
    The updated buffer.
  """
  c = buffer.capacity
  missing = [k for k in ROW_KEYS if k not in rows]
  if missing:
    raise ValueError(f'buffer_add: rows lack {missing}')
  if rows['tokens'].shape[1] != buffer.tokens_CxL.shape[1]:
    raise ValueError(f"buffer_add: rows of {rows['tokens'].shape[1]} tokens, the buffer holds "
                     f'{buffer.tokens_CxL.shape[1]}')
  keep_P = jnp.asarray(keep_P, bool)
  n_keep = keep_P.sum().astype(jnp.int32)
  rank_P = jnp.cumsum(keep_P, dtype=jnp.int32) - 1
  keep_P &= rank_P >= n_keep - c  # the last C kept rows
  dest_P = jnp.where(keep_P, (buffer.next_ + rank_P - jnp.maximum(n_keep - c, 0)) % c, c)
  put = lambda arr, new: _replicated(arr.at[dest_P].set(jnp.asarray(new).astype(arr.dtype), mode='drop'))
  written = jnp.minimum(n_keep, c)
  return ReplayBuffer(
      tokens_CxL=put(buffer.tokens_CxL, rows['tokens']), mask_CxL=put(buffer.mask_CxL, rows['mask']),
      targets_CxL=put(buffer.targets_CxL, rows['targets']),
      target_mask_CxL=put(buffer.target_mask_CxL, rows['target_mask']),
      policy_mask_CxL=put(buffer.policy_mask_CxL, rows['policy_mask']),
      weight_C=put(buffer.weight_C, rows['weight']), logp_C=put(buffer.logp_C, rows.get('logp', jnp.zeros_like(keep_P, jnp.float32))), solved_C=put(buffer.solved_C, rows['solved']),
      valid_C=put(buffer.valid_C, jnp.ones_like(keep_P)),
      next_=(buffer.next_ + written) % c, added=buffer.added + n_keep)


def sample_rows(eligible_C, key: jax.Array, num: int, weight_C=None):
  """`num` row indices drawn with replacement among the eligible rows: uniformly, or in
  proportion to `weight_C` (> 0 on eligible rows). Jittable.

  Returns:
    (index_N int32, ok): ok is False when no row is eligible (the indices are then arbitrary
    and the caller must not learn from them).
  """
  score_C = 0.0 if weight_C is None else jnp.log(jnp.maximum(weight_C, 1e-30))
  logits_C = jnp.where(eligible_C, score_C, -jnp.inf)
  ok = jnp.any(eligible_C)
  logits_C = jnp.where(ok, logits_C, 0.0)
  return jax.random.categorical(key, logits_C, shape=(num,)).astype(jnp.int32), ok


def path_loss_mask(mask_NxL, prompt_len: int):
  """1 at t where token t + 1 is a real token of the path (at or after `prompt_len`): the
  `loss_mask` of `sft.sft_step`, aligned with logits[:, :-1] predicting tokens[:, 1:]."""
  n, l = mask_NxL.shape
  next_real = jnp.concatenate([mask_NxL[:, 1:], jnp.zeros((n, 1), bool)], axis=1)
  return next_real & (jnp.arange(l)[None] + 1 >= prompt_len)


def sft_rows(buffer: ReplayBuffer, index_N, prompt_len: int) -> dict:
  """Distillation batch of buffer rows: `sft.sft_step` layout (the loss covers the rows'
  policy targets), kl_mask, the whole path after the prompt (where the anchor applies), and
  for the advantage loss sign (of each row's weight) and old_logp (`ReplayBuffer.logp_C`)."""
  tokens, mask = buffer.tokens_CxL[index_N], buffer.mask_CxL[index_N]
  return {'tokens': tokens, 'mask': mask, 'loss_mask': buffer.policy_mask_CxL[index_N],
          'kl_mask': path_loss_mask(mask, prompt_len), 'sign': jnp.sign(buffer.weight_C[index_N]),
          'old_logp': buffer.logp_C[index_N]}


def value_rows(buffer: ReplayBuffer, index_N) -> dict:
  """Value batch of buffer rows (`value.value_step` layout)."""
  return {'tokens': buffer.tokens_CxL[index_N], 'mask': buffer.mask_CxL[index_N],
          'targets': buffer.targets_CxL[index_N], 'target_mask': buffer.target_mask_CxL[index_N]}


# ------------------------------------------------------------------------------------------
# Search -> rows.


def training_leaf(tree: tree_lib.Tree, config: mcts_lib.MCTSConfig):
  """Best terminal node per tree (highest q: a verified solution when one exists), else the
  end of the most-visited path."""
  return mcts_lib.answer_leaf(tree, dataclasses.replace(config, answer='best_terminal'))


def search_rows(tree: tree_lib.Tree, leaf_B, gamma: float, max_depth: int, pad_id: int) -> dict:
  """The path root -> leaf of each tree as a buffer row with per-step q targets. Jittable.

  Args:
    tree: search trees (terminal rewards in [-1, 1], +1 = solved).
    leaf_B: last node of each path.
    gamma, max_depth: the search's discount and depth (S = max_depth steps).
    pad_id: filler token.

  Returns:
    dict tokens, mask, targets, target_mask ([B, Lp + S·K], `labels.q_value_batch`: step s's
    label (q_s + 1) / 2 on its last token) and solved [B] (the leaf is terminal with reward 1).
  """
  b = leaf_B.shape[0]
  tg = export.path_targets(tree, leaf_B, gamma, max_depth)
  b_BxS = jnp.broadcast_to(jnp.arange(b)[:, None], tg.node_BxS.shape)
  node_BxS = jnp.maximum(tg.node_BxS, 0)
  steps_BxSxT = tree.step_tokens_BxNxL[b_BxS, node_BxS]
  smask_BxSxT = tree_lib.step_mask(tree, b_BxS, node_BxS) & tg.valid_BxS[..., None]
  rows = labels_lib.q_value_batch(tree.prompt_BxLp, tree.prompt_mask_BxLp, steps_BxSxT, smask_BxSxT,
                                  tg.q_BxS, tg.valid_BxS, pad_id)
  rows['solved'] = tg.terminal_B & (tree.reward_BxN[jnp.arange(b), leaf_B] >= 1.0)
  return rows


def _node_targets(tree: tree_lib.Tree, setup: AZSetup) -> export.NodeTargets:
  kind = setup.policy_target if setup.policy_target != 'best_path' else 'visits'
  return export.node_targets(tree, setup.search.gamma, setup.search.max_depth, kind=kind,
                             temperature=setup.q_temperature, min_visits=setup.min_visits,
                             min_parent_visits=setup.policy_min_visits)


def path_rows(tree: tree_lib.Tree, setup: AZSetup, targets: export.NodeTargets) -> dict:
  """Rejection-sampling rows: each tree's best terminal path (`search_rows`), weight 1 when
  solved, its steps labelled with q (value_target='q') or their Monte Carlo values ('mc',
  steps without one unlabelled). Jittable.

  Returns:
    dict of `ROW_KEYS` ([B, L] / [B]) and keep [B] (all True).
  """
  d, pad = setup.search.max_depth, setup.ids.pad_id
  leaf_B = training_leaf(tree, setup.search)
  rows = search_rows(tree, leaf_B, setup.search.gamma, d, pad)
  if setup.value_target == 'mc':
    b = leaf_B.shape[0]
    node_BxS = tree_lib.path_by_depth(tree, jnp.arange(b), leaf_B, d)
    bi = jnp.arange(b)[:, None]
    nc = jnp.maximum(node_BxS, 0)
    on_BxS = node_BxS >= 0
    steps, smask = tree_lib.path_steps(tree, jnp.arange(b), node_BxS)
    mc = labels_lib.q_value_batch(tree.prompt_BxLp, tree.prompt_mask_BxLp, steps, smask,
                                  targets.value_BxN[bi, nc], on_BxS, pad)
    # The same packing with q = +1 / -1 for labelled / unlabelled steps marks which step ends
    # keep a label (its tokens stay in the row either way).
    has = labels_lib.q_value_batch(tree.prompt_BxLp, tree.prompt_mask_BxLp, steps, smask,
                                   jnp.where(targets.value_valid_BxN[bi, nc], 1.0, -1.0), on_BxS, pad)
    tmask = mc['target_mask'] * has['targets']
    rows['targets'], rows['target_mask'] = mc['targets'] * tmask, tmask
  rows['policy_mask'] = path_loss_mask(rows['mask'], setup.prompt_len)
  rows['weight'] = rows['solved'].astype(jnp.float32)
  b = leaf_B.shape[0]
  path_BxS = tree_lib.path_by_depth(tree, jnp.arange(b), leaf_B, d)
  rows['logp'] = jnp.sum(jnp.where(path_BxS >= 0, tree.logprob_BxN[jnp.arange(b)[:, None], jnp.maximum(path_BxS, 0)],
                                   0.0), axis=1)
  rows['keep'] = jnp.ones(rows['solved'].shape, bool)
  return rows


def node_rows(tree: tree_lib.Tree, setup: AZSetup, targets: export.NodeTargets) -> dict:
  """Every non-root node of every tree as a row: prompt + the steps to its parent + its step.
  Jittable; rows are node-major (node 1 of every tree, then node 2, ...), so when a round
  yields more rows than the buffer holds, the early (shallow) nodes of every tree stay.

  The row's policy target is its last step, with weight `targets.weight_BxN` (0 outside a
  solved tree when `solved_trees_only`; a signed advantage with 'advantage') and logp, the
  step's log-prob under the searching policy; its value target, on the last step's last token, is
  the node's Monte Carlo value ('mc', where valid) or its q ('q').

  Returns:
    dict of `ROW_KEYS` ([M, L] / [M], M = B (N - 1)) and keep [M]: the node exists and the
    row carries a policy weight or a value target.
  """
  b, n = tree.batch_size, tree.num_slots
  d, pad, lp = setup.search.max_depth, setup.ids.pad_id, setup.prompt_len
  c_M = jnp.repeat(jnp.arange(1, n, dtype=jnp.int32), b)
  b_M = jnp.tile(jnp.arange(b, dtype=jnp.int32), n - 1)
  used_M = c_M < tree.num_nodes_B[b_M]
  path_MxS = tree_lib.path_by_depth(tree, b_M, c_M, d)
  steps, smask = tree_lib.path_steps(tree, b_M, path_MxS)
  if setup.value_target == 'mc':
    v_M, has_M = targets.value_BxN[b_M, c_M], targets.value_valid_BxN[b_M, c_M]
  else:
    v_M, has_M = tree.q_BxN[b_M, c_M], jnp.ones_like(used_M)
  on_MxS = path_MxS >= 0
  rows = labels_lib.q_value_batch(tree.prompt_BxLp[b_M], tree.prompt_mask_BxLp[b_M], steps, smask,
                                  jnp.broadcast_to(v_M[:, None], on_MxS.shape), on_MxS, pad)
  l = rows['tokens'].shape[1]
  pos_L = jnp.arange(l)[None]
  end_M = lp + smask.sum(axis=(1, 2)) - 1  # the node's step ends the row
  len_M = smask[jnp.arange(b_M.shape[0]), jnp.maximum(tree.depth_BxN[b_M, c_M] - 1, 0)].sum(-1)
  last_MxL = (pos_L == end_M[:, None]) & (has_M & used_M)[:, None]
  rows['target_mask'] = rows['target_mask'] * last_MxL
  rows['targets'] = rows['targets'] * rows['target_mask']
  rows['policy_mask'] = (pos_L >= (end_M - len_M)[:, None]) & (pos_L < end_M[:, None]) & used_M[:, None]
  weight_M = jnp.where(used_M, targets.weight_BxN[b_M, c_M], 0.0)
  if setup.solved_trees_only and setup.policy_target != 'advantage':
    # (An unsolved tree's outcomes are all -1: its advantages are 0 anyway.)
    weight_M = jnp.where(targets.solved_BxN[b_M, 0], weight_M, 0.0)
  rows['weight'] = weight_M
  rows['logp'] = jnp.where(used_M, tree.logprob_BxN[b_M, c_M], 0.0)
  rows['solved'] = targets.solved_BxN[b_M, c_M] & used_M
  rows['keep'] = used_M & ((weight_M != 0) | (rows['target_mask'].sum(1) > 0))
  return rows


def tree_rows(tree: tree_lib.Tree, setup: AZSetup) -> dict:
  """The buffer rows of a round's trees (`setup.policy_target`: `node_rows` or `path_rows`),
  and the round's solved_B (the tree holds a verified solution). Jittable."""
  targets = _node_targets(tree, setup)
  rows = path_rows(tree, setup, targets) if setup.policy_target == 'best_path' else node_rows(tree, setup, targets)
  rows['solved_B'] = targets.solved_BxN[:, 0]
  return rows


def search_tree(policy_graphdef: nnx.GraphDef, value_graphdef: nnx.GraphDef | None, setup: AZSetup,
                policy_params, value_params, batch: dict, key: jax.Array):
  """MCTS over a batch of problems. Traceable.

  Args:
    policy_graphdef, policy_params: the policy.
    value_graphdef, value_params: the value model, or None (q = 0 at non-terminal children).
    setup: static settings.
    batch: prompt [P, Lp] (left-padded), prompt_mask, and for the verifier reward answer
      [P, A] (canonical final step tokens, right-padded) and answer_len [P], or with a host
      reward (`setup.reward`) problem [P] (int32, index of each problem in its tasks).
    key: PRNG key of the search.

  Returns:
    SearchResult (its tree holds the verifier's rewards at terminals).
  """
  if setup.reward is None:
    reward_fn, reward = lm.answer_reward_fn(setup.ids), lm.AnswerTable(batch['answer'], batch['answer_len'])
  else:
    if 'problem' not in batch:
      raise ValueError("search_tree: a host reward needs batch['problem'] (indices into its tasks)")
    reward_fn, reward = setup.reward, batch['problem']
  model = lm.make_search_model(policy_graphdef, setup.lm, setup.ids, value_graphdef=value_graphdef,
                               reward_fn=reward_fn)
  params = lm.LMParams(policy=policy_params, value=value_params if value_graphdef is not None else None,
                       reward=reward)
  return mcts_lib.mcts_search(params, key, batch['prompt'], batch['prompt_mask'], model=model,
                              config=setup.search)


def search(policy_graphdef: nnx.GraphDef, value_graphdef: nnx.GraphDef | None, setup: AZSetup,
           policy_params, value_params, batch: dict, key: jax.Array):
  """`search_tree` and the best-path row of each tree (`search_rows`: q targets). Traceable.

  Returns:
    (SearchResult, rows) with rows as `search_rows`.
  """
  res = search_tree(policy_graphdef, value_graphdef, setup, policy_params, value_params, batch, key)
  leaf_B = training_leaf(res.tree, setup.search)
  rows = search_rows(res.tree, leaf_B, setup.search.gamma, setup.search.max_depth, setup.ids.pad_id)
  return res, rows


def _search_rows_only(policy_graphdef, value_graphdef, setup, policy_params, value_params, batch, key):
  return search(policy_graphdef, value_graphdef, setup, policy_params, value_params, batch, key)[1]


search_rows_jit = jax.jit(_search_rows_only, static_argnums=(0, 1, 2))


# ------------------------------------------------------------------------------------------
# Learning from the buffer.


def anchor_kl(logits_NxLxV, ref_logits_NxLxV, mask_NxL):
  """KL(pi || pi_ref) per position, summed over the vocabulary, mean over the mask: the exact
  divergence of the next-token distributions (not a sampled estimate), 0 iff they agree."""
  logp = jax.nn.log_softmax(logits_NxLxV.astype(jnp.float32), axis=-1)
  ref_logp = jax.nn.log_softmax(ref_logits_NxLxV.astype(jnp.float32), axis=-1)
  kl_NxL = jnp.sum(jnp.exp(logp) * (logp - ref_logp), axis=-1)
  m = mask_NxL.astype(jnp.float32)
  return jnp.sum(kl_NxL * m) / jnp.maximum(jnp.sum(m), 1.0)


def advantage_loss(logp_NxL, mask_NxL, sign_N, old_logp_N, clip: float):
  """Clipped step surrogate of rows drawn in proportion to |A|: the mean over rows of
  -min(ρ·s, clip(ρ, 1 - clip, 1 + clip)·s), s = sign(A), ρ = exp(mean log π - old_logp / len)
  over the row's step tokens (the length-normalised ratio of the step to the policy that
  sampled it). At ρ = 1 its gradient is -mean over rows of s ∇ mean log π.

  Returns:
    (loss, aux) with aux = {'ratio': mean ρ, 'clipped': share of rows whose clip binds}.
  """
  m_NxL = mask_NxL.astype(jnp.float32)
  n_N = jnp.maximum(jnp.sum(m_NxL, axis=1), 1.0)
  mean_logp_N = jnp.sum(logp_NxL * m_NxL, axis=1) / n_N
  ratio_N = jnp.exp(mean_logp_N - old_logp_N / n_N)
  s_N = sign_N.astype(jnp.float32)
  surrogate_N = jnp.minimum(ratio_N * s_N, jnp.clip(ratio_N, 1.0 - clip, 1.0 + clip) * s_N)
  clipped_N = (ratio_N * s_N) > (jnp.clip(ratio_N, 1.0 - clip, 1.0 + clip) * s_N)
  return -jnp.mean(surrogate_N), {'ratio': jnp.mean(ratio_N), 'clipped': jnp.mean(clipped_N.astype(jnp.float32))}


def distill_loss_fn(graphdef: nnx.GraphDef, params, batch: dict, ref_params=None, kl_beta: float = 0.0,
                    sft_mix: float = 0.0, adv_clip: float | None = None):
  """Cross-entropy of the rows' policy targets (or with adv_clip the clipped advantage
  surrogate, `advantage_loss`) + kl_beta * KL to the reference policy + sft_mix *
  cross-entropy of solver traces.

  Args:
    graphdef, params: the policy.
    batch: tokens, mask, loss_mask (`sft_rows`: policy targets) and kl_mask (path positions);
      with adv_clip also sign and old_logp; with sft_mix > 0 also mix_tokens, mix_mask,
      mix_loss_mask (`encoding.encode_sft` rows).
    ref_params: the frozen start policy (same graphdef); used only when kl_beta > 0.
    kl_beta: static weight of the anchor.
    sft_mix: static weight of the data mix.
    adv_clip: static; None: cross-entropy (the targets are shares), else the surrogate's clip.

  Returns:
    (loss, aux) with aux = {'ce', 'kl', 'mix', 'accuracy'} (ce: the rows' mean
    cross-entropy whichever loss is used).
  """
  model = nnx.merge(graphdef, params)
  logits_NxLxV = model(batch['tokens'], mask_BxL=batch['mask']).logits_BxLxV[:, :-1]
  ce, aux = losses.sft_loss(logits_NxLxV, batch['tokens'][:, 1:], batch['loss_mask'][:, :-1])
  policy_loss = ce
  if adv_clip is not None:
    logp_NxL = losses.token_logprobs(logits_NxLxV, batch['tokens'][:, 1:])
    policy_loss, _ = advantage_loss(logp_NxL, batch['loss_mask'][:, :-1], batch['sign'], batch['old_logp'],
                                    adv_clip)
  kl = jnp.zeros((), jnp.float32)
  if kl_beta > 0:
    ref = nnx.merge(graphdef, jax.lax.stop_gradient(ref_params))
    ref_logits_NxLxV = ref(batch['tokens'], mask_BxL=batch['mask']).logits_BxLxV[:, :-1]
    kl = anchor_kl(logits_NxLxV, ref_logits_NxLxV, batch['kl_mask'][:, :-1])
  mix = jnp.zeros((), jnp.float32)
  if sft_mix > 0:
    mix_logits = model(batch['mix_tokens'], mask_BxL=batch['mix_mask']).logits_BxLxV
    # `encode_sft`'s loss_mask is aligned with logits[:, :-1] predicting tokens[:, 1:].
    mix, _ = losses.sft_loss(mix_logits[:, :-1], batch['mix_tokens'][:, 1:], batch['mix_loss_mask'][:, :-1])
  return (policy_loss + kl_beta * kl + sft_mix * mix,
          {'ce': ce, 'kl': kl, 'mix': mix, 'accuracy': aux['accuracy']})


def distill_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, state: TrainState, batch: dict,
                 ref_params=None, kl_beta: float = 0.0, sft_mix: float = 0.0, adv_clip: float | None = None):
  """One optimizer step of `distill_loss_fn`; a non-finite loss or gradient leaves the state
  unchanged. Returns (state, metrics: loss, ce, kl, mix, finite)."""
  loss_fn = lambda p, b: distill_loss_fn(graphdef, p, b, ref_params, kl_beta, sft_mix, adv_clip)
  (loss, aux), grads = accumulate_gradients(loss_fn, state.params, batch, 1)
  finite = jnp.isfinite(loss) & all_finite(grads)
  new = apply_gradients(state, grads, tx)
  new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
  return new, {'loss': loss, 'ce': aux['ce'], 'kl': aux['kl'], 'mix': aux['mix'], 'finite': finite}


def _fit(step_fn, state: TrainState, eligible_C, make_batch, key, num_steps: int, batch_size: int,
         weight_C=None):
  """`num_steps` optimizer steps on rows drawn from the eligible ones (lax.scan; in proportion
  to weight_C when given; `make_batch(rows, step)`); a round whose buffer has no eligible row
  leaves the state unchanged. Returns (state, metrics of every step stacked [num_steps], all
  finite, ok)."""

  def body(st, i):
    idx, ok = sample_rows(eligible_C, jax.random.fold_in(key, i), batch_size, weight_C)
    new, m = step_fn(st, make_batch(idx, i))
    new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, st)
    return new, (m, m['finite'] | ~ok, ok)

  state, (m_T, finite_T, ok_T) = jax.lax.scan(body, state, jnp.arange(num_steps))
  return state, m_T, jnp.all(finite_T), jnp.all(ok_T)


def distill(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, state: TrainState,
            buffer: ReplayBuffer, key: jax.Array, *, num_steps: int, batch_size: int, prompt_len: int,
            ref_params=None, kl_beta: float = 0.0, sft_mix: float = 0.0, mix_rows=None,
            adv_clip: float | None = None):
  """Policy distillation: steps on buffer rows drawn in proportion to their weight (the
  expected loss is the weighted cross-entropy; with adv_clip, rows drawn in proportion to
  |weight| and the advantage surrogate), with the KL anchor and, with sft_mix > 0,
  step i's solver traces `mix_rows` (tokens, mask, loss_mask, each [num_steps, M, Ls]).
  Traceable.

  Returns:
    (state, metrics_T, finite, ok): per-step loss / ce / kl / mix, all steps finite, weighted
    rows existed.
  """
  if sft_mix > 0 and mix_rows is None:
    raise ValueError(f'distill: sft_mix={sft_mix} needs mix_rows (solver traces)')
  step = lambda st, b: distill_step(graphdef, tx, st, b, ref_params, kl_beta, sft_mix, adv_clip)

  def make(idx, i):
    rows = sft_rows(buffer, idx, prompt_len)
    if sft_mix > 0:
      rows.update({f'mix_{k}': mix_rows[k][i] for k in ('tokens', 'mask', 'loss_mask')})
    return rows

  weight_C = buffer.weight_C if adv_clip is None else jnp.abs(buffer.weight_C)
  return _fit(step, state, buffer.valid_C & (weight_C > 0), make, key, num_steps, batch_size, weight_C)


def fit_value(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, state: TrainState,
              buffer: ReplayBuffer, key: jax.Array, *, num_steps: int, batch_size: int, mode: str):
  """Value / PRM regression on the buffer rows that carry a target. Traceable.

  Returns:
    (state, metrics_T, finite, ok) as `distill`.
  """
  step = lambda st, b: value_step(graphdef, tx, st, b, mode)
  make = lambda idx, i: value_rows(buffer, idx)
  eligible = buffer.valid_C & (jnp.sum(buffer.target_mask_CxL, axis=1) > 0)
  return _fit(step, state, eligible, make, key, num_steps, batch_size)


# ------------------------------------------------------------------------------------------
# One round.


@flax.struct.dataclass
class AZState:
  """Everything a round carries and the pipeline checkpoints."""

  policy: TrainState
  value: TrainState
  buffer: ReplayBuffer


def _mean(x_T):
  return jnp.mean(x_T) if x_T.shape[0] else jnp.zeros((), jnp.float32)


def alphazero_round(policy_graphdef: nnx.GraphDef, value_graphdef: nnx.GraphDef,
                    policy_tx: optax.GradientTransformation, value_tx: optax.GradientTransformation,
                    setup: AZSetup, state: AZState, batch: dict, key: jax.Array, ref_params=None, mix_rows=None):
  """Search -> buffer -> distillation -> value regression (see the module docstring).

  Args:
    policy_graphdef, value_graphdef: model graphs (static).
    policy_tx, value_tx: optimizers (static).
    setup: static settings.
    state: AZState (donated by `alphazero_round_jit`).
    batch: the round's problems, as for `search_tree`.
    key: PRNG key of the round (search, distillation and value draws use split keys).
    ref_params: the frozen start policy of the KL anchor (needed when setup.kl_beta > 0).
    mix_rows: with setup.sft_mix > 0, the round's solver traces: tokens, mask, loss_mask
      [distill_steps · sft_mix_batch, Ls] (`encoding.encode_sft`), sft_mix_batch per step.

  Returns:
    (state, metrics): solve_rate (fraction of the round's problems with a verified path),
    policy_rows / value_labels (rows with a policy weight / value targets added this round),
    buffer_size, buffer_solved (rows on solved paths), sft_loss (mean cross-entropy over the
    round's steps; 0 while no weighted row exists), kl (mean anchor KL), mix_loss (mean
    cross-entropy of the mixed-in solver traces), value_loss (mean),
    value_loss_first / value_loss_last, policy_tokens (per problem, search), finite.
  """
  if setup.kl_beta > 0 and ref_params is None:
    raise ValueError(f'alphazero_round: kl_beta={setup.kl_beta} needs ref_params (the start policy)')
  k_search, k_distill, k_value = jax.random.split(key, 3)
  value_gd = value_graphdef if setup.use_value_model else None
  res = search_tree(policy_graphdef, value_gd, setup, state.policy.params, state.value.params, batch, k_search)
  rows = tree_rows(res.tree, setup)
  buffer = buffer_add(state.buffer, rows, rows['keep'])
  if setup.sft_mix > 0:
    if mix_rows is None:
      raise ValueError(f'alphazero_round: sft_mix={setup.sft_mix} needs mix_rows (solver traces)')
    mix_rows = {k: mix_rows[k].reshape((setup.distill_steps, setup.sft_mix_batch) + mix_rows[k].shape[1:])
                for k in ('tokens', 'mask', 'loss_mask')}
  policy, d_T, sft_finite, sft_ok = distill(
      policy_graphdef, policy_tx, state.policy, buffer, k_distill, num_steps=setup.distill_steps,
      batch_size=setup.distill_batch, prompt_len=setup.prompt_len, ref_params=ref_params, kl_beta=setup.kl_beta,
      sft_mix=setup.sft_mix, mix_rows=mix_rows,
      adv_clip=setup.adv_clip if setup.policy_target == 'advantage' else None)
  value, v_T, v_finite, _ = fit_value(
      value_graphdef, value_tx, state.value, buffer, k_value, num_steps=setup.value_steps,
      batch_size=setup.value_batch, mode=setup.value_mode)
  v_loss_T = v_T['loss']
  first = lambda x_T: x_T[0] if x_T.shape[0] else jnp.zeros((), jnp.float32)
  last = lambda x_T: x_T[-1] if x_T.shape[0] else jnp.zeros((), jnp.float32)
  keep = rows['keep']
  metrics = {
      'solve_rate': jnp.mean(rows['solved_B'].astype(jnp.float32)),
      'policy_rows': jnp.sum(keep & (rows['weight'] != 0)).astype(jnp.int32),
      'value_labels': jnp.sum(jnp.where(keep[:, None], rows['target_mask'], 0.0)).astype(jnp.int32),
      'buffer_size': jnp.sum(buffer.valid_C).astype(jnp.int32),
      'buffer_solved': jnp.sum(buffer.valid_C & buffer.solved_C).astype(jnp.int32),
      'sft_loss': jnp.where(sft_ok, _mean(d_T['ce']), 0.0),
      'kl': jnp.where(sft_ok, _mean(d_T['kl']), 0.0),
      'mix_loss': jnp.where(sft_ok, _mean(d_T['mix']), 0.0),
      'value_loss': _mean(v_loss_T),
      'value_loss_first': first(v_loss_T),
      'value_loss_last': last(v_loss_T),
      'policy_tokens': jnp.mean(res.policy_tokens_B.astype(jnp.float32)),
      'finite': sft_finite & v_finite,
  }
  return AZState(policy=policy, value=value, buffer=buffer), metrics


alphazero_round_jit = jax.jit(alphazero_round, static_argnums=(0, 1, 2, 3, 4), donate_argnums=(5,))


def make_setup(cfg: AlphaZeroConfig, ids: lm.TokenIds, prompt_len: int, completion_len: int,
               value_mode: str, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               reward=None) -> AZSetup:
  """AZSetup from the config sections (the pipeline's boundary); `reward` as `AZSetup.reward`."""
  opts = lm.LMOptions(step_tokens=cfg.step_tokens, completion_tokens=completion_len, temperature=temperature,
                      top_k=top_k, top_p=top_p)
  return AZSetup(search=cfg.mcts, lm=opts, ids=ids, prompt_len=prompt_len, value_mode=value_mode,
                 use_value_model=cfg.use_value_model, distill_steps=cfg.distill_steps,
                 distill_batch=cfg.distill_batch, value_steps=cfg.value_steps, value_batch=cfg.value_batch,
                 policy_target=cfg.policy_target, q_temperature=cfg.q_temperature, adv_clip=cfg.adv_clip,
                 policy_min_visits=cfg.policy_min_visits, solved_trees_only=cfg.solved_trees_only,
                 value_target=cfg.value_target, min_visits=cfg.min_visits, kl_beta=cfg.kl_beta,
                 sft_mix=cfg.sft_mix, sft_mix_batch=cfg.sft_mix_batch, reward=reward)


def path_logprob(graphdef: nnx.GraphDef, params: Any, rows: dict, prompt_len: int) -> jax.Array:
  """Sum of log π over each row's path tokens (what distillation raises): [N]."""
  model = nnx.merge(graphdef, params)
  logits_NxLxV = model(rows['tokens'], mask_BxL=rows['mask']).logits_BxLxV
  logp_NxL = losses.token_logprobs(logits_NxLxV[:, :-1], rows['tokens'][:, 1:])
  return jnp.sum(jnp.where(path_loss_mask(rows['mask'], prompt_len)[:, :-1], logp_NxL, 0.0), axis=1)


# --- experiment phase ---------------------------------------------------------------------
# How an experiment runs the AlphaZero loop as phase 2 (`training/phase.py`, `algorithms.py`).


def build_phase(ctx, section: AlphaZeroConfig):
  """Rounds over the phase-2 pool. The value model is phase 1's when there is one, else a new
  one (`ModelBuilder.value_model`); the replay buffer is part of the checkpointed state, the
  KL anchor's reference is the phase-1 policy."""
  from rlm_jax.training import phase  # pylint: disable=g-import-not-at-top
  from rlm_jax.training.state import create_train_state, make_optimizer  # pylint: disable=g-import-not-at-top
  rl, tok = ctx.rl, ctx.tok
  graphdef, policy_params = ctx.policy
  ptx, vtx = make_optimizer(rl.optim), make_optimizer(section.value_optim)
  vgd, vparams = ctx.value if ctx.value is not None else ctx.models.value_model(policy_params)
  # rl.reward_on='host': the verifier judges terminals on host, over the whole pool (a round
  # sends only its problems' indices, so rounds share one compiled program).
  reward = host_reward.HostReward(tok, ctx.pool.tasks) if rl.reward_on == 'host' else None
  setup = make_setup(section, lm.TokenIds.of(tok), ctx.task.prompt_len, ctx.task.completion_len, ctx.value_mode,
                     rl.temperature, rl.top_k, rl.top_p, reward=reward)
  arrays = ctx.pool.prompt_batch()
  if reward is not None:
    arrays = dict(arrays, problem=np.arange(len(ctx.pool.tasks), dtype=np.int32))
  buffer = empty_buffer(section.buffer_size, setup.row_len(), tok.pad_id)
  buffer = jax.device_put(buffer, jax.sharding.NamedSharding(ctx.mesh, jax.sharding.PartitionSpec()))
  copy = lambda t: jax.tree.map(jnp.copy, t)  # the round donates its state
  state = AZState(policy=create_train_state(copy(policy_params), ptx, ctx.mesh, ctx.rules),
                  value=create_train_state(copy(vparams), vtx, ctx.mesh, ctx.rules), buffer=buffer)
  # The anchor's reference is the phase-1 policy, which a resumed run gets back from phase 1's
  # checkpoint: it is not part of the round's state.
  ref = policy_params if section.kl_beta > 0 else None
  mix = None
  if section.sft_mix > 0:
    traces = ctx.sft_data or {}
    if not traces or not len(traces.get('tokens', ())):
      raise ValueError('rl.alphazero.sft_mix > 0 mixes in solver traces, but the run has none (set sft.steps > 0 '
                       'with a training split that has steps)')
    n_mix = section.distill_steps * section.sft_mix_batch
    # The round's traces are a function of (seed, round): a resumed run draws the same ones.
    mix = lambda i: ctx.device_batch(traces, np.random.default_rng((ctx.seed, 7, i)).choice(
        len(traces['tokens']), n_mix, replace=n_mix > len(traces['tokens'])))
  step = lambda st, b, i: alphazero_round_jit(graphdef, vgd, ptx, vtx, setup, st, b,
                                              phase.iteration_key(ctx.seed, 5, i), ref,
                                              None if mix is None else mix(i))
  return phase.Phase(state=state, step=step, batch=lambda i: ctx.device_batch(arrays, ctx.prompts(i)),
                     policy=lambda st: (graphdef, st.policy.params), value=lambda st: (vgd, st.value.params))


def _algorithm():
  from rlm_jax.training import phase  # pylint: disable=g-import-not-at-top
  return phase.Algorithm(name='alphazero', config=AlphaZeroConfig, build=build_phase,
                         capabilities=frozenset({'host_reward'}), policy_path=('policy', 'params'),
                         value_path=('value', 'params'), trains_value=True)


ALGORITHM = _algorithm()
