"""AlphaZero loop: replay-buffer semantics, rows and targets from a hand-built tree (best path,
every node with visit shares and Monte Carlo values), the KL anchor, one round end to end."""
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
          'target_mask': np.ones_like(tok, np.float32), 'policy_mask': np.ones_like(tok, bool),
          'weight': (ids % 2 == 0).astype(np.float32), 'solved': ids % 2 == 0}


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
  with pytest.raises(ValueError, match='weight'):
    az.buffer_add(buf, {k: v for k, v in _rows([1]).items() if k != 'weight'}, np.ones(1, bool))


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
  # In proportion to the weights: 1 : 3.
  w_idx, _ = az.sample_rows(eligible, jax.random.key(2), 4000, jnp.array([5.0, 1.0, 5.0, 3.0, 5.0]))
  counts = np.bincount(np.asarray(w_idx), minlength=5)
  assert counts[[0, 2, 4]].sum() == 0 and abs(counts[3] - 3000) < 100  # binomial(4000, 3/4): sd ~27


def test_q_targets_from_a_hand_built_tree(hand_tree):
  tree = hand_tree
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
  # Rejection-sampling rows (policy_target='best_path') learn the path tokens only: the
  # targets 21 .. EOS, weight 1 where solved.
  setup = _hand_setup(policy_target='best_path', value_target='q')
  prow = TREE_ROWS(tree, setup)
  for k in ('tokens', 'mask', 'targets', 'target_mask'):
    np.testing.assert_allclose(prow[k], rows[k], atol=1e-6)
  np.testing.assert_array_equal(prow['weight'], [1.0, 0.0])
  np.testing.assert_array_equal(prow['solved_B'], [True, False])
  buf = az.buffer_add(az.empty_buffer(2, 12, PAD), prow, prow['keep'])
  sft = az.sft_rows(buf, jnp.array([0]), prompt_len=3)
  np.testing.assert_array_equal(sft['loss_mask'][0], [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(sft['kl_mask'][0], sft['loss_mask'][0])
  # The same path with Monte Carlo labels (gamma 0.96): node 2 (-1 + 0.96) / 2, node 3 +1,
  # node 5 its reward +1.
  mrow = TREE_ROWS(tree, _hand_setup(policy_target='best_path', value_target='mc'))
  want[[5, 7, 9]] = [((-1 + 0.96) / 2 + 1) / 2, 1.0, 1.0]
  np.testing.assert_allclose(mrow['targets'][0], want, rtol=1e-6)


TREE_ROWS = jax.jit(az.tree_rows, static_argnums=1)


def _hand_setup(**kw):
  cfg = az.AlphaZeroConfig(mcts=MCTSConfig(num_children=2, max_depth=3, gamma=0.96), step_tokens=3, **kw)
  return az.make_setup(cfg, lm.TokenIds(PAD, 2, 3), prompt_len=3, completion_len=9, value_mode='mse')


def test_node_rows_carry_visit_shares_and_monte_carlo_values(hand_tree):
  tree = hand_tree
  rows = jax.device_get(TREE_ROWS(tree, _hand_setup(min_visits=2)))
  # Node-major: row 2 (c - 1) + b is node c of tree b; 6 slots give 2 x 6 rows.
  assert rows['tokens'].shape == (12, 12)
  row = lambda c, b: 2 * (c - 1) + b
  # Node 5 of tree 0: prompt, the steps of nodes 2 and 3, then its own step (the policy target).
  r = row(5, 0)
  np.testing.assert_array_equal(rows['tokens'][r], [PAD, 7, 8, 21, 22, 3, 31, 3, 51, 2, PAD, PAD])
  np.testing.assert_array_equal(rows['policy_mask'][r], [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(rows['target_mask'][r], np.arange(12) == 9)
  np.testing.assert_allclose(rows['targets'][r, 9], 1.0)
  # Weights: the visit shares (1/5, 4/5 under the root; 2/3, 1/3 under node 2; 1 under node
  # 3) in the solved tree 0, none in tree 1 (solved_trees_only).
  np.testing.assert_allclose(rows['weight'][[row(c, 0) for c in range(1, 7)]], [0.2, 0.8, 2 / 3, 1 / 3, 1.0, 0.0],
                             rtol=1e-6)
  np.testing.assert_array_equal(rows['weight'][[row(c, 1) for c in range(1, 7)]], 0.0)
  # Value labels P(correct) = (V + 1) / 2 on each node's last token: node 2 (-1 + 0.96) / 2,
  # node 3 +1 (2 visits), node 4 -1 (a terminal); node 1 has no verified terminal below.
  lab = lambda c, b: float(rows['targets'][row(c, b)].sum())
  has = lambda c, b: float(rows['target_mask'][row(c, b)].sum())
  assert [has(c, 0) for c in range(1, 7)] == [0, 1, 1, 1, 1, 0]
  np.testing.assert_allclose([lab(c, 0) for c in (2, 3, 4)], [(-0.04 / 2 + 1) / 2, 1.0, 0.0], atol=1e-6)
  np.testing.assert_allclose([lab(c, 1) for c in (2, 3)], [(-1.96 / 2 + 1) / 2, 0.0], atol=1e-6)
  np.testing.assert_array_equal(rows['target_mask'][row(2, 0)], np.arange(12) == 5)
  # Kept: rows with a weight or a label; node 1 of tree 1 and the unused slot 6 are not.
  np.testing.assert_array_equal(rows['keep'].reshape(6, 2), [[1, 0], [1, 1], [1, 1], [1, 1], [1, 1], [0, 0]])
  np.testing.assert_array_equal(rows['solved'].reshape(6, 2)[:, 0], [0, 1, 1, 0, 1, 0])
  # min_visits=3 drops node 3's value target (2 visits), not the verified terminals'.
  rows3 = TREE_ROWS(tree, _hand_setup(min_visits=3))
  assert float(rows3['target_mask'][row(3, 0)].sum()) == 0 and float(rows3['target_mask'][row(5, 0)].sum()) == 1
  # q_softmax weights and q labels.
  rq = TREE_ROWS(tree, _hand_setup(policy_target='q_softmax', q_temperature=0.5, value_target='q'))
  np.testing.assert_allclose(rq['weight'][row(1, 0)], 1 / (1 + np.exp(1.6)), rtol=1e-5)
  np.testing.assert_allclose(rq['targets'][row(1, 0)].sum(), (-0.2 + 1) / 2, rtol=1e-5)
  # A distillation batch of node 5's row learns only its own step.
  buf = az.buffer_add(az.empty_buffer(16, 12, PAD), rows, rows['keep'])
  idx = int(np.nonzero(np.asarray(buf.tokens_CxL[:, 8]) == 51)[0][0])
  sft = az.sft_rows(buf, jnp.array([idx]), prompt_len=3)
  np.testing.assert_array_equal(sft['loss_mask'][0], [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(sft['kl_mask'][0], [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])


def test_config_names_a_bad_key():
  with pytest.raises(ValueError, match='policy_target'):
    az.AlphaZeroConfig(policy_target='path')
  with pytest.raises(ValueError, match='q_temperature'):
    az.AlphaZeroConfig(q_temperature=0.0)
  with pytest.raises(ValueError, match='min_visits'):
    az.AlphaZeroConfig(min_visits=0)
  with pytest.raises(ValueError, match='kl_beta'):
    az.AlphaZeroConfig(kl_beta=-0.1)


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
          'policy_mask': np.asarray(az.path_loss_mask(jnp.asarray(mask), LP)), 'weight': np.array([1.0]),
          'solved': np.array([True])}


def _tiny_models():
  cfg = ModelConfig(vocab_size=TOK.vocab_size, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                    d_ff=32)
  pgd, pparams = nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=0)))
  vgd, vparams = nnx.split(Transformer(dataclasses.replace(cfg, value_head='sigmoid'), rngs=nnx.Rngs(params=1)))
  return pgd, pparams, vgd, vparams


def test_kl_anchor_is_zero_at_the_start_params_and_positive_after_a_change():
  tasks = tasks_lib.generate_dataset('arithmetic', 3, seed=0, levels=(1,))
  pgd, pparams, _, _ = _tiny_models()
  row = _solved_row(tasks[0])
  batch = {'tokens': jnp.asarray(row['tokens']), 'mask': jnp.asarray(row['mask']),
           'loss_mask': jnp.asarray(row['policy_mask']), 'kl_mask': jnp.asarray(row['policy_mask'])}
  loss_fn = jax.jit(az.distill_loss_fn, static_argnums=(0, 4))
  loss, aux = loss_fn(pgd, pparams, batch, pparams, 0.5)
  assert abs(float(aux['kl'])) < 1e-6 and float(loss) == pytest.approx(float(aux['ce']), abs=1e-6)
  moved = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape, x.dtype), pparams)
  loss2, aux2 = loss_fn(pgd, moved, batch, pparams, 0.5)
  assert float(aux2['kl']) > 1e-4
  assert float(loss2) == pytest.approx(float(aux2['ce']) + 0.5 * float(aux2['kl']), rel=1e-5)
  # Hand check of the divergence itself: KL([0.5, 0.5] || [0.25, 0.75]) at one position.
  lg = jnp.log(jnp.array([[[0.5, 0.5]]]))
  ref = jnp.log(jnp.array([[[0.25, 0.75]]]))
  want = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
  np.testing.assert_allclose(az.anchor_kl(lg, ref, jnp.ones((1, 1))), want, rtol=1e-5)
  # beta = 0: no reference pass, no KL.
  _, aux0 = loss_fn(pgd, moved, batch, None, 0.0)
  assert float(aux0['kl']) == 0.0


def test_one_round_distils_the_weighted_rows_and_fits_the_value_model():
  tasks = tasks_lib.generate_dataset('arithmetic', 3, seed=0, levels=(1,))
  pgd, pparams, vgd, vparams = _tiny_models()
  # Every node of the two trees is a row (visit shares, Monte Carlo values); KL anchor on.
  azc = az.AlphaZeroConfig(mcts=MCTSConfig(num_simulations=2, num_children=2, num_walkers=1, max_depth=DEPTH),
                           step_tokens=STEP, buffer_size=16, distill_steps=4, distill_batch=4, value_steps=8,
                           value_batch=4, value_target='q', kl_beta=0.1)
  setup = az.make_setup(azc, lm.TokenIds.of(TOK), LP, 24, 'mse')
  ptx = make_optimizer(OptimConfig(learning_rate=1e-2))
  vtx = make_optimizer(OptimConfig(learning_rate=1e-2))
  solved = _solved_row(tasks[0])
  buffer = az.buffer_add(az.empty_buffer(16, setup.row_len(), TOK.pad_id), solved, np.ones(1, bool))
  state = az.AZState(policy=create_train_state(pparams, ptx), value=create_train_state(vparams, vtx), buffer=buffer)
  p0, v0 = jax.tree.map(jnp.copy, (pparams, vparams))  # the round donates its state
  prompt, pmask = encoding.encode_prompts(TOK, tasks[1:], LP)
  answer, alen = encoding.encode_answers(TOK, ['Answer: ' + tasks_lib.answer_text(t) for t in tasks[1:]], 10)
  batch = {'prompt': jnp.asarray(prompt), 'prompt_mask': jnp.asarray(pmask), 'answer': jnp.asarray(answer),
           'answer_len': jnp.asarray(alen)}

  traces = az.alphazero_round_jit._cache_size()
  state, m = az.alphazero_round_jit(pgd, vgd, ptx, vtx, setup, state, batch, jax.random.key(0), p0)
  m = jax.device_get(m)
  buf = jax.device_get(state.buffer)
  # The nodes of the two trees (2 simulations of 2 children: 2 to 4 nodes each, all labelled
  # with their q) joined the hand-made row.
  n = int(m['buffer_size'])
  assert 5 <= n <= 9 and np.asarray(buf.valid_C).sum() == n and int(buf.next_) == n
  assert int(m['value_labels']) == n - 1 and int(m['buffer_solved']) == buf.solved_C.sum()
  assert bool(m['finite']) and float(m['sft_loss']) > 0 and float(m['kl']) > 0
  # Each node row holds a prompt of the batch, one label in [0, 1] on its last token, and
  # learns (if at all) its last step only.
  prompts = {tuple(prompt[i][pmask[i]]) for i in range(2)}
  for r in range(1, n):
    assert tuple(buf.tokens_CxL[r, :LP][buf.mask_CxL[r, :LP]]) in prompts
    labels = buf.targets_CxL[r][buf.target_mask_CxL[r] > 0]
    assert len(labels) == 1 and 0 <= labels[0] <= 1
    last = np.nonzero(buf.mask_CxL[r])[0][-1]
    assert buf.target_mask_CxL[r, last] == 1 and not buf.policy_mask_CxL[r, last]
    assert buf.policy_mask_CxL[r].sum() <= STEP
  # Unsolved trees give no policy weight; the hand-made row keeps its weight 1.
  assert buf.weight_C[0] == 1.0 and np.all((buf.weight_C[1:n] > 0) <= buf.solved_C[1:n].any())

  # Distillation raised the log-probability of the solved path.
  lp = lambda params: float(az.path_logprob(pgd, params, solved, LP)[0])
  assert lp(state.policy.params) > lp(p0) + 1.0
  # The value loss over the (fixed) buffer fell.
  rows = az.value_rows(state.buffer, jnp.arange(n))
  loss = lambda params: float(value_lib.value_loss_fn(vgd, params, rows, 'mse')[0])
  assert loss(state.value.params) < 0.9 * loss(v0)

  # A second round reuses the compiled program.
  state, m2 = az.alphazero_round_jit(pgd, vgd, ptx, vtx, setup, state, batch, jax.random.key(1), p0)
  assert int(m2['buffer_size']) > n
  assert az.alphazero_round_jit._cache_size() == traces + 1
