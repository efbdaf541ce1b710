"""SPMD on a ('data', 'fsdp', 'tensor') mesh, driven by logical axis names.

Model code never names mesh axes. Every parameter is created as
`nnx.Param(value, logical_axes=('embed', 'mlp'))` (one logical name or None per dim) and
activations are annotated with `constrain(x, ('batch', 'length', 'embed'))`. One rule table
(`MeshConfig.rules`, from the config) maps logical names to mesh axes:

  params:       vocab embed mlp heads kv_heads head_dim norm value_hidden layers
  activations:  batch length cache_length embed heads kv_heads head_dim mlp vocab

With the default rules, `embed` is split over 'fsdp' (ZeRO-3 style parameter sharding), the
head/mlp/vocab dims over 'tensor' (Megatron-style), and the batch over ('data', 'fsdp').
Mesh shape (8, 1, 1) is pure data parallel, (1, 8, 1) FSDP, (1, 1, 8) tensor parallel.

Start-up::

  mesh = make_mesh(mesh_cfg)
  graphdef, state = init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)), mesh,
                                 mesh_cfg.rules)
  check_sharded(state, mesh, mesh_cfg.max_replicated_fraction)
  with use_mesh_rules(mesh, mesh_cfg.rules):
    ... jit and run steps; `constrain` inside the model now applies ...
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlm_jax import errors

MESH_AXES = ("data", "fsdp", "tensor")

Rule = tuple[str, str | tuple[str, ...] | None]
Rules = tuple[Rule, ...]

# MaxText-like defaults. A logical name may appear several times: the first rule whose mesh
# axes are still free in the current spec wins (e.g. activations' 'embed' falls back to
# replicated because 'batch' already took 'fsdp').
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("cache_length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),
    ("value_hidden", None),
)


class ShardingError(errors.Error):
  """Bad mesh/rules/annotations. `str(err)` is one line."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh and sharding rules (built from `config.mesh` with `configlib.from_config`).

  Attributes:
    shape: sizes of ('data', 'fsdp', 'tensor'); one entry may be -1 = all remaining devices.
    rules: logical name -> mesh axis, tuple of mesh axes, or None (replicated).
    max_replicated_fraction: start-up check: at most this fraction of parameter bytes may be
      left unsplit by the 'fsdp'/'tensor' axes (see `replicated_fraction`).
  """

  shape: tuple[int, int, int] = (1, -1, 1)
  rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = DEFAULT_RULES
  max_replicated_fraction: float = 0.02

  def __post_init__(self):
    if len(self.shape) != 3 or not all(isinstance(s, int) for s in self.shape):
      raise ShardingError(f"shape={self.shape}: must be 3 ints for {MESH_AXES}")
    if any(s == 0 or s < -1 for s in self.shape):
      raise ShardingError(f"shape={self.shape}: entries must be >= 1 or -1 (fill)")
    if sum(s == -1 for s in self.shape) > 1:
      raise ShardingError(f"shape={self.shape}: at most one entry may be -1")
    _rule_table(self.rules)
    if not 0.0 <= self.max_replicated_fraction <= 1.0:
      raise ShardingError(
          f"max_replicated_fraction={self.max_replicated_fraction}: must be in [0, 1]")


def _rule_table(rules: Sequence[Rule] | Mapping[str, Any]) -> dict[str, list[tuple[str, ...]]]:
  """Validates rules; returns logical name -> candidate mesh-axis tuples (() = replicated)."""
  items = rules.items() if isinstance(rules, Mapping) else rules
  table: dict[str, list[tuple[str, ...]]] = {}
  for item in items:
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
      raise ShardingError(f"rules: entry {item!r} must be (logical_name, mesh_axes)")
    name, target = item
    if target is None:
      axes = ()
    elif isinstance(target, str):
      axes = (target,)
    elif isinstance(target, (tuple, list)) and all(isinstance(a, str) for a in target):
      axes = tuple(target)
    else:
      raise ShardingError(f"rules: {name!r} -> {target!r}: must be a mesh axis name, a tuple "
                          f"of them, or None")
    for a in axes:
      if a not in MESH_AXES:
        raise ShardingError(f"rules: {name!r} -> {a!r}: unknown mesh axis "
                            f"(allowed: {', '.join(MESH_AXES)})")
    if len(set(axes)) != len(axes):
      raise ShardingError(f"rules: {name!r} -> {target!r}: a mesh axis appears twice")
    table.setdefault(name, []).append(axes)
  return table


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves a -1 entry of `shape` and checks that the mesh uses exactly `num_devices`."""
  shape = tuple(int(s) for s in shape)
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if known == 0 or num_devices % known:
      raise ShardingError(f"mesh shape {shape} {MESH_AXES}: {num_devices} devices are not "
                          f"divisible by {known}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ShardingError(f"mesh shape {shape} {MESH_AXES} needs {math.prod(shape)} devices, "
                        f"but there are {num_devices}")
  return shape


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ('data', 'fsdp', 'tensor') mesh with Auto axes.

  Args:
    cfg: mesh config; one entry of `cfg.shape` may be -1.
    devices: defaults to all devices (`jax.devices()`, every process's devices).

  Returns:
    A `jax.sharding.Mesh`.

  Raises:
    ShardingError: the shape does not match the device count (one line, both named).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg.shape, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def _spec(logical_axes: Sequence[str | None], table: dict[str, list[tuple[str, ...]]],
          mesh: Mesh | None, shape: Sequence[int] | None, strict: bool, where: str) -> P:
  if shape is not None and len(shape) != len(logical_axes):
    raise ShardingError(f"{where}logical axes {tuple(logical_axes)} do not match shape "
                        f"{tuple(shape)}")
  sizes = dict(mesh.shape) if mesh is not None else {}
  used: set[str] = set()
  out = []
  for dim, name in enumerate(logical_axes):
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise ShardingError(f"{where}logical axis {name!r} has no rule (known: "
                          f"{', '.join(sorted(table))})")
    chosen: tuple[str, ...] = ()
    for candidate in table[name]:
      if not candidate:
        break  # explicit None rule: replicated
      if any(a in used for a in candidate):
        continue  # a mesh axis may shard only one dim of an array
      axes = candidate if mesh is None else tuple(a for a in candidate if sizes[a] > 1)
      if shape is not None and mesh is not None:
        # Drop mesh axes from the end until the dim divides evenly.
        while axes and shape[dim] % math.prod(sizes[a] for a in axes):
          if strict:
            raise ShardingError(
                f"{where}dim {dim} ({name!r}) of size {shape[dim]} is not divisible by mesh "
                f"axes {candidate} of size {math.prod(sizes[a] for a in candidate)}")
          axes = axes[:-1]
      if axes:
        chosen = axes
        break
    used.update(chosen)
    out.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
  while out and out[-1] is None:  # P('fsdp', None) and P('fsdp') are different jit cache keys
    out.pop()
  return P(*out)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Sequence[Rule],
                    mesh: Mesh | None = None, shape: Sequence[int] | None = None) -> P:
  """Maps logical axis names to a PartitionSpec with the rule table.

  For each dim, the first rule for its logical name whose mesh axes are not already used
  by an earlier dim is taken (a mesh axis shards at most one dim). With `mesh`, mesh axes
  of size 1 are left out. With `mesh` and `shape`, a dim whose size is not divisible by the
  product of its mesh axes loses mesh axes from the end until it is; if none remain, the dim
  falls back to replicated (e.g. 2 kv heads on a tensor axis of 8).

  Args:
    logical_axes: one logical name or None per dim.
    rules: (logical name, mesh axis | tuple of mesh axes | None) pairs.
    mesh: optional mesh, for sizes.
    shape: optional array shape, for the divisibility fallback.

  Returns:
    The PartitionSpec.

  Raises:
    ShardingError: a logical name without a rule, or a rank mismatch with `shape`.
  """
  return _spec(logical_axes, _rule_table(rules), mesh, shape, strict=False, where="")


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator=".")


def _var_spec(path, var: nnx.Variable, table, mesh: Mesh) -> P:
  axes = var.get_metadata().get("logical_axes")
  if axes is None:
    return P()
  value = var.get_value()
  return _spec(tuple(axes), table, mesh, getattr(value, "shape", None), strict=False,
               where=f"{_path_str(path)}: ")


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Sequence[Rule]) -> Any:
  """NamedShardings for a pytree of nnx Variables, from their `logical_axes` metadata.

  Args:
    abstract_state: e.g. `nnx.state(nnx.eval_shape(init_fn))`, or any pytree holding nnx
      Variables (an optax state built over such a tree keeps the Variables and their
      metadata). Variables without `logical_axes` and plain array leaves are replicated.
    mesh: the mesh.
    rules: logical -> mesh rule table.

  Returns:
    The same tree with each Variable's value (or each array leaf) replaced by its
    NamedSharding; usable as `out_shardings`/`in_shardings` of `jax.jit`.
  """
  table = _rule_table(rules)

  def one(path, leaf):
    if _is_var(leaf):
      return leaf.replace(NamedSharding(mesh, _var_spec(path, leaf, table, mesh)))
    if hasattr(leaf, "shape"):
      return NamedSharding(mesh, P())
    return leaf

  return jax.tree_util.tree_map_with_path(one, abstract_state, is_leaf=_is_var)


def abstract_sharded(init_fn: Callable[[], nnx.Module], mesh: Mesh,
                     rules: Sequence[Rule]) -> tuple[nnx.GraphDef, Any]:
  """Shapes, dtypes and shardings of `init_fn()`'s state, without allocating it.

  Returns:
    (graphdef, state) where the state's values are `jax.ShapeDtypeStruct(sharding=...)`:
    the target for `Checkpointer.restore`.
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(init_fn))
  shardings = state_shardings(abstract, mesh, rules)
  with_sharding = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return graphdef, with_sharding


def init_sharded(init_fn: Callable[[], nnx.Module], mesh: Mesh,
                 rules: Sequence[Rule]) -> tuple[nnx.GraphDef, Any]:
  """Initialises a module directly into its sharded layout.

  `nnx.eval_shape` gives the abstract state, `state_shardings` its layout from the
  `logical_axes` metadata, and a jitted init with those `out_shardings` materialises each
  shard on its device: the full model never exists on one host or device.

  Args:
    init_fn: builds the module, e.g. `lambda: Transformer(cfg, rngs=nnx.Rngs(0))`; it is
      traced, so its randomness must come from the nnx.Rngs it creates.
    mesh: the mesh.
    rules: logical -> mesh rule table.

  Returns:
    (graphdef, state): `nnx.merge(graphdef, state)` gives the module.
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(init_fn))
  shardings = state_shardings(abstract, mesh, rules)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init():
    return nnx.state(init_fn())

  with use_mesh_rules(mesh, rules):
    state = init()
  return graphdef, state


def _param_leaves(state: Any) -> list[tuple[str, Any]]:
  """(name, array-or-ShapeDtypeStruct) of the parameters in `state`."""
  vars_ = jax.tree_util.tree_leaves_with_path(state, is_leaf=_is_var)
  if any(_is_var(v) for _, v in vars_):
    return [(_path_str(p), v.get_value()) for p, v in vars_
            if isinstance(v, nnx.Param) and hasattr(v.get_value(), "shape")]
  return [(_path_str(p), x) for p, x in vars_ if hasattr(x, "shape")]


def _param_sharding_axes(mesh: Mesh) -> set[str]:
  """Mesh axes that are meant to split parameters: all but 'data', of size > 1."""
  return {a for a, n in mesh.shape.items() if a != "data" and n > 1}


def _is_replicated(x: Any, axes: set[str]) -> bool:
  sharding = getattr(x, "sharding", None)
  if sharding is None:
    return True  # a host array: a full copy per process
  if isinstance(sharding, NamedSharding):
    used = set()
    for entry in sharding.spec:
      if entry is not None:
        used.update(entry if isinstance(entry, tuple) else (entry,))
    return not used & axes
  return sharding.is_fully_replicated


def _replicated_bytes(state: Any, mesh: Mesh) -> tuple[int, int, list[tuple[int, str]]]:
  axes = _param_sharding_axes(mesh)
  total, replicated, names = 0, 0, []
  for name, x in _param_leaves(state):
    nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
    total += nbytes
    if _is_replicated(x, axes):
      replicated += nbytes
      names.append((nbytes, name))
  return total, replicated, sorted(names, key=lambda t: (-t[0], t[1]))


def replicated_fraction(state: Any, mesh: Mesh) -> float:
  """Fraction of parameter bytes not split over any parameter-sharding mesh axis.

  Copies along 'data' are data parallelism by design, so a parameter counts as replicated
  when its sharding uses none of the other mesh axes ('fsdp', 'tensor') of size > 1. On a
  mesh without such axes (one device, pure data parallel) the fraction is 0.

  Args:
    state: pytree of nnx Variables (only nnx.Param counts) or of arrays; leaves are
      jax.Arrays or ShapeDtypeStructs carrying `.sharding`.
    mesh: the mesh the state lives on.

  Returns:
    replicated bytes / total bytes, in [0, 1].
  """
  if not _param_sharding_axes(mesh):
    return 0.0
  total, replicated, _ = _replicated_bytes(state, mesh)
  return replicated / total if total else 0.0


def _fmt_bytes(n: int) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.1f} {unit}"
  return f"{n} B"


def check_sharded(state: Any, mesh: Mesh, max_fraction: float) -> None:
  """Start-up check that the parameters really are sharded (see `replicated_fraction`).

  Raises:
    ShardingError: more than `max_fraction` of parameter bytes are replicated; the one-line
      message gives the fraction and the largest replicated parameters.
  """
  if not _param_sharding_axes(mesh):
    return
  total, replicated, names = _replicated_bytes(state, mesh)
  fraction = replicated / total if total else 0.0
  if fraction > max_fraction:
    largest = ", ".join(f"{n} ({_fmt_bytes(b)})" for b, n in names[:3])
    raise ShardingError(
        f"{fraction:.1%} of parameter bytes are replicated on mesh {dict(mesh.shape)} "
        f"(limit {max_fraction:.1%}); largest replicated: {largest}. Check the logical_axes "
        f"of these parameters and config.mesh.rules")


# ----------------------------------------------------------------------------------------
# Activations.

_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar(
    "rlm_jax_mesh_rules", default=None)


@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh, rules: Sequence[Rule]) -> Iterator[None]:
  """Makes `constrain` active with `mesh` and `rules` (and sets jax's mesh context).

  Entering `jax.set_mesh(mesh)` as well makes the mesh part of jit's trace context, so a
  function traced here is retraced (not reused) when called outside, and vice versa.
  """
  token = _ACTIVE.set((mesh, _rule_table(rules)))
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
  """The mesh set by the innermost `use_mesh_rules`, or None."""
  ctx = _ACTIVE.get()
  return None if ctx is None else ctx[0]


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical axis names.

  Identity when no `use_mesh_rules` is active or the mesh has one device, so model code
  runs unchanged on one device. Dims that do not divide their mesh axes stay replicated.

  Args:
    x: array of rank len(logical_axes).
    logical_axes: e.g. ('batch', 'length', 'embed').

  Returns:
    x, constrained to NamedSharding(mesh, spec).
  """
  ctx = _ACTIVE.get()
  if ctx is None:
    return x
  mesh, table = ctx
  if mesh.size == 1:
    return x
  spec = _spec(tuple(logical_axes), table, mesh, x.shape, strict=False, where="constrain: ")
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def shard_batch(batch: Any, mesh: Mesh, rules: Sequence[Rule],
                logical: Sequence[str | None] = ("batch",)) -> Any:
  """Puts host arrays on the mesh, leading dims named by `logical` (the rest replicated).

  Single process only: every leaf is the global batch. For multi-host, each process holds
  its slice of the batch and the global array is built with
  `jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local_x)` instead of
  `device_put` (same spec).

  Args:
    batch: pytree of arrays; leaf shape [B, ...].
    mesh: the mesh.
    rules: rule table.
    logical: logical names of the leading dims.

  Returns:
    The same pytree of jax.Arrays, sharded.

  Raises:
    ShardingError: a batch dim is not divisible by its mesh axes (names the leaf).
  """
  table = _rule_table(rules)

  def put(path, x):
    ndim = np.ndim(x)
    axes = (tuple(logical) + (None,) * ndim)[:ndim]
    spec = _spec(axes, table, mesh, np.shape(x), strict=True,
                 where=f"batch leaf {_path_str(path) or '<root>'!r}: ")
    return jax.device_put(x, NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(put, batch)
