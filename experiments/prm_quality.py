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

With `--samples=N` it also asks what search needs directly: does the PRM rank the policy's
own solutions? For each held-out problem it samples N completions from the run's policy (at
the run's `eval.temperature`), checks each with the task's verifier, and scores it with the
PRM (P(correct) at the final token, and the minimum over step ends). Printed: the samples'
accuracy, pass@N (some sample right: what a perfect ranker reaches), best-of-N accuracy under
each score, and each score's within-problem AUROC against the verifier. A PRM can separate
solver corruptions well (the first table) and still not rank these (the second). Where the
task has a step checker (`tasks.check_steps`, e.g. Countdown) each sampled step is also
labelled exactly, and the third table gives the PRM's step AUROC on the policy's own steps
(pooled, within a problem, at the first step only) and where the samples first go wrong.
"""

from __future__ import annotations

import argparse

import numpy as np

from rlm_jax import tasks as tasks_lib
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


def policy_ranking(exp, policy, value, num_samples: int, max_problems: int, seed: int = 0) -> dict:
  """How the PRM ranks `num_samples` policy samples per held-out problem (module docstring).

  Returns:
    {'samples', 'sample_accuracy', 'pass_at_n', 'best_of_n_last', 'best_of_n_min',
    'auroc_within_last', 'auroc_within_min'}.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from rlm_jax.data.steps import StepEnds  # pylint: disable=g-import-not-at-top
  from rlm_jax.experiment import data as data_lib  # pylint: disable=g-import-not-at-top
  from rlm_jax.sampling.sampler import SamplingConfig, sample  # pylint: disable=g-import-not-at-top
  from rlm_jax.training import value as value_lib  # pylint: disable=g-import-not-at-top
  cfg, tok, n = exp.cfg, exp.tok, num_samples
  tasks = exp.held.tasks[:max_problems]
  (pgd, pparams), (vgd, vparams) = policy, value
  head = nnx.merge(vgd, vparams).cfg.value_head
  scfg = SamplingConfig(max_new_tokens=cfg.task.completion_len, eos_id=tok.eos_id, pad_id=tok.pad_id,
                        step_id=tok.step_id, temperature=cfg.eval.temperature)
  ends = StepEnds.of(tok)

  @jax.jit
  def scores(prompt, prompt_mask, key):
    out = sample(pgd, pparams, prompt, prompt_mask, key, scfg, num_samples=n)
    t = out.tokens_BxT.shape[1]
    comp_mask = jnp.arange(t)[None] < out.lengths_B[:, None]
    seq = jnp.concatenate([jnp.repeat(prompt, n, axis=0), out.tokens_BxT], axis=1)
    mask = jnp.concatenate([jnp.repeat(prompt_mask, n, axis=0), comp_mask], axis=1)
    p = value_lib.prob_correct(value_lib.predict(vgd, vparams, seq, mask), head)[:, prompt.shape[1]:]
    last = jnp.take_along_axis(p, jnp.maximum(out.lengths_B - 1, 0)[:, None], axis=1)[:, 0]
    closing = ends.mask(out.tokens_BxT, comp_mask) | (comp_mask & (out.tokens_BxT == tok.eos_id))
    return out.tokens_BxT, out.lengths_B, last, jnp.min(jnp.where(closing, p, 1.0), axis=1), p, closing

  size = cfg.eval.batch_size
  checker = all(tasks_lib.has_step_checker(t) for t in tasks)
  right, last, low, steps = [], [], [], []
  for c, lo in enumerate(range(0, len(tasks), size)):
    idx = np.arange(lo, lo + size) % len(tasks)  # fixed shape: the last chunk wraps around
    real = min(size, len(tasks) - lo)
    toks, lens, s_last, s_min, p_RxT, closing_RxT = jax.device_get(scores(
        jnp.asarray(exp.held.prompt[idx]), jnp.asarray(exp.held.prompt_mask[idx]),
        jax.random.fold_in(jax.random.key(seed), c)))
    for r in range(real * n) if checker else ():  # (problem, step index, P at its end, checker label)
      ends_K = np.flatnonzero(closing_RxT[r])
      labels = value_phase.step_labels(tok, tasks[idx[r // n]], np.asarray(toks[r]), ends_K)
      steps += [(lo + r // n, k, float(p_RxT[r, e]), y) for k, (e, y) in enumerate(zip(ends_K, labels))]
    ok = data_lib.host_scorer(tok, [tasks[i] for i in idx[:real]], n)(np.asarray(toks)[:real * n],
                                                                      np.asarray(lens)[:real * n]) == 2
    right.append(ok)
    last.append(np.asarray(s_last)[:real * n])
    low.append(np.asarray(s_min)[:real * n])
  out = ranking_metrics(np.concatenate(right).reshape(-1, n), np.concatenate(last).reshape(-1, n),
                        np.concatenate(low).reshape(-1, n))
  if steps:
    out.update(step_metrics(*map(np.asarray, zip(*steps)), samples=len(tasks) * n))
  return out


def step_metrics(problem_M, step_M, p_M, label_M, samples: int) -> dict:
  """The PRM on M sampled steps with exact labels: pooled, within-problem and first-step AUROC,
  and the share of the `samples` traces whose first wrong step is step 1, 2 or later."""
  from rlm_jax.training import prm_metrics  # pylint: disable=g-import-not-at-top
  y = np.asarray(label_M) > 0
  first = step_M == 0
  # A trace's labels are 1 up to its first wrong step, then 0: count each trace's first 0.
  wrong_first = (~y) & (np.concatenate([[True], (step_M[1:] == 0) | y[:-1]]))
  share = lambda k: float(np.sum(wrong_first & (step_M == k)) / samples)
  return {'step_auroc': prm_metrics.auroc(p_M, y), 'step_auroc_within': prm_metrics.grouped_auroc(p_M, y, problem_M),
          'step1_auroc': prm_metrics.auroc(p_M[first], y[first]), 'first_wrong_step1': share(0),
          'first_wrong_step2': share(1), 'first_wrong_later': float(np.sum(wrong_first & (step_M >= 2)) / samples)}


def ranking_metrics(right_PxN, last_PxN, min_PxN) -> dict:
  """`policy_ranking`'s numbers from P problems x N samples: verdicts and the two PRM scores
  (best-of-N takes the first of tied maxima)."""
  from rlm_jax.training import prm_metrics  # pylint: disable=g-import-not-at-top
  right_PxN = np.asarray(right_PxN, bool)
  p, n = right_PxN.shape
  groups = np.repeat(np.arange(p), n)
  pick = lambda s: float(right_PxN[np.arange(p), np.argmax(s, axis=1)].mean())
  return {'samples': n, 'sample_accuracy': float(right_PxN.mean()), 'pass_at_n': float(right_PxN.any(1).mean()),
          'best_of_n_last': pick(last_PxN), 'best_of_n_min': pick(min_PxN),
          'auroc_within_last': prm_metrics.grouped_auroc(np.ravel(last_PxN), right_PxN.ravel(), groups),
          'auroc_within_min': prm_metrics.grouped_auroc(np.ravel(min_PxN), right_PxN.ravel(), groups)}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--workdir', action='append', required=True, help='a run folder (repeatable)')
  ap.add_argument('--max_problems', type=int, default=256)
  ap.add_argument('--samples', type=int, default=0, help='also rank N policy samples per problem (0: skip)')
  args = ap.parse_args(argv)
  print('| run | step AUROC | within-problem AUROC | accuracy | mean P(correct) by level: right / corrupted |')
  print('|---|---|---|---|---|')
  ranked = []
  for wd in args.workdir:
    run = models_lib.load_run(wd)
    if run.value is None:
      print(f'| {wd} | no value model | | | |')
      continue
    exp = runner.Experiment(run.cfg, wd)  # reads data only: nothing in the folder is written
    q = value_phase.prm_quality(exp, run.value, args.max_problems)
    levels = ', '.join(f'L{lv}: {a:.2f} / {b:.2f}' for lv, _, a, b in level_table(exp, run.value, args.max_problems))
    print(f"| {wd} | {q['prm/auroc']:.3f} | {q['prm/auroc_within']:.3f} | {q['prm/accuracy']:.3f} | {levels} |")
    if args.samples:
      ranked.append((wd, policy_ranking(exp, run.policy, run.value, args.samples, args.max_problems)))
  if ranked:
    n = args.samples
    print(f'\nThe policy\'s own samples ({n} per held-out problem, verifier-checked), ranked by the PRM:\n')
    print(f'| run | sample accuracy | pass@{n} | best-of-{n}, final-token P | best-of-{n}, min over steps | '
          'within-problem AUROC, final / min |')
    print('|---|---|---|---|---|---|')
    for wd, r in ranked:
      print(f"| {wd} | {r['sample_accuracy']:.3f} | {r['pass_at_n']:.3f} | {r['best_of_n_last']:.3f} | "
            f"{r['best_of_n_min']:.3f} | {r['auroc_within_last']:.3f} / {r['auroc_within_min']:.3f} |")
    checked = [(wd, r) for wd, r in ranked if 'step_auroc' in r]
    if checked:
      print('\nThe same samples\' steps, labelled by the task\'s step checker (exact process labels):\n')
      print('| run | step AUROC | within-problem | first step only | first wrong step: 1 / 2 / later |')
      print('|---|---|---|---|---|')
      for wd, r in checked:
        print(f"| {wd} | {r['step_auroc']:.3f} | {r['step_auroc_within']:.3f} | {r['step1_auroc']:.3f} | "
              f"{r['first_wrong_step1']:.3f} / {r['first_wrong_step2']:.3f} / {r['first_wrong_later']:.3f} |")


if __name__ == '__main__':
  main()
