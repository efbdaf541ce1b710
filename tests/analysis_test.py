"""rlm_jax.analysis: curves, smoothing, tree layout / chosen path (against MCTS's own answer),
scaling and verifier tables, on hand-computed numbers and real verifier scores."""
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from rlm_jax import analysis  # noqa: E402
from rlm_jax import metrics as metrics_lib  # noqa: E402
from rlm_jax import tasks  # noqa: E402
from rlm_jax.search import export, mcts, toy  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(__file__), 'search', 'golden', 'mcts_toy.json')

# ------------------------------------------------------------------------------------------
# Curves.


def test_smooth_is_debiased_ema():
  # m1 = .5, s1 = .5/.5 = 1; m2 = .25 + 1 = 1.25, s2 = 1.25/.75; m3 = .625 + 1.5, s3 = 2.125/.875
  np.testing.assert_allclose(analysis.smooth([1, 2, 3], 0.5), [1.0, 5 / 3, 17 / 7])
  # A NaN is skipped: the third value is the second finite one (m2 = .25 + 1.5, debias .75).
  out = analysis.smooth([1, float('nan'), 3], 0.5)
  assert math.isnan(out[1])
  np.testing.assert_allclose(out[[0, 2]], [1.0, 1.75 / 0.75])
  np.testing.assert_allclose(analysis.smooth([4, -2, 7], 0.0), [4, -2, 7])
  with pytest.raises(ValueError, match='weight=1.0'):
    analysis.smooth([1.0], 1.0)


def _write_run(workdir, rows, results=None):
  with metrics_lib.MetricWriter(workdir, enabled=True, tensorboard=False) as w:
    for step, scalars in rows:
      w.write(step, scalars)
  if results is not None:
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f)


def test_load_metrics_merges_steps_and_splits_phases(tmp_path):
  _write_run(tmp_path, [(0, {'sft/loss': 3.0}), (1, {'sft/loss': 2.0}),
                        (1, {'eval/greedy/accuracy': 0.25}), (2, {'grpo/reward': 0.5, 'grpo/kl': 0.01})])
  m = analysis.load_metrics(tmp_path)
  assert list(m.index) == [0, 1, 2]
  assert m.loc[1, 'sft/loss'] == 2.0 and m.loc[1, 'eval/greedy/accuracy'] == 0.25
  assert math.isnan(m.loc[2, 'sft/loss'])
  sft = analysis.phase_curves(m, 'sft')
  assert list(sft.columns) == ['loss'] and list(sft.index) == [0, 1]
  grpo = analysis.phase_curves(m, 'grpo')
  assert grpo.loc[2].to_dict() == {'kl': 0.01, 'reward': 0.5}
  with pytest.raises(KeyError, match='phases in this run: eval, grpo, sft'):
    analysis.phase_curves(m, 'ppo')
  fig = analysis.plot_curves(sft, ['loss', 'nope', ('token_accuracy',)])  # unlogged names left out
  assert len([a for a in fig.axes if a.get_visible() and a.lines]) == 1
  plt.close(fig)
  with pytest.raises(ValueError, match='none of'):
    analysis.plot_curves(sft, ['nope'])


def test_check_workdir_names_the_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match=f'{tmp_path}: no metrics.jsonl'):
    analysis.check_workdir(tmp_path)


def test_results_tables():
  results = {'sft': {'greedy/accuracy': 0.5, 'greedy/invalid': 0.1, 'greedy/accuracy_level1': 0.75,
                     'greedy/accuracy_level2': 0.25},
             'grpo': {'greedy/accuracy': 0.625, 'greedy/accuracy_level1': 1.0, 'greedy/accuracy_level2': 0.25,
                      'self_consistency/accuracy': 0.7}}
  long = analysis.results_table(results)
  assert len(long) == 8
  row = long[(long.phase == 'sft') & (long.metric == 'invalid')].iloc[0]
  assert row.strategy == 'greedy' and row.value == 0.1 and math.isnan(row.level)
  table = analysis.eval_accuracy(long)
  assert list(table.columns) == ['all', 1, 2]
  assert table.loc[('grpo', 'greedy')].tolist() == [0.625, 1.0, 0.25]
  assert table.loc[('sft', 'greedy'), 1] == 0.75
  assert table.loc[('grpo', 'self_consistency'), 'all'] == 0.7
  assert math.isnan(table.loc[('grpo', 'self_consistency'), 1])


# ------------------------------------------------------------------------------------------
# Trees.


def _node(i, parent, depth, visits, q, terminal=False, reward=None, text=''):
  return {'id': i, 'parent': parent, 'depth': depth, 'text': text, 'visits': visits, 'q': q, 'prior': 0.5,
          'terminal': terminal, 'reward': reward}


#        0
#      /   \
#     1     2 (terminal, q -1)
#    / \
#   3   4 (terminal, q .9)
HAND = {'nodes': [_node(0, -1, 0, 5, 0.1), _node(1, 0, 1, 3, 0.4, text='a=1\n\n'), _node(2, 0, 1, 1, -1.0, True, -1.0),
                  _node(3, 1, 2, 1, 0.2), _node(4, 1, 2, 1, 0.9, True, 1.0, text='Answer: 1')]}


def test_tree_layout_by_hand():
  lay = analysis.tree_layout(HAND)
  # Leaves in depth-first order 3, 4, 2 sit at 0, 1, 2; node 1 over (0 + 1) / 2, root over (0.5 + 2) / 2.
  np.testing.assert_allclose(lay.x_N, [1.25, 0.5, 2.0, 0.0, 1.0])
  np.testing.assert_allclose(lay.y_N, [0, -1, -1, -2, -2])
  assert sorted(map(tuple, lay.edges_Ex2.tolist())) == [(0, 1), (0, 2), (1, 3), (1, 4)]
  # Node order in the file does not matter: same coordinates per id.
  shuffled = {'nodes': [HAND['nodes'][i] for i in (4, 2, 0, 3, 1)]}
  lay2 = analysis.tree_layout(shuffled)
  assert dict(zip([n['id'] for n in shuffled['nodes']], lay2.x_N)) == dict(zip(range(5), lay.x_N))


def test_chosen_path_rules():
  assert analysis.chosen_path(HAND) == [0, 1, 4]  # best terminal by q
  assert analysis.chosen_path(dict(HAND, chosen_path=[0, 2])) == [0, 2]  # the file's own path wins
  # No terminal: descend by visits; equal visits -> higher q; equal q -> lower id.
  no_term = {'nodes': [dict(n, terminal=False) for n in HAND['nodes']]}
  assert analysis.chosen_path(no_term) == [0, 1, 4]
  no_term['nodes'][4]['q'] = 0.2
  assert analysis.chosen_path(no_term) == [0, 1, 3]


def test_node_table_and_pick_tree():
  table = analysis.node_table(HAND, [0, 1, 4])
  assert list(table.index) == [0, 1, 4]
  assert table.loc[1, 'text'] == 'a=1\\n\\n' and table.loc[4, 'reward'] == 1.0 and math.isnan(table.loc[1, 'reward'])
  small_solved = dict(HAND, score=2)
  big_wrong = {'nodes': HAND['nodes'] + [_node(5, 3, 3, 1, 0.0)], 'score': 0}
  assert analysis.pick_tree([big_wrong, small_solved]) == 1
  assert analysis.pick_tree([dict(HAND, score=0), big_wrong]) == 1


@pytest.mark.parametrize('change, message', [
    (lambda t: t['nodes'][1].pop('visits'), r'nodes\[1\] lacks visits'),
    (lambda t: t['nodes'][2].update(parent=-1), 'expected one root'),
    (lambda t: t['nodes'][3].update(parent=9), 'node 3 has parent 9'),
    (lambda t: t['nodes'][3].update(depth=1), 'node 3 has depth 1'),
    (lambda t: t.update(chosen_path=[0, 3]), 'not a path from the root'),
    (lambda t: t['nodes'][4].update(id=3), 'repeats id 3'),
])
def test_validate_tree_names_the_culprit(change, message):
  tree = json.loads(json.dumps(HAND))
  change(tree)
  with pytest.raises(ValueError, match=message):
    analysis.validate_tree(tree)


TOY = toy.ToyTask(num_actions=3, horizon=3, value_confidence=0.5, value_noise=0.2)
TOY_CFG = mcts.MCTSConfig(num_simulations=8, num_children=3, num_walkers=2, max_depth=3)


def test_chosen_path_matches_the_search_answer():
  """On exported trees without 'chosen_path', the answer node is the one MCTS's own rules pick
  on device: best terminal; most visited; best terminal with no terminal node (falls back)."""
  params = toy.make_params(jax.random.key(1), 4, TOY)
  search = jax.jit(functools.partial(mcts.mcts_search, model=toy.make_model(TOY), config=TOY_CFG))
  res = search(params, jax.random.key(3), *toy.prompts(4, TOY))
  no_term = res.tree.replace(terminal_BxN=jnp.zeros_like(res.tree.terminal_BxN))
  want = {'best_terminal': np.asarray(res.extra['leaf_B']),
          'most_visited': np.asarray(mcts.most_visited_leaf(res.tree, TOY_CFG.num_children, TOY_CFG.max_depth)),
          'fallback': np.asarray(mcts.answer_leaf(no_term, TOY_CFG))}
  assert (want['best_terminal'] != want['most_visited']).any(), 'pick a seed where the rules differ'
  for b in range(4):
    tree = export.tree_to_json(res.tree, b)
    analysis.validate_tree(tree)
    plain = {'nodes': [dict(n, terminal=False) for n in tree['nodes']]}
    got = {'best_terminal': analysis.chosen_path(tree), 'most_visited': analysis.chosen_path(plain),
           'fallback': analysis.chosen_path(plain)}
    for rule, path in got.items():
      assert path[-1] == want[rule][b], (b, rule, path)
      assert path[0] == 0 and len(path) == tree['nodes'][path[-1]]['depth'] + 1


def test_golden_export_loads_and_draws(tmp_path):
  trees = analysis.load_trees(GOLDEN)  # a JSON list of search.tree_to_json outputs
  assert [len(t['nodes']) for t in trees] == [t['num_nodes'] for t in json.load(open(GOLDEN))]
  tree = trees[0]
  path = analysis.chosen_path(tree)
  fig, ax = plt.subplots()
  analysis.draw_tree(ax, tree, path)
  thick = [l for l in ax.lines if l.get_linewidth() == 3.0]
  assert len(thick) == len(path) - 1 and len(ax.lines) == len(tree['nodes']) - 1
  plt.close(fig)
  fig, ax = plt.subplots()
  analysis.draw_path_table(ax, HAND)  # chosen path 0 -> 1 -> 4: one row per step, root left out
  cells = ax.tables[0].get_celld()
  assert [cells[r, 0].get_text().get_text() for r in (1, 2)] == ['1', '4']
  assert [cells[r, 4].get_text().get_text() for r in (1, 2)] == ['a=1\\n\\n', 'Answer: 1']
  assert cells[2, 3].get_text().get_text() == '+1.00' and cells[1, 3].get_text().get_text() == ''
  plt.close(fig)
  (tmp_path / 'bad.json').write_text('{"nodes": [')
  with pytest.raises(ValueError, match='bad.json: not valid JSON'):
    analysis.load_trees(tmp_path / 'bad.json')
  with pytest.raises(FileNotFoundError, match='python -m rlm_jax.analysis'):
    analysis.load_trees(tmp_path)


# ------------------------------------------------------------------------------------------
# Scaling.

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
  df = analysis.scaling_table(ROWS)
  assert list(zip(df.phase, df.strategy, df.budget)) == [
      ('sft', 'greedy', 1), ('grpo', 'greedy', 1), ('grpo', 'mcts', 8), ('grpo', 'self_consistency', 2),
      ('grpo', 'self_consistency', 4)]
  np.testing.assert_allclose(df.tokens_x, [1.0, 1.0, 15.0, 2.0, 4.0])
  # Binomial standard error: sqrt(.3 * .7 / 100), sqrt(.4 * .6 / 100); no num_problems -> NaN.
  np.testing.assert_allclose(df.accuracy_se[:2], [math.sqrt(0.0021), math.sqrt(0.0024)])
  assert math.isnan(df.accuracy_se[2])
  assert list(df.label) == ['greedy', 'greedy', 'mcts (verifier)', 'self_consistency', 'self_consistency']
  best = analysis.best_within(df, 50.0)
  assert best.loc[('grpo', 'self_consistency'), 'budget'] == 2
  assert ('grpo', 'mcts (verifier)') not in best.index
  assert analysis.best_within(df, 1000.0).loc[('grpo', 'mcts (verifier)'), 'accuracy'] == 0.9
  assert analysis.phases_in(df.phase) == ['sft', 'grpo']
  with pytest.raises(ValueError, match=r'rows\[0\] lacks policy_tokens'):
    analysis.scaling_table([{'strategy': 'greedy', 'budget': 1, 'guide': 'policy', 'accuracy': 0.1}])
  (tmp_path / 'analysis').mkdir()
  (tmp_path / 'analysis' / 'scaling.json').write_text(json.dumps({'version': 1, 'rows': ROWS}))
  assert len(analysis.load_scaling(tmp_path)) == 5
  fig, ax = plt.subplots()
  analysis.plot_scaling(ax, df, 'grpo')
  assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ['greedy', 'mcts (verifier)', 'self_consistency']
  plt.close(fig)


def test_markdown_table():
  df = pd.DataFrame({'strategy': ['greedy', 'mcts'], 'accuracy': [0.5, 0.8125]})
  assert analysis.markdown_table(df) == ('| strategy | accuracy |\n|---|---|\n| greedy | 0.500 |\n'
                                         '| mcts | 0.812 |')


def test_parse_budgets():
  assert analysis.parse_budgets('greedy=1; mcts=4,8') == {'greedy': (1,), 'mcts': (4, 8)}
  with pytest.raises(ValueError, match="unknown strategy 'mtcs'"):
    analysis.parse_budgets('mtcs=4')
  with pytest.raises(ValueError, match="'beam=x'"):
    analysis.parse_budgets('beam=x')
  with pytest.raises(ValueError, match='each >= 1'):
    analysis.parse_budgets('beam=0')


# ------------------------------------------------------------------------------------------
# Verifier errors, with scores from the real verifier.


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
  acc = analysis.level_accuracy(df)
  assert acc.loc['greedy 1'].tolist() == [0.5, 0.5, 0.5] and acc.loc['mcts 4 (verifier)'].tolist() == [1.0, 0.5, 0.75]
  assert list(analysis.level_accuracy(df.drop(columns='guide')).index) == ['greedy 1', 'mcts 4']
  scores = analysis.score_table(df, by=('strategy',))
  assert scores.loc['greedy'].to_dict() == {'invalid': 0.25, 'wrong': 0.25, 'partial': 0.0, 'solved': 0.5, 'n': 4}
  by_run = analysis.score_table(analysis.add_run_labels(df), by=('run',))
  assert list(by_run.index) == ['greedy 1', 'mcts 4 (verifier)'] and by_run.loc['mcts 4 (verifier)', 'invalid'] == 0.25
  per_level = analysis.score_table(df)
  assert per_level.loc[('mcts', 4, 2), 'invalid'] == 0.5
  bad = analysis.error_examples(df, 'invalid')
  assert bad.level.tolist() == [1, 2] and bad.output.tolist() == ['no answer here', '']
  wrong = analysis.error_examples(df, 'wrong', max_chars=6)
  assert len(wrong) == 1 and wrong.output[0] == 'Ans...'
  assert list(analysis.error_examples(df, 'partial').columns) == [
      'strategy', 'budget', 'guide', 'level', 'problem', 'expected', 'output']
  with pytest.raises(ValueError, match="kind 'oops'"):
    analysis.error_examples(df, 'oops')
  both = pd.concat([df, df.assign(budget=df.budget * 2)])
  assert sorted(set(analysis.at_largest_budget(both).budget)) == [2, 8]


def test_load_outputs_names_the_line(tmp_path):
  df = _records()
  path = tmp_path / 'outputs.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in df.to_dict('records')))
  assert analysis.load_outputs(path).score.tolist() == df.score.tolist()
  path.write_text(json.dumps(df.iloc[0].to_dict()) + '\n' + '{"strategy": "greedy"}\n')
  with pytest.raises(ValueError, match='outputs.jsonl:2: lacks budget'):
    analysis.load_outputs(path)


def test_checkpoint_phases_in_training_order(tmp_path):
  assert analysis.checkpoint_phases(tmp_path) == []
  for p in ('grpo', 'zzz', 'sft'):
    (tmp_path / 'ckpt' / p).mkdir(parents=True)
  (tmp_path / 'ckpt' / 'notes.txt').write_text('')
  assert analysis.checkpoint_phases(tmp_path) == ['sft', 'grpo', 'zzz']


def test_search_setups_set_the_budget_knob_and_the_guide():
  from rlm_jax.search import config as search_config
  base = search_config.get_config()
  assert analysis.guides_for('greedy', has_value=True, verifier=True) == ['policy']
  assert analysis.guides_for('mcts', has_value=False, verifier=True) == ['policy', 'verifier']
  assert analysis.guides_for('beam', has_value=True, verifier=False) == ['value']
  s = analysis.search_setup(base, 'greedy', 1, 'policy', False)
  assert (s.strategy, s.chain.greedy, s.reward) == ('chain', True, 'none')
  s = analysis.search_setup(base, 'best_of_n', 4, 'verifier', False)
  assert (s.best_of_n.num_samples, s.best_of_n.scorer, s.reward) == (4, 'reward', 'answer')
  assert analysis.search_setup(base, 'best_of_n', 4, 'policy', False).best_of_n.scorer == 'logprob'
  s = analysis.search_setup(base, 'mcts', 8, 'value', True)
  assert (s.mcts.num_simulations, s.lm.value_from_policy, s.reward) == (8, True, 'none')
  assert s.mcts.num_children == base.mcts.num_children  # other knobs keep their defaults
  assert analysis.search_setup(base, 'beam', 2, 'policy', False).beam.beam_width == 2
  assert analysis.search_setup(base, 'self_consistency', 3, 'policy', False).self_consistency.num_samples == 3
  assert base.mcts.num_simulations == 16  # the base config is not modified
