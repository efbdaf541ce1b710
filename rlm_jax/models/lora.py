"""LoRA adapters for a `Transformer` policy, without touching the model code.

A target weight W (input dims `in`, output dims `out`) gets two parameters
  lora_a: [*in, r]  (uniform ±1/sqrt(fan_in), as PEFT)    lora_b: [r, *out]  (zeros)
and the model runs with the effective weight
  W' = stop_gradient(W) + (alpha / r) · A·B
formed on the fly (`effective_params`) before the plain `Transformer` is merged. With B = 0
the adapted model is the base model exactly. The base is frozen twice over: the stop_gradient
makes its gradient exactly zero, and `lora_optimizer` gives it no update and no optimizer state.

`LoraTransformer` wraps the base as an nnx module with the base's call signature and `.cfg`,
so `(graphdef, params)` of the wrapper go straight into `sft_step`, `grpo_iteration`, the
sampler and the sharding helpers (adapters carry `logical_axes`; the rank dim is replicated).

Cost, and why this form: A·B is d_in·d_out·r multiply-adds per target and step, small next to
a training batch, and the backward pass forms the full dL/dW' (then dA = s·dW'·Bᵀ,
dB = s·Aᵀ·dW'), so a LoRA step costs about as many FLOPs as full fine-tuning; it saves the
optimizer state and the weight update of the base (2× the base in fp32 with Adam). An
in-model `x@W + s·(x@A)@B` would also skip dL/dW (about 1/3 of the step's FLOPs); it needs a
hook in the model's matmuls. In the sampler the effective weights are loop-invariant and XLA
hoists them out of the decode `while_loop` (seen in the compiled CPU program): a rollout
forms them once per `generate` call, not once per token.

Usage::

  base_gd, base_state = hf.load_hf(path, mesh=mesh)
  graphdef, params = lora.add_lora(base_gd, base_state, LoraConfig(rank=16), seed=0, mesh=mesh)
  tx = lora.lora_optimizer(make_optimizer(optim_cfg), params)
  state = create_train_state(params, tx)
  state, metrics = sft_step_jit(graphdef, tx, state, batch)
  hf.export_hf(*lora.merge_lora(graphdef, state.params), out_dir)
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlm_jax import errors
from rlm_jax.models.transformer import ModelOutput
from rlm_jax.models.transformer import Transformer

DEFAULT_TARGETS = ('attn.wq', 'attn.wk', 'attn.wv', 'attn.wo', 'mlp.w_gate', 'mlp.w_up',
                   'mlp.w_down')
ADAPTERS = 'adapters'  # attribute of LoraTransformer holding the adapter params
TRAIN, FROZEN = 'lora', 'frozen'  # labels for optax.multi_transform


class LoraError(errors.Error):
  """Bad LoRA settings. `str(err)` is one line."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA settings (in an experiment config: `LoraSection`, which adds rank 0 = off).

  Attributes:
    rank: r, the inner dim of A·B.
    alpha: scale numerator: W' = W + (alpha / rank)·A·B.
    targets: patterns over parameter paths such as 'layers.3.attn.wq'. A pattern matches a
      path that equals it or ends with '.' + pattern; fnmatch wildcards are allowed
      ('attn.w[qv]', 'layers.0.*'). Only weights with >= 2 dims are adapted. Every pattern
      must match at least one weight.
    dtype: storage dtype of A and B (float32 keeps the small updates exact).
  """

  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  dtype: str = 'float32'

  def __post_init__(self):
    if not isinstance(self.rank, int) or self.rank < 1:
      raise LoraError(f'lora.rank={self.rank!r}: must be an integer >= 1')
    if not self.alpha > 0:
      raise LoraError(f'lora.alpha={self.alpha!r}: must be > 0')
    if isinstance(self.targets, str) or not self.targets or not all(
        isinstance(t, str) and t for t in self.targets):
      raise LoraError(f'lora.targets={self.targets!r}: must be a non-empty tuple of patterns '
                      f"such as {DEFAULT_TARGETS[:2]}")
    if self.dtype not in ('float32', 'bfloat16', 'float16'):
      raise LoraError(f"lora.dtype='{self.dtype}': must be one of 'float32', 'bfloat16', "
                      f"'float16'")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class LoraSection:
  """`config.lora` of an experiment: the `LoraConfig` fields, with rank 0 = no adapters.

  With rank > 0 the pipeline trains only adapters of the policy in SFT, GRPO and EM
  (`LoraTransformer` + `lora_optimizer`) and evaluates / hands on the merged weights.
  """

  rank: int = 0
  alpha: float = 16.0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  dtype: str = 'float32'

  def __post_init__(self):
    if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
      raise LoraError(f'lora.rank={self.rank!r}: must be an integer >= 0 (0 = off)')
    LoraConfig(max(self.rank, 1), self.alpha, self.targets, self.dtype)  # checks the rest

  def lora_config(self) -> LoraConfig | None:
    """The LoraConfig, or None when rank == 0 (LoRA off)."""
    return LoraConfig(self.rank, self.alpha, self.targets, self.dtype) if self.rank else None


def _path_str(path: Sequence[Any]) -> str:
  return '.'.join(str(p) for p in path)


def _matches(path: str, pattern: str) -> bool:
  return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, '*.' + pattern)


def num_input_dims(logical_axes: Sequence[str | None] | None, ndim: int) -> int:
  """How many leading dims of a weight are its input (contracted with the activation).

  Weights that start with 'embed' map the model dim out ([D, H, Dh], [D, F], [D, V]); the
  others map everything but their last dim into it ([H, Dh, D], [F, D]). 2-D weights: 1.
  """
  if ndim == 2 or (logical_axes and logical_axes[0] == 'embed'):
    return 1
  return ndim - 1


def target_paths(base_state: nnx.State, targets: Sequence[str]) -> list[str]:
  """Dotted paths of the base weights the patterns select, in state order.

  Raises:
    LoraError: a pattern that matches no weight (names it and lists some weight paths).
  """
  weights = [(_path_str(p), v) for p, v in nnx.to_flat_state(base_state)
             if isinstance(v, nnx.Param) and v.get_value().ndim >= 2]
  chosen = {}
  for pattern in targets:
    hits = [name for name, _ in weights if _matches(name, pattern)]
    if not hits:
      examples = ', '.join(name for name, _ in weights[:6])
      raise LoraError(f'lora.targets: pattern {pattern!r} matches no weight of the model '
                      f'(weights look like: {examples}, ...)')
    chosen.update(dict.fromkeys(hits))
  order = {name: i for i, (name, _) in enumerate(weights)}
  return sorted(chosen, key=order.__getitem__)


class LoraAdapter(nnx.Module):
  """A [*in, r] and B [r, *out] for one weight of shape in + out."""

  def __init__(self, weight: nnx.Param, cfg: LoraConfig, *, rngs: nnx.Rngs):
    w = weight.get_value()
    axes = weight.get_metadata().get('logical_axes') or (None,) * w.ndim
    n_in = num_input_dims(axes, w.ndim)
    in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    dtype = jnp.dtype(cfg.dtype)
    self.lora_a = nnx.Param(
        jax.random.uniform(rngs.params(), in_shape + (cfg.rank,), dtype, -bound, bound),
        logical_axes=tuple(axes[:n_in]) + (None,))
    self.lora_b = nnx.Param(jnp.zeros((cfg.rank,) + out_shape, dtype),
                            logical_axes=(None,) + tuple(axes[n_in:]))

  def delta(self, scale: float) -> jax.Array:
    """scale · A·B in float32, shape in + out."""
    a = self.lora_a[...].astype(jnp.float32)
    b = self.lora_b[...].astype(jnp.float32)
    return scale * jnp.tensordot(a, b, axes=1)


class LoraTransformer(nnx.Module):
  """A frozen `Transformer` plus LoRA adapters; called exactly like the base.

  Attributes:
    base: the wrapped Transformer (its params are the frozen weights).
    adapters: nnx.Dict from dotted weight path ('layers.0.attn.wq') to `LoraAdapter`.
    cfg: the base's ModelConfig (the sampler and losses read `model.cfg`).
    lora: the LoraConfig.
  """

  def __init__(self, base: Transformer, cfg: LoraConfig, *, rngs: nnx.Rngs):
    self.base = base
    self.cfg = base.cfg
    self.lora = cfg
    base_state = nnx.state(base)
    flat = dict((_path_str(p), v) for p, v in nnx.to_flat_state(base_state))
    self.adapters = nnx.Dict({
        name: LoraAdapter(flat[name], cfg, rngs=rngs)
        for name in target_paths(base_state, cfg.targets)})

  def effective_base(self, *, freeze: bool = True) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) of the base with W' = W + scale·A·B for every adapted weight.

    Args:
      freeze: stop gradients into the base weights (training); False for export.

    Returns:
      A plain Transformer's (graphdef, state). Adapted weights are float32 when
      `freeze` (the model casts them to its compute dtype, so W + ΔW is rounded once),
      and keep the base's dtype otherwise.
    """
    graphdef, state = nnx.split(self.base)
    flat = []
    for path, var in nnx.to_flat_state(state):
      name = _path_str(path)
      if freeze:
        var = var.replace(value=jax.lax.stop_gradient(var.get_value()))
      if name in self.adapters:
        w = var.get_value()
        w_eff = w.astype(jnp.float32) + self.adapters[name].delta(self.lora.scale)
        var = var.replace(value=w_eff if freeze else w_eff.astype(w.dtype))
      flat.append((path, var))
    return graphdef, nnx.from_flat_state(flat)

  def __call__(self, *args, **kwargs) -> ModelOutput:
    return nnx.merge(*self.effective_base())(*args, **kwargs)


def add_lora(graphdef: nnx.GraphDef, state: nnx.State, cfg: LoraConfig, *, seed: int = 0,
             mesh: jax.sharding.Mesh | None = None, rules: Any = None
             ) -> tuple[nnx.GraphDef, nnx.State]:
  """Wraps an existing Transformer (e.g. from `hf.load_hf`) with fresh adapters.

  Args:
    graphdef, state: the base Transformer; its arrays are reused, not copied.
    cfg: LoRA settings.
    seed: PRNG seed of the A matrices.
    mesh, rules: place the adapters with the shardings their logical axes get (the base
      keeps its placement); None -> default device. rules None -> sharding.DEFAULT_RULES.

  Returns:
    (graphdef, state) of a `LoraTransformer`.

  Raises:
    LoraError: a target pattern that matches nothing.
  """
  base = nnx.merge(graphdef, state)
  if not isinstance(base, Transformer):
    raise LoraError(f'add_lora needs a Transformer, got {type(base).__name__}')
  model = LoraTransformer(base, cfg, rngs=nnx.Rngs(params=seed))
  out_graphdef, out_state = nnx.split(model)
  if mesh is not None:
    from rlm_jax import sharding  # pylint: disable=g-import-not-at-top
    rules = sharding.DEFAULT_RULES if rules is None else rules
    adapters = out_state[ADAPTERS]
    out_state[ADAPTERS] = jax.device_put(adapters,
                                         sharding.state_shardings(adapters, mesh, rules))
  return out_graphdef, out_state


def init_lora(model_cfg, lora_cfg: LoraConfig, seed: int = 0) -> LoraTransformer:
  """A fresh base Transformer plus adapters, e.g. as `init_fn` of `sharding.init_sharded`."""
  rngs = nnx.Rngs(params=seed)
  return LoraTransformer(Transformer(model_cfg, rngs=rngs), lora_cfg, rngs=rngs)


def effective_params(graphdef: nnx.GraphDef, state: nnx.State
                     ) -> tuple[nnx.GraphDef, nnx.State]:
  """The plain Transformer a LoRA model computes (jittable; gradients reach only A, B)."""
  return nnx.merge(graphdef, state).effective_base(freeze=True)


def merge_lora(graphdef: nnx.GraphDef, state: nnx.State) -> tuple[nnx.GraphDef, nnx.State]:
  """Folds the adapters into the weights: a plain Transformer for export and decoding.

  Args:
    graphdef, state: a `LoraTransformer` (e.g. `train_state.params`).

  Returns:
    (graphdef, state) of a `Transformer` with W + (alpha/r)·A·B in the base weights' dtype,
    laid out like the base; e.g. for `hf.export_hf(*merge_lora(graphdef, params), out_dir)`.
  """
  model = nnx.merge(graphdef, state)
  if not isinstance(model, LoraTransformer):
    raise LoraError(f'merge_lora needs a LoraTransformer, got {type(model).__name__}')
  base_graphdef, _ = nnx.split(model.base)

  @jax.jit
  def merged(state):
    return nnx.merge(graphdef, state).effective_base(freeze=False)[1]

  return base_graphdef, merged(state)


def lora_labels(params: nnx.State) -> Any:
  """TRAIN for the adapter leaves of a LoraTransformer state, FROZEN for the rest."""

  def label(path, _):
    first = path[0]
    return TRAIN if getattr(first, 'key', getattr(first, 'name', None)) == ADAPTERS else FROZEN

  return jax.tree_util.tree_map_with_path(label, params)


def lora_optimizer(tx: optax.GradientTransformation,
                   params: nnx.State | None = None) -> optax.GradientTransformation:
  """`tx` on the adapters only; the base gets zero updates and no optimizer state.

  Args:
    tx: e.g. `training.state.make_optimizer(cfg)` (clipping then sees only the adapters'
      gradients, which are the only non-zero ones anyway).
    params: optional LoraTransformer state, checked to hold adapters.

  Returns:
    An optax GradientTransformation over the whole LoraTransformer state.

  Raises:
    LoraError: `params` has no adapters (not a LoraTransformer state).
  """
  if params is not None and TRAIN not in jax.tree.leaves(lora_labels(params)):
    raise LoraError('lora_optimizer: params hold no LoRA adapters (expected the state of a '
                    'LoraTransformer, e.g. from add_lora)')
  return optax.multi_transform({TRAIN: tx, FROZEN: optax.set_to_zero()}, lora_labels)
