"""Behavioural tests of the decoder: causality, padding, KV cache, GQA, heads, dtypes."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlm_jax.models import transformer as tfm

CFG = tfm.ModelConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)


def _tokens(b, l, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, l), 4, CFG.vocab_size)


# One compiled forward per input shape instead of a few hundred op-by-op compiles per call
# (the tests compare forwards with each other, which jit does not change).
_fwd = nnx.jit(lambda model, *args, **kwargs: model(*args, **kwargs))


def test_future_tokens_do_not_change_past_logits():
  model = tfm.init_model(CFG)
  x = _tokens(2, 10)
  y = x.at[:, 6:].set(5)
  a = _fwd(model, x).logits_BxLxV
  b = _fwd(model, y).logits_BxLxV
  np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6)
  assert np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-3


def test_gradient_wrt_future_embeddings_is_zero():
  model = tfm.init_model(CFG)
  gdef, state = nnx.split(model)
  x = _tokens(1, 8)

  def loss_at(s, t):
    return nnx.merge(gdef, s)(x).logits_BxLxV[0, t].sum()

  g = np.asarray(jax.jit(jax.grad(loss_at), static_argnums=1)(state, 3)['embed'][...])
  future = np.asarray(x[0, 4:])
  past = np.asarray(x[0, :4])
  only_future = [t for t in set(future.tolist()) if t not in set(past.tolist())]
  assert only_future, 'test needs a token that appears only in the future'
  np.testing.assert_array_equal(np.asarray(g[only_future]), 0.0)
  assert np.abs(np.asarray(g[past])).sum() > 0


@pytest.mark.parametrize('side', ['left', 'right'])
def test_padding_does_not_change_real_positions(side):
  model = tfm.init_model(CFG)
  x = _tokens(1, 6)
  ref = _fwd(model, x).logits_BxLxV[0]
  pad = jnp.zeros((1, 3), jnp.int32)
  if side == 'left':
    xp, mask = jnp.concatenate([pad, x], 1), jnp.arange(9)[None] >= 3
    got = _fwd(model, xp, mask_BxL=mask).logits_BxLxV[0, 3:]
  else:
    xp, mask = jnp.concatenate([x, pad], 1), jnp.arange(9)[None] < 6
    got = _fwd(model, xp, mask_BxL=mask).logits_BxLxV[0, :6]
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_kv_cache_decode_matches_full_forward():
  model = tfm.init_model(CFG)
  x = _tokens(2, 9)
  full = _fwd(model, x).logits_BxLxV
  cache = tfm.KVCache.zeros(CFG, 2, 12)
  out = _fwd(model, x[:, :5], cache=cache, cache_index=0)
  np.testing.assert_allclose(out.logits_BxLxV, full[:, :5], atol=1e-5)
  cache = out.cache
  for t in range(5, 9):
    pos = jnp.full((2, 1), t)
    out = _fwd(model, x[:, t : t + 1], pos, cache=cache, cache_index=t)  # one compile for t = 5..8
    cache = out.cache
    np.testing.assert_allclose(out.logits_BxLxV[:, 0], full[:, t], atol=1e-5)


def test_grouped_query_attention_equals_repeated_kv_heads():
  gqa = tfm.init_model(CFG, seed=1)
  mha_cfg = dataclasses.replace(CFG, n_kv_heads=CFG.n_heads)
  mha = tfm.init_model(mha_cfg, seed=2)
  _, gqa_state = nnx.split(gqa)
  _, mha_state = nnx.split(mha)
  reps = CFG.n_heads // CFG.n_kv_heads
  flat = dict(nnx.to_flat_state(gqa_state))
  for path, var in nnx.to_flat_state(mha_state):
    value = flat[path][...]
    if path[-1] in ('wk', 'wv'):
      value = jnp.repeat(value, reps, axis=1)  # kv head j serves query heads j*reps..
    var[...] = value
  x = _tokens(2, 7)
  np.testing.assert_allclose(_fwd(gqa, x).logits_BxLxV, _fwd(mha, x).logits_BxLxV, atol=1e-5)


def test_value_head_modes():
  for mode in ('sigmoid', 'logit'):
    cfg = dataclasses.replace(CFG, lm_head=False, value_head=mode, init_std=0.5)
    out = _fwd(tfm.init_model(cfg), _tokens(2, 5))
    assert out.logits_BxLxV is None and out.values_BxL.shape == (2, 5)
    if mode == 'sigmoid':
      assert np.all(np.abs(out.values_BxL) < 1)
    else:
      assert np.abs(out.values_BxL).max() > 1  # raw logits are unbounded


def test_shared_trunk_with_both_heads():
  cfg = dataclasses.replace(CFG, value_head='sigmoid')
  out = _fwd(tfm.init_model(cfg), _tokens(2, 5))
  assert out.logits_BxLxV.shape == (2, 5, CFG.vocab_size) and out.values_BxL.shape == (2, 5)


def test_tied_embeddings_use_embedding_matrix():
  cfg = dataclasses.replace(CFG, tie_embeddings=True)
  model = tfm.init_model(cfg)
  out = _fwd(model, _tokens(1, 4))
  np.testing.assert_allclose(out.logits_BxLxV, out.hidden_BxLxD @ model.embed[...].T, atol=1e-5)
  assert not hasattr(model, 'lm_head')


def test_bf16_compute_with_fp32_params_is_close():
  model32 = tfm.init_model(CFG)
  model16 = tfm.init_model(dataclasses.replace(CFG, dtype='bfloat16'))
  assert model16.embed[...].dtype == jnp.float32
  x = _tokens(2, 6)
  a, b = _fwd(model32, x).logits_BxLxV, _fwd(model16, x).logits_BxLxV
  assert np.abs(a - b).max() < 0.05 * np.abs(a).max() + 1e-2


def test_remat_gives_same_gradients():
  x = _tokens(2, 6)

  def grads(cfg):
    gdef, state = nnx.split(tfm.init_model(cfg))
    loss = lambda s: nnx.merge(gdef, s)(x).logits_BxLxV.std()
    return jax.jit(jax.grad(loss))(state)

  g0 = grads(CFG)
  g1 = grads(dataclasses.replace(CFG, remat='full'))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


def test_bad_configs_fail_with_named_field():
  with pytest.raises(ValueError, match='n_kv_heads'):
    tfm.ModelConfig(vocab_size=8, n_heads=4, n_kv_heads=3)
  with pytest.raises(ValueError, match="model.dtype='fp8'"):
    tfm.ModelConfig(vocab_size=8, dtype='fp8')


def test_every_param_has_logical_axes_of_right_rank():
  _, state = nnx.split(tfm.init_model(dataclasses.replace(CFG, value_head='logit', qkv_bias=True)))
  for path, var in nnx.to_flat_state(state):
    axes = var.get_metadata()['logical_axes']
    assert len(axes) == var[...].ndim, path


def test_logits_last_and_none_match_the_full_head():
  model = tfm.init_model(CFG)
  x = _tokens(2, 7)
  mask = jnp.arange(7)[None] >= jnp.array([[0], [3]])
  full = model(x, mask_BxL=mask)
  last = model(x, mask_BxL=mask, logits='last')
  none = model(x, mask_BxL=mask, logits='none')
  assert last.logits_BxLxV.shape == (2, 1, CFG.vocab_size) and none.logits_BxLxV is None
  np.testing.assert_allclose(last.logits_BxLxV, full.logits_BxLxV[:, -1:], atol=1e-6)
  np.testing.assert_allclose(model.lm_logits(none.hidden_BxLxD), full.logits_BxLxV, atol=1e-6)
  with pytest.raises(ValueError, match="logits='some'"):
    model(x, logits='some')


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_hidden_from_equals_the_slice_of_the_full_forward(remat):
  """`hidden_from=k`: the last layer runs its queries, attention output and MLP from position
  k on; hidden states, logits and values equal the full forward's positions k.. (left padding
  included), and the gradient of a loss over those positions is the same."""
  cfg = tfm.ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48,
                    value_head='sigmoid', remat=remat)
  gd, st = nnx.split(tfm.init_model(cfg, seed=2))
  tokens = jax.random.randint(jax.random.key(0), (3, 9), 1, 50)
  mask = jnp.arange(9)[None] >= jnp.array([0, 2, 4])[:, None]
  fwd = jax.jit(lambda s, k: nnx.merge(gd, s)(tokens, tfm.positions_from_mask(mask), mask, hidden_from=k),
                static_argnums=1)
  full, part = fwd(st, 0), fwd(st, 5)
  assert part.hidden_BxLxD.shape == (3, 4, 32)
  np.testing.assert_allclose(part.hidden_BxLxD, full.hidden_BxLxD[:, 5:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(part.logits_BxLxV, full.logits_BxLxV[:, 5:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(part.values_BxL, full.values_BxL[:, 5:], rtol=1e-5, atol=1e-5)
  grad = jax.jit(jax.grad(lambda s, k, start: jnp.sum(jnp.sin(fwd(s, k).logits_BxLxV[:, start:]))),
                 static_argnums=(1, 2))
  g_full, g_part = grad(st, 0, 5), grad(st, 5, 0)
  chex.assert_trees_all_close(g_part, g_full, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match='hidden_from=9'):
    fwd(st, 9)


def test_dot_product_attention_equals_ours_with_padding_gqa_and_hidden_from():
  """model.attention='xla' (`jax.nn.dot_product_attention`, the call that 'cudnn' makes on a
  GPU): the same logits, values and gradients as ours on a left-padded GQA batch, with
  `hidden_from`; forwards with a KV cache keep ours (same outputs)."""
  cfg = tfm.ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48,
                        value_head='sigmoid')
  gd, st = nnx.split(tfm.init_model(cfg, seed=3))
  gd_x, _ = nnx.split(tfm.init_model(dataclasses.replace(cfg, attention='xla'), seed=3))
  tokens = jax.random.randint(jax.random.key(1), (3, 9), 1, 50)
  mask = jnp.arange(9)[None] >= jnp.array([0, 2, 5])[:, None]
  pos = tfm.positions_from_mask(mask)

  def loss(g, s, k):
    out = nnx.merge(g, s)(tokens, pos, mask, hidden_from=k)
    keep = mask[:, k:, None]
    return jnp.sum(jnp.where(keep, jnp.sin(out.logits_BxLxV), 0.0)) + jnp.sum(jnp.where(mask[:, k:], out.values_BxL, 0.0))

  for k in (0, 4):
    fwd = jax.jit(lambda s, g: nnx.merge(g, s)(tokens, pos, mask, hidden_from=k), static_argnums=1)
    a, b = fwd(st, gd), fwd(st, gd_x)
    real = np.asarray(mask[:, k:])
    np.testing.assert_allclose(np.asarray(b.logits_BxLxV)[real], np.asarray(a.logits_BxLxV)[real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(b.values_BxL)[real], np.asarray(a.values_BxL)[real], rtol=1e-5, atol=1e-5)
  grad = jax.jit(jax.grad(loss, argnums=1), static_argnums=(0, 2))
  g_a, g_b = grad(gd, st, 4), grad(gd_x, st, 4)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(g_b))  # fully masked pad queries stay finite
  chex.assert_trees_all_close(g_b, g_a, rtol=1e-4, atol=1e-5)
  # A prefill into a KV cache runs ours whatever model.attention says: the same cache and logits.
  pre = jax.jit(lambda s, g: nnx.merge(g, s)(tokens, pos, mask, cache=tfm.KVCache.zeros(cfg, 3, 12), cache_index=0),
                static_argnums=1)
  chex.assert_trees_all_close(pre(st, gd_x), pre(st, gd))
  with pytest.raises(ValueError, match="model.attention='flash'"):
    tfm.ModelConfig(vocab_size=50, attention='flash')
