"""matplotlib figures of the `frames` tables and the search trees.

Each `plot_*` / `draw_*` draws on an Axes it is given (except `plot_curves`, which makes its own
grid) and returns nothing else; pyplot is imported only where a figure is created, so the
library imports without choosing a backend.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib as mpl
import numpy as np
import pandas as pd

from rlm_jax.analysis import files
from rlm_jax.analysis import frames
from rlm_jax.analysis import trees as trees_lib

# Panels of the training-curve figure per phase-2 algorithm (other phases: every metric).
RL_PANELS = {'grpo': ['reward', 'accuracy', 'kl', 'entropy', 'completion_length', 'truncated',
                      ('clip_low', 'clip_high', 'clip_region'), 'ratio_mean', ('solve_all', 'solve_none'),
                      'invalid', 'loss', 'grad_norm']}

# ------------------------------------------------------------------------------------------
# Training curves and held-out results.


def plot_curves(curves: pd.DataFrame, panels: Sequence[str | Sequence[str]], *, smoothing: float = 0.6,
                title: str = '', ncols: int = 4):
  """A grid of training curves: raw values faint, `frames.smooth`ed values on top.

  Args:
    curves: a `frames.phase_curves` frame (index: step).
    panels: one metric name per panel, or a tuple of names sharing a panel (e.g. clip
      fractions); names the run did not log are left out.
    smoothing: EMA weight of `frames.smooth`.
    title: figure title.
    ncols: panels per row.

  Returns:
    The matplotlib Figure.
  """
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
      ax.plot(curves.index[ok], frames.smooth(y, smoothing)[ok], color=color, lw=1.6, label=name)
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
  """Held-out accuracy per strategy (bars), one bar per phase (a `frames.results_table` frame)."""
  acc = results[(results.metric == 'accuracy') & results.level.isna()]
  table = acc.pivot_table(index='strategy', columns='phase', values='value', sort=False)
  phases = files.phases_in(table.columns)
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


def draw_tree(ax, tree: Mapping, path: Sequence[int] | None = None, label_max_nodes: int = 60) -> None:
  """Draws a search tree on a matplotlib Axes.

  Node area grows with visits, colour is q (red -1 .. green +1, grey where q is unknown),
  terminal nodes are squares, the chosen path is drawn thick in blue. With at most
  `label_max_nodes` nodes every node is labelled '#id N=visits q=..' on its right.
  """
  path = trees_lib.chosen_path(tree) if path is None else list(path)
  lay = trees_lib.tree_layout(tree)
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
  q = np.asarray([trees_lib.node_q(n) for n in nodes])
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
  path = trees_lib.chosen_path(tree) if path is None else list(path)
  table = frames.node_table(tree, path[1:] or path)  # the root holds no step
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


# ------------------------------------------------------------------------------------------
# Verifier outcomes.


def plot_level_accuracy(ax, table: pd.DataFrame) -> None:
  """Grouped bars of a `frames.level_accuracy` table: one group per level (and 'all'), one bar
  per run."""
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
  """Stacked horizontal bars of a `frames.score_table`: the share of each verifier outcome per row."""
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
