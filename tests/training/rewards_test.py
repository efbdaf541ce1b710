"""The on-device answer reward agrees with the host verifier on hand-built completions."""
import jax.numpy as jnp
import numpy as np

from rlm_jax import tasks as tasks_lib
from rlm_jax.data.encoding import completion_ids, encode_answers
from rlm_jax.data import tokenizer as tk
from rlm_jax.data.tokenizer import CharTokenizer, pad_batch
from rlm_jax.sampling.sampler import StopReason
from rlm_jax.training.rewards import RewardConfig, final_step_score, score_to_reward

TOK = CharTokenizer()


def _score(completions, reasons, answers, t=24):
  toks, _ = pad_batch(completions, t, TOK.pad_id, side='right')
  ans, ans_len = encode_answers(TOK, answers, 12)
  lengths = np.asarray([len(c) for c in completions], np.int32)
  return final_step_score(jnp.asarray(toks), jnp.asarray(lengths), jnp.asarray(reasons, np.int32),
                          jnp.asarray(ans), jnp.asarray(ans_len), TOK.step_id).tolist()


def test_hand_built_cases():
  E, S = StopReason.EOS, StopReason.STEP
  cases = [
      (completion_ids(TOK, ['3+4=7', 'Answer: 7']), E, 'Answer: 7', 2),
      (completion_ids(TOK, ['Answer: 7']), E, 'Answer: 7', 2),
      (completion_ids(TOK, ['Answer: 71']), E, 'Answer: 7', 0),  # longer than the answer
      (completion_ids(TOK, ['Answer: ']), E, 'Answer: 7', 0),  # shorter
      (completion_ids(TOK, ['Answer: 7', 'x']), E, 'Answer: 7', 0),  # last step is not the answer
      (TOK.encode('Answer: 7') + [TOK.step_id], S, 'Answer: 7', -1),  # stopped at a step: no EOS
      (TOK.encode('Answer: 7'), StopReason.LENGTH, 'Answer: 7', -1),  # truncated
      (completion_ids(TOK, ['Answer: -11']), E, 'Answer: -11', 2),
  ]
  got = _score([c[0] for c in cases], [c[1] for c in cases], [c[2] for c in cases])
  assert got == [c[3] for c in cases]


def test_agrees_with_host_verifier_on_solver_traces_and_corruptions():
  tasks = tasks_lib.generate_dataset('arithmetic', 30, seed=3, levels=(1, 2, 3))
  comps, answers, expect = [], [], []
  for i, t in enumerate(tasks):
    steps = list(t['steps'])
    if i % 2:  # corrupt the final answer
      steps[-1] = 'Answer: ' + str(int(tasks_lib.answer_text(t)) + 1)
    comps.append(completion_ids(TOK, steps))
    answers.append('Answer: ' + tasks_lib.answer_text(t))
    expect.append(tasks_lib.verify(t, '\n'.join(steps)))
  got = _score(comps, [StopReason.EOS] * len(comps), answers, t=64)
  assert got == [2 if e == 2 else 0 for e in expect]
  assert expect.count(2) == 15


def test_score_to_reward_mapping():
  r = score_to_reward(jnp.asarray([2, 0, -1, 1]), RewardConfig(correct=1.0, wrong=-0.5, invalid=-1.0))
  np.testing.assert_allclose(r, [1.0, -0.5, -1.0, -1.0])


def test_final_step_score_on_a_bpe_tokenizer(split_bpe):
  """SmolLM2-style BPE writes '\\n\\n' inside text as '\\n', '\\n': the final step starts after the
  split pair, so the answer matches; with the step id alone the whole text would be 'the last step'."""
  from rlm_jax.data import steps as steps_lib
  tok = tk.HFTokenizer(split_bpe)
  ans, ans_len = encode_answers(tok, ['Answer: 5', 'Answer: 6'], 8)
  rows = [completion_ids(tok, ['Tom has 3 apples.', 'He buys 2 more.', 'Answer: 5'])] * 2
  toks, _ = pad_batch(rows, 24, tok.pad_id, side='right')
  args = (jnp.asarray(toks), jnp.asarray([len(r) for r in rows], jnp.int32), jnp.full((2,), StopReason.EOS),
          jnp.asarray(ans), jnp.asarray(ans_len))
  assert tok.step_id not in rows[0] and rows[0][-7:-5] == tok.encode('\n') * 2
  assert final_step_score(*args, steps_lib.StepEnds.of(tok)).tolist() == [2, 0]
  assert final_step_score(*args, tok.step_id).tolist() == [0, 0]
