"""Value / PRM / ORM regression: batch layouts by hand, and a value head that learns step labels."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlm_jax.models import transformer as tfm
from rlm_jax.training import value
from rlm_jax.training.state import OptimConfig, create_train_state, make_optimizer

PAD, BOS, EOS, STEP = 0, 1, 2, 3
GOOD, BAD = 5, 6
VCFG = tfm.ModelConfig(vocab_size=8, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                       lm_head=False, value_head='sigmoid')


def test_prm_batch_puts_labels_on_completion_separators_only():
  # prompt = BOS 4 STEP (its STEP must not count); completion = 5 STEP 6 6 STEP 5 EOS, padded.
  tokens = jnp.array([[BOS, 4, STEP, 5, STEP, 6, 6, STEP, 5, EOS, PAD],
                      [PAD, BOS, STEP, 6, EOS, PAD, PAD, PAD, PAD, PAD, PAD]])
  mask = tokens != PAD
  start = jnp.array([3, 3])
  labels = jnp.array([[1.0, 0.25, 0.0], [0.5, 0.9, 0.9]])
  valid = jnp.array([[True, True, True], [True, False, False]])
  b = value.prm_batch(tokens, mask, start, labels, valid, STEP, EOS)
  want_mask = np.zeros((2, 11))
  want_mask[0, [4, 7, 9]] = 1
  want_mask[1, 4] = 1
  want_t = np.zeros((2, 11))
  want_t[0, [4, 7, 9]] = [1.0, 0.25, 0.0]
  want_t[1, 4] = 0.5
  np.testing.assert_array_equal(b['target_mask'], want_mask)
  np.testing.assert_allclose(b['targets'], want_t)


def test_prm_batch_on_a_split_bpe_delimiter(split_bpe):
  """SmolLM2-style BPE: '\\n', '\\n' closes a step on its second '\\n'; a prompt that ends with
  '\\n' does not turn the completion's first '\\n' into a step end."""
  from rlm_jax.data import steps as steps_lib
  from rlm_jax.data import tokenizer as tk
  tok = tk.HFTokenizer(split_bpe)
  nl, x, e, p = tok.encode('\n')[0], tok.encode('x')[0], tok.eos_id, tok.pad_id
  # prompt = x '\n' | completion = '\n' x '\n' '\n' x EOS, padded
  tokens = jnp.array([[x, nl, nl, x, nl, nl, x, e, p]])
  mask = tokens != p
  labels = jnp.array([[0.75, 0.25, 0.0]])
  b = value.prm_batch(tokens, mask, jnp.array([2]), labels, jnp.ones((1, 3), bool), steps_lib.StepEnds.of(tok), e)
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(b['target_mask'][0])), [5, 7])
  np.testing.assert_allclose(np.asarray(b['targets'][0, [5, 7]]), [0.75, 0.25])


def test_orm_batch_labels_the_last_real_token():
  tokens = jnp.array([[BOS, STEP, 5, EOS, PAD], [BOS, STEP, 5, STEP, EOS]])
  b = value.orm_batch(tokens, tokens != PAD, jnp.array([1.0, 0.0]))
  np.testing.assert_array_equal(b['target_mask'], [[0, 0, 0, 1, 0], [0, 0, 0, 0, 1]])
  np.testing.assert_allclose(b['targets'], [[0, 0, 0, 1, 0], [0, 0, 0, 0, 0]])


def _first_error_data():
  """Three one-token steps per trace, each GOOD or BAD; a step is correct (label 1) iff no BAD
  step came before or at it. All 8 traces, right after the prompt BOS 4 STEP."""
  rows, labels = [], []
  for code in range(8):
    steps = [BAD if (code >> i) & 1 else GOOD for i in range(3)]
    rows.append([BOS, 4, STEP, steps[0], STEP, steps[1], STEP, steps[2], EOS])
    ok = np.cumprod([s == GOOD for s in steps]).astype(np.float32)
    labels.append(ok)
  tokens = jnp.array(rows)
  return tokens, jnp.ones_like(tokens, bool), jnp.full((8,), 3), jnp.array(np.stack(labels))


@pytest.mark.parametrize('mode,head', [('mse', 'sigmoid'), ('bce', 'logit')])
def test_value_head_regresses_prm_labels(mode, head):
  tokens, mask, start, labels = _first_error_data()
  batch = value.prm_batch(tokens, mask, start, labels, jnp.ones_like(labels, bool), STEP, EOS)
  cfg = dataclasses.replace(VCFG, value_head=head)
  gdef, params = nnx.split(tfm.init_model(cfg, seed=0))
  tx = make_optimizer(OptimConfig(learning_rate=1e-2, grad_clip=1.0))
  state = create_train_state(params, tx)
  _, m0 = value.value_step_jit(gdef, tx, jax.tree.map(jnp.copy, state), batch, mode)
  for _ in range(80):
    state, m = value.value_step_jit(gdef, tx, state, batch, mode)
  assert float(m['num_labels']) == 24
  # mse: targets ±1, an untrained head predicts ~0 -> loss ~1; bce starts at ~log 2.
  start_loss = {'mse': 0.9, 'bce': 0.6}[mode]
  assert float(m0['loss']) > start_loss, float(m0['loss'])
  assert float(m['loss']) < 0.05 * start_loss, float(m['loss'])
  assert float(m['accuracy']) == 1.0
  pred = value.predict(gdef, state.params, tokens, mask, mode)
  p = np.asarray(value.prob_correct(pred, head))
  tm = np.asarray(batch['target_mask']) > 0
  np.testing.assert_array_equal(p[tm] > 0.5, np.asarray(batch['targets'])[tm] > 0.5)
  assert np.abs(p[tm] - np.asarray(batch['targets'])[tm]).max() < 0.25


def test_mode_and_head_must_match():
  gdef, params = nnx.split(tfm.init_model(VCFG, seed=0))
  tx = make_optimizer(OptimConfig())
  tokens, mask, start, labels = _first_error_data()
  batch = value.prm_batch(tokens, mask, start, labels, jnp.ones_like(labels, bool), STEP, EOS)
  with pytest.raises(ValueError, match="mode 'bce' needs model.value_head='logit'"):
    value.value_step(gdef, tx, create_train_state(params, tx), batch, 'bce')
  with pytest.raises(ValueError, match='must be one of'):
    value.value_step(gdef, tx, create_train_state(params, tx), batch, 'l1')
