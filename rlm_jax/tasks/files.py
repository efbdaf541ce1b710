"""Reading and writing task files: x1 JSON (`{"version": 1, "data": [...]}`, optionally bz2),
JSONL of task dicts, and GSM8K JSONL (`question`/`answer` records, converted on load)."""
from __future__ import annotations

import bz2
import json
import os
from typing import Any, Iterable

from rlm_jax import jsonl
from rlm_jax.tasks import gsm8k

X1_VERSION = 1


def _open(path: str, mode: str):
  if path.endswith(".bz2"):
    return bz2.open(path, mode + "t", encoding="utf-8")
  return open(path, mode, encoding="utf-8")


def _base(path: str) -> str:
  return path[:-4] if path.endswith(".bz2") else path


def _check_task(task: Any, where: str) -> dict:
  if not isinstance(task, dict):
    raise ValueError(f"{where}: task is not a JSON object")
  for key in ("type", "solution"):
    if key not in task:
      raise ValueError(f"{where}: task lacks field {key!r}")
  return task


def load_tasks(path: str | os.PathLike) -> list[dict]:
  """Tasks from a file, format chosen by extension (and content for JSONL).

  Args:
    path: `.json` / `.json.bz2` (x1 `{"version", "data"}` or a plain list), or `.jsonl` /
      `.jsonl.bz2` whose lines are task dicts or GSM8K records (`question`/`answer`; converted
      with `gsm8k.records_to_tasks`).

  Returns:
    The task dicts. Raises ValueError naming the file (and line) for malformed content.
  """
  path = os.fspath(path)
  base = _base(path)
  if base.endswith(".jsonl"):
    return _load_jsonl(path)
  if not base.endswith(".json"):
    raise ValueError(f"{path}: unknown task file type (expected .json, .json.bz2, .jsonl)")
  try:
    with _open(path, "r") as f:
      blob = json.load(f)
  except (ValueError, OSError, EOFError) as e:
    raise ValueError(f"{path}: not a readable JSON file ({e})") from None
  data = blob.get("data") if isinstance(blob, dict) else blob
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected {{'version': 1, 'data': [...]}} or a list of tasks")
  return [_check_task(t, f"{path}: data[{i}]") for i, t in enumerate(data)]


def _load_jsonl(path: str) -> list[dict]:
  tasks, records = [], []
  for where, obj in jsonl.records(path):
    if isinstance(obj, dict) and "type" not in obj and "question" in obj and "answer" in obj:
      try:
        tasks.append(gsm8k.record_to_task(obj))
      except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
      records.append((len(tasks) - 1, obj))
    else:
      tasks.append(_check_task(obj, where))
  if records:  # GSM8K levels are ranks within the file
    idx = [i for i, _ in records]
    leveled = gsm8k.assign_levels([r for _, r in records], [tasks[i] for i in idx])
    for i, t in zip(idx, leveled):
      tasks[i] = t
  return tasks


def save_tasks(path: str | os.PathLike, tasks: Iterable[dict]) -> None:
  """Writes tasks as x1 JSON (`.json`, `.json.bz2`) or JSONL (`.jsonl`, `.jsonl.bz2`)."""
  path = os.fspath(path)
  base = _base(path)
  tasks = list(tasks)
  if base.endswith(".jsonl"):
    with _open(path, "w") as f:
      for t in tasks:
        f.write(json.dumps(t) + "\n")
  elif base.endswith(".json"):
    with _open(path, "w") as f:
      json.dump({"version": X1_VERSION, "data": tasks}, f)
  else:
    raise ValueError(f"{path}: unknown task file type (expected .json, .json.bz2, .jsonl)")
