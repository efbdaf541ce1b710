"""Value / PRM / ORM regression: batch builders and one jitted optimizer step.

A value batch is four `[B, L]` arrays over full sequences laid out as [prompt | completion]:

  tokens, mask     the sequence and its real tokens (left, right or both-side padding);
  targets          P(correct) in [0, 1] at labelled positions, 0 elsewhere;
  target_mask      1 where a label sits: on step separators (PRM) or on the last token (ORM).

Labels are stored on one scale, P(correct), whatever the head: `value_step` maps them to the
head's scale (mode 'mse': 2p − 1 for a 'sigmoid' head whose output 2σ(z) − 1 lies in (−1, 1);
mode 'bce': p for a 'logit' head, V = σ(z)). Solver labels are {0, 1}, Monte Carlo labels are
fractions, MCTS q-values in [−1, 1] map to (q + 1) / 2 (see `labels.py`).

The value at position t is read from the hidden state after token t, so the label of a step
sits on the token that closes it (its separator, or EOS for the final step): the value of the
state "question + steps 1..k". Search reads a node's value the same way (last token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlm_jax.data.steps import StepEnds, as_step_ends
from rlm_jax.models.transformer import positions_from_mask
from rlm_jax.training import losses
from rlm_jax.training.state import TrainState, all_finite, apply_gradients

# mode -> the value head it needs.
HEAD_OF_MODE = {'mse': 'sigmoid', 'bce': 'logit'}


def _check_mode(mode: str, value_head: str):
  if mode not in HEAD_OF_MODE:
    raise ValueError(f'value mode must be one of {tuple(HEAD_OF_MODE)}, got {mode!r}')
  if value_head != HEAD_OF_MODE[mode]:
    raise ValueError(f"value mode {mode!r} needs model.value_head='{HEAD_OF_MODE[mode]}', "
                     f"the model has value_head='{value_head}'")


def prm_batch(tokens_BxL, mask_BxL, completion_start_B, step_labels_BxS, step_valid_BxS,
              step_id: StepEnds | int, eos_id: int) -> dict:
  """PRM batch: step k's label on the k-th separator of the completion (TRL PRM layout).

  The completion's separators are the tokens that close its steps (the step token, or with a
  BPE tokenizer's `StepEnds` the token that completes a merged or split delimiter) and its
  final EOS (the last step ends with EOS, not with a delimiter). Separators inside the prompt
  (the prompt ends with one) are not counted, and the completion's first token never
  completes a delimiter begun in the prompt. Jittable.

  Args:
    tokens_BxL, mask_BxL: [prompt | completion] sequences and their real tokens.
    completion_start_B: int index of each row's first completion token.
    step_labels_BxS: P(correct) of each step, in [0, 1].
    step_valid_BxS: bool, which labels exist (steps past a row's end are ignored anyway).
    step_id: the tokenizer's `StepEnds`, or the step delimiter id.
    eos_id: EOS id.

  Returns:
    dict(tokens, mask, targets, target_mask) of [B, L] arrays (targets/target_mask float32).
  """
  l = tokens_BxL.shape[1]
  mask_BxL = jnp.asarray(mask_BxL, bool)
  in_completion_BxL = (jnp.arange(l)[None] >= jnp.asarray(completion_start_B)[:, None]) & mask_BxL
  ends_BxL = as_step_ends(step_id).mask(tokens_BxL, in_completion_BxL)
  is_sep_BxL = in_completion_BxL & (ends_BxL | (tokens_BxL == eos_id))
  # prm_targets counts occurrences of one id: mark separators with 1, hide all else.
  sep_tokens_BxL = jnp.where(is_sep_BxL, 1, -1)
  targets_BxL, target_mask_BxL = losses.prm_targets(sep_tokens_BxL, 1, step_labels_BxS, step_valid_BxS)
  return {'tokens': tokens_BxL, 'mask': mask_BxL, 'targets': targets_BxL,
          'target_mask': target_mask_BxL}


def orm_batch(tokens_BxL, mask_BxL, outcome_B) -> dict:
  """ORM batch: the outcome label P(correct) sits on each row's last real token (its EOS).

  Args:
    tokens_BxL, mask_BxL: [prompt | completion] sequences (right-padded completions).
    outcome_B: P(correct) of each full solution, in [0, 1].

  Returns:
    dict(tokens, mask, targets, target_mask) of [B, L] arrays.
  """
  l = tokens_BxL.shape[1]
  mask_BxL = jnp.asarray(mask_BxL, bool)
  pos_L = jnp.arange(l)
  last_B = jnp.max(jnp.where(mask_BxL, pos_L[None], -1), axis=1)
  at_last_BxL = (pos_L[None] == last_B[:, None]) & (last_B[:, None] >= 0)
  targets_BxL = jnp.where(at_last_BxL, jnp.asarray(outcome_B, jnp.float32)[:, None], 0.0)
  return {'tokens': tokens_BxL, 'mask': mask_BxL, 'targets': targets_BxL,
          'target_mask': at_last_BxL.astype(jnp.float32)}


def to_head_scale(p, mode: str):
  """P(correct) labels -> regression targets of `mode`: 2p − 1 ('mse') or p ('bce')."""
  p = jnp.asarray(p, jnp.float32)
  return 2.0 * p - 1.0 if mode == 'mse' else p


def predict(graphdef: nnx.GraphDef, params: nnx.State, tokens_BxL, mask_BxL, mode: str | None = None):
  """Raw value-head output per position: 2σ(z) − 1 for 'sigmoid' heads, z for 'logit' heads.

  Args:
    graphdef, params: a model with a value head.
    tokens_BxL, mask_BxL: sequences and their real tokens.
    mode: optional 'mse' | 'bce'; when given, the head must be the one that mode trains.

  Returns:
    values_BxL float32.
  """
  model = nnx.merge(graphdef, params)
  head = model.cfg.value_head
  if head == 'none':
    raise ValueError("value model has no value head (model.value_head='none')")
  if mode is not None:
    _check_mode(mode, head)
  out = model(tokens_BxL, positions_from_mask(mask_BxL), mask_BxL)
  return out.values_BxL.astype(jnp.float32)


def prob_correct(values_BxL, value_head: str):
  """Head output -> P(correct): (v + 1) / 2 for 'sigmoid' heads, σ(z) for 'logit' heads."""
  if value_head == 'sigmoid':
    return (values_BxL + 1.0) / 2.0
  return jax.nn.sigmoid(values_BxL)


def value_loss_fn(graphdef: nnx.GraphDef, params: nnx.State, batch: dict, mode: str):
  """`losses.value_loss` of the model's predictions on a value batch (see module docstring)."""
  pred_BxL = predict(graphdef, params, batch['tokens'], batch['mask'], mode)
  loss, aux = losses.value_loss(pred_BxL, to_head_scale(batch['targets'], mode),
                                batch['target_mask'], mode)
  p_BxL = prob_correct(jax.lax.stop_gradient(pred_BxL), HEAD_OF_MODE[mode])
  m_BxL = batch['target_mask']
  aux['pred_mean'] = jnp.sum(jnp.where(m_BxL > 0, p_BxL, 0.0)) / jnp.maximum(jnp.sum(m_BxL), 1.0)
  return loss, aux


def value_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, state: TrainState,
               batch: dict, mode: str):
  """One optimizer step of value / PRM / ORM regression.

  Args:
    graphdef: value model graph (static), `value_head` matching `mode`.
    tx: optimizer (static).
    state: TrainState of the value model (donated by `value_step_jit`).
    batch: dict(tokens, mask, targets, target_mask) from `prm_batch` / `orm_batch` or
      `labels.q_value_batch`; targets are P(correct).
    mode: 'mse' (head 'sigmoid', targets 2p − 1) or 'bce' (head 'logit', targets p); static.

  Returns:
    (new_state, metrics): loss, accuracy (sign agreement with the label), num_labels,
    pred_mean (mean predicted P(correct) on labelled positions), grad_norm, finite. A
    non-finite loss or gradient leaves the state unchanged.
  """
  (loss, aux), grads = jax.value_and_grad(value_loss_fn, argnums=1, has_aux=True)(
      graphdef, state.params, batch, mode)
  finite = jnp.isfinite(loss) & all_finite(grads)
  new_state = apply_gradients(state, grads, tx)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  metrics = {'loss': loss, 'accuracy': aux['accuracy'], 'num_labels': aux['num_tokens'],
             'pred_mean': aux['pred_mean'], 'grad_norm': optax.global_norm(grads), 'finite': finite}
  return new_state, metrics


value_step_jit = jax.jit(value_step, static_argnums=(0, 1, 4), donate_argnums=(2,))
