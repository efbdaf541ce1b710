"""Host-side evaluation helpers: final answers, majority vote, scoring per level."""
from rlm_jax import tasks as tasks_lib
from rlm_jax.training import evaluate


def test_final_answer_and_majority_vote():
  assert evaluate.final_answer('3+4=7\nAnswer: 7') == '7'
  assert evaluate.final_answer('Answer: 1\nAnswer:  12 ') == '12'
  assert evaluate.final_answer('no answer') == ''
  texts = ['1+2=3\nAnswer: 3', 'Answer: 4', 'x\nAnswer: 3', 'Answer: 4', 'Answer: 3']
  assert evaluate.majority_vote(texts) == '1+2=3\nAnswer: 3'
  assert evaluate.majority_vote(['junk', 'more junk']) == 'junk'


def test_score_outputs_per_level():
  tasks = tasks_lib.generate_dataset('arithmetic', 4, seed=0, levels=(1, 2))
  outputs = ['Answer: ' + tasks_lib.answer_text(tasks[0]), 'Answer: 99999', '', tasks[3]['steps'][-1]]
  res = evaluate.score_outputs(tasks, outputs)
  assert res['accuracy'] == 0.5 and res['invalid'] == 0.25
  assert res['accuracy_level1'] == 0.5 and res['accuracy_level2'] == 0.5
