"""GSM8K: loaders (JSONL, HF `datasets` from local files, TFDS when installed), conversion to
task dicts, and answer checking.

A GSM8K record is `{"question": str, "answer": str}`; the answer is a worked solution whose
lines carry calculator annotations (`<<48/2=24>>`) and end with `#### <number>`. A task is
`{"type": "gsm8k", "level", "problem", "unique_solution": True, "solution": "<number>",
"steps": [...]}`: `solution` is the canonical number (`1,080` -> `1080`), `steps` are the
solution lines (annotations removed unless `keep_calculator=True`) then `Answer: <number>`.
Text is mapped to printable ASCII (curly quotes, dashes, ...), one line per step.

GSM8K has no difficulty levels; `level` is the decile (1..10) of the record's rank within its
source when sorted by number of solution lines (then answer length), so a level means "this
much longer than the rest of the pool". `generate(seed, difficulty)` draws from the pool
(default: the 50-record sample shipped in `data/gsm8k_sample.jsonl`) at that level.

Verification reads the final number (`#### N`, `The answer is N`, `\\boxed{N}`, `A: N`,
`Answer: $1,234.50`, units, punctuation, then the last number) and compares exactly, so 18,
18.0, 18.00, $18 agree and 1,018 is 1018. A non-numeric `solution` (MATH-style LaTeX) is
compared with math-verify under a hard timeout (`mathverify.math_equal`).
"""
from __future__ import annotations

import functools
import json
import os
import re
from fractions import Fraction
from typing import Any, Iterable

from rlm_jax.tasks import extract, mathverify
from rlm_jax.tasks.common import NUM_LEVELS, check_task, level_of, make_rng, to_ascii

NAME = "gsm8k"
SAMPLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "gsm8k_sample.jsonl")

_CALC_RE = re.compile(r"<<[^<>\n]{0,400}>>")


def _split_answer(answer: str) -> tuple[list[str], str]:
  if "####" not in answer:
    raise ValueError("GSM8K answer lacks the final '#### <number>' line")
  body, final = answer.rsplit("####", 1)
  lines = [ln.strip() for ln in body.strip().splitlines() if ln.strip()]
  return lines, final.strip()


def record_to_task(record: dict, *, level: int = 1, keep_calculator: bool = False,
                   ascii_only: bool = True) -> dict:
  """Converts one GSM8K record to a task dict.

  Args:
    record: `{"question": str, "answer": str}` (extra keys are ignored).
    level: the level to record (see the module docstring for how loaders choose it).
    keep_calculator: keep `<<a*b=c>>` annotations in the steps.
    ascii_only: map question and steps to printable ASCII.

  Returns:
    The task dict. Raises ValueError (naming the problem) on a malformed record.
  """
  for key in ("question", "answer"):
    if not isinstance(record.get(key), str):
      raise ValueError(f"GSM8K record lacks a string {key!r}")
  lines, final = _split_answer(record["answer"])
  value = extract.parse_number(final)
  if value is None:
    raise ValueError(f"GSM8K final answer is not a number: {final!r}")
  solution = extract.format_number(value)
  if not keep_calculator:
    lines = [_CALC_RE.sub("", ln) for ln in lines]
  question = record["question"]
  if ascii_only:
    question = to_ascii(question)
    lines = [to_ascii(ln) for ln in lines]
  else:
    question = " ".join(question.split())
    lines = [" ".join(ln.split()) for ln in lines]
  return {
      "type": NAME,
      "level": int(level),
      "problem": question,
      "unique_solution": True,
      "solution": solution,
      "steps": [ln for ln in lines if ln] + [f"Answer: {solution}"],
  }


def _difficulty_key(record: dict) -> tuple[int, int]:
  lines, _ = _split_answer(record["answer"])
  return len(lines), len(record["answer"])


def records_to_tasks(records: Iterable[dict], **kwargs) -> list[dict]:
  """Converts GSM8K records (in order) and assigns levels by difficulty decile.

  Args:
    records: GSM8K records.
    **kwargs: passed to `record_to_task` (`keep_calculator`, `ascii_only`).

  Returns:
    Task dicts in the input order; `level` = 1 + floor(10 * rank / N), rank by (number of
    solution lines, answer length), ties broken by position.
  """
  records = list(records)
  return assign_levels(records, [record_to_task(r, **kwargs) for r in records])


def assign_levels(records: list[dict], tasks: list[dict]) -> list[dict]:
  """Sets `tasks[i]["level"]` to the difficulty decile of `records[i]` (see module docstring)."""
  order = sorted(range(len(records)), key=lambda i: (_difficulty_key(records[i]), i))
  for rank, i in enumerate(order):
    tasks[i]["level"] = 1 + (rank * NUM_LEVELS) // len(records)
  return tasks


def load_jsonl(path: str, **kwargs) -> list[dict]:
  """Tasks from a GSM8K JSONL file; a malformed line raises `ValueError("path:line: ...")`."""
  records, tasks = [], []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
        if not isinstance(rec, dict):
          raise ValueError("not a JSON object")
        tasks.append(record_to_task(rec, **kwargs))
      except ValueError as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}:{lineno}: {e}") from None
      records.append(rec)
  return assign_levels(records, tasks)


def from_hf(source: Any, split: str = "test", **kwargs) -> list[dict]:
  """Tasks from HF `datasets`, local only (never the hub).

  Args:
    source: a `datasets.Dataset` or `DatasetDict`, a directory written by `save_to_disk`, or a
      local data file (`.jsonl`/`.json`/`.parquet`/`.csv`) with `question`/`answer` columns.
    split: split to take from a `DatasetDict`.
    **kwargs: passed to `record_to_task`.
  """
  import datasets  # pylint: disable=import-outside-toplevel

  ds = source
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    if os.path.isdir(path):
      ds = datasets.load_from_disk(path)
    elif os.path.isfile(path):
      ext = path.rsplit(".", 1)[-1].lower()
      fmt = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(ext)
      if fmt is None:
        raise ValueError(f"{path}: unknown data file type {ext!r} (jsonl, json, parquet, csv)")
      ds = datasets.load_dataset(fmt, data_files={split: path}, split=split)
    else:
      raise ValueError(f"{path}: no such local file or directory (the hub is not used)")
  if isinstance(ds, datasets.DatasetDict):
    if split not in ds:
      raise ValueError(f"split {split!r} not in dataset (has {sorted(ds)})")
    ds = ds[split]
  missing = {"question", "answer"} - set(ds.column_names)
  if missing:
    raise ValueError(f"dataset lacks columns {sorted(missing)}")
  return records_to_tasks(({"question": q, "answer": a}
                            for q, a in zip(ds["question"], ds["answer"])), **kwargs)


def from_tfds(split: str = "test", data_dir: str | None = None, name: str = "gsm8k",
              **kwargs) -> list[dict]:
  """Tasks from TensorFlow Datasets (prepared locally; nothing is downloaded).

  Raises:
    ImportError: when `tensorflow_datasets` is not installed.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("from_tfds needs tensorflow_datasets, which is not installed") from e
  ds = tfds.load(name, split=split, data_dir=data_dir, download=False)
  records = []
  for ex in tfds.as_numpy(ds):
    q, a = ex["question"], ex["answer"]
    records.append({"question": q.decode() if isinstance(q, bytes) else str(q),
                    "answer": a.decode() if isinstance(a, bytes) else str(a)})
  return records_to_tasks(records, **kwargs)


@functools.lru_cache(maxsize=1)
def _sample_pool() -> tuple[dict, ...]:
  return tuple(load_jsonl(SAMPLE_PATH))


def generate(seed, difficulty: float, pool: list[dict] | None = None) -> dict:
  """Draws a task of level `level_of(difficulty)` from `pool` (default: the shipped sample).

  Args:
    seed: anything `common.make_rng` accepts.
    difficulty: in [0, 1].
    pool: GSM8K task dicts (e.g. from `load_jsonl`); their `level` fields are used.

  Returns:
    A copy of one pool task.
  """
  level = level_of(difficulty)
  pool = _sample_pool() if pool is None else pool
  candidates = [t for t in pool if t.get("level") == level]
  if not candidates:
    raise ValueError(f"GSM8K pool has no task at level {level} ({len(pool)} tasks)")
  task = make_rng(seed).choice(candidates)
  return {**task, "steps": list(task["steps"])}


def parse_task(task: dict) -> Fraction | str:
  """The gold answer: an exact number, or a LaTeX string for math-verify."""
  check_task(task, "solution")
  sol = str(task["solution"]).strip()
  if not sol:
    raise ValueError("gsm8k task has an empty solution")
  value = extract.parse_number(sol)
  if value is not None and extract.is_plain_number(sol):
    return value
  return sol


def score(gold: Fraction | str, output: str) -> int:
  """2 if the final answer equals `gold`, 0 if not, -1 if no answer can be read."""
  if isinstance(gold, str):
    equal = mathverify.math_equal(gold, output)
    return -1 if equal is None else (2 if equal else 0)
  got = extract.final_number(output)
  if got is None:
    return -1
  return 2 if got == gold else 0


def verify(task: dict, output: str) -> int:
  return score(parse_task(task), output)


def answer_text(task: dict) -> str:
  check_task(task, "solution")
  return str(task["solution"]).strip()
