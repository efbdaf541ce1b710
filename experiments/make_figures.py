"""Regenerates the README's result figures from a finished run of the default experiment.

  python -m rlm_jax.main --config=configs/main.py --workdir=runs/main
  python experiments/make_figures.py --workdir=runs/main

1. Runs the search strategies on the run's checkpoints (`python -m rlm_jax.analysis`), unless
   `<workdir>/analysis/` is already complete (`--recollect` forces it).
2. Executes the four notebooks of notebooks/ against the run; they write `<workdir>/figures/`.
   The executed notebooks are kept in `<workdir>/notebooks/`.
3. Copies the PNGs to notebooks/figures/ (`--out`) and prints the tables for the README.
"""
import argparse
import glob
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from a checkout without installing the package

from rlm_jax import analysis  # noqa: E402

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, 'notebooks', '0*.ipynb')))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='a finished `python -m rlm_jax.main` run')
  parser.add_argument('--out', default=os.path.join(REPO, 'notebooks', 'figures'))
  parser.add_argument('--recollect', action='store_true', help='rerun the search strategies')
  parser.add_argument('--budgets', default='', help="as `python -m rlm_jax.analysis --budgets`")
  parser.add_argument('--num_problems', type=int, default=0, help='held-out tasks searched (0: all)')
  args = parser.parse_args(argv)

  workdir = analysis.check_workdir(args.workdir)
  if args.recollect or not all(map(os.path.exists, analysis.analysis_paths(workdir).values())):
    t0 = time.perf_counter()
    budgets = analysis.parse_budgets(args.budgets) if args.budgets else analysis.DEFAULT_BUDGETS
    analysis.write_analysis(workdir, *analysis.collect(workdir, budgets=budgets, num_problems=args.num_problems))
    print(f'search strategies: {time.perf_counter() - t0:.0f}s')
  executed = os.path.join(workdir, 'notebooks')
  os.makedirs(executed, exist_ok=True)
  for nb in NOTEBOOKS:
    t0 = time.perf_counter()
    analysis.run_notebook(nb, workdir, save_to=os.path.join(executed, os.path.basename(nb)))
    print(f'{os.path.basename(nb)}: {time.perf_counter() - t0:.0f}s')
  os.makedirs(args.out, exist_ok=True)
  for png in sorted(glob.glob(os.path.join(workdir, analysis.FIGURES_DIR, '*.png'))):
    shutil.copy(png, args.out)
    print('figure', os.path.relpath(os.path.join(args.out, os.path.basename(png))))

  results = analysis.eval_accuracy(analysis.results_table(analysis.load_results(workdir)))
  print('\nHeld-out accuracy (results.json):\n')
  print(analysis.markdown_table(results.reset_index().rename(columns=str)))
  scaling = analysis.load_scaling(workdir)
  cols = ['phase', 'label', 'budget', 'accuracy', 'accuracy_se', 'policy_tokens', 'tokens_x']
  print('\nTest-time compute (analysis/scaling.json):\n')
  print(analysis.markdown_table(scaling[cols]))
  return 0


if __name__ == '__main__':
  sys.exit(main())
