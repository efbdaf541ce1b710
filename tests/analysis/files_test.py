"""rlm_jax.analysis.files: run-folder checks, tree validation, readers that name the culprit,
and the writer's round trip."""
import json
import os

import pytest

from rlm_jax import analysis
from rlm_jax import metrics as metrics_lib
from rlm_jax.analysis import files

GOLDEN = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'search', 'golden', 'mcts_toy.json')


def test_check_workdir_names_the_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match=f'{tmp_path}: no metrics.jsonl'):
    files.check_workdir(tmp_path)
  (tmp_path / 'metrics.jsonl').write_text('')
  assert files.check_workdir(tmp_path) == str(tmp_path)
  with pytest.raises(ValueError, match='metrics.jsonl is empty'):
    files.read_metrics(tmp_path)
  assert files.load_results(tmp_path) == {}  # not written yet


def test_phases_in_training_order():
  assert files.phases_in(['eval', 'grpo', 'sft', 'grpo', 'rl']) == ['sft', 'rl', 'grpo', 'eval']


@pytest.mark.parametrize('change, message', [
    (lambda t: t['nodes'][1].pop('visits'), r'nodes\[1\] lacks visits'),
    (lambda t: t['nodes'][2].update(parent=-1), 'expected one root'),
    (lambda t: t['nodes'][3].update(parent=9), 'node 3 has parent 9'),
    (lambda t: t['nodes'][3].update(depth=1), 'node 3 has depth 1'),
    (lambda t: t.update(chosen_path=[0, 3]), 'not a path from the root'),
    (lambda t: t['nodes'][4].update(id=3), 'repeats id 3'),
])
def test_validate_tree_names_the_culprit(hand, change, message):
  files.validate_tree(hand)
  change(hand)
  with pytest.raises(ValueError, match=message):
    files.validate_tree(hand)


def test_load_trees_of_a_golden_export(tmp_path, hand):
  trees = files.load_trees(GOLDEN)  # a JSON list of search.tree_to_json outputs
  assert [len(t['nodes']) for t in trees] == [t['num_nodes'] for t in json.load(open(GOLDEN))]
  (tmp_path / 'bad.json').write_text('{"nodes": [')
  with pytest.raises(ValueError, match='bad.json: not valid JSON'):
    files.load_trees(tmp_path / 'bad.json')
  with pytest.raises(FileNotFoundError, match='python -m rlm_jax.analysis'):
    files.load_trees(tmp_path)
  (tmp_path / 'one.json').write_text(json.dumps(dict(hand, nodes=hand['nodes'][:1] + hand['nodes'][3:])))
  with pytest.raises(ValueError, match=r'one.json: trees\[0\]: node 3 has parent 1, which is not a node'):
    files.load_trees(tmp_path / 'one.json')


def test_read_outputs_names_the_line(tmp_path):
  row = {'strategy': 'greedy', 'budget': 1, 'level': 1, 'problem': '1+1', 'expected': '2', 'output': 'Answer: 2',
         'score': 2}
  path = tmp_path / 'outputs.jsonl'
  path.write_text(json.dumps(row) + '\n\n' + json.dumps(row) + '\n')
  assert files.read_outputs(path) == [row, row]  # blank lines skipped
  path.write_text(json.dumps(row) + '\n' + '{"strategy": "greedy"}\n')
  with pytest.raises(ValueError, match='outputs.jsonl:2: lacks budget'):
    files.read_outputs(path)
  path.write_text(json.dumps(row) + '\n{"strategy":\n')
  with pytest.raises(ValueError, match='outputs.jsonl:2: not valid JSON'):
    files.read_outputs(path)
  path.write_text('\n')
  with pytest.raises(ValueError, match='outputs.jsonl: no records'):
    files.read_outputs(path)


def test_read_scaling_names_the_row(tmp_path):
  path = tmp_path / 'scaling.json'
  path.write_text(json.dumps({'version': 1, 'rows': [{'strategy': 'greedy', 'budget': 1, 'guide': 'policy',
                                                      'accuracy': 0.1}]}))
  with pytest.raises(ValueError, match=r'scaling.json: rows\[0\] lacks policy_tokens'):
    files.read_scaling(path)
  path.write_text(json.dumps([1, 2]))
  with pytest.raises(ValueError, match='expected {"version": 1, "rows"'):
    files.read_scaling(path)


def test_write_analysis_round_trips(tmp_path, hand):
  """What `collect` returns, written and read back, is the same records; nothing else is left."""
  with metrics_lib.MetricWriter(tmp_path, enabled=True, tensorboard=False) as w:
    w.write(0, {'sft/loss': 1.0})
  rows = [{'phase': 'grpo', 'strategy': 'mcts', 'budget': 4, 'guide': 'verifier', 'accuracy': 0.5,
           'invalid': 0.25, 'policy_tokens': 96.5, 'model_calls': 12.0, 'num_problems': 4, 'seconds': 1.5}]
  trees = [dict(hand, chosen_path=[0, 1, 4], phase='grpo', strategy='mcts', budget=4, guide='verifier', score=2)]
  outputs = [{'phase': 'grpo', 'strategy': 'mcts', 'budget': 4, 'guide': 'verifier', 'index': i, 'level': 1,
              'problem': f'{i}+1', 'expected': str(i + 1), 'output': f'a\n\nAnswer: {i + 1}', 'score': 2}
             for i in range(3)]
  paths = analysis.write_analysis(tmp_path, rows, trees, outputs)
  assert paths == files.analysis_paths(tmp_path)
  assert sorted(os.listdir(tmp_path / 'analysis')) == ['outputs.jsonl', 'scaling.json', 'trees.json']
  assert files.read_scaling(tmp_path) == rows
  assert files.load_trees(tmp_path) == trees
  assert files.read_outputs(tmp_path) == outputs
  assert len(open(paths['outputs']).read().splitlines()) == 3  # one OUTPUT per line
  # A second collection replaces the files.
  analysis.write_analysis(tmp_path, rows, [], outputs[:1])
  assert files.load_trees(tmp_path) == [] and len(files.read_outputs(tmp_path)) == 1
