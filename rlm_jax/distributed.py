"""Multi-process (multi-host) start-up and per-host data loading.

JAX's own runtime does the distribution: `jax.distributed.initialize` joins the processes
(one per TPU host, or one per GPU node / GPU), after which `jax.devices()` lists every
device of the job and a mesh over them spans all hosts. The same jitted step then runs on
every process (SPMD). What this module adds:

  * `DistributedConfig` + `initialize`: join from config or environment (explicit
    coordinator, or 'auto' detection on Cloud TPU / SLURM / Open MPI), idempotent, a no-op
    for one process.
  * `process_slice` / `batch_slice`: which rows of the global batch this process loads.
  * `host_local_to_global`: builds the global, sharded batch from each process's rows with
    `jax.make_array_from_process_local_data` (no process ever holds the global batch).

Start-up on every host::

  distributed.initialize(dist_cfg)          # before any other jax call
  mesh = sharding.make_mesh(mesh_cfg)       # all devices of all processes
  rows = distributed.batch_slice(global_batch, mesh, rules)
  local = load_examples(rows)                # this host's rows only
  batch = distributed.host_local_to_global(local, mesh, rules)

Environment overrides (read by `resolve`, e.g. set by the SLURM recipe in
experiments/slurm/): RLM_COORDINATOR ('host:port' or 'auto'), RLM_NUM_PROCESSES,
RLM_PROCESS_ID, RLM_LOCAL_DEVICE_IDS ('0,1').
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding

from rlm_jax import errors
from rlm_jax import sharding as sharding_lib

AUTO = "auto"
ENV_COORDINATOR = "RLM_COORDINATOR"
ENV_NUM_PROCESSES = "RLM_NUM_PROCESSES"
ENV_PROCESS_ID = "RLM_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "RLM_LOCAL_DEVICE_IDS"


class DistributedError(errors.Error):
  """Bad multi-process settings. `str(err)` is one line."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """How this process joins a multi-process job (`config.distributed`).

  Attributes:
    coordinator_address: '' = single process (no jax.distributed); 'auto' = let
      `jax.distributed.initialize()` detect the cluster (Cloud TPU VMs and pod slices,
      SLURM, Open MPI, GKE); 'host:port' = explicit, reachable from every process (process 0
      runs the coordinator service there).
    num_processes: total processes, explicit mode only (0 with 'auto': detected).
    process_id: this process's rank in [0, num_processes), explicit mode only.
    local_device_ids: devices this process drives (e.g. one GPU per process); () = all
      local devices.
    initialization_timeout: seconds to wait for all processes to join.
  """

  coordinator_address: str = ""
  num_processes: int = 1
  process_id: int = 0
  local_device_ids: tuple[int, ...] = ()
  initialization_timeout: int = 300

  def __post_init__(self):
    addr = self.coordinator_address
    if addr not in ("", AUTO) and (":" not in addr or not addr.rsplit(":", 1)[1].isdigit()):
      raise DistributedError(f"distributed.coordinator_address={addr!r}: must be '', 'auto' "
                             f"or 'host:port'")
    if addr != AUTO:
      if self.num_processes < 1:
        raise DistributedError(f"distributed.num_processes={self.num_processes}: must be >= 1")
      if not 0 <= self.process_id < self.num_processes:
        raise DistributedError(f"distributed.process_id={self.process_id}: must be in "
                               f"[0, num_processes={self.num_processes})")
      if self.num_processes > 1 and not addr:
        raise DistributedError(f"distributed.num_processes={self.num_processes} needs "
                               f"distributed.coordinator_address ('host:port' or 'auto')")
    if any(i < 0 for i in self.local_device_ids):
      raise DistributedError(f"distributed.local_device_ids={self.local_device_ids}: must be "
                             f">= 0")
    if self.initialization_timeout < 1:
      raise DistributedError(f"distributed.initialization_timeout="
                             f"{self.initialization_timeout}: must be >= 1")

  @property
  def is_multi_process(self) -> bool:
    return self.coordinator_address == AUTO or self.num_processes > 1


def _env_int(environ: Mapping[str, str], name: str) -> int:
  text = environ[name].strip()
  try:
    return int(text)
  except ValueError:
    raise DistributedError(f"{name}={text!r}: must be an integer") from None


def resolve(cfg: DistributedConfig, environ: Mapping[str, str] | None = None
            ) -> DistributedConfig:
  """Applies the RLM_* environment overrides to `cfg` (env wins over the config).

  Args:
    cfg: settings from the experiment config.
    environ: defaults to `os.environ`.

  Returns:
    The config `initialize` will use.

  Raises:
    DistributedError: a malformed variable or an inconsistent result (names it).
  """
  environ = os.environ if environ is None else environ
  changes: dict[str, Any] = {}
  if environ.get(ENV_COORDINATOR, "").strip():
    changes["coordinator_address"] = environ[ENV_COORDINATOR].strip()
  if environ.get(ENV_NUM_PROCESSES, "").strip():
    changes["num_processes"] = _env_int(environ, ENV_NUM_PROCESSES)
  if environ.get(ENV_PROCESS_ID, "").strip():
    changes["process_id"] = _env_int(environ, ENV_PROCESS_ID)
  if environ.get(ENV_LOCAL_DEVICE_IDS, "").strip():
    text = environ[ENV_LOCAL_DEVICE_IDS]
    try:
      changes["local_device_ids"] = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
      raise DistributedError(f"{ENV_LOCAL_DEVICE_IDS}={text!r}: must be comma-separated "
                             f"integers") from None
  if not changes:
    return cfg
  try:
    return dataclasses.replace(cfg, **changes)
  except DistributedError as e:
    names = ", ".join(f"{k}={v!r}" for k, v in changes.items())
    raise DistributedError(f"after environment overrides ({names}): {e}") from None


def initialize(cfg: DistributedConfig, environ: Mapping[str, str] | None = None) -> bool:
  """Joins the multi-process job described by `cfg` + environment (see `resolve`).

  Must run before anything else touches a jax backend. Idempotent: a second call (or a call
  after someone else initialised jax.distributed) does nothing. A single-process config
  does nothing, so the same entry point runs on a laptop and on a pod.

  Args:
    cfg: distributed settings.
    environ: defaults to `os.environ`.

  Returns:
    True if jax.distributed is active after the call.

  Raises:
    DistributedError: bad settings, or jax was already used in this process.
  """
  cfg = resolve(cfg, environ)
  if jax.distributed.is_initialized():
    return True
  if not cfg.is_multi_process:
    return False
  kwargs: dict[str, Any] = {"initialization_timeout": cfg.initialization_timeout}
  if cfg.local_device_ids:
    kwargs["local_device_ids"] = list(cfg.local_device_ids)
  if cfg.coordinator_address != AUTO:
    kwargs.update(coordinator_address=cfg.coordinator_address,
                  num_processes=cfg.num_processes, process_id=cfg.process_id)
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:
    where = ("auto-detection (Cloud TPU / SLURM / Open MPI)"
             if cfg.coordinator_address == AUTO else
             f"coordinator {cfg.coordinator_address}, process {cfg.process_id} of "
             f"{cfg.num_processes}")
    raise DistributedError(f"jax.distributed.initialize failed with {where}: {e}") from e
  return True


def process_slice(n_items: int, process_index: int | None = None,
                  process_count: int | None = None) -> slice:
  """The contiguous block of `n_items` rows that process `process_index` loads.

  Process p gets rows [p·n/P, (p+1)·n/P). This is the block its devices hold when the batch
  dim is sharded over mesh axes that are laid out process-major (what `make_mesh` gives for
  'data'/'fsdp' across hosts); `batch_slice` computes it from the actual sharding.

  Args:
    n_items: global number of rows (e.g. prompts per step); divisible by process_count.
    process_index: defaults to `jax.process_index()`.
    process_count: defaults to `jax.process_count()`.

  Returns:
    slice(start, stop).

  Raises:
    DistributedError: n_items not divisible, or a process index out of range.
  """
  p = jax.process_index() if process_index is None else process_index
  n = jax.process_count() if process_count is None else process_count
  if n < 1 or not 0 <= p < n:
    raise DistributedError(f"process_index={p} must be in [0, process_count={n})")
  if n_items % n:
    raise DistributedError(f"{n_items} items cannot be split evenly over {n} processes "
                           f"(use a global batch divisible by the process count)")
  per = n_items // n
  return slice(p * per, (p + 1) * per)


def _batch_sharding(mesh: Mesh, rules, ndim: int, logical: Sequence[str | None]):
  axes = (tuple(logical) + (None,) * ndim)[:ndim]
  return NamedSharding(mesh, sharding_lib.logical_to_spec(axes, rules, mesh))


def batch_slice(n_items: int, mesh: Mesh, rules: sharding_lib.Rules,
                logical: Sequence[str | None] = ("batch",)) -> slice:
  """The rows of a global batch of `n_items` that this process must load.

  Read off the batch sharding (the union of this process's devices' row ranges), so it is
  right for any mesh layout: with the batch replicated across processes (e.g. tensor
  parallelism over hosts) every process loads every row.

  Args:
    n_items: global batch size.
    mesh: the mesh (all processes' devices).
    rules: logical -> mesh rule table.
    logical: logical names of the leading dims (only the first matters here).

  Returns:
    slice(start, stop) into the global batch.

  Raises:
    DistributedError: this process's rows are not one contiguous block (an exotic device
      order), or `n_items` is not divisible by the batch's mesh axes.
  """
  s = _batch_sharding(mesh, rules, 1, logical)
  try:
    index_map = s.addressable_devices_indices_map((n_items,))
  except ValueError as e:
    raise DistributedError(f"batch of {n_items}: {e}") from None
  ranges = sorted({(i[0].start or 0, n_items if i[0].stop is None else i[0].stop)
                   for i in index_map.values()})
  start, stop = ranges[0][0], ranges[0][0]
  for a, b in ranges:
    if a != stop:
      raise DistributedError(f"process {jax.process_index()} holds rows {ranges} of the "
                             f"batch: not one contiguous block; reorder the mesh devices")
    stop = b
  return slice(start, stop)


def host_local_to_global(batch: Any, mesh: Mesh, rules: sharding_lib.Rules,
                         logical: Sequence[str | None] = ("batch",)) -> Any:
  """Builds the global sharded batch from this process's rows (multi-host `shard_batch`).

  Each process passes only the rows `batch_slice` names (in that order); the leading dims
  are laid out by `logical` through the rule table, the rest replicated. With one process
  this equals `sharding.shard_batch` on the full batch.

  Args:
    batch: pytree of host arrays, leaf shape [B_local, ...].
    mesh: the mesh (all processes' devices).
    rules: logical -> mesh rule table.
    logical: logical names of the leading dims.

  Returns:
    The same pytree of global jax.Arrays, leaf shape [B_global, ...].

  Raises:
    sharding.ShardingError: a leaf whose local rows do not split over this process's
      devices (names the leaf).
  """

  def put(path, x):
    x = np.asarray(x)
    s = _batch_sharding(mesh, rules, x.ndim, logical)
    try:
      return jax.make_array_from_process_local_data(s, x)
    except ValueError as e:
      name = jax.tree_util.keystr(path, simple=True, separator=".") or "<root>"
      raise sharding_lib.ShardingError(f"batch leaf {name!r} with local shape {x.shape} on "
                                       f"sharding {s.spec}: {e}") from None

  return jax.tree_util.tree_map_with_path(put, batch)
