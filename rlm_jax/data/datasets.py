"""Train / eval / RL splits from files, `datasets` folders and TFDS; the length policy.

  train = load_split('data/gsm8k/train.jsonl')             # GSM8K records -> gsm8k tasks
  held = load_split('data/gsm8k/test.jsonl')
  held, n = remove_overlap(held, train)                    # never evaluate on a training problem
  train, dropped = fit_lengths(tok, train, 128, 256, 16, policy='drop', where='train.jsonl')

Sources (`load_split(source)`):
  *.jsonl[.bz2]      one JSON object a line: task dicts, GSM8K `{"question","answer"}` records,
                     or prompt/answer records (field names: `question_key`, `answer_key`)
  *.json[.bz2]       x1 `{"version": 1, "data": [...]}` or a list of the same objects; a file
                     that is not one JSON document goes through `datasets.load_dataset('json')`
  *.parquet, *.csv   `datasets.load_dataset('parquet'|'csv', data_files=...)`
  DIR[:SPLIT]        a folder written by `datasets` `save_to_disk` (SPLIT for a DatasetDict)
  tfds:NAME[:SPLIT]  TensorFlow Datasets, prepared locally (nothing is downloaded)
  builtin:FILE       a file shipped in `rlm_jax/tasks/data/` (e.g. `builtin:gsm8k_train_sample.jsonl`)

What a record becomes: an object with a `type` field is a task dict (checked by its domain's
`parse_task`). Otherwise `question_key` / `answer_key` name the prompt and answer columns: an
answer holding `#### N` is a GSM8K worked solution (`gsm8k.record_to_task`: steps, canonical
number, levels by difficulty decile within the source); any other answer is the final answer
itself, giving `{"type": task_type, "problem", "solution", "level": record's level or 1}`
without steps (RL and evaluation only). `task_type='gsm8k'` compares numbers exactly and LaTeX
answers with math-verify.

Errors are one line naming the source and line or row (`train.jsonl:17: not JSON (...)`);
an empty source is an error.
"""

from __future__ import annotations

import bz2
import json
import os
from typing import Any, Iterable, Sequence

from rlm_jax import jsonl
from rlm_jax import tasks as tasks_lib
from rlm_jax.data import encoding
from rlm_jax.data.tokenizer import Tokenizer
from rlm_jax.tasks import gsm8k

BUILTIN = 'builtin:'
TFDS = 'tfds:'
_BUILTIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tasks', 'data')
LENGTH_POLICIES = ('drop', 'error')


def _open(path: str):
  if path.endswith('.bz2'):
    return bz2.open(path, 'rt', encoding='utf-8')
  return open(path, encoding='utf-8')


class _Converter:
  """Turns records into task dicts; GSM8K records get their levels once all are seen."""

  def __init__(self, question_key: str, answer_key: str, task_type: str):
    self.q, self.a, self.type = question_key, answer_key, task_type
    self.tasks: list[dict] = []
    self._gsm8k: list[tuple[int, dict]] = []

  def add(self, obj: Any, where: str) -> None:
    if not isinstance(obj, dict):
      raise ValueError(f'{where}: not a JSON object (got {type(obj).__name__})')
    try:
      if 'type' in obj:
        task = obj
      elif self.q in obj and self.a in obj:
        question, answer = obj[self.q], obj[self.a]
        if not isinstance(question, str) or not question.strip():
          raise ValueError(f'column {self.q!r} is not a non-empty string')
        if isinstance(answer, str) and '####' in answer:
          task = gsm8k.record_to_task({'question': question, 'answer': answer})
          self._gsm8k.append((len(self.tasks), {'question': question, 'answer': answer}))
        else:
          if answer is None or isinstance(answer, (dict, list)) or not str(answer).strip():
            raise ValueError(f'column {self.a!r} is not an answer: {str(answer)[:40]!r}')
          level = obj.get('level', 1)
          task = {'type': self.type, 'level': level if isinstance(level, int) and 1 <= level <= 10 else 1,
                  'problem': question, 'unique_solution': True, 'solution': str(answer).strip()}
      else:
        raise ValueError(f"record has neither 'type' (a task dict) nor the columns {self.q!r} and {self.a!r} "
                         f'(keys: {sorted(obj)[:8]}); set question_key / answer_key')
      if not isinstance(task.get('problem'), str):
        raise ValueError("task lacks a string 'problem'")
      tasks_lib.domain_of(task).parse_task(task)  # a bad solution fails here, not mid-training
    except ValueError as e:
      raise ValueError(f'{where}: {e}') from None
    self.tasks.append(task)

  def finish(self, source: str) -> list[dict]:
    if not self.tasks:
      raise ValueError(f'{source}: no tasks (empty)')
    if self._gsm8k:  # GSM8K levels are difficulty deciles within the source
      idx = [i for i, _ in self._gsm8k]
      gsm8k.assign_levels([r for _, r in self._gsm8k], [self.tasks[i] for i in idx])
    return self.tasks


def _read_jsonl(path: str, conv: _Converter) -> None:
  for where, obj in jsonl.records(path):
    conv.add(obj, where)


def _read_json(path: str, conv: _Converter) -> None:
  try:
    with _open(path) as f:
      blob = json.load(f)
  except json.JSONDecodeError:
    if path.endswith('.bz2'):
      raise ValueError(f'{path}: not a readable JSON file') from None
    _read_rows(_hf_load('json', path), path, conv)  # e.g. JSON lines named .json
    return
  except (OSError, EOFError) as e:
    raise ValueError(f'{path}: not a readable JSON file ({e})') from None
  data = blob.get('data') if isinstance(blob, dict) else blob
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected {{'version': 1, 'data': [...]}} or a list of records")
  for i, obj in enumerate(data):
    conv.add(obj, f'{path}: data[{i}]')


def _datasets():
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError("reading parquet/csv files and datasets folders needs the 'datasets' package: "
                      'pip install -e .[hf]') from None
  return datasets


def _hf_load(fmt: str, path: str):
  try:
    return _datasets().load_dataset(fmt, data_files={'train': path}, split='train')
  except Exception as e:  # pylint: disable=broad-except
    # datasets raises many types (arrow, its own); one line naming the file is what matters.
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f'{path}: not a readable {fmt} file ({msg[:200]})') from None


def _read_rows(rows: Iterable[dict], source: str, conv: _Converter) -> None:
  for i, row in enumerate(rows):
    conv.add(dict(row), f'{source}: row {i}')


def _read_dir(path: str, split: str | None, conv: _Converter) -> None:
  datasets = _datasets()
  try:
    ds = datasets.load_from_disk(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path}: not a datasets folder written by save_to_disk ({str(e)[:200]})') from None
  if isinstance(ds, datasets.DatasetDict):
    if split is None:
      if len(ds) != 1:
        raise ValueError(f'{path}: has splits {sorted(ds)}; name one as {path}:SPLIT')
      split = next(iter(ds))
    if split not in ds:
      raise ValueError(f'{path}: no split {split!r} (has {sorted(ds)})')
    ds = ds[split]
  elif split is not None:
    raise ValueError(f'{path}: is a single split; drop the ":{split}" suffix')
  _read_rows(ds, f'{path}:{split}' if split else path, conv)


def _read_tfds(spec: str, data_dir: str | None, conv: _Converter) -> None:
  name, _, split = spec[len(TFDS):].partition(':')
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(f"{spec}: needs tensorflow-datasets, which is not installed: pip install -e .[tfds]") from None
  try:
    ds = tfds.load(name, split=split or 'train', data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{spec}: TFDS could not load it locally ({str(e).splitlines()[0][:200]})') from None
  for i, ex in enumerate(tfds.as_numpy(ds)):
    row = {k: v.decode('utf-8') if isinstance(v, bytes) else v for k, v in ex.items()}
    conv.add(row, f'{spec}: example {i}')


def load_split(source: str | os.PathLike, *, question_key: str = 'question', answer_key: str = 'answer',
               task_type: str = 'gsm8k', split: str | None = None, data_dir: str | None = None) -> list[dict]:
  """Task dicts of one split (see the module docstring for sources and record handling).

  Args:
    source: a file, a `datasets` folder (`DIR` or `DIR:SPLIT`), `tfds:NAME[:SPLIT]` or
      `builtin:FILE`.
    question_key / answer_key: prompt and answer columns of records that are not task dicts.
    task_type: the task `type` given to plain prompt/answer records (the verifier used).
    split: the split of a `datasets` folder holding several (overrides a `:SPLIT` suffix).
    data_dir: TFDS data folder.

  Returns:
    Task dicts in source order. Raises ValueError (one line, naming source and line/row) for
    unreadable or malformed content and for an empty source; ImportError naming the package
    to install for formats that need one.
  """
  source = os.fspath(source)
  conv = _Converter(question_key, answer_key, task_type)
  if source.startswith(TFDS):
    _read_tfds(source, data_dir, conv)
    return conv.finish(source)
  path = os.path.join(_BUILTIN_DIR, source[len(BUILTIN):]) if source.startswith(BUILTIN) else source
  if not os.path.exists(path) and ':' in path:  # DIR:SPLIT
    head, _, tail = path.rpartition(':')
    if os.path.isdir(head):
      path, split = head, split or tail
  if os.path.isdir(path):
    _read_dir(path, split, conv)
    return conv.finish(source)
  if not os.path.isfile(path):
    raise ValueError(f'{source}: no such file or folder')
  base = path[:-4] if path.endswith('.bz2') else path
  ext = base.rsplit('.', 1)[-1].lower() if '.' in os.path.basename(base) else ''
  if ext == 'jsonl':
    _read_jsonl(path, conv)
  elif ext == 'json':
    _read_json(path, conv)
  elif ext in ('parquet', 'csv') and not path.endswith('.bz2'):
    _read_rows(_hf_load(ext, path), path, conv)
  else:
    raise ValueError(f'{source}: unknown file type {ext!r} (.jsonl, .json, .json.bz2, .parquet, .csv, a datasets '
                     f'folder, tfds:NAME)')
  return conv.finish(source)


def remove_overlap(tasks: Sequence[dict], exclude: Sequence[dict]) -> tuple[list[dict], int]:
  """`tasks` without the problems that occur in `exclude` (same problem text), and how many went.

  Use it to keep evaluation and RL pools disjoint from the SFT split.
  """
  seen = {t['problem'] for t in exclude}
  kept = [t for t in tasks if t['problem'] not in seen]
  return kept, len(tasks) - len(kept)


def fit_lengths(tok: Tokenizer, tasks: Sequence[dict], prompt_len: int, completion_len: int, answer_len: int,
                policy: str = 'drop', where: str = 'the split', fmt: encoding.PromptFormat = encoding.DEFAULT_FORMAT,
                ) -> tuple[list[dict], int]:
  """Keeps the tasks whose tokens fit the padded lengths of the run.

  A task fits when its prompt (in format `fmt`) has at most `prompt_len` tokens, its
  canonical final step `Answer: X` at most `answer_len`, and (when it has `steps`) its SFT
  completion at most `completion_len`, the generation budget, so that SFT never teaches
  traces longer than RL can sample.

  Args:
    tok: the tokenizer.
    tasks: task dicts.
    prompt_len, completion_len, answer_len: the `task.*` lengths.
    policy: 'drop' (leave out what does not fit) or 'error' (raise on the first such task).
    where: the split's name in messages (e.g. the file name).
    fmt: the prompt format the run uses.

  Returns:
    (kept tasks, number dropped). Raises ValueError naming the config key and the problem
    (`task.prompt_len=32: problem 5 of train.jsonl needs 41 tokens`, problems counted from
    1) under 'error', and when nothing is left under 'drop'.
  """
  if policy not in LENGTH_POLICIES:
    raise ValueError(f"task.length_policy='{policy}': must be one of {LENGTH_POLICIES}")
  kept, longest = [], {}
  for i, t in enumerate(tasks):
    need = {'prompt_len': len(encoding.prompt_ids(tok, t, fmt)),
            'answer_len': len(tok.encode('Answer: ' + tasks_lib.answer_text(t)))}
    if t.get('steps'):
      need['completion_len'] = len(encoding.completion_ids(tok, t['steps']))
    limits = {'prompt_len': prompt_len, 'completion_len': completion_len, 'answer_len': answer_len}
    over = [k for k in ('prompt_len', 'completion_len', 'answer_len') if k in need and need[k] > limits[k]]
    for k, n in need.items():
      longest[k] = max(longest.get(k, 0), n)
    if not over:
      kept.append(t)
      continue
    if policy == 'error':
      k = over[0]
      part = {'prompt_len': '', 'completion_len': 'the solution of ', 'answer_len': 'the answer of '}[k]
      raise ValueError(f'task.{k}={limits[k]}: {part}problem {i + 1} of {where} needs {need[k]} tokens')
  if tasks and not kept:
    raise ValueError(f'task.prompt_len={prompt_len}, task.completion_len={completion_len}, '
                     f'task.answer_len={answer_len}: none of the {len(tasks)} problems of {where} fits '
                     f'(longest: {", ".join(f"{k} {v}" for k, v in sorted(longest.items()))})')
  return kept, len(tasks) - len(kept)
