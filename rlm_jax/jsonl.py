"""JSON Lines files: one reader for every JSONL the project reads (tasks, datasets, outputs)."""

from __future__ import annotations

import bz2
import json
from typing import Any, Iterator


def records(path: str) -> Iterator[tuple[str, Any]]:
  """(where, object) for each non-blank line of `path` (`.bz2` decompressed); `where` is
  'path:line'. Raises ValueError naming path:line when a line is not JSON."""
  opener = (lambda: bz2.open(path, 'rt', encoding='utf-8')) if path.endswith('.bz2') else (
      lambda: open(path, encoding='utf-8'))
  with opener() as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{path}:{lineno}'
      try:
        obj = json.loads(line)
      except ValueError as e:
        raise ValueError(f'{where}: not valid JSON ({e})') from None
      yield where, obj
