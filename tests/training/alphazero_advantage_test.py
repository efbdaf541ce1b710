"""Expert iteration with negatives (policy_target='advantage'): sibling advantages of Monte
Carlo outcomes on a hand-built tree, the clipped step surrogate by hand, and distillation that
raises the good step and pushes down a bad sibling the policy preferred."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlm_jax.models.transformer import ModelConfig, Transformer
from rlm_jax.search import export
from rlm_jax.search import lm
from rlm_jax.search.mcts import MCTSConfig
from rlm_jax.training import alphazero as az
from rlm_jax.training.state import OptimConfig, create_train_state, make_optimizer

PAD = 0
TREE_ROWS = jax.jit(az.tree_rows, static_argnums=1)


def _hand_setup(**kw):
  cfg = az.AlphaZeroConfig(mcts=MCTSConfig(num_children=2, max_depth=3, gamma=0.96), step_tokens=3, **kw)
  return az.make_setup(cfg, lm.TokenIds(PAD, 2, 3), prompt_len=3, completion_len=9, value_mode='mse')


def test_sibling_advantages_by_hand(hand_tree):
  # Tree 0: root -> {1, 2}; 2 -> {3, 4 (fails)}; 3 -> {5 (solves)}. Undiscounted outcomes:
  # V(5) = V(3) = +1, V(4) = -1, V(2) = (1 - 1) / 2 = 0, node 1 has none. Under node 2 the
  # siblings 3 and 4 average 0: A(3) = +1, A(4) = -1. Node 2 has no valued sibling and node 5
  # none at all: 0. In tree 1 both terminals fail: every advantage is 0.
  logprob = np.zeros((2, 7), np.float32)
  logprob[:, 1:6] = [-0.5, -1.0, -1.5, -2.0, -2.5]
  tree = hand_tree.replace(logprob_BxN=jnp.asarray(logprob))
  tgt = jax.jit(export.node_targets, static_argnums=(1, 2), static_argnames=('kind', 'min_visits'))(
      tree, 0.96, 3, kind='advantage', min_visits=2)
  np.testing.assert_allclose(tgt.weight_BxN[0], [0, 0, 0, 1, -1, 0, 0], atol=1e-6)
  np.testing.assert_allclose(tgt.weight_BxN[1], np.zeros(7), atol=1e-6)
  # The value targets stay discounted (node 2: (0.96 - 1) / 2); only the weight is undiscounted.
  np.testing.assert_allclose(tgt.value_BxN[0, 2], (0.96 - 1) / 2, rtol=1e-5)
  # A parent's children's advantages sum to 0; with 3 valued siblings each one is measured
  # against the mean of all three: V = (1, -1, 0.5), mean 1/6 -> A = (5/6, -7/6, 1/3).
  v = np.zeros((2, 7), np.float32)
  v[0, [1, 2]] = [1.0, -1.0]
  three = tree.replace(parent_BxN=tree.parent_BxN.at[0, 3].set(0))  # node 3 now under the root
  adv = export.sibling_advantages(three, jnp.asarray(v).at[0, 3].set(0.5), jnp.asarray(v != 0).at[0, 3].set(True))
  np.testing.assert_allclose(adv[0, 1:4], [5 / 6, -7 / 6, 1 / 3], rtol=1e-6)
  # node_rows: the advantages as signed weights (solved_trees_only does not apply: an unsolved
  # tree's advantages are 0 anyway) and each row's step log-prob under the searching policy.
  rows = jax.device_get(TREE_ROWS(tree, _hand_setup(policy_target='advantage', min_visits=2)))
  row = lambda c, b: 2 * (c - 1) + b
  np.testing.assert_allclose(rows['weight'][[row(c, 0) for c in range(1, 7)]], [0, 0, 1, -1, 0, 0], atol=1e-6)
  np.testing.assert_allclose(rows['logp'][[row(c, 0) for c in range(1, 6)]], [-0.5, -1.0, -1.5, -2.0, -2.5])
  # Negatives are kept; their buffer weight is the sign the surrogate uses.
  assert rows['keep'][row(4, 0)]
  buf = az.buffer_add(az.empty_buffer(16, 12, PAD), rows, rows['keep'])
  idx = jnp.asarray(np.nonzero(np.asarray(buf.weight_C) != 0)[0])
  sft = az.sft_rows(buf, idx, prompt_len=3)
  np.testing.assert_array_equal(np.sort(np.asarray(sft['sign'])), [-1.0, 1.0])
  np.testing.assert_allclose(np.sort(np.asarray(sft['old_logp'])), [-2.0, -1.5])


def test_advantage_loss_by_hand():
  # Four rows of two step tokens each; old_logp is the sum over the step, the ratio uses the
  # per-token means: rho = exp(mean logp - old / 2).
  logp = jnp.array([[-1.0, -2.0], [-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]])
  mask = jnp.ones((4, 2), bool)
  old = jnp.array([-3.0, -3.0, -3.0, -1.0])  # rho = 1, e^0.5, e^0.5, e^-0.5
  sign = jnp.array([1.0, 1.0, -1.0, -1.0])
  loss, aux = az.advantage_loss(logp, mask, sign, old, 0.2)
  e = np.exp(0.5)
  # -min(rho s, clip(rho) s): row 0: 1; row 1: min(e^.5, 1.2) = 1.2 (clipped); row 2:
  # min(-e^.5, -1.2) = -e^.5; row 3: min(-e^-.5, -0.8) = -0.8 (clipped).
  want = -np.mean([1.0, 1.2, -e, -0.8])
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(aux['clipped'], 0.5)
  np.testing.assert_allclose(aux['ratio'], np.mean([1.0, e, e, 1 / e]), rtol=1e-6)
  # A masked-out token does not count: row 0 with its second token masked has rho = e^(-1+3).
  loss_m, _ = az.advantage_loss(logp[:1], jnp.array([[True, False]]), sign[:1], jnp.array([-1.0]), 0.2)
  np.testing.assert_allclose(loss_m, -1.0, rtol=1e-6)  # rho = 1
  # At rho = 1 the gradient is -s * d(mean log pi): the policy gradient of the signed rows.
  g = jax.grad(lambda lp: az.advantage_loss(lp, mask, sign, jnp.sum(logp, 1), 0.2)[0])(logp)
  np.testing.assert_allclose(g, -sign[:, None] * np.full((4, 2), 0.5) / 4, rtol=1e-6)
  # Outside the clip range the gradient vanishes where the clip binds (rows 1 and 3).
  g2 = jax.grad(lambda lp: az.advantage_loss(lp, mask, sign, old, 0.2)[0])(logp)
  np.testing.assert_allclose(g2[1], 0.0)
  np.testing.assert_allclose(g2[3], 0.0)
  assert float(g2[2, 0]) > 0  # the negative row with rho > 1 is still pushed down


def test_advantage_config_is_checked():
  with pytest.raises(ValueError, match='adv_clip'):
    az.AlphaZeroConfig(adv_clip=0.0)


def test_one_round_pushes_up_the_steps_that_won_and_down_their_losing_siblings():
  """A real round on arithmetic problems with a policy that half-knows them: the rows carry
  the searching policy's step log-probs (ratio 1 at its params), signed advantages that cancel
  within a tree, and distillation raises the winners' log-probs and lowers the losers'."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from rlm_jax import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  from rlm_jax.data import encoding  # pylint: disable=g-import-not-at-top
  from rlm_jax.data.tokenizer import CharTokenizer  # pylint: disable=g-import-not-at-top
  from rlm_jax.training import losses  # pylint: disable=g-import-not-at-top
  tok = CharTokenizer()
  lp, step, depth = 20, 12, 3
  tasks = tasks_lib.generate_dataset('arithmetic', 8, seed=0, levels=(1,))
  cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64)
  pgd, pparams = nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=0)))
  vgd, vparams = nnx.split(Transformer(dataclasses.replace(cfg, value_head='sigmoid'), rngs=nnx.Rngs(params=1)))
  # Solver traces of the problems, fitted briefly: a policy that solves some samples.
  length = lp + depth * step
  sft_buf = az.empty_buffer(8, length, tok.pad_id)
  for t in tasks:
    prompt, comp = encoding.prompt_ids(tok, t), encoding.completion_ids(tok, t['steps'])
    row = np.full((1, length), tok.pad_id, np.int32)
    row[0, lp - len(prompt):lp], row[0, lp:lp + len(comp)] = prompt, comp
    mask = row != tok.pad_id
    sft_buf = az.buffer_add(sft_buf, {
        'tokens': row, 'mask': mask, 'targets': np.zeros((1, length), np.float32),
        'target_mask': np.zeros((1, length), np.float32), 'policy_mask': np.asarray(az.path_loss_mask(jnp.asarray(mask), lp)),
        'weight': np.ones(1, np.float32), 'solved': np.ones(1, bool)}, np.ones(1, bool))
  ptx = make_optimizer(OptimConfig(learning_rate=1e-2))
  pparams = jax.jit(lambda st: az.distill(pgd, ptx, st, sft_buf, jax.random.key(0), num_steps=30, batch_size=8,
                                          prompt_len=lp)[0].params)(create_train_state(pparams, ptx))
  azc = az.AlphaZeroConfig(mcts=MCTSConfig(num_simulations=4, num_children=4, num_walkers=1, max_depth=depth),
                           step_tokens=step, buffer_size=256, distill_steps=4, distill_batch=16, value_steps=1,
                           value_batch=4, policy_target='advantage', adv_clip=0.2)
  setup = az.make_setup(azc, lm.TokenIds.of(tok), lp, depth * step, 'mse')
  vtx = make_optimizer(OptimConfig(learning_rate=1e-3))
  # The round's own learning rate: 1e-2 (the fit's) lets the negatives drag shared tokens down
  # with the winners' (the clip binds per row, an Adam step overshoots it).
  ptx = make_optimizer(OptimConfig(learning_rate=1e-3))
  state = az.AZState(policy=create_train_state(pparams, ptx), value=create_train_state(vparams, vtx),
                     buffer=az.empty_buffer(256, setup.row_len(), tok.pad_id))
  p0 = jax.tree.map(jnp.copy, pparams)
  prompt, pmask = encoding.encode_prompts(tok, tasks, lp)
  answer, alen = encoding.encode_answers(tok, ['Answer: ' + tasks_lib.answer_text(t) for t in tasks], 10)
  batch = {'prompt': jnp.asarray(prompt), 'prompt_mask': jnp.asarray(pmask), 'answer': jnp.asarray(answer),
           'answer_len': jnp.asarray(alen)}
  state, m = az.alphazero_round_jit(pgd, vgd, ptx, vtx, setup, state, batch, jax.random.key(2), p0)
  buf = jax.device_get(state.buffer)
  n = int(m['buffer_size'])
  assert float(m["solve_rate"]) > 0

  def step_logp(params):
    logits = nnx.merge(pgd, params)(jnp.asarray(buf.tokens_CxL[:n]), mask_BxL=jnp.asarray(buf.mask_CxL[:n])).logits_BxLxV
    lp_NxL = losses.token_logprobs(logits[:, :-1], jnp.asarray(buf.tokens_CxL[:n, 1:]))
    return np.asarray(jnp.sum(jnp.where(jnp.asarray(buf.policy_mask_CxL[:n, :-1]), lp_NxL, 0.0), axis=1))

  before, after = step_logp(p0), step_logp(state.policy.params)
  # The stored behaviour log-probs are the search policy's own: ratio 1 before the update.
  np.testing.assert_allclose(buf.logp_C[:n], before, atol=2e-3)
  w = buf.weight_C[:n]
  assert (w > 0).sum() >= 2 and (w < 0).sum() >= 2
  assert abs(float(w.sum())) < 1e-4 * max(1, n)  # each parent's advantages cancel
  delta = after - before
  assert float(np.mean(delta[w > 0])) > 0 > float(np.mean(delta[w < 0]))
