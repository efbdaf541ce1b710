"""Checkpoints with orbax: save every N steps, keep the last K, resume from the latest.

Atomicity: orbax writes a step into `<dir>/<step>.orbax-checkpoint-tmp-<ts>/`, writes
`commit_success.txt` into it and only then renames it to `<dir>/<step>/` (on GCS, where rename
is not atomic, the commit file alone marks completion). A process killed half-way leaves a
tmp directory, which is never listed as a step and is deleted by the next manager. On top of
that, `Checkpointer` only trusts step directories that contain `commit_success.txt`, so a
half-copied step directory (e.g. an interrupted `cp -r`/`gsutil cp`) is ignored as well.

Typical loop::

  ckpt = Checkpointer(workdir / 'ckpt', save_every=cfg.save_every, keep=cfg.keep)
  stop = install_preemption_handler()
  if ckpt.latest_step() is not None:
    state, extra = ckpt.restore(abstract_state)   # shardings taken from abstract_state
    start = extra['step'] + 1
  for step in range(start, num_steps):
    state = train_step(state, ...)
    stopping = stop()
    ckpt.save(step, state, {'step': step}, force=stopping or step == num_steps - 1)
    if stopping:
      break
  ckpt.close()

Multi-host: every process calls `save`/`restore` with its own shards; orbax coordinates.

Directories may be URLs (`gs://bucket/run/ckpt`): `resolve_path` keeps them as they are
(only local paths are made absolute) and orbax writes them through etils.epath/tensorstore.
"""
from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

COMMIT_FILE = "commit_success.txt"


def resolve_path(path: str | os.PathLike) -> epath.Path:
  """A run or checkpoint directory as an `epath.Path`.

  Local paths are made absolute (relative to the current directory); URLs such as
  'gs://bucket/run' are kept exactly (os.path.abspath would turn them into
  '<cwd>/gs:/bucket/run').

  Raises:
    ValueError: a URL whose scheme etils.epath does not handle (it would silently become a
      local path); one line naming it.
  """
  text = os.fspath(path)
  if "://" not in text:
    return epath.Path(os.path.abspath(text))
  try:
    p = epath.Path(text)
  except KeyError:  # epath has no class registered for this scheme
    p = None
  if p is None or os.fspath(p) != text.rstrip("/"):
    raise ValueError(f"{text!r}: URL scheme {text.split('://', 1)[0]!r} is not supported by "
                     f"etils.epath (use a local path or gs://, s3://, az://)")
  return p


class CheckpointNotFoundError(FileNotFoundError):
  """Raised when a checkpoint was asked for and none (or not that step) exists."""


class Checkpointer:
  """Saves/restores a state pytree plus a small JSON dict with orbax.

  Args:
    directory: where steps live (`<directory>/<step>/`); a local path (made absolute) or a
      URL such as gs://bucket/run/ckpt (kept as it is, see `resolve_path`).
    save_every: `save(step)` writes only when `step % save_every == 0` (or `force`).
    keep: number of most recent checkpoints kept; older ones are deleted.
    async_save: if True, `save` returns once device arrays are copied to host and writing
      continues in a background thread (call `wait()` before reading the files).
    create: create `directory` if it does not exist; otherwise a missing directory raises.
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int,
               async_save: bool = False, create: bool = True):
    if save_every < 1:
      raise ValueError(f"Checkpointer: save_every={save_every} must be >= 1")
    if keep < 1:
      raise ValueError(f"Checkpointer: keep={keep} must be >= 1")
    self.directory = resolve_path(directory)
    if not create and not self.directory.is_dir():
      raise CheckpointNotFoundError(f"checkpoint directory {self.directory} does not exist")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=save_every, create=create,
        enable_async_checkpointing=async_save,
        # Leftovers of a killed save are never valid; delete them at start-up.
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "extra"))

  def all_steps(self) -> list[int]:
    """Steps with a complete checkpoint, ascending."""
    self._manager.reload()  # another process may have written or deleted steps
    steps = self._manager.all_steps()
    return sorted(s for s in steps if (self.directory / str(s) / COMMIT_FILE).exists())

  def latest_step(self) -> int | None:
    """The newest complete step, or None when there is none."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, extra: dict | None = None,
           force: bool = False) -> bool:
    """Saves `state` (any pytree of arrays) and `extra` (JSON-able dict) as `step`.

    Args:
      step: training step; written only if `step % save_every == 0`, unless `force`.
      state: pytree of jax arrays (e.g. an nnx.State); each process writes its shards.
      extra: small JSON-serialisable dict (data position, rng seeds, ...).
      force: save regardless of `save_every` (end of training, preemption).

    Returns:
      True if a checkpoint was (or, with async_save, is being) written.
    """
    if step in self._manager.all_steps():
      return False  # already saved this step (e.g. the final forced save right after one)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              extra=ocp.args.JsonSave(dict(extra or {})))
    return bool(self._manager.save(step, args=args, force=force))

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores a checkpoint into the structure, dtypes and shardings of `target`.

    Args:
      target: pytree like the saved state whose leaves are `jax.ShapeDtypeStruct` with
        `.sharding` (abstract state, e.g. from `sharding.abstract_sharded`) or
        concrete `jax.Array`s; restored arrays get these shardings.
      step: which step; None means the latest complete one.

    Returns:
      (state, extra): the restored pytree and the JSON dict saved with it.

    Raises:
      CheckpointNotFoundError: no complete checkpoint (or not `step`) in the directory.
    """
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise CheckpointNotFoundError(f"no complete checkpoint in {self.directory}")
      step = steps[-1]
    elif step not in steps:
      raise CheckpointNotFoundError(
          f"no complete checkpoint for step {step} in {self.directory} "
          f"(available: {steps or 'none'})")
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()))
    return out.state, dict(out.extra or {})

  def wait(self) -> None:
    """Blocks until an async save has finished writing."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases resources."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class PreemptionFlag:
  """Callable returning True once a stop signal (SIGTERM by default) has arrived.

  Created by `install_preemption_handler`. The signal handler only sets a flag; the training
  loop polls it, saves a checkpoint and exits cleanly.
  """

  def __init__(self, signals: tuple[int, ...]):
    self._event = threading.Event()
    self._signals = signals
    self._previous = {s: signal.signal(s, self._handle) for s in signals}

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self._event.set()

  def __call__(self) -> bool:
    """True once a stop signal has been received.

    Multi-host: processes receive the signal at different times; call this at the same
    step on every process and agree on the answer, e.g. with
    `jax.experimental.multihost_utils.process_allgather(np.int32(flag())).any()`, so that
    all processes save the same step.
    """
    return self._event.is_set()

  def uninstall(self) -> None:
    """Restores the previous signal handlers."""
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def install_preemption_handler(
    signals: tuple[int, ...] = (signal.SIGTERM,)) -> Callable[[], bool]:
  """Installs handlers that record a stop request instead of killing the process.

  Must be called from the main thread.

  Args:
    signals: signals to catch; SIGTERM is what schedulers (k8s, slurm, TPU maintenance)
      send before killing a job.

  Returns:
    A `PreemptionFlag`: call it to ask whether a stop was requested; `.uninstall()` restores
    the previous handlers.
  """
  return PreemptionFlag(tuple(signals))


def prepare_workdir(path: str) -> str:
  """Resolves `--workdir` (local -> absolute, URL kept) and creates it; returns it as a str.

  Raises:
    configlib.ConfigError: a URL scheme that etils.epath does not handle (one line).
  """
  from rlm_jax import configlib  # pylint: disable=g-import-not-at-top

  try:
    workdir = resolve_path(path)
  except ValueError as e:
    raise configlib.ConfigError(f'--workdir={e}') from e
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    if '://' not in os.fspath(workdir):  # a local folder must take files before the run starts
      probe = workdir / '.write_test'
      probe.write_text('')
      probe.unlink()
  except OSError as e:
    raise configlib.ConfigError(f'--workdir={path}: cannot write there ({e.strerror or e})') from e
  return os.fspath(workdir)


# Config keys that fix the shapes of what a run checkpoints: a run resumed with other values
# cannot restore its checkpoints.
SHAPE_KEYS = ('model', 'tokenizer', 'hf_checkpoint', 'lora', 'value.mode', 'value.value_hidden')
# Keys under SHAPE_KEYS that only change how the model computes (a resumed run may set them).
COMPUTE_KEYS = ('model.remat',)


def _lookup(d: Any, dotted: str) -> Any:
  for k in dotted.split('.'):
    if not isinstance(d, dict) or k not in d:
      return None
    d = d[k]
  return d


def _differences(old: Any, new: Any, where: str):
  if isinstance(old, dict) and isinstance(new, dict):
    for k in sorted(set(old) | set(new)):
      yield from _differences(old.get(k), new.get(k), f'{where}.{k}')
  elif json.loads(json.dumps(old)) != json.loads(json.dumps(new)):
    yield where, old, new


def check_resumable(workdir: str, config) -> None:
  """Refuses to reuse a run folder whose checkpoints were written with another model config.

  Compares `config` (a ConfigDict) with `<workdir>/config.json` on SHAPE_KEYS when the
  folder holds a checkpoint; nothing is written.

  Raises:
    configlib.ConfigError: one line naming the first key that differs.
  """
  from rlm_jax import configlib  # pylint: disable=g-import-not-at-top
  root = resolve_path(workdir)
  saved = root / 'config.json'
  ckpt = root / 'ckpt'
  if not saved.exists() or not ckpt.exists() or not any(ckpt.iterdir()):
    return
  try:
    old = json.loads(saved.read_text())
  except ValueError:
    return
  new = json.loads(config.to_json_best_effort())
  for key in SHAPE_KEYS:
    for where, was, now in _differences(_lookup(old, key), _lookup(new, key), f'config.{key}'):
      if where.removeprefix('config.') in COMPUTE_KEYS:
        continue
      raise configlib.ConfigError(f'{where}={now!r}: the checkpoints in {root}/ckpt were written with {was!r}; '
                                  'use another --workdir (or the same config to resume)')


def write_config(workdir: str, config) -> None:
  """`<workdir>/config.json` (atomically: a kill leaves the old or the new file)."""
  root = resolve_path(workdir)
  tmp = root / 'config.json.tmp'
  tmp.write_text(config.to_json_best_effort(indent=1))
  tmp.replace(root / 'config.json')
