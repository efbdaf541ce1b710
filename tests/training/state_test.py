"""Gradient accumulation: strided microbatches, exact full-batch gradients, one-line errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlm_jax import sharding
from rlm_jax.training import state as state_lib


def test_split_is_strided_and_merge_inverts_it():
  batch = {'x': jnp.arange(12).reshape(6, 2), 'y': jnp.arange(6)}
  micro = state_lib.split_microbatches(batch, 3)
  assert micro['y'].tolist() == [[0, 3], [1, 4], [2, 5]]
  assert micro['x'][1].tolist() == [[2, 3], [8, 9]]
  back = state_lib.merge_microbatches(micro)
  assert back['x'].tolist() == batch['x'].tolist() and back['y'].tolist() == batch['y'].tolist()
  assert state_lib.map_microbatches(lambda b: b['y'] * 10, batch, 2).tolist() == [0, 10, 20, 30, 40, 50]


def _token_mean_loss(w, mb, n_total=None, k=1):
  """Token-mean of (w·x_t - y_t)² over mask; with n_total, normalised by the global count / k."""
  err_BxT = (mb['x'] @ w - mb['y']) ** 2
  s = jnp.sum(jnp.where(mb['mask'], err_BxT, 0.0))
  n = mb['mask'].sum() if n_total is None else n_total / k
  return s / n, {'tokens': mb['mask'].sum().astype(jnp.float32)}


def _data():
  r = np.random.default_rng(0)
  x = r.normal(size=(4, 3, 2)).astype(np.float32)
  y = r.normal(size=(4, 3)).astype(np.float32)
  # Rows 0, 2 (microbatch 0 of 2) hold 6 tokens, rows 1, 3 (microbatch 1) only 1.
  mask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 1], [0, 0, 0]], bool)
  return {'x': jnp.asarray(x), 'y': jnp.asarray(y), 'mask': jnp.asarray(mask)}, jnp.asarray([0.5, -1.0])


def test_token_weighted_accumulation_equals_the_full_batch_gradient():
  batch, w = _data()
  (loss1, _), g1 = jax.value_and_grad(_token_mean_loss, has_aux=True)(w, batch)
  # Hand form of the gradient: 2/N Σ_t (w·x_t - y_t) x_t over the 7 valid tokens.
  x, y, m = (np.asarray(batch[k]) for k in ('x', 'y', 'mask'))
  err = (x @ np.asarray(w) - y) * m
  np.testing.assert_allclose(g1, 2 / 7 * np.einsum('bt,btd->d', err, x), rtol=1e-6)
  n_total = batch['mask'].sum()
  fn = jax.jit(lambda w, b: state_lib.accumulate_gradients(
      lambda p, mb: _token_mean_loss(p, mb, n_total, 2), w, b, 2))
  (loss2, aux2), g2 = fn(w, batch)
  np.testing.assert_allclose(loss2, loss1, rtol=1e-6)
  np.testing.assert_allclose(g2, g1, rtol=1e-6, atol=1e-7)
  assert float(aux2['tokens']) == 3.5  # aux: mean over microbatches of (6, 1)
  # Averaging per-microbatch means (the naive form) weights the 1-token microbatch 3x.
  (_, _), g_naive = state_lib.accumulate_gradients(_token_mean_loss, w, batch, 2)
  assert np.abs(np.asarray(g_naive) - np.asarray(g1)).max() > 1e-2


def test_accumulation_under_a_mesh_keeps_the_param_dtype():
  mesh = sharding.make_mesh(sharding.MeshConfig(shape=(1, 8, 1)))
  rules = sharding.DEFAULT_RULES
  batch = {'x': jnp.ones((16, 8), jnp.float32)}
  w = jnp.ones((8,), jnp.bfloat16)
  # Row sum of x·w over the batch, / 16 rows: each microbatch divides by 16 / 4.
  loss = lambda p, mb: (jnp.sum(mb['x'] @ p.astype(jnp.float32)) / (16.0 / 4), {})
  with sharding.use_mesh_rules(mesh, rules):
    b = jax.device_put(batch, NamedSharding(mesh, P('fsdp')))
    (val, _), g = jax.jit(lambda w, b: state_lib.accumulate_gradients(loss, w, b, 4))(w, b)
  assert g.dtype == jnp.bfloat16 and float(val) == 8.0  # 16 rows · 8 / 16
  np.testing.assert_array_equal(np.asarray(g, np.float32), np.full(8, 1.0))  # Σ_rows x / 16


@pytest.mark.parametrize('k, batch, message', [
    (0, {'a': jnp.ones(4)}, 'microbatches=0: must be an int >= 1'),
    (3, {'a': jnp.ones(4)}, "microbatches=3: does not divide the batch size 4 (leaf 'a')"),
    (2, {'a': jnp.ones(4), 'b': jnp.ones(6)},
     "microbatches: batch leaf 'b' has leading dim 6, but 'a' has 4"),
])
def test_bad_microbatches_one_line(k, batch, message):
  with pytest.raises(ValueError) as e:
    state_lib.accumulate_gradients(lambda p, mb: (jnp.sum(mb['a']) * p, {}), 1.0, batch, k)
  assert str(e.value) == message
