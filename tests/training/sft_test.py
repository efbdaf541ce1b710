"""SFT: completion-only loss mask, learning a fixed trace, non-finite updates are skipped."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlm_jax.data import encoding
from rlm_jax.data.tokenizer import CharTokenizer
from rlm_jax.models import transformer as tfm
from rlm_jax.training import sft
from rlm_jax.training.state import OptimConfig, create_train_state, make_optimizer

TOK = CharTokenizer()
TASKS = [{'problem': 'Compute 2+3.', 'steps': ['2+3=5', 'Answer: 5']},
         {'problem': 'Compute 4*2.', 'steps': ['4*2=8', 'Answer: 8']}]


def test_loss_mask_covers_exactly_the_completion():
  enc = encoding.encode_sft(TOK, TASKS, 40)
  row, loss_mask = enc['tokens'][0], enc['loss_mask'][0]
  p = len(encoding.prompt_ids(TOK, TASKS[0]))
  c = len(encoding.completion_ids(TOK, TASKS[0]['steps']))
  # position i predicts token i+1: completion tokens are at [p, p+c)
  assert np.flatnonzero(loss_mask).tolist() == list(range(p - 1, p + c - 1))
  assert row[p + c - 1] == TOK.eos_id and TOK.decode(row[p:p + c]) == '2+3=5\nAnswer: 5'


def test_sft_memorises_two_traces():
  cfg = tfm.ModelConfig(vocab_size=TOK.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                        head_dim=16, d_ff=64)
  gdef, params = nnx.split(tfm.init_model(cfg))
  tx = make_optimizer(OptimConfig(learning_rate=1e-2))
  state = create_train_state(params, tx)
  batch = {k: jnp.asarray(v) for k, v in encoding.encode_sft(TOK, TASKS, 40).items()}
  first = None
  for _ in range(60):
    state, m = sft.sft_step_jit(gdef, tx, state, batch)
    first = float(m['loss']) if first is None else first
  assert float(m['loss']) < 0.05 * first and float(m['token_accuracy']) == 1.0


def test_non_finite_batch_skips_the_update():
  cfg = tfm.ModelConfig(vocab_size=TOK.vocab_size, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                        head_dim=8, d_ff=32)
  gdef, params = nnx.split(tfm.init_model(cfg))
  params = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan) if x.ndim == 2 else x, params)
  tx = make_optimizer(OptimConfig(learning_rate=1e-2))
  state = create_train_state(params, tx)
  batch = {k: jnp.asarray(v) for k, v in encoding.encode_sft(TOK, TASKS, 40).items()}
  new, m = sft.sft_step_jit(gdef, tx, state, batch)
  assert not bool(m['finite'])
  assert int(new.step) == 0


def test_microbatches_give_the_full_batch_update_in_one_compile():
  """k = 2 accumulated gradients == full-batch gradients (SGD lr 1: update = -grad), though
  the two microbatches hold very different token counts (rows 0, 2 long; 1, 3 short)."""
  import chex
  import optax

  cfg = tfm.ModelConfig(vocab_size=TOK.vocab_size, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                        head_dim=8, d_ff=32)
  gdef, params = nnx.split(tfm.init_model(cfg, seed=3))
  tasks = [{'problem': 'Compute 12+34+5.', 'steps': ['12+34=46', '46+5=51', 'Answer: 51']},
           {'problem': 'Compute 1+1.', 'steps': ['Answer: 2']},
           {'problem': 'Compute 7*8-6.', 'steps': ['7*8=56', '56-6=50', 'Answer: 50']},
           {'problem': 'Compute 3-3.', 'steps': ['Answer: 0']}]
  batch = {k: jnp.asarray(v) for k, v in encoding.encode_sft(TOK, tasks, 48).items()}
  n_mb = np.asarray(batch['loss_mask'])[:, :-1].sum(1)
  assert n_mb[[0, 2]].sum() > 2 * n_mb[[1, 3]].sum()
  tx = optax.sgd(1.0)
  copy = lambda: create_train_state(jax.tree.map(jnp.copy, params), tx)
  full, m1 = jax.jit(sft.sft_step, static_argnums=(0, 1, 4))(gdef, tx, copy(), batch, 1)
  step2 = jax.jit(chex.assert_max_traces(sft.sft_step, n=1), static_argnums=(0, 1),
                  static_argnames=('microbatches',))
  acc, m2 = step2(gdef, tx, copy(), batch, microbatches=2)
  other = dict(batch, tokens=jnp.roll(batch['tokens'], 1, axis=0))
  step2(gdef, tx, copy(), other, microbatches=2)  # new data, same program
  chex.clear_trace_counter()
  np.testing.assert_allclose(float(m2['loss']), float(m1['loss']), rtol=1e-6)
  np.testing.assert_allclose(float(m2['token_accuracy']), float(m1['token_accuracy']), rtol=1e-6)
  grads = lambda st: jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, st.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads(acc),
               grads(full))
  assert max(np.abs(x).max() for x in jax.tree.leaves(grads(full))) > 1e-2
