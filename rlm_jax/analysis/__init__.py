"""Analysis of finished runs, for the notebooks: curves, search trees, test-time scaling, errors.

  files     the run folder's files: names, formats (its docstring), validation, reading, writing
  frames    pandas tables: curves, results, tree nodes, scaling, verifier outcomes
  trees     search-tree structure: children, the answer's path, drawing layout
  plots     matplotlib figures of those tables and trees
  collect   runs the search strategies on a run's checkpoints and returns ROWs/TREEs/OUTPUTs
  notebook  executes the notebooks of notebooks/

  python -m rlm_jax.analysis --workdir=W   # collect + files.write_analysis -> W/analysis/

Everything runs on host; jax is imported only when `collect` runs.
"""
from rlm_jax.analysis.collect import BUDGET_KNOBS
from rlm_jax.analysis.collect import checkpoint_phases
from rlm_jax.analysis.collect import collect
from rlm_jax.analysis.collect import Collected
from rlm_jax.analysis.collect import DEFAULT_BUDGETS
from rlm_jax.analysis.collect import guides_for
from rlm_jax.analysis.collect import parse_budgets
from rlm_jax.analysis.collect import search_setup
from rlm_jax.analysis.files import analysis_paths
from rlm_jax.analysis.files import ANALYSIS_DIR
from rlm_jax.analysis.files import check_workdir
from rlm_jax.analysis.files import FIGURES_DIR
from rlm_jax.analysis.files import figures_dir
from rlm_jax.analysis.files import load_results
from rlm_jax.analysis.files import load_trees
from rlm_jax.analysis.files import OUTPUTS_FILE
from rlm_jax.analysis.files import PHASE_ORDER
from rlm_jax.analysis.files import phases_in
from rlm_jax.analysis.files import read_metrics
from rlm_jax.analysis.files import read_outputs
from rlm_jax.analysis.files import read_scaling
from rlm_jax.analysis.files import SCALING_FILE
from rlm_jax.analysis.files import SCORE_NAMES
from rlm_jax.analysis.files import TREES_FILE
from rlm_jax.analysis.files import validate_tree
from rlm_jax.analysis.files import write_analysis
from rlm_jax.analysis.frames import add_run_labels
from rlm_jax.analysis.frames import at_largest_budget
from rlm_jax.analysis.frames import best_within
from rlm_jax.analysis.frames import error_examples
from rlm_jax.analysis.frames import eval_accuracy
from rlm_jax.analysis.frames import level_accuracy
from rlm_jax.analysis.frames import load_metrics
from rlm_jax.analysis.frames import load_outputs
from rlm_jax.analysis.frames import load_scaling
from rlm_jax.analysis.frames import markdown_table
from rlm_jax.analysis.frames import node_table
from rlm_jax.analysis.frames import phase_curves
from rlm_jax.analysis.frames import results_table
from rlm_jax.analysis.frames import run_label
from rlm_jax.analysis.frames import scaling_table
from rlm_jax.analysis.frames import score_table
from rlm_jax.analysis.frames import smooth
from rlm_jax.analysis.notebook import run_notebook
from rlm_jax.analysis.plots import draw_path_table
from rlm_jax.analysis.plots import draw_tree
from rlm_jax.analysis.plots import plot_curves
from rlm_jax.analysis.plots import plot_eval
from rlm_jax.analysis.plots import plot_level_accuracy
from rlm_jax.analysis.plots import plot_scaling
from rlm_jax.analysis.plots import plot_score_breakdown
from rlm_jax.analysis.plots import RL_PANELS
from rlm_jax.analysis.trees import children_of
from rlm_jax.analysis.trees import chosen_path
from rlm_jax.analysis.trees import pick_tree
from rlm_jax.analysis.trees import tree_layout
from rlm_jax.analysis.trees import TreeLayout
