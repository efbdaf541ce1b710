"""AlphaZero-style training over reasoning steps: search -> replay buffer -> distill + fit value.

One round is ONE compiled program (`alphazero_round_jit`):

  1. Search: MCTS (`search.mcts.mcts_search`) over P training problems with the current policy,
     the value model for non-terminal children (optional) and the verifier reward (the final
     step must equal the canonical answer) for terminal ones.
  2. Restructure: each tree's training path (its best terminal: a solved path whenever the
     search found one, else the most-visited path) becomes one row, prompt + the path's steps,
     with every step's q mapped to P(correct) = (q + 1) / 2 on the step's last token
     (`search_rows`, through `export.path_targets` and `labels.q_value_batch`).
  3. Replay: the P rows enter a fixed-size FIFO buffer of device arrays (`ReplayBuffer`).
  4. Policy distillation: `distill_steps` SFT steps on buffer rows whose path was solved.
  5. Value / PRM regression: `value_steps` steps on every buffer row (q targets).

The buffer is part of the state that the pipeline checkpoints each round, so a resumed run
continues with exactly the buffer it stopped with (nothing is rebuilt).

Shape legend: P problems per round, C buffer rows, L row tokens (prompt + D steps of T tokens),
N rows per optimizer step, S steps per path (= D, the search's max_depth).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlm_jax import sharding
from rlm_jax.search import export
from rlm_jax.search import lm
from rlm_jax.search import mcts as mcts_lib
from rlm_jax.search import tree as tree_lib
from rlm_jax.training import labels as labels_lib
from rlm_jax.training import losses
from rlm_jax.training.sft import sft_step
from rlm_jax.training.state import OptimConfig, TrainState
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

  def __post_init__(self):
    for name in ('step_tokens', 'buffer_size', 'distill_batch', 'value_batch'):
      if getattr(self, name) < 1:
        raise ValueError(f'alphazero.{name}={getattr(self, name)}: must be >= 1')
    for name in ('distill_steps', 'value_steps'):
      if getattr(self, name) < 0:
        raise ValueError(f'alphazero.{name}={getattr(self, name)}: must be >= 0')


@dataclasses.dataclass(frozen=True)
class AZSetup:
  """Static settings of one round (hashable: a static jit argument).

  search: MCTS config; lm: sampling of the expansions; ids: special tokens; prompt_len: Lp,
  width of the (left-padded) prompts, where completions start in buffer rows; value_mode:
  'mse' | 'bce' (`training.value`); the rest as in `AlphaZeroConfig`.
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

  def row_len(self) -> int:
    """L of a buffer row: the prompt and max_depth step slots."""
    return self.prompt_len + self.search.max_depth * self.lm.step_tokens


# ------------------------------------------------------------------------------------------
# Replay buffer.


@flax.struct.dataclass
class ReplayBuffer:
  """C rows of step-labelled paths (device arrays, fixed shape).

  Rows use the layout of `labels.q_value_batch`: [left-padded prompt (Lp) | steps packed
  left | padding]; targets hold P(correct) on each step's last token, target_mask marks them.

  Attributes:
    tokens_CxL, mask_CxL: the sequences and their real tokens.
    targets_CxL, target_mask_CxL: value / PRM labels (float32).
    solved_C: the path ends in a verified-correct final step (distillation rows).
    valid_C: the slot holds a row.
    next_: slot the next row goes to (FIFO: the oldest row is overwritten first).
    added: rows added since the start (the buffer holds min(added, C)).
  """

  tokens_CxL: jax.Array
  mask_CxL: jax.Array
  targets_CxL: jax.Array
  target_mask_CxL: jax.Array
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
      targets_CxL=zeros(jnp.float32), target_mask_CxL=zeros(jnp.float32),
      solved_C=jnp.zeros((capacity,), bool), valid_C=jnp.zeros((capacity,), bool),
      next_=jnp.zeros((), jnp.int32), added=jnp.zeros((), jnp.int32))


def _replicated(x):
  # The buffer is small: keep it whole on every device, so each round returns it in the layout
  # it came in (no retrace of the round when the state goes around again).
  return sharding.constrain(x, (None,) * x.ndim)


def buffer_add(buffer: ReplayBuffer, rows: dict, keep_P) -> ReplayBuffer:
  """Writes the kept rows, in order, into the next slots (FIFO, wrapping around). Jittable.

  When more than C rows are kept at once, only the last C of them are written.

  Args:
    buffer: the buffer.
    rows: dict tokens, mask, targets, target_mask ([P, L]) and solved [P] (`search_rows`).
    keep_P: bool, which rows to add.

  Returns:
    The updated buffer.
  """
  c = buffer.capacity
  if rows['tokens'].shape[1] != buffer.tokens_CxL.shape[1]:
    raise ValueError(f"buffer_add: rows of {rows['tokens'].shape[1]} tokens, the buffer holds "
                     f'{buffer.tokens_CxL.shape[1]}')
  keep_P = jnp.asarray(keep_P, bool)
  n_keep = keep_P.sum().astype(jnp.int32)
  rank_P = jnp.cumsum(keep_P, dtype=jnp.int32) - 1
  keep_P &= rank_P >= n_keep - c  # the last C kept rows
  dest_P = jnp.where(keep_P, (buffer.next_ + rank_P - jnp.maximum(n_keep - c, 0)) % c, c)
  put = lambda arr, new: _replicated(arr.at[dest_P].set(new.astype(arr.dtype), mode='drop'))
  written = jnp.minimum(n_keep, c)
  return ReplayBuffer(
      tokens_CxL=put(buffer.tokens_CxL, rows['tokens']), mask_CxL=put(buffer.mask_CxL, rows['mask']),
      targets_CxL=put(buffer.targets_CxL, rows['targets']),
      target_mask_CxL=put(buffer.target_mask_CxL, rows['target_mask']),
      solved_C=put(buffer.solved_C, rows['solved']),
      valid_C=put(buffer.valid_C, jnp.ones_like(keep_P)),
      next_=(buffer.next_ + written) % c, added=buffer.added + n_keep)


def sample_rows(eligible_C, key: jax.Array, num: int):
  """`num` row indices drawn uniformly, with replacement, among the eligible rows. Jittable.

  Returns:
    (index_N int32, ok): ok is False when no row is eligible (the indices are then arbitrary
    and the caller must not learn from them).
  """
  logits_C = jnp.where(eligible_C, 0.0, -jnp.inf)
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
  """SFT batch of buffer rows (`sft.sft_step` layout): the loss covers the path's tokens."""
  tokens, mask = buffer.tokens_CxL[index_N], buffer.mask_CxL[index_N]
  return {'tokens': tokens, 'mask': mask, 'loss_mask': path_loss_mask(mask, prompt_len)}


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


def search(policy_graphdef: nnx.GraphDef, value_graphdef: nnx.GraphDef | None, setup: AZSetup,
           policy_params, value_params, batch: dict, key: jax.Array):
  """MCTS over a batch of problems and the training row of each tree. Traceable.

  Args:
    policy_graphdef, policy_params: the policy.
    value_graphdef, value_params: the value model, or None (q = 0 at non-terminal children).
    setup: static settings.
    batch: prompt [P, Lp] (left-padded), prompt_mask, answer [P, A] (canonical final step
      tokens, right-padded) and answer_len [P] for the verifier reward.
    key: PRNG key of the search.

  Returns:
    (SearchResult, rows) with rows as `search_rows`.
  """
  model = lm.make_search_model(policy_graphdef, setup.lm, setup.ids, value_graphdef=value_graphdef,
                               reward_fn=lm.answer_reward_fn(setup.ids))
  params = lm.LMParams(policy=policy_params, value=value_params if value_graphdef is not None else None,
                       reward=lm.AnswerTable(batch['answer'], batch['answer_len']))
  res = mcts_lib.mcts_search(params, key, batch['prompt'], batch['prompt_mask'], model=model,
                             config=setup.search)
  leaf_B = training_leaf(res.tree, setup.search)
  rows = search_rows(res.tree, leaf_B, setup.search.gamma, setup.search.max_depth, setup.ids.pad_id)
  return res, rows


def _search_rows_only(policy_graphdef, value_graphdef, setup, policy_params, value_params, batch, key):
  return search(policy_graphdef, value_graphdef, setup, policy_params, value_params, batch, key)[1]


search_rows_jit = jax.jit(_search_rows_only, static_argnums=(0, 1, 2))


# ------------------------------------------------------------------------------------------
# Learning from the buffer.


def _fit(step_fn, state: TrainState, eligible_C, make_batch, key, num_steps: int, batch_size: int):
  """`num_steps` optimizer steps on rows drawn from the eligible ones (lax.scan); a round whose
  buffer has no eligible row leaves the state unchanged."""

  def body(st, i):
    idx, ok = sample_rows(eligible_C, jax.random.fold_in(key, i), batch_size)
    new, m = step_fn(st, make_batch(idx))
    new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, st)
    return new, (m['loss'], m['finite'] | ~ok, ok)

  state, (loss_T, finite_T, ok_T) = jax.lax.scan(body, state, jnp.arange(num_steps))
  return state, loss_T, jnp.all(finite_T), jnp.all(ok_T)


def distill(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, state: TrainState,
            buffer: ReplayBuffer, key: jax.Array, *, num_steps: int, batch_size: int, prompt_len: int):
  """Policy distillation: SFT steps on solved buffer rows. Traceable.

  Returns:
    (state, loss_T, finite, ok): per-step SFT loss, all steps finite, solved rows existed.
  """
  step = lambda st, b: sft_step(graphdef, tx, st, b)
  make = lambda idx: sft_rows(buffer, idx, prompt_len)
  return _fit(step, state, buffer.valid_C & buffer.solved_C, make, key, num_steps, batch_size)


def fit_value(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, state: TrainState,
              buffer: ReplayBuffer, key: jax.Array, *, num_steps: int, batch_size: int, mode: str):
  """Value / PRM regression on every buffer row's q targets. Traceable.

  Returns:
    (state, loss_T, finite, ok) as `distill`.
  """
  step = lambda st, b: value_step(graphdef, tx, st, b, mode)
  make = lambda idx: value_rows(buffer, idx)
  return _fit(step, state, buffer.valid_C, make, key, num_steps, batch_size)


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
                    setup: AZSetup, state: AZState, batch: dict, key: jax.Array):
  """Search -> buffer -> distillation -> value regression (see the module docstring).

  Args:
    policy_graphdef, value_graphdef: model graphs (static).
    policy_tx, value_tx: optimizers (static).
    setup: static settings.
    state: AZState (donated by `alphazero_round_jit`).
    batch: the round's problems, as for `search`.
    key: PRNG key of the round (search, distillation and value draws use split keys).

  Returns:
    (state, metrics): solve_rate (fraction of the round's problems with a verified path),
    buffer_size, buffer_solved, sft_loss (mean over the round's steps; 0 while no solved row
    exists), value_loss (mean), value_loss_first / value_loss_last, policy_tokens (per
    problem, search), finite.
  """
  k_search, k_distill, k_value = jax.random.split(key, 3)
  value_gd = value_graphdef if setup.use_value_model else None
  res, rows = search(policy_graphdef, value_gd, setup, state.policy.params, state.value.params, batch, k_search)
  buffer = buffer_add(state.buffer, rows, jnp.ones(rows['solved'].shape, bool))
  policy, sft_loss_T, sft_finite, sft_ok = distill(
      policy_graphdef, policy_tx, state.policy, buffer, k_distill, num_steps=setup.distill_steps,
      batch_size=setup.distill_batch, prompt_len=setup.prompt_len)
  value, v_loss_T, v_finite, _ = fit_value(
      value_graphdef, value_tx, state.value, buffer, k_value, num_steps=setup.value_steps,
      batch_size=setup.value_batch, mode=setup.value_mode)
  first = lambda x_T: x_T[0] if x_T.shape[0] else jnp.zeros((), jnp.float32)
  last = lambda x_T: x_T[-1] if x_T.shape[0] else jnp.zeros((), jnp.float32)
  metrics = {
      'solve_rate': jnp.mean(rows['solved'].astype(jnp.float32)),
      'buffer_size': jnp.sum(buffer.valid_C).astype(jnp.int32),
      'buffer_solved': jnp.sum(buffer.valid_C & buffer.solved_C).astype(jnp.int32),
      'sft_loss': jnp.where(sft_ok, _mean(sft_loss_T), 0.0),
      'value_loss': _mean(v_loss_T),
      'value_loss_first': first(v_loss_T),
      'value_loss_last': last(v_loss_T),
      'policy_tokens': jnp.mean(res.policy_tokens_B.astype(jnp.float32)),
      'finite': sft_finite & v_finite,
  }
  return AZState(policy=policy, value=value, buffer=buffer), metrics


alphazero_round_jit = jax.jit(alphazero_round, static_argnums=(0, 1, 2, 3, 4), donate_argnums=(5,))


def make_setup(cfg: AlphaZeroConfig, ids: lm.TokenIds, prompt_len: int, completion_len: int,
               value_mode: str, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> AZSetup:
  """AZSetup from the config sections (the pipeline's boundary)."""
  opts = lm.LMOptions(step_tokens=cfg.step_tokens, completion_tokens=completion_len, temperature=temperature,
                      top_k=top_k, top_p=top_p)
  return AZSetup(search=cfg.mcts, lm=opts, ids=ids, prompt_len=prompt_len, value_mode=value_mode,
                 use_value_model=cfg.use_value_model, distill_steps=cfg.distill_steps,
                 distill_batch=cfg.distill_batch, value_steps=cfg.value_steps, value_batch=cfg.value_batch)


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
  one (`ModelBuilder.value_model`); the replay buffer is part of the checkpointed state."""
  from rlm_jax.training import phase  # pylint: disable=g-import-not-at-top
  from rlm_jax.training.state import create_train_state, make_optimizer  # pylint: disable=g-import-not-at-top
  rl, tok = ctx.rl, ctx.tok
  graphdef, policy_params = ctx.policy
  ptx, vtx = make_optimizer(rl.optim), make_optimizer(section.value_optim)
  vgd, vparams = ctx.value if ctx.value is not None else ctx.models.value_model(policy_params)
  setup = make_setup(section, lm.TokenIds.of(tok), ctx.task.prompt_len, ctx.task.completion_len, ctx.value_mode,
                     rl.temperature, rl.top_k, rl.top_p)
  buffer = empty_buffer(section.buffer_size, setup.row_len(), tok.pad_id)
  buffer = jax.device_put(buffer, jax.sharding.NamedSharding(ctx.mesh, jax.sharding.PartitionSpec()))
  copy = lambda t: jax.tree.map(jnp.copy, t)  # the round donates its state
  state = AZState(policy=create_train_state(copy(policy_params), ptx, ctx.mesh, ctx.rules),
                  value=create_train_state(copy(vparams), vtx, ctx.mesh, ctx.rules), buffer=buffer)
  step = lambda st, b, i: alphazero_round_jit(graphdef, vgd, ptx, vtx, setup, st, b,
                                              phase.iteration_key(ctx.seed, 5, i))
  return phase.Phase(state=state, step=step, batch=lambda i: ctx.device_batch(ctx.pool.prompt_batch(), ctx.prompts(i)),
                     policy=lambda st: (graphdef, st.policy.params), value=lambda st: (vgd, st.value.params))


def _algorithm():
  from rlm_jax.training import phase  # pylint: disable=g-import-not-at-top
  return phase.Algorithm(name='alphazero', config=AlphaZeroConfig, build=build_phase,
                         policy_path=('policy', 'params'), value_path=('value', 'params'), trains_value=True)


ALGORITHM = _algorithm()
