"""PRM / value-model quality on labelled steps: step-level AUROC and accuracy.

    m = prm_metrics.step_metrics(values_BxS, labels_BxS, valid_BxS, scale='reward')
    # {'auroc': 0.81, 'accuracy': 0.74, 'num_steps': 512, 'num_positive': 301}
    m = prm_metrics.step_metrics(values_BxS, labels_BxS, valid_BxS, groups=problem_BxS)
    # ... plus 'auroc_within': the AUROC over (right, wrong) step pairs of the same problem

The pooled AUROC mixes problems: a value model that only knows how hard each problem is (easy
problems high, hard ones low) scores well above 0.5 on it while it cannot rank two solutions of
one problem, which is what best-of-N, beam search and MCTS ask of it. `auroc_within` counts
only pairs that share a problem, so problem difficulty cancels.

Inputs are per-step arrays of any (equal) shape, numpy or jax: the model's predicted value of
each step, the step's label (1 / -1 or 1 / 0 from a solver, a Monte Carlo success fraction, an
MCTS q) and a validity mask. `scale` says which units both are in: 'reward' ([-1, 1], the
search's units, threshold 0) or 'prob' ([0, 1], P(correct), threshold 0.5). A step is positive
when its label is above the threshold, and predicted positive when its value is above it.

Host-side functions (they pull arrays to host): metrics are computed once per evaluation, not
inside a training step. They never raise on data: a set with one class has no AUROC (nan), an
empty set has neither metric (nan); entries whose value or label is not finite count as
invalid. A bad `scale` or mismatched shapes raise ValueError naming them.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

SCALES = {'reward': 0.0, 'prob': 0.5}


def _flat_valid(pred, label, valid) -> tuple[np.ndarray, np.ndarray]:
  pred = np.asarray(pred, np.float64)
  label = np.asarray(label, np.float64)
  if pred.shape != label.shape:
    raise ValueError(f'prm_metrics: values {pred.shape} and labels {label.shape} differ in shape')
  ok = np.isfinite(pred) & np.isfinite(label)
  if valid is not None:
    valid = np.asarray(valid, bool)
    if valid.shape != pred.shape:
      raise ValueError(f'prm_metrics: valid mask {valid.shape} and values {pred.shape} differ in shape')
    ok &= valid
  return pred[ok], label[ok]


def _threshold(scale: str) -> float:
  if scale not in SCALES:
    raise ValueError(f"prm_metrics: scale='{scale}' must be one of {tuple(SCALES)}")
  return SCALES[scale]


def auroc(scores_N, positive_N) -> float:
  """Area under the ROC curve of 1-D scores for boolean classes (Mann-Whitney U / (P * N)).

  Ties between a positive and a negative count 1/2 (average ranks). nan without both classes.
  """
  scores_N = np.asarray(scores_N, np.float64).reshape(-1)
  positive_N = np.asarray(positive_N, bool).reshape(-1)
  n_pos = int(positive_N.sum())
  n_neg = positive_N.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float('nan')
  # Average rank (1-based) of each score among all scores, ties sharing their mean rank.
  order = np.argsort(scores_N, kind='mergesort')
  sorted_s = scores_N[order]
  first = np.searchsorted(sorted_s, scores_N, side='left')
  last = np.searchsorted(sorted_s, scores_N, side='right')
  rank = (first + last + 1) / 2.0
  u = rank[positive_N].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def grouped_auroc(scores_N, positive_N, groups_N) -> float:
  """AUROC over the (positive, negative) pairs that share a group (e.g. a problem).

  Pooled over pairs: sum over groups of the Mann-Whitney U, divided by the number of
  within-group pairs; ties count 1/2. nan when no group holds both classes.
  """
  scores_N = np.asarray(scores_N, np.float64).reshape(-1)
  positive_N = np.asarray(positive_N, bool).reshape(-1)
  groups_N = np.asarray(groups_N).reshape(-1)
  u_sum, pairs = 0.0, 0
  for g in np.unique(groups_N):
    sel = groups_N == g
    n_pos = int(positive_N[sel].sum())
    n_neg = int(sel.sum()) - n_pos
    if n_pos and n_neg:
      u_sum += auroc(scores_N[sel], positive_N[sel]) * n_pos * n_neg
      pairs += n_pos * n_neg
  return u_sum / pairs if pairs else float('nan')


def step_auroc(values, labels, valid: Optional[Any] = None, scale: str = 'reward') -> float:
  """Step-level AUROC of predicted values against thresholded labels.

  Args:
    values: predicted value per step, any shape (e.g. `[B, S]`).
    labels: label per step, same shape and units as `values` (see `scale`).
    valid: bool mask of the steps to count (same shape), or None for all.
    scale: 'reward' (units [-1, 1], threshold 0) or 'prob' ([0, 1], threshold 0.5).

  Returns:
    AUROC in [0, 1] (0.5: no better than chance); nan when the valid steps hold one class only.
  """
  t = _threshold(scale)
  pred, label = _flat_valid(values, labels, valid)
  return auroc(pred, label > t)


def step_accuracy(values, labels, valid: Optional[Any] = None, scale: str = 'reward') -> float:
  """Share of valid steps whose value falls on the same side of the threshold as the label.

  Args/shapes as `step_auroc`. Returns nan when no step is valid.
  """
  t = _threshold(scale)
  pred, label = _flat_valid(values, labels, valid)
  if pred.size == 0:
    return float('nan')
  return float(np.mean((pred > t) == (label > t)))


def step_metrics(values, labels, valid: Optional[Any] = None, scale: str = 'reward',
                 groups: Optional[Any] = None) -> dict:
  """Everything at once: {'auroc', 'accuracy', 'num_steps', 'num_positive'} (floats / ints),
  and 'auroc_within' (`grouped_auroc`) when `groups` is given.

  Args/shapes as `step_auroc`; `groups`: the problem (any hashable id) of each step, same
  shape. `num_steps` counts the valid steps, `num_positive` those whose label is above the
  threshold. Call it once per label source (solver, MC rollouts, MCTS q) to compare them on
  the same held-out traces.
  """
  t = _threshold(scale)
  pred, label = _flat_valid(values, labels, valid)
  positive = label > t
  out = {
      'auroc': auroc(pred, positive),
      'accuracy': float(np.mean((pred > t) == positive)) if pred.size else float('nan'),
      'num_steps': int(pred.size),
      'num_positive': int(positive.sum()),
  }
  if groups is not None:
    groups = np.asarray(groups)
    if groups.shape != np.shape(values):
      raise ValueError(f'prm_metrics: groups {groups.shape} and values {np.shape(values)} differ in shape')
    keep = np.isfinite(np.asarray(values, np.float64)) & np.isfinite(np.asarray(labels, np.float64))
    if valid is not None:
      keep &= np.asarray(valid, bool)
    out['auroc_within'] = grouped_auroc(pred, positive, groups[keep])
  return out
