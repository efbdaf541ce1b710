"""Reward functions by spec: built-ins on hand-scored outputs, a user module, weighted sums."""
import math

import numpy as np
import pytest

from rlm_jax.tasks import reward_fns as rf

GSM = {'type': 'gsm8k', 'level': 1, 'problem': 'What is 2+3?', 'unique_solution': True, 'solution': '5'}
COMPLETIONS = ['2+3=5\nAnswer: 5', 'I think 6.', '\\boxed{5}', 'no idea at all, it is long']
COLUMNS = rf.columns_of([GSM] * 4)
PROMPTS = ['p'] * 4


def test_correctness_maps_scores():
  assert rf.correctness(PROMPTS, COMPLETIONS, **COLUMNS) == [1.0, 0.0, 1.0, 0.0]
  # 'no idea' has no number: invalid (-1); 'I think 6.' is wrong (0)
  assert rf.correctness(PROMPTS, COMPLETIONS, invalid=-1.0, wrong=-0.5, **COLUMNS) == [1.0, -0.5, 1.0, -1.0]


def test_correctness_partial_credit_and_odd_outputs():
  cd = {'type': 'Countdown', 'level': 1, 'problem': 'Use 2, 6 to make 3.', 'unique_solution': False,
        'solution': '6/2'}
  comps = ['Answer: 6/2', 'Answer: 6-2', '\x00' * 50000 + 'Answer: (', [{'role': 'assistant', 'content': 'Answer: 6/2'}]]
  out = rf.correctness(['p'] * 4, comps, partial=0.5, invalid=-1.0, **rf.columns_of([cd] * 4))
  # 6-2 uses the numbers but makes 4: constraints met, not solved -> partial credit
  assert out == [1.0, 0.5, -1.0, 1.0]  # a conversational completion is scored on its last message


def test_format_and_length():
  comps = ['x\nAnswer: 5', '**Final answer:** 5', '\\boxed{5}', 'so #### 5', 'the answer is 5', 'Answers']
  assert rf.format_reward(['p'] * 6, comps) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
  assert rf.length(['p'] * 3, ['a' * 10, 'a' * 12, ''], limit=10, per=0.5) == [0.0, -1.0, 0.0]
  assert rf.length(['p'] * 2, ['', ''], limit=3, per=0.25, unit='token', completion_tokens=[3, 7]) == [0.0, -1.0]
  with pytest.raises(ValueError, match="needs the column 'completion_tokens'"):
    rf.length(['p'], [''], unit='token')


USER_MODULE = '''
def exact_five(prompts, completions, solution, **kw):
  return [1.0 if c.strip().endswith(s) else 0.0 for c, s in zip(completions, solution)]

def only_long(prompts, completions, **kw):
  return [None if len(c) < 12 else 2.0 for c in completions]

def fragile(prompts, completions, **kw):
  return [float(c[0] == '2') for c in completions]  # IndexError on an empty completion

def broken(prompts, completions, **kw):
  raise RuntimeError('bug')

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
  (tmp_path / 'my_rewards.py').write_text(USER_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  return str(tmp_path / 'my_rewards.py')


def test_user_module_by_spec_and_weighted_sum(user_module):
  fns = rf.load_reward_fns(['my_rewards:exact_five', 'format', 'length(limit=10, per=0.1)', 'correctness(partial=0.5)'])
  assert [f.__name__ for f in fns] == ['my_rewards:exact_five', 'format', 'length(limit=10, per=0.1)',
                                       'correctness(partial=0.5)']
  per = rf.score(fns, PROMPTS, COMPLETIONS, **COLUMNS)
  np.testing.assert_allclose(per, [[1, 0, 0, 0], [1, 0, 1, 0], [-0.5, 0, 0, -1.6], [1, 0, 1, 0]])
  total = rf.combine(fns, [1.0, 0.5, 1.0, 2.0])(PROMPTS, COMPLETIONS, **COLUMNS)
  # row 0: 1 + 0.5*1 - 0.5 + 2*1 = 3.0; row 2: 0 + 0.5 + 0 + 2 = 2.5; row 3: -1.6
  np.testing.assert_allclose(total, [3.0, 0.0, 2.5, -1.6])
  (by_file,) = rf.load_reward_fns([f'{user_module}:exact_five'])
  assert by_file(PROMPTS, COMPLETIONS, **COLUMNS) == [1.0, 0.0, 0.0, 0.0]


def test_none_rows_and_exceptions(user_module):
  only_long, fragile, broken = rf.load_reward_fns(['my_rewards:only_long', 'my_rewards:fragile', 'my_rewards:broken'])
  comps = ['2+3=5\nAnswer: 5', '', '25']
  per = rf.score([only_long, fragile], ['p'] * 3, comps)
  assert per[0, 0] == 2.0 and math.isnan(per[0, 1]) and math.isnan(per[0, 2])
  np.testing.assert_array_equal(per[1], [1.0, 0.0, 1.0])  # the empty row raised alone: scored 0
  assert rf.combine([only_long, fragile], [1.0, 1.0])(['p'] * 3, comps) == [3.0, 0.0, 1.0]
  with pytest.raises(ValueError, match=r"reward function 'my_rewards:broken' raised on every completion: RuntimeError: bug"):
    rf.score([broken], ['p'], ['x'])


@pytest.mark.parametrize('spec,match', [
    ('no_such_mod_xyz:f', r"reward function 'no_such_mod_xyz:f': module 'no_such_mod_xyz' not found"),
    ('my_rewards:nope', r"reward function 'my_rewards:nope': module 'my_rewards' has no function 'nope'"),
    ('my_rewards:NOT_A_FUNCTION', r"'NOT_A_FUNCTION' is not callable"),
    ('correctnes', r"reward function 'correctnes': not a built-in \(\['correctness', 'format', 'length'\]\)"),
    ('length(limit=len)', r"reward function 'length\(limit=len\)': arguments must be key=literal"),
    ('/nowhere/r.py:f', r"file /nowhere/r.py not found"),
])
def test_bad_specs_name_the_spec(user_module, spec, match):
  with pytest.raises(ValueError, match=match):
    rf.load_reward_fns([spec])


def test_mismatched_inputs_fail_clearly():
  with pytest.raises(ValueError, match=r'rl.reward_weights has 1 entries for 2 reward functions'):
    rf.combine(rf.load_reward_fns(['format', 'length']), [1.0])
  with pytest.raises(ValueError, match=r"mismatched columns: \['solution'\]"):
    rf.score(rf.load_reward_fns(['format']), ['p', 'p'], ['a', 'b'], solution=['5'])
