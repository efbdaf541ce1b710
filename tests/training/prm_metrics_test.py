"""Step-level PRM metrics on hand-computed sets and against scipy's Mann-Whitney U."""
import math

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from rlm_jax.training import prm_metrics

# Five steps: positives score .9, .4, .1; negatives .4, -.2 (reward units, threshold 0).
# Pairs (pos, neg): (.9,.4) 1, (.9,-.2) 1, (.4,.4) 1/2, (.4,-.2) 1, (.1,.4) 0, (.1,-.2) 1
# -> AUROC 4.5 / 6 = .75. Predicted positive: .9 .4 .4 .1 yes, -.2 no; labels + + - - +, so
# the step valued .4 with label - is the one mistake: accuracy 4 / 5.
VALUES = [0.9, 0.4, 0.4, -0.2, 0.1]
LABELS = [1.0, 1.0, -1.0, -1.0, 1.0]


def test_five_points_by_hand():
  assert prm_metrics.step_auroc(VALUES, LABELS) == pytest.approx(0.75)
  assert prm_metrics.step_accuracy(VALUES, LABELS) == pytest.approx(0.8)
  m = prm_metrics.step_metrics(jnp.asarray(VALUES), jnp.asarray(LABELS))  # jax arrays too
  assert m == {'auroc': pytest.approx(0.75), 'accuracy': pytest.approx(0.8), 'num_steps': 5,
               'num_positive': 3}


def test_probability_scale_and_mask():
  """The same set in P(correct) units: v -> (v + 1) / 2, labels 1 / 0, threshold .5. A masked
  step (a confident wrong value on padding) and a NaN one change nothing."""
  p = [(v + 1) / 2 for v in VALUES] + [0.99, float('nan')]
  lab = [(l + 1) / 2 for l in LABELS] + [0.0, 1.0]
  valid = np.array([True] * 5 + [False, True])
  m = prm_metrics.step_metrics(np.array(p), np.array(lab), valid, scale='prob')
  assert m['auroc'] == pytest.approx(0.75) and m['accuracy'] == pytest.approx(0.8)
  assert m['num_steps'] == 5
  # Without the mask the .99-valued negative joins: pairs with it are all 1 for it, 0 for
  # us -> (4.5 + 0) / 9 = .5; accuracy 4 / 6.
  m = prm_metrics.step_metrics(np.array(p), np.array(lab), None, scale='prob')
  assert m['auroc'] == pytest.approx(0.5) and m['accuracy'] == pytest.approx(4 / 6)


def test_soft_labels_are_thresholded_and_perfect_ranking_scores_one():
  # MC success fractions: .75 and .5 vs threshold .5 -> positive, negative.
  assert prm_metrics.step_auroc([0.8, 0.3], [0.75, 0.5], scale='prob') == 1.0
  assert prm_metrics.step_auroc([0.3, 0.8], [0.75, 0.5], scale='prob') == 0.0
  assert prm_metrics.step_auroc([0.2, 0.2, 0.2], [1, -1, 1]) == 0.5  # all tied


def test_one_class_and_empty_give_nan_not_errors():
  assert math.isnan(prm_metrics.step_auroc([0.3, -0.4], [1.0, 1.0]))
  assert prm_metrics.step_accuracy([0.3, -0.4], [1.0, 1.0]) == 0.5
  m = prm_metrics.step_metrics(np.zeros((2, 3)), np.ones((2, 3)), np.zeros((2, 3), bool))
  assert math.isnan(m['auroc']) and math.isnan(m['accuracy']) and m['num_steps'] == 0


def test_matches_mann_whitney_on_random_steps():
  rng = np.random.default_rng(0)
  values = np.round(rng.normal(size=(20, 7)), 1)  # rounding makes ties
  labels = np.where(rng.random((20, 7)) < 0.4 + 0.3 * (values > 0), 1.0, -1.0)
  valid = rng.random((20, 7)) < 0.8
  pos, neg = values[valid & (labels > 0)], values[valid & (labels <= 0)]
  u = stats.mannwhitneyu(pos, neg).statistic
  assert prm_metrics.step_auroc(values, labels, valid) == pytest.approx(u / (pos.size * neg.size), rel=1e-12)


def test_bad_arguments_name_the_culprit():
  with pytest.raises(ValueError, match="scale='logit'"):
    prm_metrics.step_auroc(VALUES, LABELS, scale='logit')
  with pytest.raises(ValueError, match=r'values \(5,\) and labels \(4,\)'):
    prm_metrics.step_accuracy(VALUES, LABELS[:4])
  with pytest.raises(ValueError, match='valid mask'):
    prm_metrics.step_metrics(VALUES, LABELS, [True])
