"""Train state (a pytree passed in and returned by every step) and the optimizer."""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  learning_rate: float = 1e-3
  warmup_steps: int = 0
  decay_steps: int = 0  # cosine decay to `end_lr_factor * learning_rate`; 0 = constant
  end_lr_factor: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0  # global norm; 0 = off

  def __post_init__(self):
    if self.learning_rate <= 0:
      raise ValueError(f'learning_rate={self.learning_rate}: must be > 0')
    if self.warmup_steps < 0 or self.decay_steps < 0:
      raise ValueError('warmup_steps and decay_steps must be >= 0')


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  if cfg.decay_steps:
    lr = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, max(cfg.warmup_steps, 1), cfg.warmup_steps + cfg.decay_steps,
        end_value=cfg.learning_rate * cfg.end_lr_factor)
  elif cfg.warmup_steps:
    lr = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
  else:
    lr = cfg.learning_rate
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
  parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
  return optax.chain(*parts)


def _create(params: nnx.State, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def create_train_state(params: nnx.State, tx: optax.GradientTransformation, mesh=None,
                       rules=None) -> TrainState:
  """A TrainState laid out like the train step returns it, so the step compiles once.

  With a mesh, the optimizer moments get the params' logical-axis shardings from the start
  (otherwise zeros would be created replicated: a full copy per device until step 1).
  """
  out_shardings = None
  if mesh is not None:
    from rlm_jax import sharding  # pylint: disable=g-import-not-at-top

    abstract = jax.eval_shape(lambda p: _create(p, tx), params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    out_shardings = TrainState(step=replicated, params=jax.tree.map(lambda x: x.sharding, params),
                               opt_state=sharding.state_shardings(abstract.opt_state, mesh, rules))
  return jax.jit(_create, static_argnums=1, out_shardings=out_shardings)(params, tx)


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation) -> TrainState:
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)


def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
