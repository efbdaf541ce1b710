"""rlm_jax.analysis.plots: what each figure draws (lines, bars, table cells, legend), read back
from the matplotlib artists."""
import os

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from rlm_jax.analysis import files  # noqa: E402
from rlm_jax.analysis import frames  # noqa: E402
from rlm_jax.analysis import plots  # noqa: E402
from rlm_jax.analysis import trees  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'search', 'golden', 'mcts_toy.json')


def test_plot_curves_leaves_out_unlogged_names():
  curves = pd.DataFrame({'loss': [3.0, 2.0, 1.0]}, index=pd.Index([0, 1, 2], name='step'))
  fig = plots.plot_curves(curves, ['loss', 'nope', ('token_accuracy',)], smoothing=0.5)
  panels = [a for a in fig.axes if a.get_visible() and a.lines]
  assert len(panels) == 1
  raw, smoothed = panels[0].lines
  np.testing.assert_allclose(raw.get_ydata(), [3.0, 2.0, 1.0])
  np.testing.assert_allclose(smoothed.get_ydata(), frames.smooth([3.0, 2.0, 1.0], 0.5))
  plt.close(fig)
  with pytest.raises(ValueError, match='none of'):
    plots.plot_curves(curves, ['nope'])


def test_draw_tree_and_path_table(hand):
  tree = files.load_trees(GOLDEN)[0]
  path = trees.chosen_path(tree)
  fig, ax = plt.subplots()
  plots.draw_tree(ax, tree, path)
  thick = [l for l in ax.lines if l.get_linewidth() == 3.0]
  assert len(thick) == len(path) - 1 and len(ax.lines) == len(tree['nodes']) - 1
  plt.close(fig)
  fig, ax = plt.subplots()
  plots.draw_path_table(ax, hand)  # chosen path 0 -> 1 -> 4: one row per step, root left out
  cells = ax.tables[0].get_celld()
  assert [cells[r, 0].get_text().get_text() for r in (1, 2)] == ['1', '4']
  assert [cells[r, 4].get_text().get_text() for r in (1, 2)] == ['a=1\\n\\n', 'Answer: 1']
  assert cells[2, 3].get_text().get_text() == '+1.00' and cells[1, 3].get_text().get_text() == ''
  plt.close(fig)


def test_plot_scaling_one_line_per_label():
  rows = [{'phase': 'grpo', 'strategy': 'greedy', 'budget': 1, 'guide': 'policy', 'accuracy': 0.4,
           'policy_tokens': 20.0, 'num_problems': 100},
          {'phase': 'grpo', 'strategy': 'mcts', 'budget': 8, 'guide': 'verifier', 'accuracy': 0.9,
           'policy_tokens': 300.0, 'num_problems': 100},
          {'phase': 'grpo', 'strategy': 'mcts', 'budget': 4, 'guide': 'verifier', 'accuracy': 0.7,
           'policy_tokens': 150.0, 'num_problems': 100},
          {'phase': 'sft', 'strategy': 'greedy', 'budget': 1, 'guide': 'policy', 'accuracy': 0.3,
           'policy_tokens': 25.0}]
  fig, ax = plt.subplots()
  plots.plot_scaling(ax, frames.scaling_table(rows), 'grpo')
  assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ['greedy', 'mcts (verifier)']
  # Data lines (error-bar caps are marker-only lines): the verifier is an oracle, dashed.
  data = {l.get_linestyle(): l for l in ax.lines if l.get_linestyle() not in ('None', None)}
  assert sorted(data) == ['-', '--']
  np.testing.assert_allclose(np.asarray(data['--'].get_xdata(), float), [150.0, 300.0])  # sorted by tokens
  np.testing.assert_allclose(np.asarray(data['--'].get_ydata(), float), [0.7, 0.9])
  np.testing.assert_allclose(np.asarray(data['-'].get_ydata(), float), [0.4])
  plt.close(fig)


def test_level_and_score_bars_show_the_table():
  outputs = pd.DataFrame({'strategy': ['greedy'] * 4, 'budget': [1] * 4, 'level': [1, 1, 2, 2],
                          'score': [2, 2, -1, 2]})
  levels = frames.level_accuracy(outputs)
  fig, (ax1, ax2) = plt.subplots(1, 2)
  plots.plot_level_accuracy(ax1, levels)
  assert [p.get_height() for p in ax1.patches] == [1.0, 0.5, 0.75]  # level 1, level 2, all
  assert [t.get_text() for t in ax1.get_xticklabels()] == ['level 1', 'level 2', 'all']
  plots.plot_score_breakdown(ax2, frames.score_table(outputs, by=('strategy',)))
  # Stacked: invalid .25 from 0, wrong 0 from .25, partial 0 from .25, solved .75 from .25.
  assert [(p.get_x(), p.get_width()) for p in ax2.patches] == [(0.0, 0.25), (0.25, 0.0), (0.25, 0.0), (0.25, 0.75)]
  plt.close(fig)


def test_plot_eval_one_bar_per_phase():
  results = frames.results_table({'sft': {'greedy/accuracy': 0.5, 'greedy/accuracy_level1': 0.75},
                                  'rl': {'greedy/accuracy': 0.625}})
  fig, ax = plt.subplots()
  plots.plot_eval(ax, results)
  assert [p.get_height() for p in ax.patches] == [0.5, 0.625]  # sft before rl, levels left out
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ['SFT', 'RL']
  plt.close(fig)
