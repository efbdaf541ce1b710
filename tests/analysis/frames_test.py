"""rlm_jax.analysis.frames: smoothing, curves, results, scaling and verifier tables on
hand-computed numbers and real verifier scores."""
import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from rlm_jax import analysis
from rlm_jax import metrics as metrics_lib
from rlm_jax import tasks
from rlm_jax.analysis import frames


def test_smooth_is_debiased_ema():
  # m1 = .5, s1 = .5/.5 = 1; m2 = .25 + 1 = 1.25, s2 = 1.25/.75; m3 = .625 + 1.5, s3 = 2.125/.875
  np.testing.assert_allclose(frames.smooth([1, 2, 3], 0.5), [1.0, 5 / 3, 17 / 7])
  # A NaN is skipped: the third value is the second finite one (m2 = .25 + 1.5, debias .75).
  out = frames.smooth([1, float('nan'), 3], 0.5)
  assert math.isnan(out[1])
  np.testing.assert_allclose(out[[0, 2]], [1.0, 1.75 / 0.75])
  np.testing.assert_allclose(frames.smooth([4, -2, 7], 0.0), [4, -2, 7])
  with pytest.raises(ValueError, match='weight=1.0'):
    frames.smooth([1.0], 1.0)


def _write_run(workdir, rows):
  with metrics_lib.MetricWriter(workdir, enabled=True, tensorboard=False) as w:
    for step, scalars in rows:
      w.write(step, scalars)


def test_load_metrics_merges_steps_and_splits_phases(tmp_path):
  _write_run(tmp_path, [(0, {'sft/loss': 3.0}), (1, {'sft/loss': 2.0}),
                        (1, {'eval/greedy/accuracy': 0.25}), (2, {'grpo/reward': 0.5, 'grpo/kl': 0.01})])
  m = frames.load_metrics(tmp_path)
  assert list(m.index) == [0, 1, 2]
  assert m.loc[1, 'sft/loss'] == 2.0 and m.loc[1, 'eval/greedy/accuracy'] == 0.25
  assert math.isnan(m.loc[2, 'sft/loss'])
  sft = frames.phase_curves(m, 'sft')
  assert list(sft.columns) == ['loss'] and list(sft.index) == [0, 1]
  grpo = frames.phase_curves(m, 'grpo')
  assert grpo.loc[2].to_dict() == {'kl': 0.01, 'reward': 0.5}
  with pytest.raises(KeyError, match='phases in this run: eval, grpo, sft'):
    frames.phase_curves(m, 'ppo')


def test_results_tables(tmp_path):
  results = {'sft': {'greedy/accuracy': 0.5, 'greedy/invalid': 0.1, 'greedy/accuracy_level1': 0.75,
                     'greedy/accuracy_level2': 0.25},
             'grpo': {'greedy/accuracy': 0.625, 'greedy/accuracy_level1': 1.0, 'greedy/accuracy_level2': 0.25,
                      'self_consistency/accuracy': 0.7},
             'preempted': False}
  _write_run(tmp_path, [(0, {'sft/loss': 1.0})])
  (tmp_path / 'results.json').write_text(json.dumps(results))
  long = frames.results_table(analysis.load_results(tmp_path))
  assert len(long) == 8  # the 'preempted' flag is not a phase
  row = long[(long.phase == 'sft') & (long.metric == 'invalid')].iloc[0]
  assert row.strategy == 'greedy' and row.value == 0.1 and math.isnan(row.level)
  table = frames.eval_accuracy(long)
  assert list(table.columns) == ['all', 1, 2]
  assert table.loc[('grpo', 'greedy')].tolist() == [0.625, 1.0, 0.25]
  assert table.loc[('sft', 'greedy'), 1] == 0.75
  assert table.loc[('grpo', 'self_consistency'), 'all'] == 0.7
  assert math.isnan(table.loc[('grpo', 'self_consistency'), 1])


def test_node_table(hand):
  table = frames.node_table(hand, [0, 1, 4])
  assert list(table.index) == [0, 1, 4]
  assert table.loc[1, 'text'] == 'a=1\\n\\n' and table.loc[4, 'reward'] == 1.0 and math.isnan(table.loc[1, 'reward'])
  assert list(frames.node_table(hand).index) == [0, 1, 2, 3, 4]
  ids = dict(hand, nodes=[dict(n, text=[5, 7]) for n in hand['nodes']])  # an export without a decoder
  assert frames.node_table(ids).loc[3, 'text'] == '5 7'


ROWS = [
    {'phase': 'grpo', 'strategy': 'self_consistency', 'budget': 4, 'guide': 'policy', 'accuracy': 0.6, 'policy_tokens': 80.0},
    {'phase': 'grpo', 'strategy': 'greedy', 'budget': 1, 'guide': 'policy', 'accuracy': 0.4, 'policy_tokens': 20.0,
     'num_problems': 100},
    {'phase': 'grpo', 'strategy': 'self_consistency', 'budget': 2, 'guide': 'policy', 'accuracy': 0.5, 'policy_tokens': 40.0},
    {'phase': 'grpo', 'strategy': 'mcts', 'budget': 8, 'guide': 'verifier', 'accuracy': 0.9, 'policy_tokens': 300.0},
    {'phase': 'sft', 'strategy': 'greedy', 'budget': 1, 'guide': 'policy', 'accuracy': 0.3, 'policy_tokens': 25.0,
     'num_problems': 100},
]


def test_scaling_table_and_budget_matching(tmp_path):
  df = frames.scaling_table(ROWS)
  assert list(zip(df.phase, df.strategy, df.budget)) == [
      ('sft', 'greedy', 1), ('grpo', 'greedy', 1), ('grpo', 'mcts', 8), ('grpo', 'self_consistency', 2),
      ('grpo', 'self_consistency', 4)]
  np.testing.assert_allclose(df.tokens_x, [1.0, 1.0, 15.0, 2.0, 4.0])
  # Binomial standard error: sqrt(.3 * .7 / 100), sqrt(.4 * .6 / 100); no num_problems -> NaN.
  np.testing.assert_allclose(df.accuracy_se[:2], [math.sqrt(0.0021), math.sqrt(0.0024)])
  assert math.isnan(df.accuracy_se[2])
  assert list(df.label) == ['greedy', 'greedy', 'mcts (verifier)', 'self_consistency', 'self_consistency']
  best = frames.best_within(df, 50.0)
  assert best.loc[('grpo', 'self_consistency'), 'budget'] == 2
  assert ('grpo', 'mcts (verifier)') not in best.index
  assert frames.best_within(df, 1000.0).loc[('grpo', 'mcts (verifier)'), 'accuracy'] == 0.9
  assert analysis.phases_in(df.phase) == ['sft', 'grpo']
  with pytest.raises(ValueError, match=r'rows\[0\] lacks policy_tokens'):
    frames.scaling_table([{'strategy': 'greedy', 'budget': 1, 'guide': 'policy', 'accuracy': 0.1}])
  (tmp_path / 'analysis').mkdir()
  (tmp_path / 'analysis' / 'scaling.json').write_text(json.dumps({'version': 1, 'rows': ROWS}))
  pd.testing.assert_frame_equal(frames.load_scaling(tmp_path), df)


def test_markdown_table():
  df = pd.DataFrame({'strategy': ['greedy', 'mcts'], 'accuracy': [0.5, 0.8125]})
  assert frames.markdown_table(df) == ('| strategy | accuracy |\n|---|---|\n| greedy | 0.500 |\n'
                                       '| mcts | 0.812 |')


# ------------------------------------------------------------------------------------------
# Verifier outcomes, with scores from the real verifier.


def _records():
  ts = tasks.generate_dataset('arithmetic', 4, 0, levels=(1, 2))  # levels 1, 1, 2, 2
  answers = [tasks.answer_text(t) for t in ts]
  outputs = {'greedy': [f'Answer: {answers[0]}', 'no answer here', f'Answer: {answers[2]}', f'Answer: {int(answers[3]) + 1}'],
             'mcts': [f'Answer: {answers[0]}', f'Answer: {answers[1]}', '', f'Answer: {answers[3]}']}
  rows = []
  for strategy, outs in outputs.items():
    for i, (t, o) in enumerate(zip(ts, outs)):
      rows.append({'phase': 'grpo', 'strategy': strategy, 'budget': 1 if strategy == 'greedy' else 4,
                   'guide': 'policy' if strategy == 'greedy' else 'verifier', 'index': i,
                   'level': t['level'], 'problem': t['problem'], 'expected': answers[i], 'output': o,
                   'score': tasks.verify(t, o)})
  return pd.DataFrame(rows)


def test_verifier_tables():
  df = _records()
  assert df.score.tolist() == [2, -1, 2, 0, 2, 2, -1, 2]
  acc = frames.level_accuracy(df)
  assert acc.loc['greedy 1'].tolist() == [0.5, 0.5, 0.5] and acc.loc['mcts 4 (verifier)'].tolist() == [1.0, 0.5, 0.75]
  assert list(frames.level_accuracy(df.drop(columns='guide')).index) == ['greedy 1', 'mcts 4']
  scores = frames.score_table(df, by=('strategy',))
  assert scores.loc['greedy'].to_dict() == {'invalid': 0.25, 'wrong': 0.25, 'partial': 0.0, 'solved': 0.5, 'n': 4}
  by_run = frames.score_table(frames.add_run_labels(df), by=('run',))
  assert list(by_run.index) == ['greedy 1', 'mcts 4 (verifier)'] and by_run.loc['mcts 4 (verifier)', 'invalid'] == 0.25
  per_level = frames.score_table(df)
  assert per_level.loc[('mcts', 4, 2), 'invalid'] == 0.5
  bad = frames.error_examples(df, 'invalid')
  assert bad.level.tolist() == [1, 2] and bad.output.tolist() == ['no answer here', '']
  wrong = frames.error_examples(df, 'wrong', max_chars=6)
  assert len(wrong) == 1 and wrong.output[0] == 'Ans...'
  assert list(frames.error_examples(df, 'partial').columns) == [
      'strategy', 'budget', 'guide', 'level', 'problem', 'expected', 'output']
  with pytest.raises(ValueError, match="kind 'oops'"):
    frames.error_examples(df, 'oops')
  both = pd.concat([df, df.assign(budget=df.budget * 2)])
  assert sorted(set(frames.at_largest_budget(both).budget)) == [2, 8]


def test_load_outputs(tmp_path):
  df = _records()
  path = tmp_path / 'outputs.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in df.to_dict('records')))
  pd.testing.assert_frame_equal(frames.load_outputs(path), df)
  os.remove(path)
  with pytest.raises(FileNotFoundError, match='outputs.jsonl: missing'):
    frames.load_outputs(path)
