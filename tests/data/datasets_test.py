"""Splits from each file format (written here), train/eval separation and the length policy."""
import bz2
import json
import sys

import pytest

from rlm_jax import tasks as tasks_lib
from rlm_jax.data import datasets as ds_lib
from rlm_jax.data import tokenizer as tk
from rlm_jax.tasks import gsm8k

GSM = [{'question': 'Ann has 2 cats and buys 3. How many?', 'answer': 'She has 2+3=<<2+3=5>>5.\n#### 5'},
       {'question': 'Bo reads 4 pages a day for 2 days, then 1 more. Pages?',
        'answer': '4*2=<<4*2=8>>8\n8+1=<<8+1=9>>9\n#### 9'}]
SAT = {'type': 'SAT', 'level': 1, 'problem': 'Satisfy (x1 | x2) & (~x1)', 'unique_solution': True,
       'solution': '(x1 | x2) & (~x1)'}


def _write_jsonl(path, objs):
  path.write_text(''.join(json.dumps(o) + '\n' for o in objs))
  return str(path)


def test_gsm8k_jsonl_matches_the_gsm8k_loader(tmp_path):
  path = _write_jsonl(tmp_path / 'train.jsonl', GSM)
  got = ds_lib.load_split(path)
  assert got == gsm8k.load_jsonl(path)
  assert got[0]['steps'] == ['She has 2+3=5.', 'Answer: 5'] and got[1]['solution'] == '9'
  assert [t['level'] for t in got] == [1, 6]  # deciles of (solution lines, answer length) within the file


def test_task_dicts_and_prompt_answer_records(tmp_path):
  recs = [SAT, {'prompt': 'What is 6*7?', 'target': 42, 'level': 3}, {'prompt': 'Half of 3?', 'target': '3/2'}]
  path = _write_jsonl(tmp_path / 'mixed.jsonl', recs)
  with pytest.raises(ValueError, match=r"mixed\.jsonl:2: record has neither 'type' .*'question' and 'answer'"):
    ds_lib.load_split(path)
  sat, six, half = ds_lib.load_split(path, question_key='prompt', answer_key='target')
  assert sat == SAT
  assert six == {'type': 'gsm8k', 'level': 3, 'problem': 'What is 6*7?', 'unique_solution': True, 'solution': '42'}
  assert tasks_lib.verify(six, 'So the answer is 42.') == 2 and tasks_lib.verify(six, 'Answer: 41') == 0
  assert tasks_lib.verify(half, 'Answer: 1.5') == 2 and 'steps' not in half


def test_x1_json_bz2_and_json_lines_named_json(tmp_path):
  blob = json.dumps({'version': 1, 'data': [SAT, SAT]})
  (tmp_path / 'x1.json').write_text(blob)
  (tmp_path / 'x1.json.bz2').write_bytes(bz2.compress(blob.encode()))
  assert ds_lib.load_split(str(tmp_path / 'x1.json')) == [SAT, SAT]
  assert ds_lib.load_split(str(tmp_path / 'x1.json.bz2')) == [SAT, SAT]
  pytest.importorskip('datasets')
  lines = _write_jsonl(tmp_path / 'lines.json', GSM)  # not one JSON document: read by `datasets`
  assert ds_lib.load_split(lines) == gsm8k.records_to_tasks(GSM)


def test_parquet_csv_and_datasets_folder(tmp_path):
  datasets = pytest.importorskip('datasets')
  want = gsm8k.records_to_tasks(GSM)
  data = datasets.Dataset.from_list(GSM)
  data.to_parquet(str(tmp_path / 'g.parquet'))
  data.to_csv(str(tmp_path / 'g.csv'), index=False)
  assert ds_lib.load_split(str(tmp_path / 'g.parquet')) == want
  assert ds_lib.load_split(str(tmp_path / 'g.csv')) == want
  other = datasets.Dataset.from_list([{'q': 'What is 1+1?', 'a': '2'}])
  datasets.DatasetDict({'train': data, 'test': other}).save_to_disk(str(tmp_path / 'dd'))
  assert ds_lib.load_split(str(tmp_path / 'dd:train')) == want
  (test,) = ds_lib.load_split(str(tmp_path / 'dd'), split='test', question_key='q', answer_key='a')
  assert test['problem'] == 'What is 1+1?' and test['solution'] == '2'
  with pytest.raises(ValueError, match=r"dd: has splits \['test', 'train'\]; name one as .*dd:SPLIT"):
    ds_lib.load_split(str(tmp_path / 'dd'))
  with pytest.raises(ValueError, match=r"dd:test: row 0: record has neither"):
    ds_lib.load_split(str(tmp_path / 'dd:test'))
  data.save_to_disk(str(tmp_path / 'one'))
  assert ds_lib.load_split(str(tmp_path / 'one')) == want


def test_tfds_missing_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)
  with pytest.raises(ImportError, match=r'tfds:gsm8k:train: needs tensorflow-datasets.*pip install -e \.\[tfds\]'):
    ds_lib.load_split('tfds:gsm8k:train')


@pytest.mark.parametrize('name,content,match', [
    ('train.jsonl', json.dumps(GSM[0]) + '\n{broken\n', r'train\.jsonl:2: not valid JSON'),
    ('train.jsonl', '\n\n', r'train\.jsonl: no tasks \(empty\)'),
    ('train.jsonl', '[1, 2]\n', r'train\.jsonl:1: not a JSON object \(got list\)'),
    ('train.jsonl', json.dumps({**SAT, 'solution': 'not a formula'}) + '\n', r'train\.jsonl:1: '),
    ('train.jsonl', json.dumps({'question': 'q', 'answer': ''}) + '\n', r"train\.jsonl:1: column 'answer' is not"),
    ('t.json', '{"version": 1, "data": {}}', r"t\.json: expected \{'version': 1"),
    ('t.json', '{"version": 1, "data": []}', r't\.json: no tasks'),
    ('t.txt', 'x', r"t\.txt: unknown file type 'txt'"),
])
def test_bad_sources_fail_in_one_line(tmp_path, name, content, match):
  (tmp_path / name).write_text(content)
  with pytest.raises(ValueError, match=match) as e:
    ds_lib.load_split(str(tmp_path / name))
  assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match=r'nope\.jsonl: no such file'):
    ds_lib.load_split(str(tmp_path / 'nope.jsonl'))


def test_shipped_gsm8k_samples_train_on_train_test_on_test():
  train = ds_lib.load_split('builtin:gsm8k_train_sample.jsonl')
  test = ds_lib.load_split('builtin:gsm8k_sample.jsonl')
  assert len(train) == len(test) == 50
  assert not {t['problem'] for t in train} & {t['problem'] for t in test}
  assert all(tasks_lib.verify(t, '\n'.join(t['steps'])) == 2 for t in train)
  held, n = ds_lib.remove_overlap(test + train[:3], train)
  assert n == 3 and held == test


CHAR = tk.CharTokenizer()
# prompt BOS 'abc' STEP = 5 tokens; 'Answer: 7' = 9; completion '1+6=7' STEP 'Answer: 7' EOS = 16.
SHORT = {'type': 'gsm8k', 'level': 1, 'problem': 'abc', 'unique_solution': True, 'solution': '7',
         'steps': ['1+6=7', 'Answer: 7']}
LONG = {**SHORT, 'problem': 'abcdefgh'}  # prompt 10 tokens


def test_fit_lengths_drop_and_error():
  kept, dropped = ds_lib.fit_lengths(CHAR, [SHORT, LONG, SHORT], 5, 16, 9, policy='drop', where='train.jsonl')
  assert kept == [SHORT, SHORT] and dropped == 1
  assert ds_lib.fit_lengths(CHAR, [SHORT, LONG], 10, 16, 9) == ([SHORT, LONG], 0)
  with pytest.raises(ValueError, match=r'^task\.prompt_len=5: problem 2 of train\.jsonl needs 10 tokens$'):
    ds_lib.fit_lengths(CHAR, [SHORT, LONG], 5, 16, 9, policy='error', where='train.jsonl')
  with pytest.raises(ValueError, match=r'^task\.completion_len=15: the solution of problem 1 of t needs 16 tokens$'):
    ds_lib.fit_lengths(CHAR, [SHORT], 5, 15, 9, policy='error', where='t')
  with pytest.raises(ValueError, match=r'^task\.answer_len=8: the answer of problem 1 of t needs 9 tokens$'):
    ds_lib.fit_lengths(CHAR, [SHORT], 5, 16, 8, policy='error', where='t')
  with pytest.raises(ValueError, match=r'none of the 2 problems of t fits \(longest: answer_len 9, '
                                       r'completion_len 16, prompt_len 10\)'):
    ds_lib.fit_lengths(CHAR, [SHORT, LONG], 4, 16, 9, where='t')
  with pytest.raises(ValueError, match=r"task\.length_policy='truncate'"):
    ds_lib.fit_lengths(CHAR, [SHORT], 5, 16, 9, policy='truncate')
  no_steps = {k: v for k, v in LONG.items() if k != 'steps'}
  assert ds_lib.fit_lengths(CHAR, [no_steps], 10, 1, 9) == ([no_steps], 0)  # RL-only task: no completion
