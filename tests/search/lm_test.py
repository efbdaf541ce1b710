"""The LM adapter with a tiny random Transformer: callables, reward, and every strategy end to end."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlm_jax.data.tokenizer import CharTokenizer, pad_batch
from rlm_jax.models.transformer import ModelConfig, ModelOutput, Transformer, positions_from_mask
from rlm_jax.sampling import sampler as sampler_lib
from rlm_jax.search import config as search_config
from rlm_jax.search import lm
from rlm_jax.search import tree as tree_lib
from rlm_jax.search.base import NodeBatch

TOK = CharTokenizer()
IDS = lm.TokenIds.of(TOK)


def _model(value_head='sigmoid', seed=0):
  cfg = ModelConfig(vocab_size=TOK.vocab_size, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                    d_ff=32, value_head=value_head)
  return nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=seed)))


GD, STATE = _model()
OPTS = lm.LMOptions(step_tokens=4, completion_tokens=10, value_from_policy=True)
PROBLEMS = ['1+1', '2+5']
ANSWERS = ['Answer: 2', 'Answer: 7']


def _prompts():
  rows = [TOK.encode(p, bos=True) + [TOK.step_id] for p in PROBLEMS]
  p, m = pad_batch(rows, 8, TOK.pad_id)
  return jnp.asarray(p), jnp.asarray(m)


def test_answer_reward():
  table = lm.answer_table(TOK, ANSWERS, 12)
  rows = [TOK.encode_steps(['1+1=2', 'Answer: 2']),  # right
          TOK.encode_steps(['Answer: 2']),  # right, one step
          TOK.encode_steps(['Answer: 3']),  # wrong
          TOK.encode_steps(['Answer: 2'], final=False),  # no EOS
          TOK.encode_steps(['Answer: 22'])]  # longer
  tok, mask = pad_batch(rows, 20, TOK.pad_id, side='right')
  r = lm.answer_reward_fn(IDS)(table, jnp.asarray(tok), jnp.asarray(mask), jnp.zeros((5,), jnp.int32))
  np.testing.assert_array_equal(r, [1, 1, -1, -1, -1])
  tok7, mask7 = pad_batch([TOK.encode_steps(['Answer: 7'])], 20, TOK.pad_id, side='right')
  assert float(lm.answer_reward_fn(IDS)(table, jnp.asarray(tok7), jnp.asarray(mask7), jnp.array([1]))[0]) == 1


def test_policy_fn_is_one_sampler_call_over_repeated_rows():
  """One prefill per node (`num_samples`) gives exactly the samples of the repeated rows."""
  model = lm.make_search_model(GD, OPTS, IDS)
  p, m = _prompts()
  nodes = NodeBatch(p, m, jnp.zeros((2,), jnp.int32), jnp.arange(2))
  key = jax.random.key(3)
  policy = jax.jit(lambda p, k, n: model.policy_fn(p, k, n, 3, to_end=False, greedy=False))
  steps = policy(lm.LMParams(policy=STATE), key, nodes)
  assert steps.tokens_MxKxL.shape == (2, 3, 4)
  cfg = sampler_lib.SamplingConfig(max_new_tokens=4, eos_id=IDS.eos_id, pad_id=IDS.pad_id, step_id=IDS.step_id,
                                   stop_at_step=True)
  ref = sampler_lib.sample(GD, STATE, jnp.repeat(p, 3, 0), jnp.repeat(m, 3, 0), key, cfg)
  np.testing.assert_array_equal(steps.tokens_MxKxL.reshape(6, 4), ref.tokens_BxT)
  np.testing.assert_allclose(steps.logprob_MxK.reshape(6), ref.logprobs_BxT.sum(1), rtol=1e-6)
  np.testing.assert_array_equal(steps.terminal_MxK.reshape(6), ref.stop_reason_B == sampler_lib.StopReason.EOS)
  # Samples of one node differ (each row draws its own tokens).
  assert len({tuple(r) for r in np.asarray(steps.tokens_MxKxL[0])}) > 1


def test_logit_value_head_is_mapped_to_reward_units():
  gd, st = _model('logit', seed=1)
  model = lm.make_search_model(GD, dataclasses.replace(OPTS, value_from_policy=False), IDS, value_graphdef=gd)
  p, m = _prompts()
  v = model.value_fn(lm.LMParams(policy=STATE, value=st), NodeBatch(p, m, jnp.zeros(2, jnp.int32), jnp.arange(2)))
  raw = nnx.merge(gd, st)(p, positions_from_mask(m), m).values_BxL
  np.testing.assert_allclose(v, 2 * jax.nn.sigmoid(raw) - 1, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='not both'):
    lm.make_search_model(GD, OPTS, IDS, value_graphdef=gd)


# ------------------------------------------------------------------------------------------
# Every strategy end to end: shapes and compute counters.


def _setup():
  c = search_config.get_config()
  c.mcts.update(num_simulations=3, num_children=2, num_walkers=2, max_depth=3)
  c.beam.update(beam_width=2, expansions=2, max_depth=3)
  c.best_of_n.num_samples = 3
  c.self_consistency.num_samples = 3
  return search_config.build(c)


@pytest.mark.parametrize('name', search_config.STRATEGY_NAMES)
def test_strategy_end_to_end(name):
  setup = _setup()
  model = lm.make_search_model(GD, OPTS, IDS, reward_fn=lm.answer_reward_fn(IDS))
  params = lm.LMParams(policy=STATE, reward=lm.answer_table(TOK, ANSWERS, 12))
  fn = jax.jit(functools.partial(search_config.build_strategy(setup, name, TOK.encode), model=model))
  res = fn(params, jax.random.key(0), *_prompts())
  r = jax.tree.map(np.asarray, res)
  b = 2
  assert r.lengths_B.shape == (b,) and r.score_B.shape == (b,)
  assert ((r.lengths_B > 0) & (r.lengths_B <= r.tokens_BxL.shape[1])).all()
  assert (r.tokens_BxL[np.arange(r.tokens_BxL.shape[1])[None] >= r.lengths_B[:, None]] == TOK.pad_id).all()
  texts = lm.decode_result(TOK, res)
  assert len(texts) == b and all(isinstance(t, str) for t in texts)
  if name == 'chain':
    assert r.tokens_BxL.shape == (b, OPTS.completion_tokens)
    np.testing.assert_array_equal(r.policy_tokens_B, r.lengths_B)
    np.testing.assert_array_equal(r.model_calls_B, 1)
  elif name in ('best_of_n', 'self_consistency'):
    n = 3
    np.testing.assert_array_equal(r.policy_tokens_B, r.extra['lengths_BxN'].sum(1))
    # best-of-N scores with the policy's value head, read from its decode: no value rows.
    np.testing.assert_array_equal(r.model_calls_B, n)
  else:
    d = 3
    t = r.tree
    assert r.tokens_BxL.shape == (b, d * OPTS.step_tokens)
    assert tree_lib.invariant_errors(res.tree) == []
    k = 2
    expanded = (t.first_child_BxN >= 0).sum(1)
    used = np.arange(t.parent_BxN.shape[1])[None] < t.num_nodes_B[:, None]
    # root value + K samples per expansion; the children's values come from the policy's
    # decode (value_from_policy), so no value row per child.
    np.testing.assert_array_equal(r.model_calls_B, 1 + k * expanded)
    stored = np.where(used, t.step_len_BxN, 0).sum(1)
    assert (r.policy_tokens_B >= stored).all()
    assert (r.policy_tokens_B <= k * expanded * OPTS.step_tokens).all()


def _tree_arrays_equal(full, other):
  """Every tree array of `other` equals `full`'s; log-probs up to float rounding (a prefill over
  fewer padding slots sums its softmax in another order)."""
  for name in full.tree.keys():
    a, b = np.asarray(getattr(full.tree, name)), np.asarray(getattr(other.tree, name))
    if name == 'logprob_BxN':
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=name)
    else:
      np.testing.assert_array_equal(b, a, err_msg=name)
  np.testing.assert_array_equal(other.tokens_BxL, full.tokens_BxL)
  np.testing.assert_array_equal(other.score_B, full.score_B)
  np.testing.assert_array_equal(other.policy_tokens_B, full.policy_tokens_B)
  np.testing.assert_array_equal(other.model_calls_B, full.model_calls_B)


# Beam builds its states by the same `expansion` code as MCTS; slow only to keep the default suite short.
@pytest.mark.parametrize('strategy', ['mcts', pytest.param('beam', marks=pytest.mark.slow)])
def test_states_built_by_depth_give_the_full_width_search(strategy):
  """States as wide as the deepest expanding leaf needs (a lax.switch over a few widths) give
  the search of full-width states, for a fixed key: same samples, values, rewards and tree."""
  from rlm_jax.search.beam import BeamConfig, beam_search
  from rlm_jax.search.mcts import MCTSConfig, mcts_search
  model = lm.make_search_model(GD, OPTS, IDS, reward_fn=lm.answer_reward_fn(IDS))
  params = lm.LMParams(policy=STATE, reward=lm.answer_table(TOK, ANSWERS, 12))
  if strategy == 'mcts':
    search, config = mcts_search, MCTSConfig(num_simulations=4, num_children=2, num_walkers=2, max_depth=3)
  else:
    search, config = beam_search, BeamConfig(beam_width=2, expansions=2, max_depth=3)
  run = lambda width: jax.device_get(jax.jit(functools.partial(
      search, model=model, config=dataclasses.replace(config, state_width=width)))(
          params, jax.random.key(1), *_prompts()))
  full, other = run('full'), run('halving')  # halving: widths for depths 1 and 2
  assert int(full.tree.depth_BxN.max()) == 3  # both widths were used
  _tree_arrays_equal(full, other)


class _ScriptedLM(nnx.Module):
  """Forced logits: the token after position p is script[p + 1] (the last entry past its end),
  whatever was sampled: a policy that always writes one known trace after its prompt."""

  def __init__(self, cfg: ModelConfig, script):
    self.cfg = cfg
    self.script = tuple(int(t) for t in script)

  def __call__(self, tokens_BxL, positions_BxL, mask_BxL, *, cache=None, cache_index=0, logits='all'):
    del mask_BxL, cache_index, logits
    script = jnp.asarray(self.script, jnp.int32)
    next_BxL = script[jnp.clip(positions_BxL + 1, 0, len(self.script) - 1)]
    logits_BxLxV = jnp.where(jax.nn.one_hot(next_BxL, self.cfg.vocab_size) > 0, 0.0, -1e9)
    hidden = jnp.zeros(tokens_BxL.shape + (self.cfg.d_model,), jnp.float32)
    return ModelOutput(logits_BxLxV, None, hidden, cache)


@pytest.mark.parametrize('which', ['split', 'merge'])
def test_beam_steps_end_at_bpe_delimiters(which, split_bpe, merge_bpe):
  """Beam search with an HF tokenizer: every expansion stops where `encode_trace` ends a step
  (the second '\\n' of a split pair, or a token merging '\\n\\n' with its neighbours), so the
  tree's steps are the trace's; with the step id alone the first step runs to the length cap."""
  from rlm_jax.data import tokenizer as tk
  from rlm_jax.search.beam import BeamConfig, beam_search
  tok = tk.HFTokenizer(split_bpe if which == 'split' else merge_bpe)
  steps = ['He buys 2 more.', 'The end.', 'Answer: 5']
  trace, ends = tok.encode_trace(steps)
  prompt = tok.encode('Tom has 3 apples.', bos=True)
  cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8, d_ff=8)
  gd, st = nnx.split(_ScriptedLM(cfg, prompt + trace))
  p, m = (jnp.asarray(x) for x in pad_batch([prompt], len(prompt) + 2, tok.pad_id))
  opts = lm.LMOptions(step_tokens=8, completion_tokens=24)
  config = BeamConfig(beam_width=1, expansions=2, max_depth=4)

  def run(ids):
    model = lm.make_search_model(gd, opts, ids)
    return jax.jit(functools.partial(beam_search, model=model, config=config))(
        lm.LMParams(policy=st), jax.random.key(0), p, m)

  res = run(lm.TokenIds.of(tok))
  n = int(res.lengths_B[0])
  assert n == len(trace) and bool(res.terminal_B[0])
  assert np.asarray(res.tokens_BxL[0, :n]).tolist() == trace
  tree = jax.device_get(res.tree)
  spans = [trace[a + 1:b + 1] for a, b in zip([-1] + ends[:-1], ends)]
  used = np.flatnonzero(tree.parent_BxN[0] >= 0)
  assert len(used) >= len(steps)
  for node in used:
    k, d = int(tree.step_len_BxN[0, node]), int(tree.depth_BxN[0, node])
    assert np.asarray(tree.step_tokens_BxNxL[0, node, -k:]).tolist() == spans[d - 1], (node, d)
  if which == 'merge':
    return
  old = jax.device_get(run(lm.TokenIds(tok.pad_id, tok.eos_id, tok.step_id)).tree)
  first = np.flatnonzero(old.depth_BxN[0] == 1)
  assert int(old.step_len_BxN[0, first[0]]) == 8 != len(spans[0])


def test_policy_values_read_from_the_decode_equal_the_value_pass():
  """An actor-critic's step values come from the decode that sampled the step: equal to the
  value head over the child state (parent + step) at its last token."""
  model = lm.make_search_model(GD, OPTS, IDS)
  p, m = _prompts()
  nodes = NodeBatch(p, m, jnp.zeros((2,), jnp.int32), jnp.arange(2))
  params = lm.LMParams(policy=STATE)
  steps = jax.jit(lambda p, k, n: model.policy_fn(p, k, n, 3, to_end=False, greedy=False))(
      params, jax.random.key(5), nodes)
  assert steps.value_MxK.shape == (2, 3)
  for i in range(2):
    for j in range(3):
      n = int(steps.lengths_MxK[i, j])
      tok = jnp.concatenate([p[i], steps.tokens_MxKxL[i, j, :n]])[None]
      msk = jnp.concatenate([m[i], jnp.ones((n,), bool)])[None]
      child = NodeBatch(tok, msk, jnp.ones((1,), jnp.int32), jnp.array([i]))
      np.testing.assert_allclose(steps.value_MxK[i, j], model.value_fn(params, child)[0, -1], rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(model.last_value_fn(params, child)[0], model.value_fn(params, child)[0, -1],
                                 rtol=1e-5, atol=1e-6)
  # Without value_from_policy the policy returns no values (a value model scores the children).
  plain = lm.make_search_model(GD, dataclasses.replace(OPTS, value_from_policy=False), IDS)
  assert plain.policy_fn(params, jax.random.key(5), nodes, 3, to_end=False, greedy=False).value_MxK is None


@pytest.mark.parametrize('strategy', ['mcts', pytest.param('beam', marks=pytest.mark.slow)])
def test_actor_critic_search_equals_the_same_weights_as_a_value_model(strategy):
  """MCTS / beam with the policy's own value head read from its decode build the tree that the
  same weights give as a separate value model (one more forward over every child), minus
  those value rows in the compute count."""
  from rlm_jax.search.beam import BeamConfig, beam_search
  from rlm_jax.search.mcts import MCTSConfig, mcts_search
  if strategy == 'mcts':
    search, config = mcts_search, MCTSConfig(num_simulations=4, num_children=2, num_walkers=2, max_depth=3)
  else:
    search, config = beam_search, BeamConfig(beam_width=2, expansions=2, max_depth=3)
  run = lambda model, params: jax.device_get(jax.jit(functools.partial(search, model=model, config=config))(
      params, jax.random.key(1), *_prompts()))
  decode = run(lm.make_search_model(GD, OPTS, IDS), lm.LMParams(policy=STATE))
  separate = run(lm.make_search_model(GD, dataclasses.replace(OPTS, value_from_policy=False), IDS, value_graphdef=GD),
                 lm.LMParams(policy=STATE, value=STATE))
  t_a, t_b = decode.tree, separate.tree
  for name in t_a.keys():
    a, b = np.asarray(getattr(t_a, name)), np.asarray(getattr(t_b, name))
    if a.dtype.kind == 'f':
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
    else:
      np.testing.assert_array_equal(a, b, err_msg=name)
  np.testing.assert_array_equal(decode.tokens_BxL, separate.tokens_BxL)
  np.testing.assert_array_equal(decode.policy_tokens_B, separate.policy_tokens_B)
  used = np.arange(t_a.parent_BxN.shape[1])[None] < t_a.num_nodes_B[:, None]
  children = used.sum(1) - 1  # every created node but the root had a value row
  np.testing.assert_array_equal(separate.model_calls_B - decode.model_calls_B, children)
  assert children.min() > 0


# The scorers differ only in `completions._decode_scores`' last reduction (completions_test.py).
@pytest.mark.parametrize('scorer', [pytest.param('orm', marks=pytest.mark.slow),
                                    pytest.param('prm_min', marks=pytest.mark.slow), 'prm_last'])
def test_best_of_n_scores_from_the_decode_equal_the_value_pass(scorer):
  """Best-of-N with an actor-critic scores its samples with the values its decode computed:
  the scores (and picks) of the same weights as a separate value model, no value rows."""
  from rlm_jax.search.completions import BestOfNConfig, best_of_n
  config = BestOfNConfig(num_samples=4, scorer=scorer)
  run = lambda model, params: jax.device_get(jax.jit(functools.partial(best_of_n, model=model, config=config))(
      params, jax.random.key(3), *_prompts()))
  decode = run(lm.make_search_model(GD, OPTS, IDS), lm.LMParams(policy=STATE))
  separate = run(lm.make_search_model(GD, dataclasses.replace(OPTS, value_from_policy=False), IDS, value_graphdef=GD),
                 lm.LMParams(policy=STATE, value=STATE))
  np.testing.assert_allclose(decode.extra['scores_BxN'], separate.extra['scores_BxN'], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(decode.tokens_BxL, separate.tokens_BxL)
  np.testing.assert_array_equal(separate.model_calls_B - decode.model_calls_B, 4)


_VALUE_GD, _VALUE_STATE = _model(value_head='logit', seed=7)  # a separate value model / PRM


# 'mcts_rollouts' covers both the children's and the rollouts' shared reads (beam expands by the same code).
@pytest.mark.parametrize('strategy', [pytest.param('mcts', marks=pytest.mark.slow), 'mcts_rollouts',
                                      pytest.param('beam', marks=pytest.mark.slow), 'prm_min',
                                      pytest.param('orm', marks=pytest.mark.slow)])
def test_shared_state_values_equal_the_whole_state_pass(strategy):
  """A separate value model reads each leaf's (prompt's) state once for its K children (N
  completions, R rollouts): the same tree, picks and scores as the value model over every
  extended state whole (`extension_value_fn=None`), and the same compute counts."""
  from rlm_jax.search.beam import BeamConfig, beam_search
  from rlm_jax.search.completions import BestOfNConfig, best_of_n
  from rlm_jax.search.mcts import MCTSConfig, mcts_search
  configs = {
      'mcts': (mcts_search, MCTSConfig(num_simulations=4, num_children=3, num_walkers=2, max_depth=3)),
      'mcts_rollouts': (mcts_search, MCTSConfig(num_simulations=3, num_children=2, num_walkers=2, max_depth=3,
                                                num_rollouts=2, rollout_weight=0.5)),
      'beam': (beam_search, BeamConfig(beam_width=2, expansions=3, max_depth=3)),
      'prm_min': (best_of_n, BestOfNConfig(num_samples=4, scorer='prm_min')),
      'orm': (best_of_n, BestOfNConfig(num_samples=4, scorer='orm')),
  }
  search, config = configs[strategy]
  shared = lm.make_search_model(GD, dataclasses.replace(OPTS, value_from_policy=False), IDS,
                                value_graphdef=_VALUE_GD)
  assert shared.extension_value_fn is not None
  whole = shared._replace(extension_value_fn=None)
  params = lm.LMParams(policy=STATE, value=_VALUE_STATE)
  run = lambda model: jax.device_get(jax.jit(functools.partial(search, model=model, config=config))(
      params, jax.random.key(2), *_prompts()))
  a, b = run(shared), run(whole)
  np.testing.assert_array_equal(a.tokens_BxL, b.tokens_BxL)
  np.testing.assert_allclose(a.score_B, b.score_B, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(a.model_calls_B, b.model_calls_B)
  if a.tree is not None:
    for name in a.tree.keys():
      x, y = np.asarray(getattr(a.tree, name)), np.asarray(getattr(b.tree, name))
      if x.dtype.kind == 'f':
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=name)
      else:
        np.testing.assert_array_equal(x, y, err_msg=name)
    q = np.asarray(a.tree.value_BxN)[np.arange(a.tree.parent_BxN.shape[1])[None] < a.tree.num_nodes_B[:, None]]
    assert np.ptp(q) > 1e-3  # the value model's scores differ between nodes (the test can fail)
  else:
    np.testing.assert_allclose(a.extra['scores_BxN'], b.extra['scores_BxN'], rtol=1e-4, atol=1e-5)
    assert np.ptp(a.extra['scores_BxN']) > 1e-3


def test_extension_values_equal_the_value_head_over_each_extended_state():
  """`extension_value_fn` on left- and right-padded extensions (and an empty one): the value
  head over the parent state + the extension's tokens at each real token, the parent's own
  last value, zeros on padding."""
  model = lm.make_search_model(GD, dataclasses.replace(OPTS, value_from_policy=False), IDS,
                               value_graphdef=_VALUE_GD)
  params = lm.LMParams(policy=STATE, value=_VALUE_STATE)
  p, m = _prompts()
  nodes = NodeBatch(p, m, jnp.zeros((2,), jnp.int32), jnp.arange(2))
  rng = np.random.default_rng(0)
  ext = jnp.asarray(rng.integers(3, TOK.vocab_size, (2, 3, 5)), jnp.int32)
  mask = jnp.asarray([[[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]],
                      [[1, 1, 1, 1, 1], [0, 0, 0, 0, 1], [1, 0, 0, 0, 0]]], bool)
  values, own = jax.jit(model.extension_value_fn)(params, nodes, ext, mask)
  np.testing.assert_allclose(own, model.last_value_fn(params, nodes), rtol=1e-5, atol=1e-6)
  whole_fn = jax.jit(lambda t, k: model.value_fn(params, NodeBatch(t, k, jnp.ones((1,), jnp.int32), jnp.zeros((1,), jnp.int32))))
  width = p.shape[1] + ext.shape[2]
  for i in range(2):
    for j in range(3):
      real = np.flatnonzero(mask[i, j])
      np.testing.assert_array_equal(np.asarray(values[i, j])[~np.asarray(mask[i, j])], 0.0)
      if real.size == 0:
        continue
      # The parent's real tokens and the extension's, left-padded to one width (one compile).
      tok = np.concatenate([np.asarray(p[i])[np.asarray(m[i])], np.asarray(ext[i, j, real])])
      pad = width - tok.size
      whole = whole_fn(jnp.asarray(np.pad(tok, (pad, 0)))[None], (jnp.arange(width) >= pad)[None])[0, -real.size:]
      np.testing.assert_allclose(np.asarray(values[i, j])[real], whole, rtol=1e-4, atol=1e-5)
