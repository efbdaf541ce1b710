"""`value.arch`: a value model / PRM of its own shape (deeper layers start as the identity)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlm_jax import configlib
from rlm_jax.experiment import config as config_lib
from rlm_jax.experiment import models as models_lib
from rlm_jax.experiment import runner

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, 'configs', 'alphazero.py') + ':smoke'  # policy: 1 layer, d=16


def _exp(tmp_path, *overrides):
  return runner.Experiment(config_lib.parse(configlib.load_config(CONFIG, list(overrides))), str(tmp_path))


@jax.jit
def _values(graphdef, params, tokens):
  return nnx.merge(graphdef, params)(tokens).values_BxL


def test_deeper_value_model_starts_as_the_policys_trunk_and_can_learn(tmp_path):
  """Extra layers with zero output projections add nothing: with the same value head, the
  3-layer value model gives the 1-layer one's values exactly; the extra layers still get
  gradient (their output projections are not stuck at zero)."""
  policy = _exp(tmp_path / 'p').models.init_policy()[1]
  gd1, p1 = _exp(tmp_path / 'a').models.value_model(policy)
  gd3, p3 = _exp(tmp_path / 'b', 'value.arch.n_layers=3').models.value_model(policy)
  d1, d3 = p1.to_pure_dict(), p3.to_pure_dict()
  assert sorted(d3['layers']) == [0, 1, 2] and sorted(d1['layers']) == [0]
  np.testing.assert_array_equal(d3['layers'][0]['attn']['wq'], d1['layers'][0]['attn']['wq'])
  assert not np.any(d3['layers'][2]['mlp']['w_down']) and np.any(d3['layers'][2]['mlp']['w_up'])
  d1['value_head'] = d3['value_head']  # the heads are initialised from different seeds
  nnx.replace_by_pure_dict(p1, d1)
  tokens = jax.random.randint(jax.random.key(0), (2, 9), 3, 40)
  v1, v3 = _values(gd1, p1, tokens), _values(gd3, p3, tokens)
  assert float(jnp.std(v1)) > 1e-4  # not a constant
  np.testing.assert_allclose(v3, v1, atol=1e-6)

  def loss(params):
    return jnp.mean((_values(gd3, params, tokens) - 0.5) ** 2)

  g = nnx.State.to_pure_dict(jax.jit(jax.grad(loss))(p3))
  assert float(jnp.abs(g['layers'][2]['attn']['wo']).max()) > 0 and float(jnp.abs(g['layers'][1]['mlp']['w_down']).max()) > 0


def test_a_wider_value_model_starts_at_random_and_restores_to_its_own_shape(tmp_path):
  """The restore target (`abstract_value`, what `load_run` fills from ckpt/value) has the
  value model's own shape, not the policy's."""
  models = _exp(tmp_path, 'value.init=random', 'value.arch.d_model=32', 'value.arch.n_layers=2').models
  _, params = models.value_model()  # value.init='random': no policy weights needed
  d = params.to_pure_dict()
  assert d['embed'].shape == (models.model_cfg.vocab_size, 32) and sorted(d['layers']) == [0, 1]
  shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree.to_pure_dict())
  assert shapes(models.abstract_value()[1]) == shapes(params)


@pytest.mark.parametrize('overrides, culprit', [
    (['value.arch.d_model=32'], 'value.arch.d_model=32'),  # init='policy' cannot copy another width
    (['value.arch.n_heads=4'], 'value.arch.n_heads=4'),
    (['model.n_layers=2', 'value.arch.n_layers=1'], 'value.arch.n_layers=1'),  # fewer layers than the policy
    (['value.arch.n_layers=-1'], 'value.arch.n_layers=-1'),
    (['value.init=random', 'value.arch.n_heads=3'], 'n_kv_heads'),  # 3 heads over 1 kv head is fine: 1 divides 3
])
def test_a_value_shape_the_run_cannot_build_is_one_line(tmp_path, overrides, culprit):
  if overrides[-1] == 'value.arch.n_heads=3':
    overrides = ['value.init=random', 'value.arch.n_kv_heads=2', 'value.arch.n_heads=3']
  with pytest.raises(configlib.ConfigError) as e:
    _exp(tmp_path, *overrides)
  assert culprit in str(e.value) and '\n' not in str(e.value)
  assert not os.path.exists(tmp_path / 'config.json')
