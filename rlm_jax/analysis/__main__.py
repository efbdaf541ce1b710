"""Runs the search strategies on a finished run and writes `<workdir>/analysis/`.

  python -m rlm_jax.analysis --workdir=runs/main [--phases=grpo] \\
      [--budgets='greedy=1;self_consistency=2,4;mcts=4,8'] [--num_problems=100] [--no_verifier]

Writes scaling.json, trees.json and outputs.jsonl (formats in `rlm_jax.analysis.files`) and
prints one progress line per (phase, strategy, guide, budget). A bad flag, budget or run
directory is one line on stderr (`error: ...`, exit status 2).
"""
from absl import flags

from rlm_jax import analysis
from rlm_jax import configlib

_WORKDIR = flags.DEFINE_string('workdir', None, 'A finished `python -m rlm_jax.main` run.')
_PHASES = flags.DEFINE_list('phases', [], "Checkpoints to search, e.g. 'grpo' (default: all).")
_BUDGETS = flags.DEFINE_string('budgets', '', "e.g. 'greedy=1;self_consistency=2,4;mcts=4,8' "
                               '(default: analysis.DEFAULT_BUDGETS).')
_NUM_PROBLEMS = flags.DEFINE_integer('num_problems', 0, 'First N held-out tasks (0: all).')
_NUM_TREES = flags.DEFINE_integer('num_trees', 8, 'MCTS trees kept per phase and guide.')
_SEED = flags.DEFINE_integer('seed', 0, 'Search seed.')
_NO_VERIFIER = flags.DEFINE_bool('no_verifier', False,
                                 'Skip the verifier-guided (oracle) runs of best-of-N, beam and MCTS.')


def main(argv):
  if len(argv) > 1:
    raise configlib.ConfigError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _WORKDIR.value:
    raise configlib.ConfigError('--workdir is required (a finished `python -m rlm_jax.main` run)')
  try:
    budgets = analysis.parse_budgets(_BUDGETS.value) if _BUDGETS.value else analysis.DEFAULT_BUDGETS
    found = analysis.collect(_WORKDIR.value, phases=_PHASES.value or None, budgets=budgets,
                             verifier=not _NO_VERIFIER.value, num_problems=_NUM_PROBLEMS.value,
                             num_trees=_NUM_TREES.value, seed=_SEED.value)
  except (ValueError, FileNotFoundError) as e:
    raise configlib.ConfigError(str(e)) from e
  for path in analysis.write_analysis(_WORKDIR.value, *found).values():
    print('wrote', path)


if __name__ == '__main__':
  configlib.run_main(main)
