"""The decode-step shortcuts give the outputs of the plain path: attention over a prefix of the
KV cache (static prefill index, caches grown phase by phase) and the sampler built on them."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlm_jax.models import transformer as tfm
from rlm_jax.sampling.sampler import SamplingConfig, sample

CFG = tfm.ModelConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)


def test_decode_spans_known_sizes():
  # 160 slots in 4 equal steps; sizes that hold no decode step (<= prompt) are dropped.
  assert tfm.decode_spans(32, 128) == (40, 80, 120, 160)
  assert tfm.decode_spans(100, 64) == (128, 164)
  # 140 slots: 35, 70, 105, 140 rounded up to multiples of 8 (never past the total).
  assert tfm.decode_spans(20, 120) == (40, 72, 112, 140)
  # Phases of at least 32 slots: 100 slots give 3 (34, 67, 100 rounded up).
  assert tfm.decode_spans(10, 90) == (40, 72, 100)
  # Short caches (< 2 x 32 slots) decode in one phase: nothing to save, one compile.
  assert tfm.decode_spans(5, 40) == (45,)
  assert tfm.decode_spans(7, 0) == (7,)
  assert tfm.decode_spans(32, 128, n_phases=1) == (160,)


def test_resize_pads_with_empty_slots_and_truncates():
  cache = tfm.KVCache.zeros(CFG, 2, 5)
  cache = cache._replace(k=tuple(k + 1.0 for k in cache.k), valid_BxT=jnp.ones((2, 5), bool))
  big = cache.resize(9)
  assert big.size == 9 and big.k[0].shape == (2, CFG.n_kv_heads, CFG.head_dim, 9)
  assert big.v[1].shape == (2, CFG.n_kv_heads, 9, CFG.head_dim)
  np.testing.assert_array_equal(big.valid_BxT, np.arange(9)[None].repeat(2, 0) < 5)
  np.testing.assert_array_equal(big.k[0][..., :5], 1.0)
  np.testing.assert_array_equal(big.k[0][..., 5:], 0.0)
  small = big.resize(5)
  for a, b in zip(jax.tree.leaves(small), jax.tree.leaves(cache)):
    np.testing.assert_array_equal(a, b)
  assert cache.resize(5) is cache


def test_static_prefill_index_attends_over_the_prompt_only():
  """A Python-int cache_index attends over slots [0, index + L); a traced one over all T."""
  model = tfm.init_model(CFG)
  x = jax.random.randint(jax.random.key(0), (3, 7), 4, CFG.vocab_size)
  mask = jnp.arange(7)[None] >= jnp.array([[0], [2], [5]])  # left padding
  cache = tfm.KVCache.zeros(CFG, 3, 20)
  run = lambda i: model(x, tfm.positions_from_mask(mask), mask, cache=cache, cache_index=i)
  static = jax.jit(lambda: run(0))()
  traced = jax.jit(run)(jnp.int32(0))
  real = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(static.logits_BxLxV)[real], np.asarray(traced.logits_BxLxV)[real],
                             atol=1e-6)
  # The cache agrees on the real tokens' slots (padding slots hold never-visible junk).
  np.testing.assert_array_equal(static.cache.valid_BxT, traced.cache.valid_BxT)
  valid = np.asarray(static.cache.valid_BxT)
  for a, b in zip(static.cache.k, traced.cache.k):
    np.testing.assert_allclose(np.asarray(a).transpose(0, 3, 1, 2)[valid], np.asarray(b).transpose(0, 3, 1, 2)[valid],
                               atol=1e-6)
  for a, b in zip(static.cache.v, traced.cache.v):
    np.testing.assert_allclose(np.asarray(a).transpose(0, 2, 1, 3)[valid], np.asarray(b).transpose(0, 2, 1, 3)[valid],
                               atol=1e-6)


def _decode_step(graphdef):

  @jax.jit
  def step(state, tok_B, pos_B, cache, index):
    out = nnx.merge(graphdef, state)(tok_B[:, None], pos_B[:, None], cache=cache, cache_index=index)
    return out.logits_BxLxV[:, -1], out.cache

  return step


def test_grown_cache_decode_matches_full_cache_across_span_boundaries():
  """Greedy decode over a cache grown 8 -> 16 -> 24 slots vs one of 24 slots from the start."""
  graphdef, state = nnx.split(tfm.init_model(CFG, seed=3))
  step = _decode_step(graphdef)
  model = nnx.merge(graphdef, state)
  x = jax.random.randint(jax.random.key(1), (2, 5), 4, CFG.vocab_size)
  runs = {}
  for sizes in ((24,), (8, 16, 24)):
    out = jax.jit(lambda n=sizes[0]: model(x, cache=tfm.KVCache.zeros(CFG, 2, n), cache_index=0, logits='last'))()
    logits, cache = out.logits_BxLxV[:, -1], out.cache
    toks, all_logits = [], []
    for i in range(24 - 5):
      cache = cache.resize(next(n for n in sizes if 5 + i < n))
      tok = jnp.argmax(logits, -1).astype(jnp.int32)
      logits, cache = step(state, tok, jnp.full((2,), 5 + i), cache, jnp.int32(5 + i))
      toks.append(tok)
      all_logits.append(logits)
    runs[sizes] = (np.stack(toks, 1), np.stack(all_logits, 1))
  np.testing.assert_array_equal(runs[(24,)][0], runs[(8, 16, 24)][0])
  np.testing.assert_allclose(runs[(24,)][1], runs[(8, 16, 24)][1], atol=1e-6)
  assert len(set(runs[(24,)][0].ravel().tolist())) > 3  # a real decode, not one repeated token


def test_sampler_with_decode_phases_matches_a_full_cache_decode():
  """`sample` over 4 decode phases (cache 32 -> 64 -> 96 -> 128) gives the tokens and log-probs
  of a plain greedy loop over one 128-slot cache, for left-padded prompts."""
  lp, t_max = 8, 120
  assert tfm.decode_spans(lp, t_max) == (32, 64, 96, 128)
  graphdef, state = nnx.split(tfm.init_model(CFG, seed=5))
  prompts = jax.random.randint(jax.random.key(2), (3, lp), 4, CFG.vocab_size)
  mask = jnp.arange(lp)[None] >= jnp.array([[0], [3], [6]])
  prompts = jnp.where(mask, prompts, 0)
  scfg = SamplingConfig(max_new_tokens=t_max, eos_id=-1, pad_id=0, greedy=True)
  got = sample(graphdef, state, prompts, mask, jax.random.key(0), scfg)

  model, step = nnx.merge(graphdef, state), _decode_step(graphdef)
  prefill = lambda i: model(prompts, tfm.positions_from_mask(mask), mask, cache=tfm.KVCache.zeros(CFG, 3, lp + t_max),
                            cache_index=i)
  out = jax.jit(prefill)(jnp.int32(0))  # traced index: attention over all 128 slots
  logits, cache = out.logits_BxLxV[:, -1], out.cache
  plen = mask.sum(1)
  toks, logps = [], []
  for i in range(t_max):
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    logps.append(jnp.take_along_axis(jax.nn.log_softmax(logits), tok[:, None], 1)[:, 0])
    toks.append(tok)
    logits, cache = step(state, tok, plen + i, cache, jnp.int32(lp + i))
  np.testing.assert_array_equal(got.tokens_BxT, np.stack(toks, 1))
  np.testing.assert_allclose(got.logprobs_BxT, np.stack(logps, 1), atol=1e-5)
  np.testing.assert_array_equal(got.lengths_B, t_max)
