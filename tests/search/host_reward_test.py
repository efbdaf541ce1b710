"""The task verifier on host as a jittable search reward: agrees with the device answer match
where a problem has one answer text, accepts other right answers where it has many, and runs
inside the loops MCTS compiles."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlm_jax import tasks as tasks_lib
from rlm_jax.data.tokenizer import CharTokenizer, pad_batch
from rlm_jax.search import host_reward
from rlm_jax.search import lm
from rlm_jax.search import mcts as mcts_lib
from rlm_jax.search.base import SearchModel, Steps

TOK = CharTokenizer()
IDS = lm.TokenIds.of(TOK)
# Solver's answer (3+5)*2; 2*(5+3) reaches 16 with the same numbers, 3*5+2 = 17 does not.
COUNTDOWN = {'type': 'Countdown', 'level': 3, 'problem': 'Use 3, 5, 2 to make 16.', 'unique_solution': False,
             'solution': '(3+5)*2'}


def _rows(traces, width=40):
  tok, mask = pad_batch(traces, width, TOK.pad_id, side='right')
  return jnp.asarray(tok), jnp.asarray(mask)


def test_equals_the_answer_match_on_tasks_with_one_answer():
  arith = tasks_lib.generate_dataset('arithmetic', 3, seed=0, levels=(1,))
  t0, t1 = arith[1], arith[2]
  wrong = str(int(t0['solution']) + 1)
  traces = [TOK.encode_steps(t0['steps']),  # right
            TOK.encode_steps(t0['steps'][:-1] + ['Answer: ' + wrong]),  # wrong
            TOK.encode_steps(t0['steps'], final=False),  # unfinished: no EOS
            [],  # empty row (an idle walker)
            TOK.encode_steps(['Answer: ' + t0['solution'] + '0']),  # a longer number
            TOK.encode_steps(t1['steps']),  # right, second problem
            TOK.encode_steps(t1['steps'])]  # problem 1's trace scored as problem 0
  tokens, mask = _rows(traces)
  problem_B = jnp.array([0, 0, 0, 0, 0, 1, 0])
  want = [1, -1, -1, -1, -1, 1, -1]
  assert t0['solution'] != t1['solution']
  table = lm.answer_table(TOK, ['Answer: ' + t['solution'] for t in (t0, t1)], 12)
  device = jax.jit(lm.answer_reward_fn(IDS))(table, tokens, mask, problem_B)
  # The host side holds the whole pool; the round's table maps search ids 0, 1 to pool rows 1, 2.
  reward = host_reward.HostReward(TOK, arith)
  host = jax.jit(reward)(jnp.array([1, 2]), tokens, mask, problem_B)
  np.testing.assert_array_equal(device, want)
  np.testing.assert_array_equal(host, want)
  assert host.dtype == jnp.float32 and host.shape == (7,)


def test_a_right_answer_other_than_the_solvers_is_rewarded_on_host_only():
  traces = [TOK.encode_steps(['5+3=8', '2*8=16', 'Answer: 2*(5+3)']),  # another right expression
            TOK.encode_steps(['Answer: (3+5)*2']),  # the solver's
            TOK.encode_steps(['Answer: 3*5+2']),  # 17: constraints met, not solved (score 1)
            TOK.encode_steps(['Answer: 8*2']),  # 16 from a number not given (score 0)
            TOK.encode_steps(['Answer: 2*(5+3)'], final=False)]  # right text, unfinished
  rng = np.random.default_rng(0)
  garbage = rng.integers(0, TOK.vocab_size, 20).tolist()  # any ids, spare ones included
  traces += [garbage, garbage[:19] + [TOK.eos_id]]
  tokens, mask = _rows(traces)
  problem_B = jnp.zeros((len(traces),), jnp.int32)
  host = jax.jit(host_reward.HostReward(TOK, [COUNTDOWN]))(jnp.array([0]), tokens, mask, problem_B)
  device = lm.answer_reward_fn(IDS)(lm.answer_table(TOK, ['Answer: (3+5)*2'], 20), tokens, mask, problem_B)
  np.testing.assert_array_equal(host, [1, 1, -1, -1, -1, -1, -1])
  np.testing.assert_array_equal(device, [-1, 1, -1, -1, -1, -1, -1])
  # The verifier's own scores, as GRPO's host scorer sees them; an index outside the tasks is -1.
  scores = host_reward.verify_rows(TOK, [COUNTDOWN], np.asarray(tokens), np.asarray(mask),
                                   np.array([0, 0, 0, 0, 0, 0, 1]))
  np.testing.assert_array_equal(scores[:5], [2, 2, 1, 0, -1])
  assert scores[6] == -1


def test_a_malformed_task_fails_when_the_reward_is_built():
  with pytest.raises(ValueError, match="task 1 .*'Use 3 to make'"):
    host_reward.HostReward(TOK, [COUNTDOWN, dict(COUNTDOWN, problem='Use 3 to make')])


def test_runs_inside_while_loop_and_switch():
  """One row per iteration of a traced loop, through both branches of a switch."""
  reward = host_reward.HostReward(TOK, [COUNTDOWN])
  tokens, mask = _rows([TOK.encode_steps(['Answer: 2*(5+3)']), TOK.encode_steps(['Answer: 3*5+2']),
                        TOK.encode_steps(['Answer: (3+5)*2'])])
  table = jnp.array([0])

  @jax.jit
  def total(tokens, mask):
    def body(carry):
      i, acc = carry
      row = lambda x: jax.lax.dynamic_slice_in_dim(x, i, 1)
      score = lambda s: reward(table, row(tokens), row(mask), jnp.zeros((1,), jnp.int32))[0] * s
      r = jax.lax.switch(i % 2, [lambda: score(1.0), lambda: score(10.0)])
      return i + 1, acc + r
    return jax.lax.while_loop(lambda c: c[0] < tokens.shape[0], body, (0, 0.0))[1]

  assert float(total(tokens, mask)) == 1.0 - 10.0 + 1.0


def _scripted_model(steps, reward_fn):
  """A policy whose K samples at every node are `steps` (each closed by EOS: terminal)."""
  rows = [TOK.encode_steps([s]) for s in steps]
  width = max(len(r) for r in rows)
  toks, _ = pad_batch(rows, width, TOK.pad_id, side='right')
  toks, lens = jnp.asarray(toks), jnp.asarray([len(r) for r in rows], jnp.int32)

  def policy_fn(params, key, nodes, num, *, to_end, greedy):
    m = nodes.tokens_MxT.shape[0]
    tile = lambda x: jnp.broadcast_to(x[:num], (m,) + x[:num].shape)
    return Steps(tile(toks), tile(lens), tile(jnp.zeros((len(rows),))), tile(jnp.ones((len(rows),), bool)))

  search_reward = lambda params, tokens, mask, problem: reward_fn(params, tokens, mask, problem)
  return SearchModel(policy_fn, None, search_reward, TOK.pad_id, TOK.eos_id, TOK.step_id)


def test_mcts_scores_terminal_children_with_the_host_verifier():
  """MCTS expands the root into three terminal children: the verifier on host rewards both
  right expressions, the device match only the solver's."""
  steps = ['Answer: 2*(5+3)', 'Answer: (3+5)*2', 'Answer: 3*5+2']
  prompt, pmask = pad_batch([TOK.encode(COUNTDOWN['problem'], bos=True) + [TOK.step_id]], 28, TOK.pad_id)
  cfg = mcts_lib.MCTSConfig(num_simulations=2, num_children=3, num_walkers=1, max_depth=2)
  pool = [dict(COUNTDOWN, problem='Use 1, 1, 1 to make 3.', solution='1+1+1'), COUNTDOWN]

  def rewards(reward_fn, table):
    search = jax.jit(functools.partial(mcts_lib.mcts_search, model=_scripted_model(steps, reward_fn), config=cfg))
    res = search(table, jax.random.key(0), jnp.asarray(prompt), jnp.asarray(pmask))
    assert int(res.tree.num_nodes_B[0]) == 4
    return np.asarray(res.tree.reward_BxN[0, 1:4]), float(res.score_B[0])

  host, score = rewards(host_reward.HostReward(TOK, pool), jnp.array([1]))
  np.testing.assert_array_equal(host, [1, 1, -1])
  assert score == 1.0
  device, _ = rewards(lm.answer_reward_fn(IDS), lm.answer_table(TOK, ['Answer: (3+5)*2'], 20))
  np.testing.assert_array_equal(device, [-1, 1, -1])
