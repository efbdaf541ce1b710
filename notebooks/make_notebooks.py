"""Writes the analysis notebooks of this folder (the .ipynb files are generated; edit them here).

  python notebooks/make_notebooks.py

Every notebook takes the run directory in its first cell (tagged 'parameters' for papermill;
the environment variable RLM_WORKDIR overrides the default), imports `rlm_jax.analysis` for all
logic and saves its figures as PNGs in `<workdir>/figures/`. Notebooks 02-04 read
`<workdir>/analysis/`, written by `python -m rlm_jax.analysis --workdir=<workdir>`.
"""
import os

import nbformat
from nbformat import v4

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_WORKDIR = '../runs/main'  # relative to this folder: the README's quickstart run


def _params(extra: str = '') -> nbformat.NotebookNode:
  src = ("import os\n\n"
         f"# A finished `python -m rlm_jax.main --workdir=...` run.\n"
         f"workdir = os.environ.get('RLM_WORKDIR', '{DEFAULT_WORKDIR}')\n" + extra)
  return v4.new_code_cell(src, metadata={'tags': ['parameters']})


def _notebook(title: str, intro: str, cells: list, params: str = '') -> nbformat.NotebookNode:
  nb = v4.new_notebook()
  nb.cells = [_params(params), v4.new_markdown_cell(f'# {title}\n\n{intro}')]
  for c in cells:
    nb.cells.append(v4.new_markdown_cell(c[3:]) if c.startswith('md:') else v4.new_code_cell(c.strip()))
  for i, cell in enumerate(nb.cells):
    cell.id = f'cell-{i}'  # stable ids: regenerating gives the same files
  nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
  nb.metadata['language_info'] = {'name': 'python'}
  return nb


SETUP = """
import matplotlib.pyplot as plt
import pandas as pd

from rlm_jax import analysis

workdir = analysis.check_workdir(workdir)
figures = analysis.figures_dir(workdir)
pd.set_option('display.max_colwidth', 120)
"""

CURVES = _notebook(
    'Training curves',
    'SFT and GRPO metrics of one run (`<workdir>/metrics.jsonl`), smoothed as in TensorBoard, and '
    'the held-out accuracy after each phase (`results.json`).',
    [SETUP + "metrics = analysis.load_metrics(workdir)\nanalysis.phases_in(c.split('/')[0] for c in metrics.columns)",
     "md:## Phase 1: SFT",
     """
sft = analysis.phase_curves(metrics, 'sft')
fig = analysis.plot_curves(sft, ['loss', 'token_accuracy', 'grad_norm'], smoothing=smoothing, title='SFT')
fig.savefig(f'{figures}/training_sft.png', dpi=120)
""",
     "md:## Phase 2: RL\n\nFor GRPO: reward and accuracy of the sampled groups, KL to the reference, "
     "policy entropy, completion lengths, the share of truncated completions, and the fraction of "
     "tokens whose ratio was clipped (low, high, either).",
     """
phases = analysis.phases_in(c.split('/')[0] for c in metrics.columns)
for phase in [p for p in phases if p not in ('sft', 'eval')]:
  curves = analysis.phase_curves(metrics, phase)
  panels = analysis.RL_PANELS.get(phase, list(curves.columns))
  fig = analysis.plot_curves(curves, panels, smoothing=smoothing, title=phase.upper())
  fig.savefig(f'{figures}/training_{phase}.png', dpi=120)
""",
     "md:## Held-out accuracy",
     """
results = analysis.results_table(analysis.load_results(workdir))
fig, ax = plt.subplots(figsize=(5, 3.2))
analysis.plot_eval(ax, results)
fig.tight_layout()
fig.savefig(f'{figures}/eval_accuracy.png', dpi=120)
analysis.eval_accuracy(results)
"""],
    params='smoothing = 0.6  # EMA weight, 0 = raw\n')

TREE = _notebook(
    'MCTS tree viewer',
    'One search tree of `<workdir>/analysis/trees.json`: node area = visits, colour = q, squares '
    '= terminal steps, the chosen answer path in blue. The table lists the steps of that path.',
    [SETUP + """
trees = analysis.load_trees(workdir)
trees = [t for t in trees if guide is None or t.get('guide') == guide] or trees
i = analysis.pick_tree(trees) if tree_index is None else tree_index
tree = trees[i]
path = analysis.chosen_path(tree)
print(f"tree {i} of {len(trees)} ({tree.get('phase')}, {tree.get('strategy')} {tree.get('budget')}, "
      f"guide {tree.get('guide')}): "
      f"{len(tree['nodes'])} nodes, verifier score of the answer: {tree.get('score')}")
tree.get('task')
""",
     """
width = min(4 + 0.4 * len(tree['nodes']), 16)
fig, (ax, ax_steps) = plt.subplots(2, 1, figsize=(width, 6.5), height_ratios=[3, 1])
analysis.draw_tree(ax, tree, path)
task = tree.get('task', {})
ax.set_title(f"{task.get('problem', tree.get('prompt', ''))}   (expected: {task.get('expected', '?')})", fontsize=10)
analysis.draw_path_table(ax_steps, tree, path)
fig.tight_layout()
fig.savefig(f'{figures}/mcts_tree.png', dpi=120)
""",
     "md:## Steps of the chosen path",
     "analysis.node_table(tree, path)",
     "md:## All nodes",
     "analysis.node_table(tree)"],
    params="guide = 'verifier'  # trees of this guide if any ('policy', 'value', 'verifier', None: all)\n"
           'tree_index = None  # None: the largest solved tree\n')

SCALING = _notebook(
    'Test-time compute scaling',
    'Held-out accuracy against policy tokens spent per problem, per strategy and budget '
    '(`<workdir>/analysis/scaling.json`), with one standard error. Solid lines use the policy '
    'alone (samples, majority votes, log-probs, priors; or a value head when the run has one). '
    'Dashed lines rank candidates with the ground-truth verifier: an oracle upper bound on what '
    'a learned verifier could add, not a deployable strategy.',
    [SETUP + """
scaling = analysis.load_scaling(workdir)
scaling[['phase', 'label', 'budget', 'accuracy', 'accuracy_se', 'invalid', 'policy_tokens', 'tokens_x',
         'model_calls', 'seconds']]
""",
     """
phases = analysis.phases_in(scaling.phase)
fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases) + 2, 4), squeeze=False, sharey=True)
for j, (ax, phase) in enumerate(zip(axes[0], phases)):
  analysis.plot_scaling(ax, scaling, phase, legend='right' if j == len(phases) - 1 else 'none')
  ax.set_title(f'after {phase.upper()}' if phase else '')
fig.tight_layout()
fig.savefig(f'{figures}/scaling.png', dpi=120)
""",
     "md:## Best accuracy within a token budget\n\nPer strategy, the best budget that spends at "
     "most `budget_x` times the tokens of greedy decoding.",
     """
greedy_tokens = scaling[scaling.strategy == 'greedy'].policy_tokens.max()
analysis.best_within(scaling, budget_x * greedy_tokens)[['budget', 'accuracy', 'accuracy_se', 'policy_tokens', 'tokens_x']]
"""],
    params='budget_x = 8  # token budget, in multiples of greedy decoding\n')

ERRORS = _notebook(
    'Verifier error analysis',
    'How outputs fail: accuracy per difficulty level, the share of invalid / wrong / partial / '
    'solved outputs (`rlm_jax.tasks.verify`: -1 / 0 / 1 / 2), and examples. Records: '
    '`<workdir>/analysis/outputs.jsonl`.',
    [SETUP + """
outputs = analysis.load_outputs(workdir)
phase = phase or analysis.phases_in(outputs.phase)[-1]
recs = analysis.at_largest_budget(outputs[outputs.phase == phase])
print(f'{phase}: {len(recs)} outputs, strategies {sorted(set(recs.strategy))}')
""",
     "md:## Accuracy per level and verifier outcomes",
     """
levels = analysis.level_accuracy(recs)
scores = analysis.score_table(analysis.add_run_labels(recs), by=('run',))
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.8))
analysis.plot_level_accuracy(ax1, levels)
analysis.plot_score_breakdown(ax2, scores)
fig.tight_layout()
fig.savefig(f'{figures}/verifier_levels.png', dpi=120)
levels
""",
     "analysis.score_table(analysis.add_run_labels(recs), by=('run', 'level'))",
     "md:## Outcomes per phase (largest budget of each strategy)",
     "analysis.score_table(analysis.add_run_labels(analysis.at_largest_budget(outputs)), by=('run', 'phase'))",
     "md:## Per-level accuracy of the training-time evaluation (`results.json`)",
     """
analysis.eval_accuracy(analysis.results_table(analysis.load_results(workdir)))
""",
     "md:## Invalid outputs (no parsable answer)",
     "analysis.error_examples(recs, 'invalid', n=num_examples)",
     "md:## Wrong answers",
     "analysis.error_examples(recs, 'wrong', n=num_examples)"],
    params="phase = None  # None: the last phase analysed\nnum_examples = 6\n")

NOTEBOOKS = {
    '01_training_curves.ipynb': CURVES,
    '02_mcts_tree.ipynb': TREE,
    '03_test_time_scaling.ipynb': SCALING,
    '04_verifier_errors.ipynb': ERRORS,
}


def main():
  for name, nb in NOTEBOOKS.items():
    nbformat.validate(nb)
    nbformat.write(nb, os.path.join(HERE, name))
    print('wrote', os.path.join(HERE, name))


if __name__ == '__main__':
  main()
