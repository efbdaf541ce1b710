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


def test_within_problem_auroc_ignores_problem_difficulty():
  """A value that only knows each problem's difficulty ranks well pooled and at chance within
  problems; one that ranks inside each problem is perfect within."""
  # Problem 0 (easy): values 0.9 on every step; problem 1 (hard): 0.1 on every step.
  # Labels: problem 0 has 3 right steps and 1 wrong, problem 1 has 1 right and 3 wrong.
  labels = np.array([1, 1, 1, -1, 1, -1, -1, -1], float)
  groups = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  difficulty = np.array([0.9] * 4 + [0.1] * 4)
  m = prm_metrics.step_metrics(difficulty, labels, groups=groups)
  # Pooled: pairs (pos, neg) = 4 x 4 = 16; pos in problem 0 beat the 3 negatives of problem 1
  # (3 x 3 = 9 wins), ties inside a problem count 1/2 (3 x 1 + 1 x 3 = 6 ties), and the
  # positive of problem 1 loses to the negative of problem 0: (9 + 3) / 16 = 0.75.
  assert m['auroc'] == pytest.approx(0.75)
  assert m['auroc_within'] == pytest.approx(0.5)  # every within-problem pair tied
  ranks = np.array([0.8, 0.7, 0.9, 0.2, 0.3, 0.1, 0.0, 0.25])
  # Within: problem 0 all 3 pairs right; problem 1: 0.3 beats 0.1, 0.0, 0.25 -> 3 of 3.
  assert prm_metrics.grouped_auroc(ranks, labels > 0, groups) == 1.0
  # Invalid steps are dropped before grouping; a group with one class adds no pairs.
  valid = np.array([1, 1, 1, 1, 1, 0, 0, 0], bool)
  assert prm_metrics.step_metrics(ranks, labels, valid, groups=groups)['auroc_within'] == 1.0
  assert math.isnan(prm_metrics.grouped_auroc([0.1, 0.2], [True, False], [0, 1]))
  with pytest.raises(ValueError, match='groups'):
    prm_metrics.step_metrics(ranks, labels, groups=groups[:3])
