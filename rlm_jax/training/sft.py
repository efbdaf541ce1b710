"""Phase 1: completion-only supervised fine-tuning on solver traces."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlm_jax.training import losses
from rlm_jax.training.state import TrainState, apply_gradients, all_finite


def sft_loss_fn(graphdef: nnx.GraphDef, params: nnx.State, batch: dict):
  """Cross-entropy of tokens[:, 1:] given tokens[:, :-1], on completion tokens only."""
  model = nnx.merge(graphdef, params)
  logits_BxLxV = model(batch['tokens'], mask_BxL=batch['mask']).logits_BxLxV
  return losses.sft_loss(logits_BxLxV[:, :-1], batch['tokens'][:, 1:], batch['loss_mask'][:, :-1])


def sft_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, state: TrainState, batch: dict):
  """One optimizer step. Returns (new_state, metrics); a non-finite loss leaves params unchanged."""
  (loss, aux), grads = jax.value_and_grad(sft_loss_fn, argnums=1, has_aux=True)(graphdef, state.params, batch)
  finite = jnp.isfinite(loss) & all_finite(grads)
  new_state = apply_gradients(state, grads, tx)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  metrics = {'loss': loss, 'token_accuracy': aux['accuracy'], 'grad_norm': optax.global_norm(grads),
             'finite': finite}
  return new_state, metrics


sft_step_jit = jax.jit(sft_step, static_argnums=(0, 1), donate_argnums=(2,))
