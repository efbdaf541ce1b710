"""Metrics: one JSON line per write in `<workdir>/metrics.jsonl`, TensorBoard in `<workdir>/tb/`.

Only process 0 writes (by default). Values may be Python numbers, numpy or jax scalars; they
are pulled to host here, so call `write` only every `log_every` steps, after dispatching the
next step (a write is a host sync).

Resuming after a kill: rows logged after the checkpoint that is resumed from would be logged
again. `MetricWriter(workdir, resume_step=s)` (or `writer.truncate_after(s)`) drops JSONL
rows with step > s and tells TensorBoard to hide events with step > s, so the curves stay
clean. `read_metrics` skips a torn last line left by a killed process.

Workdirs may be URLs (`gs://bucket/run`, `s3://…`; any scheme `etils.epath` opens). Object
stores cannot append, so there the writer keeps the rows in memory and rewrites the whole
JSONL object at most every `remote_flush_secs` seconds, on `flush()` and on `close()` (a
kill loses at most that window; resuming truncates to the checkpoint anyway). TensorBoard
writes `gs://` / `s3://` itself (tensorboardX; needs google-cloud-storage / boto3 there).
"""
from __future__ import annotations

import json
import numbers
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from etils import epath

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def _to_python(key: str, value: Any) -> float | int | bool:
  """Converts a scalar (Python, numpy, 0-d or size-1 jax array) to a Python number."""
  if isinstance(value, bool):
    return value
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    return float(value)
  arr = np.asarray(value)  # device -> host for jax arrays
  if arr.size != 1:
    raise ValueError(f"metric {key!r}: expected a scalar, got shape {arr.shape}")
  item = arr.reshape(()).item()
  if isinstance(item, bool):
    return item
  if isinstance(item, int):
    return item
  if isinstance(item, float):
    return item
  raise ValueError(f"metric {key!r}: expected a number, got {arr.dtype}")


def is_url(path: str | os.PathLike) -> bool:
  """True for 'scheme://…' paths (gs://, s3://, …), which must not go through os.path."""
  return "://" in os.fspath(path)


def _epath(path: str | os.PathLike) -> epath.Path:
  """An epath.Path that keeps a URL as it is; a scheme epath cannot open is a one-line error."""
  text = os.fspath(path)
  try:
    p = epath.Path(text)
  except KeyError:  # epath has no class registered for this scheme
    p = None
  if is_url(text) and (p is None or os.fspath(p) != text.rstrip("/")):
    raise ValueError(f"{text!r}: URL scheme {text.split('://', 1)[0]!r} is not supported by "
                     f"etils.epath (use a local path or gs://, s3://, az://)")
  return p


def _default_enabled() -> bool:
  import jax
  return jax.process_index() == 0


class MetricWriter:
  """Appends scalar metrics to JSONL and TensorBoard.

  Args:
    workdir: run directory (local path or URL such as gs://bucket/run); created if missing.
    enabled: write anything at all; default: only on jax.process_index() == 0.
    resume_step: when resuming from a checkpoint at this step, drop rows with a larger step
      (see `truncate_after`).
    tensorboard: also write TensorBoard event files.
    remote_flush_secs: URL workdirs only: rewrite the JSONL object at most this often.
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None,
               resume_step: int | None = None, tensorboard: bool = True,
               remote_flush_secs: float = 30.0):
    self.workdir = os.fspath(workdir)
    self.enabled = _default_enabled() if enabled is None else bool(enabled)
    self.remote = is_url(self.workdir)
    root = _epath(self.workdir)
    self.path = os.fspath(root / METRICS_FILE)
    self._tensorboard = tensorboard
    self._file = None
    self._tb = None
    self._rows: list[dict] = []  # remote only: every row, rewritten as one object
    self._remote_flush_secs = remote_flush_secs
    self._dirty_since: float | None = None
    if not self.enabled:
      return
    root.mkdir(parents=True, exist_ok=True)
    if self.remote:
      self._rows = read_metrics(self.workdir)
      if resume_step is not None:
        self._rows = [r for r in self._rows if r["step"] <= resume_step]
        self._upload()
    else:
      _drop_torn_tail(self.path)
      if resume_step is not None:
        _rewrite(self.path, lambda row: row["step"] <= resume_step)
      self._file = open(self.path, "a", encoding="utf-8")
    self._open_tb(purge_step=None if resume_step is None else resume_step + 1)

  def _upload(self) -> None:
    """Remote: writes all rows as one object (replaced atomically by the store)."""
    _epath(self.path).write_text("".join(json.dumps(r) + "\n" for r in self._rows),
                                 encoding="utf-8")
    self._dirty_since = None

  def _open_tb(self, purge_step: int | None) -> None:
    if not self._tensorboard:
      return
    from tensorboardX import SummaryWriter
    if self._tb is not None:
      self._tb.close()
    # Event file names only carry the time in seconds; a writer reopened within the same
    # second (resume, truncate_after) would overwrite the previous file without a suffix.
    self._tb = SummaryWriter(logdir=os.fspath(_epath(self.workdir) / TB_DIR), purge_step=purge_step,
                             flush_secs=10, filename_suffix=f".{time.time_ns()}")

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs `scalars` at `step`: one JSON line `{"step": step, **scalars}` (flushed).

    Args:
      step: integer step.
      scalars: name -> scalar (Python/numpy/jax). Non-finite floats are written as
        NaN/Infinity (Python's json reads them back).

    Raises:
      ValueError: a value is not a scalar, or a key is 'step'.
    """
    if not self.enabled:
      return
    if "step" in scalars:
      raise ValueError("metric name 'step' is reserved")
    row = {"step": int(step)}
    for key, value in scalars.items():
      row[str(key)] = _to_python(str(key), value)
    if self.remote:
      self._rows.append(row)
      now = time.monotonic()
      self._dirty_since = now if self._dirty_since is None else self._dirty_since
      if now - self._dirty_since >= self._remote_flush_secs:
        self._upload()
    else:
      self._file.write(json.dumps(row) + "\n")
      self._file.flush()
    if self._tb is not None:
      for key, value in row.items():
        if key != "step":
          self._tb.add_scalar(key, float(value), global_step=row["step"])

  def truncate_after(self, step: int) -> None:
    """Drops JSONL rows with step > `step`; TensorBoard hides its events after `step`."""
    if not self.enabled:
      return
    if self.remote:
      self._rows = [r for r in self._rows if r["step"] <= step]
      self._upload()
    else:
      self._file.close()
      _rewrite(self.path, lambda row: row["step"] <= step)
      self._file = open(self.path, "a", encoding="utf-8")
    self._open_tb(purge_step=step + 1)

  def flush(self) -> None:
    """Makes every row written so far readable (remote: uploads the JSONL object)."""
    if self._dirty_since is not None:
      self._upload()
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._dirty_since is not None:
      self._upload()
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _drop_torn_tail(path: str) -> None:
  """Cuts a last line without newline (a write interrupted by a kill) off the file."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    data = f.read()
    if data and not data.endswith(b"\n"):
      f.truncate(data.rfind(b"\n") + 1)


def _rewrite(path: str, keep) -> None:
  if not os.path.exists(path):
    return
  rows = [r for r in read_metrics(os.path.dirname(path) or ".") if keep(r)]
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)  # atomic: a kill here leaves either the old or the new file


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """Reads `<workdir>/metrics.jsonl`.

  Args:
    workdir: run directory (local path or URL).

  Returns:
    The rows in file order (empty if there is no file). A torn last line (process killed
    mid-write) is skipped.

  Raises:
    ValueError: a line other than the last is not valid JSON (names the line number).
  """
  path = _epath(workdir) / METRICS_FILE
  if not path.exists():
    return []
  lines = path.read_text(encoding="utf-8").split("\n")
  rows = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i == len(lines) - 1:  # last line with no newline: torn write
        continue
      raise ValueError(f"{path}:{i + 1}: not valid JSON: {line[:80]!r}") from None
  return rows


def progress(iterable: Iterable | None = None, *, total: int | None = None,
             initial: int = 0, desc: str | None = None, enabled: bool | None = None):
  """tqdm progress bar, shown only on process 0 (or when `enabled`).

  Args:
    iterable: what to iterate over (or None and call `.update(n)`).
    total: number of items; `initial` is where a resumed run starts.
    desc: label.
    enabled: default: only on jax.process_index() == 0.

  Returns:
    A tqdm instance.
  """
  from tqdm.auto import tqdm
  on = _default_enabled() if enabled is None else enabled
  return tqdm(iterable, total=total, initial=initial, desc=desc, disable=not on,
              dynamic_ncols=True)

