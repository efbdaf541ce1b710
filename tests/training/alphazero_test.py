"""AlphaZero loop: replay-buffer semantics, q targets from a hand-built tree, one round end to end."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlm_jax import tasks as tasks_lib
from rlm_jax.data import encoding
from rlm_jax.data.tokenizer import CharTokenizer
from rlm_jax.models.transformer import ModelConfig, Transformer
from rlm_jax.search import lm
from rlm_jax.search import tree as tree_lib
from rlm_jax.search.mcts import MCTSConfig
from rlm_jax.training import alphazero as az
from rlm_jax.training import value as value_lib
from rlm_jax.training.state import OptimConfig, create_train_state, make_optimizer

PAD = 0


def _rows(ids, length=3):
  """Rows whose tokens all equal their id (so a slot shows which row landed there)."""
  ids = np.asarray(ids)
  tok = np.repeat(ids[:, None], length, axis=1).astype(np.int32)
  return {'tokens': tok, 'mask': np.ones_like(tok, bool), 'targets': tok.astype(np.float32) / 100,
          'target_mask': np.ones_like(tok, np.float32), 'solved': ids % 2 == 0}


def _slots(buf):
  return [int(t) if v else None for t, v in zip(np.asarray(buf.tokens_CxL[:, 0]), np.asarray(buf.valid_C))]


def test_buffer_is_fifo_and_overwrites_the_oldest_rows():
  buf = az.empty_buffer(4, 3, PAD)
  assert _slots(buf) == [None] * 4
  buf = az.buffer_add(buf, _rows([10, 11, 12]), np.array([True, False, True]))  # 11 is not kept
  assert _slots(buf) == [10, 12, None, None] and int(buf.next_) == 2 and int(buf.added) == 2
  buf = az.buffer_add(buf, _rows([20, 21, 22]), np.ones(3, bool))  # wraps around: 22 replaces 10
  assert _slots(buf) == [22, 12, 20, 21] and int(buf.next_) == 1 and int(buf.added) == 5
  np.testing.assert_array_equal(buf.solved_C, [True, True, True, False])
  np.testing.assert_allclose(buf.targets_CxL[2], [0.2] * 3)
  # More rows than slots: only the last 4 stay, still oldest-first from the write position.
  buf = az.buffer_add(buf, _rows([30, 31, 32, 33, 34, 35]), np.ones(6, bool))
  assert _slots(buf) == [35, 32, 33, 34] and int(buf.next_) == 1 and int(buf.added) == 11
  with pytest.raises(ValueError, match='5 tokens'):
    az.buffer_add(buf, _rows([1], length=5), np.ones(1, bool))


def test_sampling_draws_only_eligible_rows_uniformly():
  eligible = jnp.array([False, True, False, True, False])
  idx, ok = az.sample_rows(eligible, jax.random.key(0), 2000)
  counts = np.bincount(np.asarray(idx), minlength=5)
  assert bool(ok) and counts[[0, 2, 4]].sum() == 0
  assert abs(counts[1] - 1000) < 120  # binomial(2000, 1/2): sd ~22
  _, ok = az.sample_rows(jnp.zeros(5, bool), jax.random.key(0), 4)
  assert not bool(ok)
  # Distillation draws solved rows only, the value fit every valid row.
  buf = az.buffer_add(az.empty_buffer(4, 3, PAD), _rows([10, 11, 12]), np.ones(3, bool))
  d_idx, _ = az.sample_rows(buf.valid_C & buf.solved_C, jax.random.key(1), 200)
  v_idx, _ = az.sample_rows(buf.valid_C, jax.random.key(1), 200)
  assert set(np.asarray(d_idx).tolist()) == {0, 2} and set(np.asarray(v_idx).tolist()) == {0, 1, 2}


def _hand_tree():
  """Two trees: root 0 -> {1, 2}; 2 -> {3, 4 (terminal)}; 3 -> {5 (terminal)}.
  Tree 0 solves at node 5 (reward +1); in tree 1 both terminals are wrong (reward -1)."""
  prompt = jnp.array([[PAD, 7, 8], [PAD, 7, 9]])
  t = tree_lib.empty(prompt, prompt != PAD, jnp.array([0, 1]), num_nodes=7, step_len=3, pad_id=PAD,
                     root_value_B=jnp.array([0.5, -0.5]))
  steps = np.zeros((2, 7, 3), np.int32)
  lens = np.zeros((2, 7), np.int32)
  for node, toks in {1: [11, 3], 2: [21, 22, 3], 3: [31, 3], 4: [41, 2], 5: [51, 2]}.items():
    steps[:, node, 3 - len(toks):] = toks
    lens[:, node] = len(toks)
  two = lambda x, y=None: jnp.asarray(np.array([x, x if y is None else y]))
  nan = np.nan
  return t.replace(
      parent_BxN=two([-1, 0, 0, 2, 2, 3, -1]), depth_BxN=two([0, 1, 1, 2, 2, 3, 0]),
      visits_BxN=two([6, 1, 4, 2, 1, 1, 0]), first_child_BxN=two([1, -1, 3, 5, -1, -1, -1]),
      num_children_BxN=two([2, 0, 2, 1, 0, 0, 0]),
      terminal_BxN=two([False, False, False, False, True, True, False]),
      q_BxN=two([0.5, -0.2, 0.6, 0.8, -1.0, 1.0, 0.0], [-0.5, -0.2, -0.9, -0.96, -1.0, -1.0, 0.0]
                ).astype(jnp.float32),
      reward_BxN=two([nan, nan, nan, nan, -1.0, 1.0, nan], [nan, nan, nan, nan, -1.0, -1.0, nan]
                     ).astype(jnp.float32),
      step_tokens_BxNxL=jnp.asarray(steps), step_len_BxN=jnp.asarray(lens), num_nodes_B=jnp.array([6, 6]))


def test_q_targets_from_a_hand_built_tree():
  tree = _hand_tree()
  leaf = jax.jit(az.training_leaf, static_argnums=1)(tree, MCTSConfig(num_children=2, max_depth=3,
                                                                     answer='most_visited'))
  # The best terminal, whatever `answer` says: node 5 in tree 0; in tree 1 the first of the two
  # equally bad terminals (node 4).
  np.testing.assert_array_equal(leaf, [5, 4])
  rows = jax.jit(az.search_rows, static_argnums=(2, 3, 4))(tree, leaf, 0.96, 3, PAD)
  np.testing.assert_array_equal(rows['tokens'][0], [PAD, 7, 8, 21, 22, 3, 31, 3, 51, 2, PAD, PAD])
  np.testing.assert_array_equal(rows['mask'][0], [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
  want = np.zeros(12)
  want[[5, 7, 9]] = [(0.6 + 1) / 2, (0.8 + 1) / 2, 1.0]  # P(correct) = (q + 1) / 2 on step ends
  np.testing.assert_allclose(rows['targets'][0], want, rtol=1e-6)
  np.testing.assert_array_equal(rows['target_mask'][0], want > 0)
  np.testing.assert_array_equal(rows['tokens'][1], [PAD, 7, 9, 21, 22, 3, 41, 2, PAD, PAD, PAD, PAD])
  want1 = np.zeros(12)
  want1[[5, 7]] = [(-0.9 + 1) / 2, 0.0]
  np.testing.assert_allclose(rows['targets'][1], want1, atol=1e-6)
  np.testing.assert_array_equal(rows['target_mask'][1], [0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(rows['solved'], [True, False])
  # Distillation learns the path tokens only: the targets 21 .. EOS.
  buf = az.buffer_add(az.empty_buffer(2, 12, PAD), rows, np.ones(2, bool))
  sft = az.sft_rows(buf, jnp.array([0]), prompt_len=3)
  np.testing.assert_array_equal(sft['loss_mask'][0], [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])


# --- one round end to end -----------------------------------------------------------------

TOK = CharTokenizer()
LP, STEP, DEPTH = 20, 12, 3


def _solved_row(task):
  """The solver's trace as a buffer row: left-padded prompt, steps, label 1 on each step end."""
  length = LP + DEPTH * STEP
  prompt = encoding.prompt_ids(TOK, task)
  comp = encoding.completion_ids(TOK, task['steps'])
  tok = np.full((1, length), TOK.pad_id, np.int32)
  tok[0, LP - len(prompt):LP] = prompt
  tok[0, LP:LP + len(comp)] = comp
  mask = np.zeros((1, length), bool)
  mask[0, LP - len(prompt):LP + len(comp)] = True
  ends = mask & ((tok == TOK.step_id) | (tok == TOK.eos_id)) & (np.arange(length) >= LP)
  return {'tokens': tok, 'mask': mask, 'targets': ends.astype(np.float32), 'target_mask': ends.astype(np.float32),
          'solved': np.array([True])}


def test_one_round_distils_the_solved_path_and_fits_the_value_model():
  tasks = tasks_lib.generate_dataset('arithmetic', 3, seed=0, levels=(1,))
  cfg = ModelConfig(vocab_size=TOK.vocab_size, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                    d_ff=32)
  pgd, pparams = nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=0)))
  vgd, vparams = nnx.split(Transformer(dataclasses.replace(cfg, value_head='sigmoid'), rngs=nnx.Rngs(params=1)))
  azc = az.AlphaZeroConfig(mcts=MCTSConfig(num_simulations=2, num_children=2, num_walkers=1, max_depth=DEPTH),
                           step_tokens=STEP, buffer_size=6, distill_steps=4, distill_batch=4, value_steps=8,
                           value_batch=4)
  setup = az.make_setup(azc, lm.TokenIds.of(TOK), LP, 24, 'mse')
  ptx = make_optimizer(OptimConfig(learning_rate=1e-2))
  vtx = make_optimizer(OptimConfig(learning_rate=1e-2))
  solved = _solved_row(tasks[0])
  buffer = az.buffer_add(az.empty_buffer(6, setup.row_len(), TOK.pad_id), solved, np.ones(1, bool))
  state = az.AZState(policy=create_train_state(pparams, ptx), value=create_train_state(vparams, vtx), buffer=buffer)
  p0, v0 = jax.tree.map(jnp.copy, (pparams, vparams))  # the round donates its state
  prompt, pmask = encoding.encode_prompts(TOK, tasks[1:], LP)
  answer, alen = encoding.encode_answers(TOK, ['Answer: ' + tasks_lib.answer_text(t) for t in tasks[1:]], 10)
  batch = {'prompt': jnp.asarray(prompt), 'prompt_mask': jnp.asarray(pmask), 'answer': jnp.asarray(answer),
           'answer_len': jnp.asarray(alen)}

  traces = az.alphazero_round_jit._cache_size()
  state, m = az.alphazero_round_jit(pgd, vgd, ptx, vtx, setup, state, batch, jax.random.key(0))
  m = jax.device_get(m)
  buf = jax.device_get(state.buffer)
  # The two searched problems joined the hand-made row.
  assert int(m['buffer_size']) == 3 and np.asarray(buf.valid_C).sum() == 3 and int(buf.next_) == 3
  assert float(m['solve_rate']) == np.mean(buf.solved_C[1:3]) and int(m['buffer_solved']) == buf.solved_C.sum()
  assert bool(m['finite']) and float(m['sft_loss']) > 0
  # Each new row holds a prompt of the batch and its path's step labels in [0, 1].
  for r in (1, 2):
    np.testing.assert_array_equal(buf.tokens_CxL[r, :LP][buf.mask_CxL[r, :LP]], prompt[r - 1][pmask[r - 1]])
    labels = buf.targets_CxL[r][buf.target_mask_CxL[r] > 0]
    assert len(labels) >= 1 and np.all((labels >= 0) & (labels <= 1))

  # Distillation raised the log-probability of the solved path.
  lp = lambda params: float(az.path_logprob(pgd, params, solved, LP)[0])
  assert lp(state.policy.params) > lp(p0) + 1.0
  # The value loss over the (fixed) buffer fell.
  rows = az.value_rows(state.buffer, jnp.arange(3))
  loss = lambda params: float(value_lib.value_loss_fn(vgd, params, rows, 'mse')[0])
  assert loss(state.value.params) < 0.8 * loss(v0)

  # A second round reuses the compiled program.
  state, m2 = az.alphazero_round_jit(pgd, vgd, ptx, vtx, setup, state, batch, jax.random.key(1))
  assert int(m2['buffer_size']) == 5
  assert az.alphazero_round_jit._cache_size() == traces + 1
