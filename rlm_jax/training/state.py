"""Train state (a pytree passed in and returned by every step), the optimizer, and
gradient accumulation over microbatches (`accumulate_gradients`)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlm_jax import sharding as sharding_lib


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


# Cached: jitted steps take the optimizer as a static argument, so the same config must give
# the same object for a second run in one process (a notebook, a sweep) to reuse the compiled step.
@functools.lru_cache(maxsize=64)
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
    abstract = jax.eval_shape(lambda p: _create(p, tx), params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    out_shardings = TrainState(step=replicated, params=jax.tree.map(lambda x: x.sharding, params),
                               opt_state=sharding_lib.state_shardings(abstract.opt_state, mesh, rules))
  return jax.jit(_create, static_argnums=1, out_shardings=out_shardings)(params, tx)


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation) -> TrainState:
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)


def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


# ----------------------------------------------------------------------------------------
# Microbatching (gradient accumulation inside one compiled step).


def _check_microbatches(batch, num_microbatches: int) -> int:
  """The common leading dim B of `batch`; raises one line if B % k != 0 or dims differ."""
  if not isinstance(num_microbatches, int) or num_microbatches < 1:
    raise ValueError(f'microbatches={num_microbatches!r}: must be an int >= 1')
  leaves = jax.tree_util.tree_leaves_with_path(batch)
  if not leaves:
    raise ValueError('microbatches: the batch has no arrays')
  sizes = {jax.tree_util.keystr(p, simple=True, separator='.'): x.shape[0] if x.ndim else None
           for p, x in leaves}
  first_name, b = next(iter(sizes.items()))
  for name, n in sizes.items():
    if n != b:
      raise ValueError(f'microbatches: batch leaf {name!r} has leading dim {n}, but '
                       f'{first_name!r} has {b}')
  if b % num_microbatches:
    raise ValueError(f'microbatches={num_microbatches}: does not divide the batch size {b} '
                     f'(leaf {first_name!r})')
  return b


def split_microbatches(batch, num_microbatches: int):
  """[B, ...] leaves -> [k, B/k, ...]; microbatch j holds rows j, j+k, j+2k, ...

  Strided rather than contiguous: a batch sharded in contiguous row blocks over D devices
  then spreads every microbatch over all D devices (when B/k is divisible by D), so each
  microbatch keeps the full data/FSDP parallelism instead of landing on D/k devices.
  """
  k = num_microbatches
  _check_microbatches(batch, k)

  def split(x):
    x_MxKx = x.reshape((x.shape[0] // k, k) + x.shape[1:])
    x_KxMx = jnp.swapaxes(x_MxKx, 0, 1)
    return sharding_lib.constrain(x_KxMx, (None, 'batch') + (None,) * (x.ndim - 1))

  return jax.tree.map(split, batch)


def merge_microbatches(tree):
  """Inverse of `split_microbatches`: [k, B/k, ...] leaves -> [B, ...] in the original order."""

  def merge(x_KxMx):
    x_MxKx = jnp.swapaxes(x_KxMx, 0, 1)
    x = x_MxKx.reshape((-1,) + x_KxMx.shape[2:])
    return sharding_lib.constrain(x, ('batch',) + (None,) * (x.ndim - 1))

  return jax.tree.map(merge, tree)


def map_microbatches(fn: Callable[[Any], Any], batch, num_microbatches: int):
  """`fn(batch)` computed k microbatches at a time (lax.map), outputs re-assembled to [B, ...].

  For forward-only passes over a big batch (π_old / π_ref log-probs) whose activations
  (e.g. [B, L, V] logits) would not fit at once. `fn` must map rows independently.

  Args:
    fn: microbatch (leaves [B/k, ...]) -> pytree of arrays with leading dim B/k.
    batch: pytree, leaves [B, ...].
    num_microbatches: k (1 = a plain call).

  Returns:
    fn's output for the whole batch, leaves [B, ...], rows in the batch's order.
  """
  if num_microbatches == 1:
    return fn(batch)
  return merge_microbatches(jax.lax.map(fn, split_microbatches(batch, num_microbatches)))


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _zeros_like_params(params):
  """float32 zeros shaped (and, under `use_mesh_rules`, sharded) like the parameters."""

  def zeros(leaf):
    if _is_var(leaf):
      value = jnp.zeros(leaf.get_value().shape, jnp.float32)
      axes = leaf.get_metadata().get('logical_axes')
      if axes is not None:  # the accumulator is as big as the params: shard it like them
        value = sharding_lib.constrain(value, tuple(axes))
      return leaf.replace(value)
    return jnp.zeros(jnp.shape(leaf), jnp.float32)

  return jax.tree.map(zeros, params, is_leaf=_is_var)


def accumulate_gradients(loss_fn: Callable[[Any, Any], tuple[jax.Array, Any]], params, batch,
                         num_microbatches: int):
  """Value and gradient of `loss_fn` over `batch`, k microbatches at a time, in one lax.scan.

  Returns the mean over microbatches of each microbatch's loss, aux and gradient. The mean
  equals the full-batch objective only if each microbatch loss is normalised by the
  *global* quantity divided by k, e.g. a token-mean loss divides its token sum by
  (tokens in the whole batch) / k — not by its own token count (averaging per-microbatch
  means weights a token of a short microbatch more). Row-mean losses with equal
  microbatch sizes (GRPO's per-sequence mean, Dr.GRPO's fixed B·L) need nothing extra.
  Gradients are summed in float32 and cast back to the parameter dtype; the activations of
  only one microbatch are alive at a time, then one optimizer update follows.

  Args:
    loss_fn: (params, microbatch) -> (scalar loss, aux pytree of arrays).
    params: pytree (e.g. nnx.State) differentiated.
    batch: pytree of arrays with a common leading dim B, divisible by k.
    num_microbatches: k; 1 = `jax.value_and_grad(loss_fn, has_aux=True)(params, batch)`.

  Returns:
    ((loss, aux), grads), as `jax.value_and_grad(..., has_aux=True)` returns them.

  Raises:
    ValueError: k < 1, or B not divisible by k (names the leaf).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_microbatches == 1:
    return grad_fn(params, batch)
  k = num_microbatches
  micro = split_microbatches(batch, k)

  def body(acc, mb):
    (loss, aux), grads = grad_fn(params, mb)
    acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
    return acc, (loss, aux)

  acc, (loss_K, aux_K) = jax.lax.scan(body, _zeros_like_params(params), micro)
  grads = jax.tree.map(lambda a, p: (a / k).astype(jnp.result_type(p)), acc, params)
  aux = jax.tree.map(lambda x: jnp.mean(x, axis=0), aux_K)
  return (jnp.mean(loss_K), aux), grads
