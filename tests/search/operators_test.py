"""Operators on hand-computed numbers."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from rlm_jax.search import operators


def test_step_priors_softmax_over_valid_siblings():
  lp = jnp.array([[-1.0, -2.0, -3.0]])
  valid = jnp.array([[True, True, False]])
  p = operators.step_priors(lp, valid, 'logprob')
  e1, e2 = math.exp(-1), math.exp(-2)
  np.testing.assert_allclose(p, [[e1 / (e1 + e2), e2 / (e1 + e2), 0.0]], rtol=1e-6)
  p_t = operators.step_priors(lp, valid, 'logprob', temperature=2.0)
  a, b = math.exp(-0.5), math.exp(-1.0)
  np.testing.assert_allclose(p_t, [[a / (a + b), b / (a + b), 0.0]], rtol=1e-6)
  np.testing.assert_allclose(operators.step_priors(lp, valid, 'uniform'), [[0.5, 0.5, 0.0]])
  np.testing.assert_allclose(operators.step_priors(lp, valid, 'empirical'), [[0.5, 0.5, 0.0]])
  with pytest.raises(ValueError, match='prior kind'):
    operators.step_priors(lp, valid, 'bogus')


def test_merge_duplicates_keeps_first_and_counts():
  tok = jnp.array([[[5, 3], [6, 3], [5, 3], [5, 3]]])
  keep, count = operators.merge_duplicates(tok, jnp.ones((1, 4), bool))
  np.testing.assert_array_equal(keep, [[True, True, False, False]])
  np.testing.assert_array_equal(count, [[3, 1, 0, 0]])
  # An invalid candidate is neither kept nor counted for its twin.
  keep, count = operators.merge_duplicates(tok, jnp.array([[True, True, False, True]]))
  np.testing.assert_array_equal(keep, [[True, True, False, False]])
  np.testing.assert_array_equal(count, [[2, 1, 0, 0]])


def test_priors_count_each_unique_step_once():
  """Samples a, b, a, c with pi = .5, .2, .5, .1 (lengths 2, 4, 2, 1 tokens).

  Summing softmax(log pi) over duplicates (the old rule) gives a 1.0 / 1.3 = .769: pi counted
  twice for the twice-sampled step. Renormalised pi over {a, b, c}: .5 / .8, .2 / .8, .1 / .8;
  the empirical share: 2/4, 1/4, 1/4; per token: pi^(1/length) = .5^(1/2), .2^(1/4), .1.
  """
  tok = jnp.array([[[5, 3], [6, 3], [5, 3], [7, 3]]])
  lp = jnp.log(jnp.array([[0.5, 0.2, 0.5, 0.1]]))
  lengths = jnp.array([[2, 4, 2, 1]])
  keep, count = operators.merge_duplicates(tok, jnp.ones((1, 4), bool))
  np.testing.assert_allclose(operators.step_priors(lp, keep, 'logprob', count_MxK=count),
                             [[0.625, 0.25, 0.0, 0.125]], rtol=1e-5)
  np.testing.assert_allclose(operators.step_priors(lp, keep, 'empirical', count_MxK=count),
                             [[0.5, 0.25, 0.0, 0.25]], rtol=1e-6)
  w = np.array([0.5 ** 0.5, 0.2 ** 0.25, 0.1])
  got = operators.step_priors(lp, keep, 'logprob_per_token', count_MxK=count, lengths_MxK=lengths)
  np.testing.assert_allclose(got, [[w[0] / w.sum(), w[1] / w.sum(), 0.0, w[2] / w.sum()]], rtol=1e-5)
  with pytest.raises(ValueError, match='needs lengths_MxK'):
    operators.step_priors(lp, keep, 'logprob_per_token')


def test_normalize_q():
  np.testing.assert_allclose(operators.normalize_q(jnp.array([-1.0, 0.0, 1.0]), -1.0, 1.0), [0, 0.5, 1])
  np.testing.assert_allclose(operators.normalize_q(jnp.array([0.3]), 0.3, 0.3), [0.5])


def test_puct_matches_formula():
  qn, prior, n_c = jnp.array([0.2, 0.9]), jnp.array([0.7, 0.3]), jnp.array([1.0, 3.0])
  n_s, c1, c2 = 5.0, 1.25, 19652.0
  got = operators.puct_scores(qn, prior, n_c, n_s, c1, c2)
  pb = c1 + math.log((n_s + c2 + 1) / c2)
  want = [0.2 + 0.7 * math.sqrt(5) / 2 * pb, 0.9 + 0.3 * math.sqrt(5) / 4 * pb]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_uct_matches_formula_and_unvisited_first():
  got = operators.uct_scores(jnp.array([0.5, 0.1, 0.0]), jnp.array([2.0, 1.0, 0.0]), 4.0, 1.5)
  np.testing.assert_allclose(got[:2], [0.5 + 1.5 * math.sqrt(math.log(4) / 2),
                                       0.1 + 1.5 * math.sqrt(math.log(4) / 1)], rtol=1e-6)
  assert got[2] == np.inf


def test_backup_td_and_mean_by_hand():
  q_c, n_c, valid = jnp.array([1.0, -1.0, 9.0]), jnp.array([3, 1, 7]), jnp.array([True, True, False])
  # target = gamma * (3*1 + 1*(-1)) / 4 = 0.9 * 0.5
  np.testing.assert_allclose(operators.backup_td(0.2, q_c, n_c, valid, 0.9, 1.0), 0.45, rtol=1e-6)
  np.testing.assert_allclose(operators.backup_td(0.2, q_c, n_c, valid, 0.9, 0.5), 0.5 * 0.2 + 0.5 * 0.45,
                             rtol=1e-6)
  # mean = gamma * (v0 + (3*1 - 1)) / (1 + 4): v0 and the children's q both estimate V(s)
  np.testing.assert_allclose(operators.backup_mean(0.5, q_c, n_c, valid, 0.9), 0.9 * (0.5 + 2) / 5, rtol=1e-6)


def test_prune_keeps_top_valid():
  scores = jnp.array([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.1, 0.0]])
  valid = jnp.array([[True, False, True, True], [True, False, False, False]])
  idx, kept = operators.prune(scores, valid, 2)
  np.testing.assert_array_equal(idx[0], [3, 2])
  np.testing.assert_array_equal(kept, [[True, True], [True, False]])
  assert idx[1, 0] == 0


def test_answer_spans_marker_and_last_step():
  pad, eos, step = 0, 2, 3
  # "x STEP A : 7 EOS" with marker (A, :) -> span (7)
  toks = jnp.array([[10, step, 40, 41, 7, eos, pad, pad],
                    [40, 41, 9, step, 40, 41, 8, eos]])
  mask = toks != pad
  span, found = operators.answer_spans(toks, mask, (40, 41), 3, pad_id=pad, stop_ids=(eos, step))
  np.testing.assert_array_equal(span, [[7, pad, pad], [8, pad, pad]])
  assert bool(found.all())
  span, found = operators.answer_spans(toks, mask, (), 4, pad_id=pad, stop_ids=(eos, step))
  np.testing.assert_array_equal(span, [[40, 41, 7, pad], [40, 41, 8, pad]])
  none, found = operators.answer_spans(toks, mask, (99,), 2, pad_id=pad, stop_ids=(eos, step))
  assert not bool(found.any())
  np.testing.assert_array_equal(none, jnp.full((2, 2), pad))
  # A BPE delimiter has no id of its own: token 50 ends a step only by the stop mask.
  bpe = jnp.array([[10, 50, 40, 41, 7, eos, pad, pad]])
  span, _ = operators.answer_spans(bpe, bpe != pad, (), 4, pad_id=pad, stop_ids=(eos, step))
  np.testing.assert_array_equal(span, [[10, 50, 40, 41]])  # without it: the whole trace
  span, _ = operators.answer_spans(bpe, bpe != pad, (), 4, pad_id=pad, stop_ids=(eos, step),
                                   stop_mask_MxL=bpe == 50)
  np.testing.assert_array_equal(span, [[40, 41, 7, pad]])


def test_majority_vote_counts_and_weights():
  spans = jnp.array([[[1], [2], [2], [3]]])
  valid = jnp.array([[True, True, True, True]])
  winner, votes = operators.majority_vote(spans, valid)
  assert int(winner[0]) == 1
  np.testing.assert_allclose(votes, [[1, 2, 2, 1]])
  winner, _ = operators.majority_vote(spans, valid, jnp.array([[5.0, 1.0, 1.0, 0.5]]))
  assert int(winner[0]) == 0
  winner, votes = operators.majority_vote(spans, jnp.array([[True, False, False, True]]))
  assert int(winner[0]) == 0 and votes[0, 1] == -1


def test_host_vote():
  assert operators.majority_vote_host(['4', None, '5', '5', '4', '5']) == 2
  assert operators.majority_vote_host([None, None]) == -1
  assert operators.vote_texts(['Answer: 3', 'Answer: 4', 'Answer: 4'], lambda t: t.split()[-1]) == 1


@pytest.mark.parametrize('n', [1, 4, 16, 32, 40])
def test_short_reductions_equal_the_reductions(n):
  """The unrolled sum, max, any and argmax (first maximum on ties, all -inf -> 0) give jnp.sum's and
  jnp.argmax's results, also past SHORT_AXIS where they are those reductions."""
  rng = np.random.default_rng(n)
  x = rng.normal(size=(7, 3, n)).astype(np.float32)
  x[0, 0] = -np.inf  # a node without valid children
  x[1, 1, :] = 2.0  # ties everywhere: the first wins
  x[2, 2, -1] = x[2, 2].max() + 1.0  # the last wins
  ints = rng.integers(0, 5, size=(7, n)).astype(np.int32)
  np.testing.assert_allclose(operators.short_sum(jnp.asarray(np.where(np.isinf(x), 0, x))),
                             np.where(np.isinf(x), 0, x).sum(-1), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(operators.short_sum(jnp.asarray(ints)), ints.sum(-1))
  np.testing.assert_array_equal(operators.short_argmax(jnp.asarray(x)), np.argmax(x, -1))
  np.testing.assert_array_equal(operators.short_max(jnp.asarray(x)), x.max(-1))
  np.testing.assert_array_equal(operators.short_any(jnp.asarray(x > 1.0)), (x > 1.0).any(-1))
  assert int(operators.short_argmax(jnp.asarray(x))[1, 1]) == 0
  assert n == 1 or int(operators.short_argmax(jnp.asarray(x))[2, 2]) == n - 1
