"""Step labels: solver traces + corruptions (checked by the task verifier), Monte Carlo rollout
labels from a scripted bigram policy with known completion odds, MCTS q-value batches."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlm_jax import tasks as tasks_lib
from rlm_jax.data.tokenizer import CharTokenizer
from rlm_jax.models import transformer as tfm
from rlm_jax.sampling.sampler import SamplingConfig
from rlm_jax.training import labels, value

PAD, BOS, EOS, STEP = 0, 1, 2, 3


# --- (a) solver labels -------------------------------------------------------------------

def test_corrupt_step_edits_one_claim():
  rng = np.random.default_rng(0)
  for _ in range(20):
    bad = labels.corrupt_step('6+5=11', rng)
    diff = [i for i, (a, b) in enumerate(zip(bad, '6+5=11')) if a != b]
    assert len(bad) == 6 and len(diff) == 1 and bad[diff[0]].isdigit()
  assert labels.corrupt_step('Answer: True', rng) == 'Answer: False'
  assert labels.corrupt_step('Answer: False', rng) == 'Answer: True'
  assert labels.corrupt_step('Wren is shy.', rng) == 'Wren is not shy.'
  assert labels.corrupt_step('Wren is not shy.', rng) == 'Wren is shy.'
  assert labels.corrupt_step('no claim here', rng) is None


_EQ = re.compile(r'^(-?\d+)([+\-*/])\(?(-?\d+)\)?=(-?\d+)$')


def _holds(step):
  a, op, b, c = _EQ.match(step).groups()
  a, b, c = int(a), int(b), int(c)
  return {'+': a + b, '-': a - b, '*': a * b, '/': a // b if b and a % b == 0 else None}[op] == c


def test_solver_labels_and_corruptions_checked_by_the_verifier():
  tasks = (tasks_lib.generate_dataset('arithmetic', 12, seed=0, levels=(1, 2, 3))
           + tasks_lib.generate_dataset('prontoqa', 4, seed=0, levels=(1, 2))
           + tasks_lib.generate_dataset('knapsack', 4, seed=0, levels=(1, 2)))
  recs = labels.solver_labels(tasks, seed=0, negatives_per_task=3)
  by_task = {}
  for r in recs:
    by_task.setdefault(r['task'], []).append(r)
  assert sorted(by_task) == list(range(len(tasks)))
  finals = middles = 0
  for i, task in enumerate(tasks):
    pos, *negs = by_task[i]
    assert pos['steps'] == task['steps'] and pos['labels'] == [1.0] * len(task['steps'])
    assert tasks_lib.verify(task, '\n'.join(pos['steps'])) == 2
    assert len(negs) == 3
    for r in negs:
      k, n = r['first_error'], len(task['steps'])
      assert r['labels'] == [1.0] * k + [0.0] * (n - k)
      changed = [j for j in range(n) if r['steps'][j] != task['steps'][j]]
      assert changed == [k]
      if k == n - 1:  # a wrong final answer: the verifier must not accept the trace
        finals += 1
        assert tasks_lib.verify(task, '\n'.join(r['steps'])) < 2, r
      elif task['type'] == 'Arithmetic':  # a wrong intermediate equation
        middles += 1
        assert _holds(task['steps'][k]) and not _holds(r['steps'][k]), (task['steps'][k], r['steps'][k])
  assert finals >= 10 and middles >= 5, (finals, middles)


def test_solver_labels_reject_a_task_whose_steps_do_not_verify():
  task = tasks_lib.generate_dataset('arithmetic', 1, seed=0, levels=(1,))[0]
  task = dict(task, steps=task['steps'][:-1] + ['Answer: 999'])
  with pytest.raises(ValueError, match='task 0: the verifier does not accept its own solver steps'):
    labels.solver_labels([task], seed=0)


def test_encoded_solver_labels_land_on_step_separators():
  tok = CharTokenizer()
  rec = {'problem': 'Compute 1+2.', 'steps': ['1+2=3', 'Answer: 3'], 'labels': [1.0, 0.0]}
  enc = labels.encode_step_labels(tok, [rec], length=40, max_steps=4)
  b = value.prm_batch(*(jnp.asarray(enc[k]) for k in ('tokens', 'mask', 'completion_start', 'step_labels',
                                                      'step_valid')), tok.step_id, tok.eos_id)
  start = 1 + len('Compute 1+2.') + 1
  assert int(enc['completion_start'][0]) == start
  where = np.flatnonzero(np.asarray(b['target_mask'][0]))
  np.testing.assert_array_equal(where, [start + 5, start + 5 + 1 + 9])
  assert enc['tokens'][0, where[0]] == tok.step_id and enc['tokens'][0, where[1]] == tok.eos_id
  np.testing.assert_allclose(np.asarray(b['targets'][0, where]), [1.0, 0.0])
  with pytest.raises(ValueError, match='record 0 has 2 steps, more than max_steps=1'):
    labels.encode_step_labels(tok, [rec], length=40, max_steps=1)


# --- (b) Monte Carlo rollout labels --------------------------------------------------------

BIGRAM = tfm.ModelConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=2, d_ff=2)


def _bigram_policy(p_five_after_step):
  """A transformer that is exactly a bigram table: one-hot embeddings, zero attention and MLP,
  so the logits at a position are table[last token]. After STEP it emits 5 with probability
  p and 6 otherwise; after 5 or 6 it emits EOS; after 4 or 7 STEP."""
  table = np.full((8, 8), -30.0, np.float32)
  with np.errstate(divide='ignore'):
    table[STEP, 5], table[STEP, 6] = np.log(p_five_after_step), np.log(1 - p_five_after_step)
  table[STEP] = np.maximum(table[STEP], -30.0)
  table[5, EOS] = table[6, EOS] = 0.0
  table[4, STEP] = table[7, STEP] = 0.0
  table[[PAD, BOS, EOS]] = 0.0
  gdef, params = nnx.split(tfm.init_model(BIGRAM, seed=0))

  def set_leaf(path, x):
    name = '/'.join(str(getattr(p, 'key', p)) for p in path)
    if name.startswith('embed'):
      return jnp.eye(8, dtype=x.dtype)
    if name.startswith('lm_head'):  # RMSNorm turns a one-hot row into sqrt(d)·one-hot
      return jnp.asarray(table / np.sqrt(8.0), x.dtype)
    if '/scale' in name:
      return jnp.ones_like(x)
    return jnp.zeros_like(x)

  return gdef, jax.tree_util.tree_map_with_path(set_leaf, params)


def _mc_batch():
  # row 0: steps "4", "4", "5"+EOS, answer 5 (the trace is right).
  # row 1: steps "4", "7"+EOS, answer 6 (the trace is wrong).
  return {'prompt': jnp.array([[PAD, BOS, 4, STEP]] * 2), 'prompt_mask': jnp.array([[0, 1, 1, 1]] * 2, bool),
          'completion': jnp.array([[4, STEP, 4, STEP, 5, EOS], [4, STEP, 7, EOS, PAD, PAD]]),
          'completion_mask': jnp.array([[1] * 6, [1] * 4 + [0] * 2], bool),
          'answer': jnp.array([[5], [6]]), 'answer_len': jnp.array([1, 1])}


def _mc_setup(m):
  return labels.MCLabelSetup(num_rollouts=m, max_steps=3, step_id=STEP,
                             sampling=SamplingConfig(max_new_tokens=3, eos_id=EOS, pad_id=PAD))


def test_mc_labels_of_a_deterministic_policy_are_exact():
  gdef, params = _bigram_policy(1.0)  # after STEP always "5 EOS"
  out = labels.mc_rollout_labels_jit(gdef, params, _mc_setup(4), _mc_batch(), jax.random.key(0))
  np.testing.assert_array_equal(out['valid'], [[True, True, True], [True, True, False]])
  np.testing.assert_array_equal(out['labels'], [[1, 1, 1], [0, 0, 0]])
  np.testing.assert_array_equal(out['num_correct'], [[4, 4, 4], [0, 0, 0]])
  np.testing.assert_array_equal(out['outcome'], [1, 0])


def test_mc_labels_estimate_the_completion_odds():
  """After STEP the policy says "5 EOS" w.p. 0.75 and "6 EOS" w.p. 0.25: a non-final step of
  row 0 (answer 5) is worth 0.75, of row 1 (answer 6) 0.25; final steps get the outcome."""
  gdef, params = _bigram_policy(0.75)
  m = 256
  out = labels.mc_rollout_labels_jit(gdef, params, _mc_setup(m), _mc_batch(), jax.random.key(1))
  lab = np.asarray(out['labels'])
  tol = 4 * np.sqrt(0.75 * 0.25 / m)  # 4 sigma of a binomial fraction
  np.testing.assert_allclose(lab[0, :2], [0.75, 0.75], atol=tol)
  np.testing.assert_allclose(lab[1, 0], 0.25, atol=tol)
  assert lab[0, 2] == 1.0 and lab[1, 1] == 0.0 and lab[1, 2] == 0.0
  prm = labels.trace_prm_batch(_mc_batch(), out['labels'], out['valid'], STEP, EOS)
  lp = 4
  np.testing.assert_array_equal(np.flatnonzero(prm['target_mask'][0]), [lp + 1, lp + 3, lp + 5])
  np.testing.assert_array_equal(np.flatnonzero(prm['target_mask'][1]), [lp + 1, lp + 3])
  np.testing.assert_allclose(np.asarray(prm['targets'][0, [lp + 1, lp + 3, lp + 5]]), lab[0])


# --- (c) MCTS q-values ---------------------------------------------------------------------

def test_q_value_batch_packs_steps_and_maps_q_to_probabilities():
  prompt = jnp.array([[BOS, 4, STEP]] * 2)
  steps = jnp.array([
      # row 0: left-padded steps as in a search tree; step 1 was cut without a delimiter.
      [[PAD, 5, STEP], [6, 6, 6], [PAD, 7, EOS]],
      # row 1: right-padded; step 2 is not on the path (its tokens must vanish).
      [[5, STEP, PAD], [6, EOS, PAD], [7, 7, 7]]])
  smask = steps != PAD
  q = jnp.array([[0.5, -0.5, 1.0], [0.0, 1.0, 0.3]])
  valid = jnp.array([[True, True, True], [True, True, False]])
  b = labels.q_value_batch(prompt, jnp.ones_like(prompt, bool), steps, smask, q, valid, PAD)
  np.testing.assert_array_equal(b['tokens'][0], [BOS, 4, STEP, 5, STEP, 6, 6, 6, 7, EOS, PAD, PAD])
  np.testing.assert_array_equal(b['tokens'][1], [BOS, 4, STEP, 5, STEP, 6, EOS] + [PAD] * 5)
  np.testing.assert_array_equal(b['mask'][1], [1] * 7 + [0] * 5)
  np.testing.assert_array_equal(np.flatnonzero(b['target_mask'][0]), [4, 7, 9])
  np.testing.assert_allclose(np.asarray(b['targets'][0, [4, 7, 9]]), [0.75, 0.25, 1.0])
  np.testing.assert_array_equal(np.flatnonzero(b['target_mask'][1]), [4, 6])
  np.testing.assert_allclose(np.asarray(b['targets'][1, [4, 6]]), [0.5, 1.0])
  with pytest.raises(ValueError, match='q_max=0 must be > q_min=1'):
    labels.q_value_batch(prompt, prompt > 0, steps, smask, q, valid, PAD, q_min=1, q_max=0)


@pytest.mark.parametrize('which', ['split', 'merge'])
def test_bpe_solver_labels_land_on_the_trace_step_ends(which, split_bpe, merge_bpe):
  """With a BPE tokenizer the PRM labels sit on the tokens `encode_trace` closes steps with
  (the second '\\n' of a split pair, a merged '.\\n\\nHe ' token, EOS), and `step_ends` finds them."""
  from rlm_jax.data import encoding
  from rlm_jax.data import steps as steps_lib
  from rlm_jax.data import tokenizer as tk
  tok = tk.HFTokenizer(split_bpe if which == 'split' else merge_bpe)
  rec = {'problem': 'Tom has 3 apples.', 'steps': ['He buys 2 more.', 'The end.', 'Answer: 5'],
         'labels': [1.0, 0.0, 0.0]}
  enc = labels.encode_step_labels(tok, [rec], length=40, max_steps=4)
  start = int(enc['completion_start'][0])
  _, ends = tok.encode_trace(rec['steps'])
  arrays = [jnp.asarray(enc[k]) for k in ('tokens', 'mask', 'completion_start', 'step_labels', 'step_valid')]
  b = value.prm_batch(*arrays, steps_lib.StepEnds.of(tok), tok.eos_id)
  where = np.flatnonzero(np.asarray(b['target_mask'][0]))
  np.testing.assert_array_equal(where, start + np.asarray(ends))
  np.testing.assert_allclose(np.asarray(b['targets'][0, where]), [1.0, 0.0, 0.0])
  assert start == len(encoding.prompt_ids(tok, rec))
  comp = jnp.asarray(enc['tokens'][:, start:])
  got, valid = labels.step_ends(comp, jnp.asarray(enc['mask'][:, start:]), steps_lib.StepEnds.of(tok), tok.eos_id, 4)
  np.testing.assert_array_equal(np.asarray(got[0, :3]), ends)
  np.testing.assert_array_equal(np.asarray(valid[0]), [True, True, True, False])


def test_follow_labels_mark_steps_right_until_the_sample_leaves_the_solver_trace():
  """Steps of 3 tokens (2 = delimiter, 9 = EOS). Row 0 equals the reference: all right.
  Row 1 differs at token 4 (inside step 1): step 0 right, steps 1 and 2 wrong. Row 2 differs
  at token 1 (inside step 0): every step wrong. Row 3 differs at token 4 but its answer is
  verified: all right (another route). Slot 9 is padding (-1 in the reference)."""
  sep, eos = 2, 9
  ref = np.array([5, 6, sep, 7, 8, sep, 3, 4, eos, -1])
  rows = np.stack([ref.copy(), ref.copy(), ref.copy(), ref.copy()])
  rows[1, 4] = 1
  rows[2, 1] = 1
  rows[3, 4] = 1
  rows = np.where(rows < 0, 0, rows)
  mask = np.arange(10)[None] < 9
  correct = np.array([True, False, False, True])
  out = labels.follow_labels(jnp.asarray(rows), jnp.asarray(np.repeat(mask, 4, 0)), jnp.asarray(np.stack([ref] * 4)),
                             jnp.asarray(correct), sep, eos, 4)
  np.testing.assert_array_equal(np.asarray(out['valid']), [[1, 1, 1, 0]] * 4)
  np.testing.assert_array_equal(np.asarray(out['labels']),
                                [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]])
  np.testing.assert_array_equal(np.asarray(out['first_diff']), [10, 4, 1, 4])
