"""Phase 1: completion-only supervised fine-tuning on solver traces.

`microbatches = k > 1` splits the batch into k microbatches whose gradients are accumulated
in one lax.scan before one optimizer update (`state.accumulate_gradients`): the activations
of B/k rows are alive at a time, and the update is the full-batch one. The token-mean
cross-entropy stays exact: each microbatch's token sum is divided by the whole batch's
token count / k, not by its own count.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlm_jax.training import losses
from rlm_jax.training.state import TrainState, accumulate_gradients, all_finite, apply_gradients


def sft_loss_fn(graphdef: nnx.GraphDef, params: nnx.State, batch: dict, num_tokens=None,
                num_microbatches: int = 1):
  """Cross-entropy of tokens[:, 1:] given tokens[:, :-1], on completion tokens only.

  Args:
    graphdef, params: the policy.
    batch: tokens [B, L], mask [B, L] (attention), loss_mask [B, L] (1 on tokens whose
      successor is a completion token).
    num_tokens: with microbatches, the loss-mask token count of the whole batch; the loss
      and accuracy are then this microbatch's sums / (num_tokens / num_microbatches), whose
      mean over the k microbatches is the full-batch token mean. None: this batch's mean.
    num_microbatches: k (only used with num_tokens).

  Returns:
    (loss, aux) with aux = {'num_tokens', 'accuracy'}.
  """
  model = nnx.merge(graphdef, params)
  logits_BxLxV = model(batch['tokens'], mask_BxL=batch['mask']).logits_BxLxV
  loss, aux = losses.sft_loss(logits_BxLxV[:, :-1], batch['tokens'][:, 1:],
                              batch['loss_mask'][:, :-1])
  if num_tokens is not None:
    # sft_loss divided this microbatch's sums by max(n, 1); re-weight to the global count.
    weight = jnp.maximum(aux['num_tokens'], 1.0) * num_microbatches / jnp.maximum(num_tokens, 1.0)
    loss, aux = loss * weight, dict(aux, accuracy=aux['accuracy'] * weight,
                                    num_tokens=aux['num_tokens'] * num_microbatches)
  return loss, aux


def sft_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, state: TrainState, batch: dict,
             microbatches: int = 1):
  """One optimizer step.

  Args:
    graphdef: policy graph (static).
    tx: optimizer (static).
    state: TrainState (donated by `sft_step_jit`).
    batch: tokens, mask, loss_mask, each [B, L].
    microbatches: k (static); B must be divisible by k. k > 1 accumulates gradients over
      k microbatches; loss, token_accuracy and the update equal the k = 1 ones.

  Returns:
    (new_state, metrics); a non-finite loss or gradient leaves the state unchanged.
  """
  if microbatches == 1:
    loss_fn = functools.partial(sft_loss_fn, graphdef)
  else:
    n_tok = jnp.sum(batch['loss_mask'][:, :-1].astype(jnp.float32))  # as sft_loss counts
    loss_fn = lambda p, mb: sft_loss_fn(graphdef, p, mb, n_tok, microbatches)
  (loss, aux), grads = accumulate_gradients(loss_fn, state.params, batch, microbatches)
  finite = jnp.isfinite(loss) & all_finite(grads)
  new_state = apply_gradients(state, grads, tx)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  metrics = {'loss': loss, 'token_accuracy': aux['accuracy'], 'grad_norm': optax.global_norm(grads),
             'finite': finite}
  return new_state, metrics


sft_step_jit = jax.jit(sft_step, static_argnums=(0, 1), static_argnames=('microbatches',),
                       donate_argnums=(2,))
