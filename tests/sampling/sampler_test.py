"""Sampler tests: greedy and logprobs against full forwards, keys, stops, compile count."""
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlm_jax.data import steps as steps_lib
from rlm_jax.data.tokenizer import pad_batch
from rlm_jax.models import transformer as tfm
from rlm_jax.sampling import sampler as smp

CFG = tfm.ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                      init_std=0.3)
EOS, PAD, STEP = 2, 0, 3
PROMPTS = [[1, 9, 17, 5, 30], [1, 12], [1, 7, 7, 8]]


@pytest.fixture(scope='module')
def model():
  return nnx.split(tfm.init_model(CFG, seed=3))


def _batch(rows=PROMPTS, length=6):
  tokens, mask = pad_batch(rows, length, PAD, side='left')
  return jnp.asarray(tokens), jnp.asarray(mask)


# The reference full forwards are jitted (one compile per shape): op by op, every op compiles
# anew for each length, which cost minutes of the suite.
@functools.partial(jax.jit, static_argnums=0)
def _full_logits(gdef, state, tokens_BxL, mask_BxL=None):
  return nnx.merge(gdef, state)(tokens_BxL, mask_BxL=mask_BxL).logits_BxLxV


def _reference_greedy(gdef, state, prompt, n, stop_ids):
  """Step-by-step argmax of the full forward (no cache), one unpadded row at a time."""
  seq, out, logps = list(prompt), [], []
  for _ in range(n):
    logits = _full_logits(gdef, state, jnp.asarray([seq]))[0, -1]
    tok = int(jnp.argmax(logits))
    out.append(tok)
    logps.append(float(jax.nn.log_softmax(logits)[tok]))
    seq.append(tok)
    if tok in stop_ids:
      break
  return out, logps


def test_greedy_equals_stepwise_argmax_of_full_forward(model):
  gdef, state = model
  cfg = smp.SamplingConfig(max_new_tokens=8, eos_id=EOS, pad_id=PAD, greedy=True)
  out = smp.sample(gdef, state, *_batch(), jax.random.key(0), cfg)
  for i, prompt in enumerate(PROMPTS):
    ref, ref_logp = _reference_greedy(gdef, state, prompt, 8, {EOS})
    n = int(out.lengths_B[i])
    assert out.tokens_BxT[i, :n].tolist() == ref
    np.testing.assert_allclose(out.logprobs_BxT[i, :n], ref_logp, atol=1e-4)
    assert np.all(np.asarray(out.tokens_BxT[i, n:]) == PAD)


def test_sampled_logprobs_equal_full_forward(model):
  gdef, state = model
  cfg = smp.SamplingConfig(max_new_tokens=7, eos_id=-1, pad_id=PAD, temperature=0.7, top_k=10)
  tokens, mask = _batch()
  out = smp.sample(gdef, state, tokens, mask, jax.random.key(1), cfg)
  full = jnp.concatenate([tokens, out.tokens_BxT], 1)
  full_mask = jnp.concatenate([mask, jnp.ones_like(out.tokens_BxT, bool)], 1)
  logits = _full_logits(gdef, state, full, full_mask)
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, 5:-1]), out.tokens_BxT[..., None], -1)[..., 0]
  np.testing.assert_allclose(out.logprobs_BxT, logp, atol=1e-4)


def test_fixed_key_reproducible_and_keys_differ(model):
  gdef, state = model
  cfg = smp.SamplingConfig(max_new_tokens=10, eos_id=-1, pad_id=PAD, temperature=1.5)
  a = smp.sample(gdef, state, *_batch(), jax.random.key(7), cfg)
  b = smp.sample(gdef, state, *_batch(), jax.random.key(7), cfg)
  c = smp.sample(gdef, state, *_batch(), jax.random.key(8), cfg)
  np.testing.assert_array_equal(a.tokens_BxT, b.tokens_BxT)
  assert not np.array_equal(a.tokens_BxT, c.tokens_BxT)


def test_top_k_one_equals_greedy(model):
  gdef, state = model
  greedy = smp.SamplingConfig(max_new_tokens=8, eos_id=EOS, pad_id=PAD, greedy=True)
  topk1 = smp.SamplingConfig(max_new_tokens=8, eos_id=EOS, pad_id=PAD, temperature=2.0, top_k=1)
  a = smp.sample(gdef, state, *_batch(), jax.random.key(0), greedy)
  b = smp.sample(gdef, state, *_batch(), jax.random.key(5), topk1)
  np.testing.assert_array_equal(a.tokens_BxT, b.tokens_BxT)


def test_top_p_keeps_smallest_prefix_reaching_mass():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.3, 1e-9]]))
  kept = np.isfinite(np.asarray(smp.filter_logits(logits, 0, 0.6))) & (np.asarray(smp.filter_logits(logits, 0, 0.6)) > -1e30)
  assert kept.tolist() == [[True, False, True, False]]  # 0.5 + 0.3 >= 0.6
  kept = np.asarray(smp.filter_logits(logits, 0, 0.5)) > -1e30
  assert kept.tolist() == [[True, False, False, False]]
  kept = np.asarray(smp.filter_logits(logits, 2, 1.0)) > -1e30
  assert kept.tolist() == [[True, False, True, False]]


def test_stops_on_step_delimiter_and_eos(model):
  gdef, state = model
  # Use the greedy continuation's tokens as "delimiter" and "eos" to force known stops.
  g = smp.SamplingConfig(max_new_tokens=8, eos_id=-1, pad_id=PAD, greedy=True)
  free = smp.sample(gdef, state, *_batch(), jax.random.key(0), g)
  step_tok = int(free.tokens_BxT[0, 2])
  cfg = smp.SamplingConfig(max_new_tokens=8, eos_id=-1, pad_id=PAD, greedy=True, step_id=step_tok,
                           stop_at_step=True)
  out = smp.sample(gdef, state, *_batch(), jax.random.key(0), cfg)
  for i in range(3):
    row = free.tokens_BxT[i].tolist()
    if step_tok in row:
      n = row.index(step_tok) + 1
      assert int(out.lengths_B[i]) == n and int(out.stop_reason_B[i]) == smp.StopReason.STEP
      assert out.tokens_BxT[i, :n].tolist() == row[:n]
    else:
      assert int(out.lengths_B[i]) == 8 and int(out.stop_reason_B[i]) == smp.StopReason.LENGTH
  assert int(out.lengths_B[0]) <= 3


def test_empty_prompt_and_all_rows_finished_at_step_zero(model):
  gdef, state = model
  cfg = smp.SamplingConfig(max_new_tokens=5, eos_id=EOS, pad_id=PAD, greedy=True)
  tokens, mask = _batch([[], [1, 12]], 4)
  out = smp.sample(gdef, state, tokens, mask, jax.random.key(0), cfg)
  assert out.stop_reason_B.tolist()[0] == smp.StopReason.EMPTY and int(out.lengths_B[0]) == 0
  ref, _ = _reference_greedy(gdef, state, [1, 12], 5, {EOS})
  assert out.tokens_BxT[1, : len(ref)].tolist() == ref
  tokens, mask = _batch([[], []], 4)
  out = smp.sample(gdef, state, tokens, mask, jax.random.key(0), cfg)
  assert out.lengths_B.tolist() == [0, 0] and np.all(np.asarray(out.tokens_BxT) == PAD)


def test_no_recompile_for_same_shapes(model):
  gdef, state = model
  counted = jax.jit(chex.assert_max_traces(smp.generate, n=1), static_argnames=('graphdef', 'cfg'))
  cfg = smp.SamplingConfig(max_new_tokens=4, eos_id=EOS, pad_id=PAD, temperature=1.0)
  for seed, rows in enumerate([PROMPTS, [[1, 2, 3], [1], [1, 5, 6, 7, 8]]]):
    counted(gdef, state, *_batch(rows), jax.random.key(seed), cfg)
  chex.clear_trace_counter()


def test_bad_sampling_config_names_field():
  with pytest.raises(ValueError, match='temperature'):
    smp.SamplingConfig(max_new_tokens=4, eos_id=2, pad_id=0, temperature=0.0)


@pytest.mark.parametrize('greedy', [True, False])
def test_shared_prefix_equals_repeated_prompts(model, greedy):
  """num_samples=N (one prefill per prompt) gives exactly the tokens, lengths and stop reasons
  of the N = 1 path on prompts repeated N times, for the same key, and its log-probs up to
  float rounding (the prefill runs over B rows instead of B·N, which a CPU matmul may block
  differently: 2e-6 apart on an AVX-512 Xeon)."""
  gdef, state = model
  cfg = smp.SamplingConfig(max_new_tokens=6, eos_id=EOS, pad_id=PAD, greedy=greedy, temperature=1.3,
                           step_id=STEP, stop_at_step=True)
  tokens, mask = _batch()
  shared = smp.sample(gdef, state, tokens, mask, jax.random.key(2), cfg, num_samples=4)
  repeated = smp.sample(gdef, state, jnp.repeat(tokens, 4, 0), jnp.repeat(mask, 4, 0), jax.random.key(2), cfg)
  assert shared.tokens_BxT.shape == (12, 6)
  np.testing.assert_array_equal(shared.tokens_BxT, repeated.tokens_BxT)
  np.testing.assert_array_equal(shared.lengths_B, repeated.lengths_B)
  np.testing.assert_array_equal(shared.stop_reason_B, repeated.stop_reason_B)
  np.testing.assert_allclose(shared.logprobs_BxT, repeated.logprobs_BxT, rtol=1e-5, atol=1e-5)
  if not greedy:  # the N samples of one prompt differ (rows are prompt-major)
    assert len({tuple(r) for r in np.asarray(shared.tokens_BxT[:4]).tolist()}) > 1


def test_step_table_stops_after_any_marked_token(model):
  """A hand-made table marks two token ids as 'contains the delimiter': each row stops right
  after the first of them in its free-running greedy continuation, with reason STEP."""
  gdef, state = model
  free = smp.sample(gdef, state, *_batch(), jax.random.key(0),
                    smp.SamplingConfig(max_new_tokens=8, eos_id=-1, pad_id=PAD, greedy=True))
  marked = {int(free.tokens_BxT[0, 1]), int(free.tokens_BxT[1, 3])}
  table = jnp.zeros((CFG.vocab_size,), bool).at[jnp.asarray(sorted(marked))].set(True)
  cfg = smp.SamplingConfig(max_new_tokens=8, eos_id=-1, pad_id=PAD, greedy=True, stop_at_step=True)
  out = smp.sample(gdef, state, *_batch(), jax.random.key(0), cfg, step_table_V=table)
  for i in range(3):
    row = free.tokens_BxT[i].tolist()
    hits = [t for t, tok in enumerate(row) if tok in marked]
    n = hits[0] + 1 if hits else 8
    assert int(out.lengths_B[i]) == n, (i, row, marked)
    assert int(out.stop_reason_B[i]) == (smp.StopReason.STEP if hits else smp.StopReason.LENGTH)
    assert out.tokens_BxT[i, :n].tolist() == row[:n]
  assert int(out.lengths_B[0]) <= 2 and int(out.lengths_B[1]) <= 4
  with pytest.raises(ValueError, match='step_id or a step_table_V'):
    smp.sample(gdef, state, *_batch(), jax.random.key(0), cfg)
  with pytest.raises(ValueError, match=r'step_table_V has shape \(5,\)'):
    smp.sample(gdef, state, *_batch(), jax.random.key(0), cfg, step_table_V=jnp.zeros((5,), bool))


def _reference_step_stop(row, table, ends, starts, pad):
  """First index where a step ends in `row` (None: none): a marked token, or a split pair
  (ends[prev] & starts[tok]) whose first half is inside the step (not the prompt)."""
  prev = pad
  for t, tok in enumerate(row):
    if table[tok] or (ends[0, prev] and starts[0, tok]):
      return t
    prev = tok
  return None


def test_step_ends_stop_at_a_delimiter_split_over_two_tokens(model):
  """A hand-made split table ('\\n' ends a token, '\\n' starts the next): a row stops after
  the second half of a pair, never at a first new token whose pair began in the prompt."""
  gdef, state = model
  free = smp.sample(gdef, state, *_batch(), jax.random.key(0),
                    smp.SamplingConfig(max_new_tokens=8, eos_id=-1, pad_id=PAD, greedy=True))
  rows = np.asarray(free.tokens_BxT).tolist()
  v = CFG.vocab_size
  table, ends, starts = np.zeros(v, bool), np.zeros((1, v), bool), np.zeros((1, v), bool)
  ends[0, [rows[0][2], rows[1][4]]] = True  # pairs inside rows 0 and 1
  starts[0, [rows[0][3], rows[1][5]]] = True
  for r, prompt in enumerate(PROMPTS):  # prompt's last token + first new token: not a pair
    ends[0, prompt[-1]] = True
    starts[0, rows[r][0]] = True
  ends[0, PAD] = starts[0, PAD] = False
  step_ends = steps_lib.StepEnds(table, ends, starts, pad_id=PAD)
  cfg = smp.SamplingConfig(max_new_tokens=8, eos_id=-1, pad_id=PAD, greedy=True, stop_at_step=True)
  out = smp.sample(gdef, state, *_batch(), jax.random.key(0), cfg, step_ends=step_ends)
  want = [_reference_step_stop(row, table, ends, starts, PAD) for row in rows]
  assert want[0] is not None and want[0] <= 3 and want[1] is not None and want[1] <= 5
  assert all(w != 0 for w in want)  # the prompt never completes a pair
  for i in range(3):
    n = 8 if want[i] is None else want[i] + 1
    assert int(out.lengths_B[i]) == n, (i, rows[i], want)
    assert int(out.stop_reason_B[i]) == (smp.StopReason.LENGTH if want[i] is None else smp.StopReason.STEP)
    assert out.tokens_BxT[i, :n].tolist() == rows[i][:n]
  # The character tokenizer's tables stop exactly where step_id does.
  char = smp.sample(gdef, state, *_batch(), jax.random.key(0), cfg, step_ends=steps_lib.as_step_ends(rows[2][1]))
  by_id = smp.sample(gdef, state, *_batch(), jax.random.key(0), dataclasses.replace(cfg, step_id=rows[2][1]))
  for a, b in zip(char, by_id):
    np.testing.assert_array_equal(a, b)
  assert int(char.lengths_B[2]) <= 2


def test_tempered_logprobs_are_those_of_logits_over_t(model):
  gdef, state = model
  cfg = smp.SamplingConfig(max_new_tokens=5, eos_id=-1, pad_id=PAD, temperature=0.5)
  tokens, mask = _batch()
  out = smp.sample(gdef, state, tokens, mask, jax.random.key(3), cfg, tempered_logprobs=True)
  raw = smp.sample(gdef, state, tokens, mask, jax.random.key(3), cfg)
  np.testing.assert_array_equal(out.tokens_BxT, raw.tokens_BxT)
  full = jnp.concatenate([tokens, out.tokens_BxT], 1)
  logits = _full_logits(gdef, state, full, jnp.concatenate([mask, jnp.ones_like(out.tokens_BxT, bool)], 1))
  pick = lambda z: jnp.take_along_axis(jax.nn.log_softmax(z[:, 5:-1]), out.tokens_BxT[..., None], -1)[..., 0]
  np.testing.assert_allclose(out.logprobs_BxT, pick(logits / 0.5), atol=1e-4)
  np.testing.assert_allclose(raw.logprobs_BxT, pick(logits), atol=1e-4)
  assert np.abs(np.asarray(out.logprobs_BxT - raw.logprobs_BxT)).max() > 1e-2


# num_samples=3 covers the shared prefill too; 1 is slow only to keep the default suite short.
@pytest.mark.parametrize('num_samples', [pytest.param(1, marks=pytest.mark.slow), 3])
def test_values_from_the_decode_equal_a_full_forward(num_samples):
  """`return_values`: the value head at each generated token (and at the last prompt token)
  equals the full forward's value at that position of prompt + completion; 0 on padding."""
  cfg = dataclasses.replace(CFG, value_head='logit')
  gdef, state = nnx.split(tfm.init_model(cfg, seed=4))
  scfg = smp.SamplingConfig(max_new_tokens=5, eos_id=EOS, pad_id=PAD, step_id=STEP, stop_at_step=True,
                            temperature=1.5)
  tokens, mask = _batch()
  out = smp.sample(gdef, state, tokens, mask, jax.random.key(4), scfg, num_samples=num_samples,
                   return_values=True)
  plain = smp.sample(gdef, state, tokens, mask, jax.random.key(4), scfg, num_samples=num_samples)
  np.testing.assert_array_equal(out.tokens_BxT, plain.tokens_BxT)  # the values change no sample
  full = jax.jit(lambda t, m: nnx.merge(gdef, state)(t, mask_BxL=m).values_BxL)
  rows = np.repeat(np.arange(len(PROMPTS)), num_samples)
  lengths = np.asarray(out.lengths_B)
  assert lengths.min() >= 1 and (lengths < 5).any()  # some rows stopped early
  for r, row in enumerate(rows):
    seq = PROMPTS[row] + np.asarray(out.tokens_BxT[r, :lengths[r]]).tolist()
    ref = np.asarray(full(jnp.asarray([seq]), None))[0]
    np.testing.assert_allclose(out.values_BxT[r, :lengths[r]], ref[len(PROMPTS[row]):], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.prompt_values_B[r], ref[len(PROMPTS[row]) - 1], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out.values_BxT[r, lengths[r]:], 0.0)
  with pytest.raises(ValueError, match='no value head'):
    smp.sample(*nnx.split(tfm.init_model(CFG)), tokens, mask, jax.random.key(0), scfg, return_values=True)
