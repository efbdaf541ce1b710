"""The files of a run folder that analysis reads and writes: names, schemas, validation, I/O.

A run of `python -m rlm_jax.main --workdir=W` leaves `W/metrics.jsonl`, `W/results.json`,
`W/config.json` and `W/ckpt/<phase>/`. `python -m rlm_jax.analysis --workdir=W` (see
`collect`) runs the search strategies on the run's held-out tasks and adds, under
`W/analysis/`:

  scaling.json   {"version": 1, "rows": [ROW, ...]}
  trees.json     {"version": 1, "trees": [TREE, ...]}
  outputs.jsonl  one OUTPUT per line

  ROW    {"phase", "strategy", "budget", "guide", "accuracy", "invalid", "policy_tokens",
          "model_calls", "num_problems", "seconds"}: one strategy at one budget (the knob of
          `collect.BUDGET_KNOBS`); policy_tokens / model_calls are means per problem; guide is
          what ranks candidates: "policy" (the policy alone: samples, votes, log-probs,
          priors), "value" (a value head) or "verifier" (the task's ground-truth reward at
          terminal steps: an oracle upper bound, not a deployable strategy).
  TREE   `search.tree_to_json` of one problem ({"prompt", "problem", "num_nodes", "nodes"})
          plus "chosen_path" ([node ids], root first), "phase", "strategy", "budget", "guide",
          "task" ({"level", "problem", "expected"}) and "score" (verifier score of the answer).
          nodes[i] = {"id", "parent" (-1 at the root), "text", "visits", "q", "prior",
          "terminal", "reward" (null where no verifier ran), "depth"}; other keys of the
          export ("value", "logprob", "children") are kept but not required.
  OUTPUT {"phase", "strategy", "budget", "guide", "index", "level", "problem", "expected",
          "output", "score"}: score is `tasks.verify` (-1 invalid, 0 wrong, 1 partial, 2 solved).

Figures go to `W/figures/`. The readers here return plain records (lists of dicts), validated,
with errors naming the file (and line); `frames` turns them into tables.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rlm_jax import jsonl
from rlm_jax import metrics as metrics_lib

ANALYSIS_DIR = 'analysis'
FIGURES_DIR = 'figures'
RESULTS_FILE = 'results.json'
SCALING_FILE = 'scaling.json'
TREES_FILE = 'trees.json'
OUTPUTS_FILE = 'outputs.jsonl'
NODE_KEYS = ('id', 'parent', 'text', 'visits', 'q', 'prior', 'terminal', 'reward', 'depth')
SCALING_KEYS = ('strategy', 'budget', 'guide', 'accuracy', 'policy_tokens')
OUTPUT_KEYS = ('strategy', 'budget', 'level', 'problem', 'expected', 'output', 'score')
PHASE_ORDER = ('sft', 'rl', 'grpo', 'ppo', 'em')  # results.json names phase 2 'rl'
SCORE_NAMES = {-1: 'invalid', 0: 'wrong', 1: 'partial', 2: 'solved'}


def phases_in(phases: Iterable[str]) -> list[str]:
  """The distinct phase names of an iterable (e.g. a 'phase' column) in training order: sft,
  grpo, then the others as they come."""
  seen = list(dict.fromkeys(phases))
  return [p for p in PHASE_ORDER if p in seen] + [p for p in seen if p not in PHASE_ORDER]


# ------------------------------------------------------------------------------------------
# Run folders.


def check_workdir(workdir: str | os.PathLike) -> str:
  """Absolute path of a run directory; raises FileNotFoundError naming it if it holds no run."""
  path = os.path.abspath(os.fspath(workdir))
  if not os.path.exists(os.path.join(path, metrics_lib.METRICS_FILE)):
    raise FileNotFoundError(f'{path}: no {metrics_lib.METRICS_FILE}; run '
                            f'`python -m rlm_jax.main --config=configs/main.py --workdir={path}` first')
  return path


def figures_dir(workdir: str | os.PathLike) -> str:
  """`<workdir>/figures`, created."""
  path = os.path.join(os.fspath(workdir), FIGURES_DIR)
  os.makedirs(path, exist_ok=True)
  return path


def analysis_paths(workdir: str | os.PathLike) -> dict[str, str]:
  """{'scaling', 'trees', 'outputs'}: the paths of the files under `<workdir>/analysis/`."""
  base = os.path.join(os.fspath(workdir), ANALYSIS_DIR)
  return {'scaling': os.path.join(base, SCALING_FILE), 'trees': os.path.join(base, TREES_FILE),
          'outputs': os.path.join(base, OUTPUTS_FILE)}


def _analysis_file(workdir_or_file: str | os.PathLike, name: str) -> str:
  path = os.fspath(workdir_or_file)
  if os.path.isdir(path):
    path = os.path.join(path, ANALYSIS_DIR, name)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: missing; create it with `python -m rlm_jax.analysis '
                            f'--workdir=<workdir>`')
  return path


def read_json(path: str | os.PathLike) -> Any:
  """The JSON value of a file; ValueError naming the file if it does not parse."""
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{os.fspath(path)}: not valid JSON ({e})') from None


# ------------------------------------------------------------------------------------------
# Readers.


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """The rows of `<workdir>/metrics.jsonl` ({'step', '<phase>/<name>': value, ...}), in order."""
  rows = metrics_lib.read_metrics(check_workdir(workdir))
  if not rows:
    raise ValueError(f'{workdir}: {metrics_lib.METRICS_FILE} is empty')
  return rows


def load_results(workdir: str | os.PathLike) -> dict:
  """`<workdir>/results.json` ({phase: {'<strategy>/<metric>': value}}); {} if not written yet."""
  path = os.path.join(check_workdir(workdir), RESULTS_FILE)
  if not os.path.exists(path):
    return {}
  return read_json(path)


def validate_tree(tree: Mapping, where: str = 'tree') -> None:
  """Raises ValueError naming the first node that breaks the TREE format (module docstring)."""
  nodes = tree.get('nodes') if isinstance(tree, Mapping) else None
  if not isinstance(nodes, list) or not nodes:
    raise ValueError(f'{where}: expected a dict with a non-empty "nodes" list')
  ids = {}
  for i, node in enumerate(nodes):
    missing = [k for k in NODE_KEYS if k not in node]
    if missing:
      raise ValueError(f'{where}: nodes[{i}] lacks {", ".join(missing)}')
    if node['id'] in ids:
      raise ValueError(f'{where}: nodes[{i}] repeats id {node["id"]}')
    ids[node['id']] = node
  roots = [n['id'] for n in nodes if n['parent'] == -1]
  if len(roots) != 1:
    raise ValueError(f'{where}: expected one root (parent -1), found {len(roots)}')
  for node in nodes:
    if node['parent'] == -1:
      continue
    parent = ids.get(node['parent'])
    if parent is None:
      raise ValueError(f'{where}: node {node["id"]} has parent {node["parent"]}, which is not a node')
    if node['depth'] != parent['depth'] + 1:
      raise ValueError(f'{where}: node {node["id"]} has depth {node["depth"]}, its parent '
                       f'{parent["id"]} depth {parent["depth"]}')
  path = tree.get('chosen_path')
  if path is not None:
    if any(p not in ids for p in path):
      raise ValueError(f'{where}: chosen_path {path} names a node that does not exist')
    if path and (path[0] != roots[0] or any(ids[b]['parent'] != a for a, b in zip(path, path[1:]))):
      raise ValueError(f'{where}: chosen_path {path} is not a path from the root')


def load_trees(workdir_or_file: str | os.PathLike) -> list[dict]:
  """Trees from `<workdir>/analysis/trees.json`, a file of that format, or a JSON list of (or
  one) `search.tree_to_json` outputs; each is validated."""
  path = _analysis_file(workdir_or_file, TREES_FILE)
  data = read_json(path)
  if isinstance(data, Mapping) and 'trees' in data:
    trees = data['trees']
  else:  # a list of exported trees, or one
    trees = data if isinstance(data, list) else [data]
  for i, t in enumerate(trees):
    validate_tree(t, f'{path}: trees[{i}]')
  return trees


def validate_scaling(rows: Sequence[Mapping], where: str = 'scaling rows') -> None:
  """Raises ValueError naming the first ROW that lacks a required key (SCALING_KEYS)."""
  for i, r in enumerate(rows):
    missing = [k for k in SCALING_KEYS if k not in r]
    if missing:
      raise ValueError(f'{where}: rows[{i}] lacks {", ".join(missing)}')


def read_scaling(workdir_or_file: str | os.PathLike) -> list[dict]:
  """The ROWs of `<workdir>/analysis/scaling.json` (or a file of that format), validated."""
  path = _analysis_file(workdir_or_file, SCALING_FILE)
  data = read_json(path)
  if not isinstance(data, Mapping) or not isinstance(data.get('rows'), list):
    raise ValueError(f'{path}: expected {{"version": 1, "rows": [...]}}')
  validate_scaling(data['rows'], where=path)
  return data['rows']


def read_outputs(workdir_or_file: str | os.PathLike) -> list[dict]:
  """The OUTPUTs of `<workdir>/analysis/outputs.jsonl` (or a file of that format), validated;
  errors name the line."""
  path = _analysis_file(workdir_or_file, OUTPUTS_FILE)
  rows = []
  for where, row in jsonl.records(path):
    missing = [k for k in OUTPUT_KEYS if not isinstance(row, dict) or k not in row]
    if missing:
      raise ValueError(f'{where}: lacks {", ".join(missing)}')
    rows.append(row)
  if not rows:
    raise ValueError(f'{path}: no records')
  return rows


# ------------------------------------------------------------------------------------------
# Writer.


def write_analysis(workdir: str | os.PathLike, rows: Sequence[Mapping], trees: Sequence[Mapping],
                   outputs: Sequence[Mapping]) -> dict[str, str]:
  """Writes the three files of the module docstring under `<workdir>/analysis/` (each replaced
  atomically, so a reader never sees half a file).

  Args:
    workdir: the run directory.
    rows: ROW dicts (`collect(...).rows`).
    trees: TREE dicts.
    outputs: OUTPUT dicts.

  Returns:
    {'scaling', 'trees', 'outputs'}: the paths written.
  """
  paths = analysis_paths(workdir)
  os.makedirs(os.path.dirname(paths['scaling']), exist_ok=True)
  _write_atomic(paths['scaling'], json.dumps({'version': 1, 'rows': list(rows)}, indent=1))
  _write_atomic(paths['trees'], json.dumps({'version': 1, 'trees': list(trees)}))
  _write_atomic(paths['outputs'], ''.join(json.dumps(r) + '\n' for r in outputs))
  return paths


def _write_atomic(path: str, text: str) -> None:
  with open(path + '.tmp', 'w') as f:
    f.write(text)
  os.replace(path + '.tmp', path)
