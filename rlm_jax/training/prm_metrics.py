"""PRM / value-model quality on labelled steps: step-level AUROC and accuracy.

    m = prm_metrics.step_metrics(values_BxS, labels_BxS, valid_BxS, scale='reward')
    # {'auroc': 0.81, 'accuracy': 0.74, 'num_steps': 512, 'num_positive': 301}

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


def step_metrics(values, labels, valid: Optional[Any] = None, scale: str = 'reward') -> dict:
  """Everything at once: {'auroc', 'accuracy', 'num_steps', 'num_positive'} (floats / ints).

  Args/shapes as `step_auroc`; `num_steps` counts the valid steps, `num_positive` those whose
  label is above the threshold. Call it once per label source (solver, MC rollouts, MCTS q)
  to compare them on the same held-out traces.
  """
  t = _threshold(scale)
  pred, label = _flat_valid(values, labels, valid)
  positive = label > t
  return {
      'auroc': auroc(pred, positive),
      'accuracy': float(np.mean((pred > t) == positive)) if pred.size else float('nan'),
      'num_steps': int(pred.size),
      'num_positive': int(positive.sum()),
  }
