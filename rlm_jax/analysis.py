"""Analysis of finished runs, for the notebooks: curves, search trees, test-time scaling, errors.

A run of `python -m rlm_jax.main --workdir=W` leaves `W/metrics.jsonl`, `W/results.json`,
`W/config.json` and `W/ckpt/<phase>/`. `collect` (CLI: `python -m rlm_jax.analysis
--workdir=W`) loads a phase's checkpoint, runs the search strategies of `rlm_jax.search` on the
run's held-out tasks and adds, under `W/analysis/`:

  scaling.json   {"version": 1, "rows": [ROW, ...]}
  trees.json     {"version": 1, "trees": [TREE, ...]}
  outputs.jsonl  one OUTPUT per line

  ROW    {"phase", "strategy", "budget", "guide", "accuracy", "invalid", "policy_tokens",
          "model_calls", "num_problems", "seconds"}: one strategy at one budget (the knob of
          BUDGET_KNOBS); policy_tokens / model_calls are means per problem; guide is what
          ranks candidates: "policy" (the policy alone: samples, votes, log-probs, priors),
          "value" (a value head) or "verifier" (the task's ground-truth reward at terminal
          steps: an oracle upper bound, not a deployable strategy).
  TREE   `search.tree_to_json` of one problem ({"prompt", "problem", "num_nodes", "nodes"})
          plus "chosen_path" ([node ids], root first), "phase", "strategy", "budget", "guide",
          "task" ({"level", "problem", "expected"}) and "score" (verifier score of the answer).
          nodes[i] = {"id", "parent" (-1 at the root), "text", "visits", "q", "prior",
          "terminal", "reward" (null where no verifier ran), "depth"}; other keys of the
          export ("value", "logprob", "children") are kept but not required.
  OUTPUT {"phase", "strategy", "budget", "guide", "index", "level", "problem", "expected",
          "output", "score"}: score is `tasks.verify` (-1 invalid, 0 wrong, 1 partial, 2 solved).

Figures go to `W/figures/`. Everything here runs on host; jax is imported only by `collect`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from rlm_jax import metrics as metrics_lib

ANALYSIS_DIR = 'analysis'
FIGURES_DIR = 'figures'
SCALING_FILE = 'scaling.json'
TREES_FILE = 'trees.json'
OUTPUTS_FILE = 'outputs.jsonl'
NODE_KEYS = ('id', 'parent', 'text', 'visits', 'q', 'prior', 'terminal', 'reward', 'depth')
SCALING_KEYS = ('strategy', 'budget', 'guide', 'accuracy', 'policy_tokens')
OUTPUT_KEYS = ('strategy', 'budget', 'level', 'problem', 'expected', 'output', 'score')
PHASE_ORDER = ('sft', 'rl', 'grpo', 'ppo', 'em')  # results.json names phase 2 'rl'
SCORE_NAMES = {-1: 'invalid', 0: 'wrong', 1: 'partial', 2: 'solved'}
# The knob of each strategy that a budget sets (the other knobs keep `search.config` defaults).
BUDGET_KNOBS = {'greedy': None, 'self_consistency': 'num_samples', 'best_of_n': 'num_samples',
                'beam': 'beam_width', 'mcts': 'num_simulations'}
# Panels of the training-curve figure per phase-2 algorithm (other phases: every metric).
RL_PANELS = {'grpo': ['reward', 'accuracy', 'kl', 'entropy', 'completion_length', 'truncated',
                      ('clip_low', 'clip_high', 'clip_region'), 'ratio_mean', ('solve_all', 'solve_none'),
                      'invalid', 'loss', 'grad_norm']}
DEFAULT_BUDGETS = {'greedy': (1,), 'self_consistency': (2, 4, 8), 'best_of_n': (2, 4, 8),
                   'beam': (1, 2, 4), 'mcts': (4, 8, 16)}


# ------------------------------------------------------------------------------------------
# Run directories.


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


def _analysis_file(workdir_or_file: str | os.PathLike, name: str) -> str:
  path = os.fspath(workdir_or_file)
  if os.path.isdir(path):
    path = os.path.join(path, ANALYSIS_DIR, name)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: missing; create it with `python -m rlm_jax.analysis '
                            f'--workdir=<workdir>`')
  return path


# ------------------------------------------------------------------------------------------
# Training curves.


def load_metrics(workdir: str | os.PathLike) -> pd.DataFrame:
  """All metrics of a run as one frame: index 'step', one column per '<phase>/<name>'.

  Rows logged at the same step (e.g. a phase's last step and an evaluation) are merged; a
  metric not logged at a step is NaN.
  """
  rows = metrics_lib.read_metrics(check_workdir(workdir))
  if not rows:
    raise ValueError(f'{workdir}: {metrics_lib.METRICS_FILE} is empty')
  frame = pd.DataFrame(rows).groupby('step', sort=True).first()
  return frame.astype(float)


def phases_in(phases) -> list[str]:
  """The distinct phase names of an iterable (e.g. a 'phase' column) in training order: sft,
  grpo, then the others as they come."""
  seen = list(dict.fromkeys(phases))
  return [p for p in PHASE_ORDER if p in seen] + [p for p in seen if p not in PHASE_ORDER]


def phase_curves(metrics: pd.DataFrame, phase: str) -> pd.DataFrame:
  """The columns of one phase ('sft', 'grpo', 'eval') with the prefix dropped, rows that log it."""
  prefix = phase + '/'
  cols = [c for c in metrics.columns if c.startswith(prefix)]
  if not cols:
    phases = sorted({c.split('/')[0] for c in metrics.columns})
    raise KeyError(f"no metrics of phase '{phase}' (phases in this run: {', '.join(phases)})")
  out = metrics[cols].dropna(how='all')
  return out.rename(columns={c: c[len(prefix):] for c in cols})


def smooth(values: Sequence[float] | np.ndarray, weight: float = 0.6) -> np.ndarray:
  """TensorBoard's debiased exponential moving average; NaNs are skipped and stay NaN.

  s_t = m_t / (1 - weight^n_t), m_t = weight m_{t-1} + (1 - weight) x_t, n_t = finite values so
  far; the debiasing keeps the first points from being pulled towards 0.

  Args:
    values: [T] numbers.
    weight: in [0, 1); 0 returns the values unchanged.

  Returns:
    [T] float64.
  """
  if not 0.0 <= weight < 1.0:
    raise ValueError(f'smooth: weight={weight} must be in [0, 1)')
  x = np.asarray(values, dtype=np.float64)
  out = np.full_like(x, np.nan)
  m, n = 0.0, 0
  for t, v in enumerate(x):
    if not np.isfinite(v):
      continue
    m = weight * m + (1.0 - weight) * v
    n += 1
    out[t] = m / (1.0 - weight ** n)
  return out


def load_results(workdir: str | os.PathLike) -> dict:
  """`<workdir>/results.json` ({phase: {'<strategy>/<metric>': value}}); {} if not written yet."""
  path = os.path.join(check_workdir(workdir), 'results.json')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def results_table(results: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
  """results.json as a long frame: columns phase, strategy, metric, level (NaN if overall), value."""
  rows = []
  for phase, res in results.items():
    if not isinstance(res, Mapping):
      continue  # e.g. a 'preempted' flag
    for key, value in res.items():
      strategy, _, metric = key.rpartition('/')
      level = float('nan')
      if metric.startswith('accuracy_level'):
        level, metric = int(metric[len('accuracy_level'):]), 'accuracy'
      rows.append({'phase': phase, 'strategy': strategy, 'metric': metric, 'level': level, 'value': value})
  return pd.DataFrame(rows, columns=['phase', 'strategy', 'metric', 'level', 'value'])


def eval_accuracy(results: pd.DataFrame) -> pd.DataFrame:
  """Held-out accuracy of a `results_table`: rows (phase, strategy), columns 'all' then levels."""
  acc = results[results.metric == 'accuracy']
  rows = list(dict.fromkeys(zip(acc.phase, acc.strategy)))
  levels = sorted(int(v) for v in acc.level.dropna().unique())
  table = pd.DataFrame(np.nan, index=pd.MultiIndex.from_tuples(rows, names=['phase', 'strategy']),
                       columns=['all'] + levels)
  for r in acc.itertuples(index=False):
    table.loc[(r.phase, r.strategy), 'all' if pd.isna(r.level) else int(r.level)] = r.value
  return table


def plot_curves(curves: pd.DataFrame, panels: Sequence[str | Sequence[str]], *, smoothing: float = 0.6,
                title: str = '', ncols: int = 4):
  """A grid of training curves: raw values faint, `smooth`ed values on top.

  Args:
    curves: a `phase_curves` frame (index: step).
    panels: one metric name per panel, or a tuple of names sharing a panel (e.g. clip
      fractions); names the run did not log are left out.
    smoothing: EMA weight of `smooth`.
    title: figure title.
    ncols: panels per row.

  Returns:
    The matplotlib Figure.
  """
  import matplotlib as mpl
  import matplotlib.pyplot as plt

  groups = [[n for n in ([p] if isinstance(p, str) else p) if n in curves.columns] for p in panels]
  groups = [g for g in groups if g]
  if not groups:
    raise ValueError(f'plot_curves: none of {list(panels)} was logged (logged: {", ".join(curves.columns)})')
  ncols = min(ncols, len(groups))
  nrows = -(-len(groups) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.6 * nrows), squeeze=False)
  for ax, group in zip(axes.flat, groups):
    for j, name in enumerate(group):
      y = curves[name].to_numpy(dtype=float)
      ok = np.isfinite(y)
      color = f'C{j}'
      ax.plot(curves.index[ok], y[ok], color=color, alpha=0.25, lw=0.8)
      ax.plot(curves.index[ok], smooth(y, smoothing)[ok], color=color, lw=1.6, label=name)
    ax.set_title(' / '.join(group) if len(group) < 3 else group[0].split('_')[0] + ' fractions', fontsize=9)
    if len(group) > 1:
      ax.legend(fontsize=7)
    ax.set_xlabel('step', fontsize=8)
    ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(groups):]:
    ax.axis('off')
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def plot_eval(ax, results: pd.DataFrame) -> None:
  """Held-out accuracy per strategy (bars), one bar per phase (a `results_table` frame)."""
  acc = results[(results.metric == 'accuracy') & results.level.isna()]
  table = acc.pivot_table(index='strategy', columns='phase', values='value', sort=False)
  phases = phases_in(table.columns)
  width = 0.8 / max(len(phases), 1)
  x = np.arange(len(table.index))
  for j, phase in enumerate(phases):
    vals = table[phase].to_numpy()
    bars = ax.bar(x + (j - (len(phases) - 1) / 2) * width, vals, width, label=phase.upper())
    ax.bar_label(bars, fmt='%.3f', fontsize=7)
  ax.set_xticks(x, table.index)
  ax.set_ylabel('held-out accuracy')
  ax.set_ylim(0, 1.05)
  ax.legend(fontsize=8)


# ------------------------------------------------------------------------------------------
# Search trees.


def _read_json(path: str) -> Any:
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not valid JSON ({e})') from None


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
  data = _read_json(path)
  if isinstance(data, Mapping) and 'trees' in data:
    trees = data['trees']
  else:  # a list of exported trees, or one
    trees = data if isinstance(data, list) else [data]
  for i, t in enumerate(trees):
    validate_tree(t, f'{path}: trees[{i}]')
  return trees


def children_of(tree: Mapping) -> dict[int, list[int]]:
  """Node id -> child ids in ascending order."""
  kids: dict[int, list[int]] = {n['id']: [] for n in tree['nodes']}
  for n in tree['nodes']:
    if n['parent'] != -1:
      kids[n['parent']].append(n['id'])
  return {k: sorted(v) for k, v in kids.items()}


def _q(node: Mapping) -> float:
  return float('nan') if node['q'] is None else float(node['q'])


def chosen_path(tree: Mapping) -> list[int]:
  """Node ids of the answer's path, root first.

  The tree's own "chosen_path" when present; else MCTS's 'best_terminal' rule
  (`search.mcts.answer_leaf`): the terminal node with the highest q (ties: lowest id), or, with
  no terminal node, descend from the root by visits (ties: higher q, then lower id).
  """
  if tree.get('chosen_path'):
    return [int(i) for i in tree['chosen_path']]
  by_id = {n['id']: n for n in tree['nodes']}
  terminals = [n for n in tree['nodes'] if n['terminal'] and n['parent'] != -1]
  if terminals:
    best = max(terminals, key=lambda n: (np.nan_to_num(_q(n), nan=-np.inf), -n['id']))
    path = [best['id']]
    while by_id[path[-1]]['parent'] != -1:
      path.append(by_id[path[-1]]['parent'])
    return path[::-1]
  kids = children_of(tree)
  node = next(n['id'] for n in tree['nodes'] if n['parent'] == -1)
  path = [node]
  while kids[node]:
    node = max(kids[node], key=lambda c: (by_id[c]['visits'], np.nan_to_num(_q(by_id[c]), nan=-np.inf), -c))
    path.append(node)
  return path


class TreeLayout(NamedTuple):
  """Drawing coordinates, aligned with `tree['nodes']` (N nodes, E = N - 1 edges)."""

  x_N: np.ndarray  # leaves at 0, 1, 2, ... in depth-first order; a parent above its children
  y_N: np.ndarray  # -depth
  edges_Ex2: np.ndarray  # (parent row, child row) into the node list


def tree_layout(tree: Mapping) -> TreeLayout:
  """Tidy layout: leaves spaced 1 apart in depth-first order (children by id), each parent
  centred over its first and last child, depth downwards."""
  nodes = tree['nodes']
  row = {n['id']: i for i, n in enumerate(nodes)}
  kids = children_of(tree)
  root = next(n['id'] for n in nodes if n['parent'] == -1)
  x = np.zeros(len(nodes))
  next_leaf = 0
  # Iterative post-order: deep trees would hit Python's recursion limit.
  stack = [(root, False)]
  while stack:
    node, done = stack.pop()
    if kids[node] and not done:
      stack.append((node, True))
      stack.extend((c, False) for c in reversed(kids[node]))
    elif kids[node]:
      x[row[node]] = 0.5 * (x[row[kids[node][0]]] + x[row[kids[node][-1]]])
    else:
      x[row[node]] = next_leaf
      next_leaf += 1
  y = -np.asarray([n['depth'] for n in nodes], dtype=np.float64)
  edges = np.asarray([(row[n['parent']], i) for i, n in enumerate(nodes) if n['parent'] != -1],
                     dtype=np.int64).reshape(-1, 2)
  return TreeLayout(x, y, edges)


def node_table(tree: Mapping, only: Sequence[int] | None = None) -> pd.DataFrame:
  """One row per node (or per id of `only`, in that order): id, depth, visits, q, prior, reward,
  terminal, text (newlines shown as '\\n')."""
  by_id = {n['id']: n for n in tree['nodes']}
  ids = list(only) if only is not None else sorted(by_id)
  rows = []
  for i in ids:
    n = by_id[i]
    text = n['text'] if isinstance(n['text'], str) else ' '.join(map(str, n['text']))
    rows.append({'id': i, 'depth': n['depth'], 'visits': n['visits'], 'q': _q(n),
                 'prior': float('nan') if n['prior'] is None else n['prior'],
                 'reward': float('nan') if n['reward'] is None else n['reward'],
                 'terminal': bool(n['terminal']), 'text': text.replace('\n', '\\n')})
  return pd.DataFrame(rows).set_index('id')


def pick_tree(trees: Sequence[Mapping]) -> int:
  """Index of the most instructive tree: the largest whose answer was solved (score 2), else the
  largest (ties: the first)."""
  if not trees:
    raise ValueError('pick_tree: no trees')
  key = lambda i: (trees[i].get('score') == 2, len(trees[i]['nodes']), -i)
  return max(range(len(trees)), key=key)


def draw_tree(ax, tree: Mapping, path: Sequence[int] | None = None, label_max_nodes: int = 60) -> None:
  """Draws a search tree on a matplotlib Axes.

  Node area grows with visits, colour is q (red -1 .. green +1, grey where q is unknown),
  terminal nodes are squares, the chosen path is drawn thick in blue. With at most
  `label_max_nodes` nodes every node is labelled '#id N=visits q=..' on its right.
  """
  import matplotlib as mpl

  path = chosen_path(tree) if path is None else list(path)
  lay = tree_layout(tree)
  nodes = tree['nodes']
  row = {n['id']: i for i, n in enumerate(nodes)}
  on_path = {(a, b) for a, b in zip(path, path[1:])}
  for p, c in lay.edges_Ex2:
    hot = (nodes[p]['id'], nodes[c]['id']) in on_path
    ax.plot(lay.x_N[[p, c]], lay.y_N[[p, c]], color='tab:blue' if hot else '0.7',
            lw=3.0 if hot else 0.8, zorder=1 + hot)
  cmap, norm = mpl.colormaps['RdYlGn'], mpl.colors.Normalize(-1.0, 1.0)
  visits = np.asarray([max(n['visits'], 0) for n in nodes], dtype=np.float64)
  size = 30.0 + 270.0 * np.sqrt(visits / max(visits.max(), 1.0))
  q = np.asarray([_q(n) for n in nodes])
  color = [cmap(norm(v)) if np.isfinite(v) else (0.6, 0.6, 0.6, 1.0) for v in q]
  for terminal, marker in ((False, 'o'), (True, 's')):
    sel = np.asarray([bool(n['terminal']) == terminal for n in nodes])
    if sel.any():
      ax.scatter(lay.x_N[sel], lay.y_N[sel], s=size[sel], c=[color[i] for i in np.nonzero(sel)[0]],
                 marker=marker, edgecolors='k', linewidths=0.5, zorder=3)
  ring = [row[i] for i in path]
  ax.scatter(lay.x_N[ring], lay.y_N[ring], s=size[ring] + 60, facecolors='none',
             edgecolors='tab:blue', linewidths=2.0, zorder=4)
  if len(nodes) <= label_max_nodes:
    for i, n in enumerate(nodes):
      qs = 'q=?' if not np.isfinite(q[i]) else f'q={q[i]:+.2f}'
      # Right of the node, where no edge runs (edges leave a node upwards and downwards).
      ax.annotate(f'#{n["id"]}\nN={n["visits"]}\n{qs}', (lay.x_N[i], lay.y_N[i]), xytext=(9, 0),
                  textcoords='offset points', ha='left', va='center', fontsize=6)
  depth = int(max(n['depth'] for n in nodes))
  ax.set_yticks(-np.arange(depth + 1), [str(d) for d in range(depth + 1)])
  ax.set_ylabel('depth (steps)')
  ax.set_xticks([])
  ax.set_ylim(-depth - 0.7, 0.5)
  for side in ('top', 'right', 'bottom'):
    ax.spines[side].set_visible(False)
  ax.figure.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label='q', shrink=0.6)


def draw_path_table(ax, tree: Mapping, path: Sequence[int] | None = None, max_chars: int = 60) -> None:
  """The steps of a path as a table on a matplotlib Axes (id, visits, q, reward, step text)."""
  path = chosen_path(tree) if path is None else list(path)
  table = node_table(tree, path[1:] or path)  # the root holds no step
  fmt = lambda v: '' if not np.isfinite(v) else f'{v:+.2f}'
  cut = lambda t: t if len(t) <= max_chars else t[:max_chars - 3] + '...'
  rows = [[str(i), str(r.visits), fmt(r.q), fmt(r.reward), cut(r.text)] for i, r in table.iterrows()]
  ax.axis('off')
  tab = ax.table(cellText=rows, colLabels=['node', 'N', 'q', 'reward', 'step text'], loc='upper center',
                 cellLoc='left', colWidths=[0.06, 0.06, 0.08, 0.08, 0.72])
  tab.auto_set_font_size(False)
  tab.set_fontsize(8)


# ------------------------------------------------------------------------------------------
# Test-time compute scaling.


def load_scaling(workdir_or_file: str | os.PathLike) -> pd.DataFrame:
  """`<workdir>/analysis/scaling.json` (or a file of that format) as a frame (see `scaling_table`)."""
  path = _analysis_file(workdir_or_file, SCALING_FILE)
  data = _read_json(path)
  if not isinstance(data, Mapping) or not isinstance(data.get('rows'), list):
    raise ValueError(f'{path}: expected {{"version": 1, "rows": [...]}}')
  return scaling_table(data['rows'], where=path)


def run_label(strategy: str, guide: str | None = None) -> str:
  """'mcts' for a policy-only run, 'mcts (verifier)' / 'mcts (value)' for guided ones."""
  return strategy if guide in (None, 'policy') else f'{strategy} ({guide})'


def scaling_table(rows: Sequence[Mapping], where: str = 'scaling rows') -> pd.DataFrame:
  """ROW dicts -> frame sorted by (phase in training order, label, policy_tokens), with
  `label` (`run_label`), `tokens_x`: policy tokens relative to greedy decoding of the same
  phase (NaN without a greedy row), and `accuracy_se`: the binomial standard error sqrt(a (1 - a) / num_problems) (NaN
  without num_problems)."""
  for i, r in enumerate(rows):
    missing = [k for k in SCALING_KEYS if k not in r]
    if missing:
      raise ValueError(f'{where}: rows[{i}] lacks {", ".join(missing)}')
  df = pd.DataFrame(list(rows))
  if 'phase' not in df:
    df['phase'] = ''
  df['label'] = [run_label(s, g) for s, g in zip(df.strategy, df.guide)]
  order = {p: i for i, p in enumerate(phases_in(df.phase))}
  df = df.assign(_order=df.phase.map(order)).sort_values(['_order', 'label', 'policy_tokens'], kind='stable')
  df = df.drop(columns='_order').reset_index(drop=True)
  greedy = df[df.strategy == 'greedy'].groupby('phase').policy_tokens.first()
  df['tokens_x'] = df.policy_tokens / df.phase.map(greedy)
  n = df['num_problems'] if 'num_problems' in df else np.nan
  df['accuracy_se'] = np.sqrt(df.accuracy * (1.0 - df.accuracy) / n)
  return df


def best_within(scaling: pd.DataFrame, max_tokens: float) -> pd.DataFrame:
  """Per (phase, label): the row with the best accuracy among those spending at most
  `max_tokens` policy tokens per problem (ties: fewer tokens). Runs with no such row are left
  out."""
  ok = scaling[scaling.policy_tokens <= max_tokens]
  ok = ok.sort_values(['accuracy', 'policy_tokens'], ascending=[False, True], kind='stable')
  return ok.groupby(['phase', 'label'], sort=True).head(1).set_index(['phase', 'label']).sort_index()


def plot_scaling(ax, scaling: pd.DataFrame, phase: str | None = None, legend: str = 'inside') -> None:
  """Accuracy vs policy tokens per problem (log x), one line per strategy, +-1 standard error
  bars; verifier-guided strategies dashed (they use the ground-truth reward: an upper bound).
  legend: 'inside', 'right' (outside the axes, for the last of several panels) or 'none'."""
  df = scaling if phase is None else scaling[scaling.phase == phase]
  strategies = sorted(set(df.strategy))
  for label, g in df.groupby('label', sort=True):
    g = g.sort_values('policy_tokens')
    oracle = (g.guide == 'verifier').any()
    # One colour per strategy, so a strategy with and without the verifier reads as a pair.
    ax.errorbar(g.policy_tokens, g.accuracy, yerr=g.accuracy_se.fillna(0.0), fmt='s--' if oracle else 'o-',
                color=f'C{strategies.index(g.strategy.iloc[0])}', capsize=2, label=label,
                alpha=0.75 if oracle else 1.0)
    for _, r in g.iterrows():
      ax.annotate(str(r.budget), (r.policy_tokens, r.accuracy), xytext=(3, 3), textcoords='offset points', fontsize=7)
  import matplotlib as mpl
  ax.set_xscale('log')
  ax.xaxis.set_major_formatter(mpl.ticker.ScalarFormatter())
  ax.xaxis.set_minor_formatter(mpl.ticker.NullFormatter())
  ax.set_xlabel('policy tokens per problem')
  ax.set_ylabel('held-out accuracy')
  ax.set_ylim(0.0, min(1.02, float(df.accuracy.max()) + 0.1))
  ax.grid(alpha=0.3)
  if legend == 'inside':
    ax.legend(fontsize=8)
  elif legend == 'right':
    ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.02, 1.0))


def markdown_table(df: pd.DataFrame, floatfmt: str = '.3f') -> str:
  """A frame as a Markdown table (no extra dependency)."""
  cells = lambda vals: '| ' + ' | '.join(
      format(v, floatfmt) if isinstance(v, float) else str(v) for v in vals) + ' |'
  lines = [cells(df.columns), '|' + '---|' * len(df.columns)]
  lines += [cells(r) for r in df.itertuples(index=False)]
  return '\n'.join(lines)


# ------------------------------------------------------------------------------------------
# Verifier error analysis.


def load_outputs(workdir_or_file: str | os.PathLike) -> pd.DataFrame:
  """`<workdir>/analysis/outputs.jsonl` (or a file of that format) as a frame."""
  path = _analysis_file(workdir_or_file, OUTPUTS_FILE)
  rows = []
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{lineno}: not valid JSON ({e})') from None
      missing = [k for k in OUTPUT_KEYS if k not in row]
      if missing:
        raise ValueError(f'{path}:{lineno}: lacks {", ".join(missing)}')
      rows.append(row)
  if not rows:
    raise ValueError(f'{path}: no records')
  return pd.DataFrame(rows)


def score_table(outputs: pd.DataFrame, by: Sequence[str] = ('strategy', 'budget', 'level')) -> pd.DataFrame:
  """Fraction of outputs per verifier score (columns invalid, wrong, partial, solved) and the
  count n, per group of `by`."""
  groups = outputs.groupby(list(by), sort=True)
  out = pd.DataFrame({name: groups.score.apply(lambda s, v=v: float(np.mean(s == v)))
                      for v, name in SCORE_NAMES.items()})
  out['n'] = groups.size()
  return out


def add_run_labels(outputs: pd.DataFrame) -> pd.DataFrame:
  """A copy with column 'run' = `run_label('<strategy> <budget>', guide)`, e.g. 'mcts 16 (verifier)'."""
  guide = outputs.guide if 'guide' in outputs else [None] * len(outputs)
  return outputs.assign(run=[run_label(f'{s} {b}', g) for s, b, g in zip(outputs.strategy, outputs.budget, guide)])


def level_accuracy(outputs: pd.DataFrame) -> pd.DataFrame:
  """Accuracy (score 2) with rows '<strategy> <budget>' (plus ' (<guide>)' for runs guided by
  a value head or the verifier, see `run_label`) and one column per level, plus 'all'."""
  df = add_run_labels(outputs)
  df = df.assign(solved=(df.score == 2).astype(float))
  table = df.pivot_table(index='run', columns='level', values='solved', aggfunc='mean')
  table['all'] = df.groupby('run').solved.mean()
  return table


def error_examples(outputs: pd.DataFrame, kind: str, n: int = 5, max_chars: int = 120) -> pd.DataFrame:
  """Up to `n` outputs of one verifier outcome ('invalid', 'wrong', 'partial', 'solved'),
  spread over levels (round robin, lowest level first); long outputs are cut to `max_chars`."""
  codes = {v: k for k, v in SCORE_NAMES.items()}
  if kind not in codes:
    raise ValueError(f"error_examples: kind '{kind}' must be one of {', '.join(codes)}")
  sel = outputs[outputs.score == codes[kind]]
  picked = []
  per_level = [g for _, g in sel.groupby('level', sort=True)]
  for i in range(n):
    for g in per_level:
      if i < len(g) and len(picked) < n:
        picked.append(g.iloc[i])
  cols = ['strategy', 'budget'] + (['guide'] if 'guide' in outputs else []) + ['level', 'problem', 'expected', 'output']
  if not picked:
    return pd.DataFrame(columns=cols)
  cut = lambda s: s if len(s) <= max_chars else s[:max_chars - 3] + '...'
  df = pd.DataFrame(picked)[cols].reset_index(drop=True)
  df['output'] = df.output.map(lambda s: cut(s.replace('\n', '\\n')))
  return df


def at_largest_budget(outputs: pd.DataFrame) -> pd.DataFrame:
  """The records of each run's largest budget (per phase and guide when those columns exist)."""
  keys = [k for k in ('phase', 'strategy', 'guide') if k in outputs]
  return outputs[outputs.budget == outputs.groupby(keys).budget.transform('max')]


def plot_level_accuracy(ax, table: pd.DataFrame) -> None:
  """Grouped bars of a `level_accuracy` table: one group per level (and 'all'), one bar per run."""
  cols = list(table.columns)
  x = np.arange(len(cols))
  width = 0.8 / max(len(table.index), 1)
  for j, run in enumerate(table.index):
    ax.bar(x + (j - (len(table.index) - 1) / 2) * width, table.loc[run].to_numpy(dtype=float), width, label=run)
  ax.set_xticks(x, [f'level {c}' if c != 'all' else 'all' for c in cols])
  ax.set_ylabel('accuracy (verifier score 2)')
  ax.set_ylim(0, 1.05)
  ax.legend(fontsize=7)


def plot_score_breakdown(ax, scores: pd.DataFrame) -> None:
  """Stacked horizontal bars of a `score_table`: the share of each verifier outcome per row."""
  labels = [' '.join(map(str, k)) if isinstance(k, tuple) else str(k) for k in scores.index]
  left = np.zeros(len(scores))
  colors = {'invalid': 'tab:gray', 'wrong': 'tab:red', 'partial': 'tab:orange', 'solved': 'tab:green'}
  for name, color in colors.items():
    vals = scores[name].to_numpy(dtype=float)
    ax.barh(labels, vals, left=left, color=color, label=name)
    left += vals
  ax.set_xlim(0, 1)
  ax.set_xlabel('share of outputs')
  ax.invert_yaxis()
  ax.legend(fontsize=7, ncols=4, loc='lower center', bbox_to_anchor=(0.5, 1.0))


# ------------------------------------------------------------------------------------------
# Collecting search results from a checkpoint (jax from here on).


def checkpoint_phases(workdir: str | os.PathLike) -> list[str]:
  """Phases with a checkpoint directory (`ckpt/<phase>`), in training order."""
  base = os.path.join(os.fspath(workdir), 'ckpt')
  if not os.path.isdir(base):
    return []
  return phases_in(sorted(p for p in os.listdir(base) if os.path.isdir(os.path.join(base, p))))


def parse_budgets(text: str) -> dict[str, tuple[int, ...]]:
  """'greedy=1;mcts=4,8' -> {'greedy': (1,), 'mcts': (4, 8)}; names from BUDGET_KNOBS."""
  out = {}
  for part in filter(None, (p.strip() for p in text.split(';'))):
    name, _, values = part.partition('=')
    name = name.strip()
    if name not in BUDGET_KNOBS:
      raise ValueError(f"budgets: unknown strategy '{name}' (allowed: {', '.join(BUDGET_KNOBS)})")
    try:
      budget = tuple(int(v) for v in values.split(',') if v.strip())
    except ValueError:
      raise ValueError(f"budgets: '{part}' must be <strategy>=<int>[,<int>...]") from None
    if not budget or min(budget) < 1:
      raise ValueError(f"budgets: '{part}' needs at least one budget, each >= 1")
    out[name] = budget
  if not out:
    raise ValueError(f"budgets: '{text}' names no strategy")
  return out


def guides_for(name: str, has_value: bool, verifier: bool) -> list[str]:
  """What may rank the candidates of strategy `name`: 'policy' (its samples, votes, log-probs,
  priors), 'value' (the policy's value head), 'verifier' (the ground-truth reward: an oracle)."""
  if name in ('greedy', 'self_consistency'):
    return ['policy']
  return ['value' if has_value else 'policy'] + (['verifier'] if verifier else [])


def search_setup(base, name: str, budget: int, guide: str, has_value: bool):
  """The `search.config` section of one (strategy, budget, guide): `base` (a ConfigDict from
  `search.config.get_config`) with the budget's knob (BUDGET_KNOBS) and the guide set."""
  from rlm_jax.search import config as search_config

  c = base.copy_and_resolve_references()
  c.strategy = 'chain' if name == 'greedy' else name
  c.reward = 'answer' if guide == 'verifier' else 'none'
  c.lm.value_from_policy = has_value
  if name == 'greedy':
    c.chain.update(greedy=True, score='none')
  elif name == 'best_of_n':
    c.best_of_n.update(num_samples=budget, scorer={'verifier': 'reward', 'value': 'orm', 'policy': 'logprob'}[guide])
  else:
    knob = BUDGET_KNOBS[name]
    c[name][knob] = budget
  return search_config.build(c)


def collect(workdir: str | os.PathLike, *, phases: Sequence[str] | None = None,
            budgets: Mapping[str, Sequence[int]] = DEFAULT_BUDGETS, verifier: bool = True,
            num_problems: int = 0, num_trees: int = 8, seed: int = 0, log=print) -> dict[str, str]:
  """Runs the search strategies on a run's held-out tasks; writes the files of the module docstring.

  Uses `rlm_jax.solve` (the policy of `ckpt/<phase>`, fixed-shape batches). The held-out tasks
  are the run's own (`pipeline.build_data` with the run's config).

  Args:
    workdir: a finished run.
    phases: checkpoints to evaluate; None = every phase with a checkpoint.
    budgets: strategy -> budgets (see BUDGET_KNOBS). The other knobs are `search.config`
      defaults, except that completions are as long as the run's `task.completion_len` and
      sampling uses the run's `eval.temperature`.
    verifier: also run best-of-N, beam and MCTS guided by the task's verifier reward (an oracle
      upper bound). Without it, and without a value head in the checkpoint, they rank by the
      policy alone (best-of-N by mean log-prob; beam and MCTS with all values 0).
    num_problems: first N held-out tasks (0 = all of them).
    num_trees: MCTS trees kept per phase and guide (largest MCTS budget, first problems).
    seed: search seed; a run at budget b uses `search.config` seed 1000 * seed + b.
    log: progress lines.

  Returns:
    {'scaling', 'trees', 'outputs'}: the paths written.
  """
  import tempfile

  import ml_collections
  from flax import nnx

  from rlm_jax import configlib
  from rlm_jax import solve
  from rlm_jax import tasks as tasks_lib
  from rlm_jax.search import config as search_config
  from rlm_jax.training import pipeline

  workdir = check_workdir(workdir)
  phases = list(phases) if phases is not None else checkpoint_phases(workdir)
  if not phases:
    raise FileNotFoundError(f'{workdir}/ckpt: no checkpoints to analyse')
  for name in budgets:
    if name not in BUDGET_KNOBS:
      raise ValueError(f"budgets: unknown strategy '{name}' (allowed: {', '.join(BUDGET_KNOBS)})")
  cfg = ml_collections.ConfigDict(_read_json(os.path.join(workdir, 'config.json')))
  run_cfg = configlib.from_config(pipeline.ExperimentConfig, cfg, '')
  rows, trees, outputs = [], [], []
  for phase in phases:
    try:
      tok, graphdef, params = solve.load_policy(cfg, workdir, False, run_cfg.seed, phase)
    except configlib.ConfigError as e:
      raise ValueError(str(e)) from e
    has_value = nnx.merge(graphdef, params).cfg.value_head != 'none'
    _, held = pipeline.build_data(tok, run_cfg.task, run_cfg.eval.size)
    task_list = held.tasks[:num_problems] if num_problems > 0 else held.tasks
    n = len(task_list)
    expected = [tasks_lib.answer_text(t) for t in task_list]
    base = search_config.get_config()
    base.lm.update(completion_tokens=run_cfg.task.completion_len, temperature=run_cfg.eval.temperature)
    base.batch_size = min(base.batch_size, n)
    for name, name_budgets in budgets.items():
      for guide in guides_for(name, has_value, verifier):
        for budget in name_budgets:
          setup = search_setup(base, name, budget, guide, has_value)
          setup = dataclasses.replace(setup, seed=seed * 1000 + budget)
          keep = num_trees if name == 'mcts' and budget == max(name_budgets) else 0
          t0 = time.perf_counter()
          with tempfile.TemporaryDirectory() as tmp:
            tree_file = os.path.join(tmp, 'trees.jsonl') if keep else None
            records = solve.solve(cfg, setup, setup.strategy, task_list, tok, graphdef, params,
                                  trees_path=tree_file)
            kept = []
            if tree_file and os.path.exists(tree_file):
              with open(tree_file) as f:
                kept = [json.loads(line) for _, line in zip(range(keep), f)]
          seconds = time.perf_counter() - t0
          scores = np.asarray([tasks_lib.verify(t, r['output']) for t, r in zip(task_list, records)])
          for i, (t, r) in enumerate(zip(task_list, records)):
            outputs.append({'phase': phase, 'strategy': name, 'budget': budget, 'guide': guide, 'index': i,
                            'level': t['level'], 'problem': t['problem'], 'expected': expected[i],
                            'output': r['output'], 'score': int(scores[i])})
          for i, t in enumerate(kept):
            t.update(phase=phase, strategy=name, budget=budget, guide=guide, score=int(scores[i]),
                     chosen_path=chosen_path(t),  # solve keeps mcts.answer='best_terminal' (default)
                     task={'level': task_list[i]['level'], 'problem': task_list[i]['problem'],
                           'expected': expected[i]})
            trees.append(t)
          rows.append({'phase': phase, 'strategy': name, 'budget': budget, 'guide': guide,
                       'accuracy': float(np.mean(scores == 2)), 'invalid': float(np.mean(scores < 0)),
                       'policy_tokens': float(np.mean([r['policy_tokens'] for r in records])),
                       'model_calls': float(np.mean([r['model_calls'] for r in records])),
                       'num_problems': n, 'seconds': round(seconds, 2)})
          log(f"{phase} {name}={budget} ({guide}): accuracy {rows[-1]['accuracy']:.3f}, "
              f"{rows[-1]['policy_tokens']:.1f} policy tokens/problem, {seconds:.1f}s")
  out_dir = os.path.join(workdir, ANALYSIS_DIR)
  os.makedirs(out_dir, exist_ok=True)
  paths = {k: os.path.join(out_dir, f) for k, f in
           (('scaling', SCALING_FILE), ('trees', TREES_FILE), ('outputs', OUTPUTS_FILE))}
  _write_atomic(paths['scaling'], json.dumps({'version': 1, 'rows': rows}, indent=1))
  _write_atomic(paths['trees'], json.dumps({'version': 1, 'trees': trees}))
  _write_atomic(paths['outputs'], ''.join(json.dumps(r) + '\n' for r in outputs))
  return paths


def _write_atomic(path: str, text: str) -> None:
  with open(path + '.tmp', 'w') as f:
    f.write(text)
  os.replace(path + '.tmp', path)


def run_notebook(path: str | os.PathLike, workdir: str | os.PathLike, *, timeout: int = 600,
                 save_to: str | os.PathLike | None = None):
  """Executes a notebook of notebooks/ against a run (nbclient; RLM_WORKDIR set, Agg backend).

  The kernel starts in the notebook's folder and finds rlm_jax through PYTHONPATH, so the
  repository need not be installed.

  Args:
    path: the .ipynb file.
    workdir: the run directory handed to the notebook.
    timeout: seconds per cell.
    save_to: also write the executed notebook there.

  Returns:
    The executed nbformat NotebookNode; a failing cell raises nbclient's CellExecutionError
    (its message holds the traceback).
  """
  import nbclient
  import nbformat

  path = os.path.abspath(os.fspath(path))
  nb = nbformat.read(path, as_version=4)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {'RLM_WORKDIR': os.path.abspath(os.fspath(workdir)), 'MPLBACKEND': 'Agg',
         'PYTHONPATH': os.pathsep.join(filter(None, [repo, os.environ.get('PYTHONPATH', '')]))}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel process inherits the environment
  try:
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name='python3',
                            resources={'metadata': {'path': os.path.dirname(path)}}).execute()
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  if save_to is not None:
    nbformat.write(nb, os.fspath(save_to))
  return nb


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m rlm_jax.analysis',
      description='Run the search strategies on a finished run and write <workdir>/analysis/.')
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--phases', default='', help="comma-separated, e.g. 'grpo' (default: all)")
  parser.add_argument('--budgets', default='', help="e.g. 'greedy=1;self_consistency=2,4;mcts=4,8'")
  parser.add_argument('--num_problems', type=int, default=0, help='first N held-out tasks (0: all)')
  parser.add_argument('--num_trees', type=int, default=8)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--no_verifier', action='store_true',
                      help='skip the verifier-guided (oracle) runs of best-of-N, beam and MCTS')
  args = parser.parse_args(argv)
  try:
    budgets = parse_budgets(args.budgets) if args.budgets else DEFAULT_BUDGETS
    phases = [p for p in args.phases.split(',') if p] or None
    paths = collect(args.workdir, phases=phases, budgets=budgets, verifier=not args.no_verifier,
                    num_problems=args.num_problems, num_trees=args.num_trees, seed=args.seed)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for p in paths.values():
    print('wrote', p)
  return 0


if __name__ == '__main__':
  sys.exit(main())
