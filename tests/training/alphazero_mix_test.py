"""Expert iteration's data mix: solver traces' cross-entropy joins every distillation step."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlm_jax import configlib
from rlm_jax.experiment import config as config_lib
from rlm_jax.models.transformer import ModelConfig, Transformer
from rlm_jax.training import alphazero as az
from rlm_jax.training import losses
from rlm_jax.training.state import OptimConfig, create_train_state, make_optimizer

V, LP, L = 12, 3, 5
CFG = ModelConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _node_row(prompt, token, weight=1.0):
  tokens = np.zeros((1, L), np.int32)
  tokens[0, :LP], tokens[0, LP:LP + 2] = prompt, [token, 3]
  policy = np.zeros((1, L), bool)
  policy[0, LP - 1] = True
  return {'tokens': tokens, 'mask': tokens != 0, 'targets': np.zeros((1, L), np.float32),
          'target_mask': np.zeros((1, L), np.float32), 'policy_mask': policy, 'weight': np.array([weight], np.float32),
          'solved': np.array([True])}


def _trace(prompt, token, n):
  """n copies of an SFT row (encode_sft layout): loss_mask at t where token t + 1 is learnt."""
  tokens = np.zeros((n, L), np.int32)
  tokens[:, :LP], tokens[:, LP:LP + 2] = prompt, [token, 3]
  loss = np.zeros((n, L), bool)
  loss[:, LP - 1:LP + 1] = True
  return {'tokens': jnp.asarray(tokens), 'mask': jnp.asarray(tokens != 0), 'loss_mask': jnp.asarray(loss)}


def test_mix_loss_is_the_weighted_cross_entropy_of_the_traces():
  gd, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(params=0)))
  row = _node_row([4, 5, 6], 7)
  trace = _trace([4, 9, 6], 8, 2)
  batch = {'tokens': jnp.asarray(row['tokens']), 'mask': jnp.asarray(row['mask']),
           'loss_mask': jnp.asarray(row['policy_mask']), 'kl_mask': jnp.asarray(row['policy_mask']),
           **{f'mix_{k}': v for k, v in trace.items()}}
  loss_fn = jax.jit(az.distill_loss_fn, static_argnums=(0, 3, 4, 5))
  loss, aux = loss_fn(gd, params, batch, None, 0.0, 0.5)
  logits = jax.jit(lambda p: nnx.merge(gd, p)(trace['tokens'], mask_BxL=trace['mask']).logits_BxLxV)(params)
  want_mix, _ = losses.sft_loss(logits[:, :-1], trace['tokens'][:, 1:], trace['loss_mask'][:, :-1])
  assert float(want_mix) > 1.0  # an untrained model: ~log V per token
  np.testing.assert_allclose(float(aux['mix']), float(want_mix), rtol=1e-6)
  np.testing.assert_allclose(float(loss), float(aux['ce']) + 0.5 * float(want_mix), rtol=1e-6)
  assert float(loss_fn(gd, params, batch, None, 0.0, 0.0)[1]['mix']) == 0.0  # off: not computed


def test_the_mix_keeps_what_sft_taught_while_distilling_new_rows():
  """After SFT teaches prompt P1 -> token A, distillation on node rows P2 -> B alone drags P1
  toward B as well (one tiny model shares everything); with P1's traces mixed into every
  step, P(A | P1) stays high while P(B | P2) is learnt just the same."""
  gd, params = nnx.split(Transformer(CFG, rngs=nnx.Rngs(params=0)))
  tx = make_optimizer(OptimConfig(learning_rate=3e-2, grad_clip=0.0))
  p1, p2, a, b = [4, 5, 6], [4, 5, 9], 7, 8

  @jax.jit
  def prob(p, prompt, token):
    return jax.nn.softmax(nnx.merge(gd, p)(jnp.asarray([prompt])).logits_BxLxV[0, -1])[token]

  def buffer(*rows):
    buf = az.empty_buffer(2, L, 0)
    for r in rows:
      buf = az.buffer_add(buf, r, np.ones(1, bool))
    return buf

  steps = 40
  sft = jax.jit(lambda st, key: az.distill(gd, tx, st, buffer(_node_row(p1, a)), key, num_steps=steps,
                                           batch_size=4, prompt_len=LP)[0])
  start = sft(create_train_state(params, tx), jax.random.key(0))
  assert float(prob(start.params, p1, a)) > 0.9
  mix_rows = {k: jnp.broadcast_to(v, (steps,) + v.shape) for k, v in _trace(p1, a, 4).items()}
  got = {}
  for mix in (0.0, 1.0):
    fit = jax.jit(lambda st, key, m=mix: az.distill(gd, tx, st, buffer(_node_row(p2, b)), key, num_steps=steps,
                                                      batch_size=4, prompt_len=LP, sft_mix=m, mix_rows=mix_rows)[0])
    st = fit(jax.tree.map(jnp.copy, start), jax.random.key(1))
    got[mix] = float(prob(st.params, p1, a)), float(prob(st.params, p2, b))
  (keep0, new0), (keep1, new1) = got[0.0], got[1.0]
  assert new0 > 0.8 and new1 > 0.8  # the new rows are learnt either way
  assert keep1 > 0.8 and keep1 > keep0 + 0.2, got  # only the mix keeps P1 -> A


def test_sft_mix_without_sft_traces_is_one_line():
  with pytest.raises(configlib.ConfigError) as e:
    config_lib.parse(configlib.load_config(os.path.join(REPO, 'configs', 'alphazero.py') + ':mix', ['sft.steps=0']))
  assert 'rl.alphazero.sft_mix=1.0' in str(e.value) and '\n' not in str(e.value)
