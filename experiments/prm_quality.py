"""How good is a run's value model / PRM, and at what: ranking problems or ranking solutions?

  python experiments/prm_quality.py --workdir=runs/blueprint/seed0 [--workdir=RUN2 ...]

For each run folder (config.json + checkpoints, with a trained value model), on the solver-
labelled held-out traces of `experiment.value_phase.prm_quality` (each held-out problem's
solution, right at every step, and one corrupted copy, wrong from the corrupted step on), it
prints the pooled step AUROC, the within-problem AUROC (only (right, wrong) step pairs of the
same problem: what best-of-N, beam search and MCTS need) and the mean predicted P(correct) by
problem level for right and corrupted traces. A value model that has learnt how hard each
problem is, but not which solution is right, has a high spread across levels, the same mean
for right and corrupted traces, and a within-problem AUROC near 0.5.
"""

from __future__ import annotations

import argparse

import numpy as np

from rlm_jax.experiment import models as models_lib
from rlm_jax.experiment import runner
from rlm_jax.experiment import value_phase


def level_table(exp, value, max_problems: int = 256) -> list[tuple[int, int, float, float]]:
  """(level, traces, mean P(correct) of right traces, of corrupted traces) per level."""
  records, p_NxL, rows = value_phase.held_out_predictions(exp, value, max_problems)
  tasks = [t for t in exp.held.tasks if t.get('steps')][:max_problems]  # what record['task'] indexes
  tmask_NxL = np.asarray(rows['target_mask']) > 0
  trace_p = np.array([p_NxL[i][tmask_NxL[i]].mean() if tmask_NxL[i].any() else np.nan for i in range(len(records))])
  level = np.array([tasks[r['task']].get('level', 0) for r in records])
  right = np.array([r['first_error'] < 0 for r in records])
  out = []
  for lv in sorted(set(level.tolist())):
    sel = level == lv
    out.append((lv, int(sel.sum()), float(np.nanmean(trace_p[sel & right])), float(np.nanmean(trace_p[sel & ~right]))))
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--workdir', action='append', required=True, help='a run folder (repeatable)')
  ap.add_argument('--max_problems', type=int, default=256)
  args = ap.parse_args(argv)
  print('| run | step AUROC | within-problem AUROC | accuracy | mean P(correct) by level: right / corrupted |')
  print('|---|---|---|---|---|')
  for wd in args.workdir:
    run = models_lib.load_run(wd)
    if run.value is None:
      print(f'| {wd} | no value model | | | |')
      continue
    exp = runner.Experiment(run.cfg, wd)  # reads data only: nothing in the folder is written
    q = value_phase.prm_quality(exp, run.value, args.max_problems)
    levels = ', '.join(f'L{lv}: {a:.2f} / {b:.2f}' for lv, _, a, b in level_table(exp, run.value, args.max_problems))
    print(f"| {wd} | {q['prm/auroc']:.3f} | {q['prm/auroc_within']:.3f} | {q['prm/accuracy']:.3f} | {levels} |")


if __name__ == '__main__':
  main()
