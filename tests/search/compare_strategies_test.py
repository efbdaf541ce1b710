"""experiments/compare_strategies.py on the scripted toy task: the table, and the strategies'
ordering on quality over fixed seeds."""
import importlib.util
import os
import sys

import pytest

_PATH = os.path.join(os.path.dirname(__file__), '..', '..', 'experiments', 'compare_strategies.py')


def _module():
  spec = importlib.util.spec_from_file_location('compare_strategies', _PATH)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # dataclasses look their module up
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.slow
def test_toy_comparison_table(tmp_path):
  out = tmp_path / 'table.md'
  rows = _module().main(['--policy=toy', '--problems=16', '--budget=4', f'--out={out}'])
  assert [r.strategy.split()[0] for r in rows] == ['greedy', 'best-of-4', 'self-consistency@4', 'beam', 'mcts',
                                                   'mcts']
  assert rows[-1].strategy.endswith('(negated PRM)')
  greedy = rows[0]
  assert greedy.policy_tokens == 8 and greedy.model_calls == 1  # H=4 steps of 2 tokens, one sample
  for r in rows[1:]:  # every other strategy spends more, at most about the budget
    assert greedy.policy_tokens < r.policy_tokens <= 4 * greedy.policy_tokens * 1.25
  assert 'mcts' in out.read_text() and (tmp_path / 'table.json').exists()


@pytest.mark.slow
def test_toy_strategies_ordered_by_quality():
  """512 problems x seeds 0, 1, 2, budget 8 completions (64 tokens). Measured per seed (this
  commit, CPU): greedy .361 .373 .385; PRM best-of-8 .463 .463 .482 (64 tokens); MCTS S=11
  .541 .520 .537 (48 tokens); MCTS on the negated PRM .330 .346 .295; beam 2x4 .594 .586 .662
  (54 tokens). The margins asserted are about half of the smallest measured ones."""
  rows = {r.strategy.split(' (')[0] if 'negated' not in r.strategy else 'negated': r
          for r in _module().main(['--policy=toy', '--problems=512', '--budget=8', '--num_seeds=3'])}
  greedy, bon, sc = rows['greedy'], rows['best-of-8'], rows['self-consistency@8']
  mcts, neg, beam = rows['mcts S=11 K=3'], rows['negated'], rows['beam 2x4']
  per_seed = lambda a, b: [x - y for x, y in zip(a.seed_accuracy, b.seed_accuracy)]
  assert len(mcts.seed_accuracy) == 3
  # MCTS beats PRM best-of-N while spending fewer policy tokens, on every seed.
  assert mcts.policy_tokens <= bon.policy_tokens
  assert min(per_seed(mcts, bon)) >= 0.03, (mcts.seed_accuracy, bon.seed_accuracy)
  assert min(per_seed(mcts, greedy)) >= 0.08, (mcts.seed_accuracy, greedy.seed_accuracy)
  # A value model that is wrong (the negated PRM) makes MCTS worse, worse than no search.
  assert min(per_seed(mcts, neg)) >= 0.10, (mcts.seed_accuracy, neg.seed_accuracy)
  assert neg.accuracy <= greedy.accuracy - 0.02
  # The PRM is what helps: ranking by it beats voting; step-level PRM beam beats greedy.
  assert min(per_seed(bon, sc)) >= 0.04, (bon.seed_accuracy, sc.seed_accuracy)
  assert min(per_seed(beam, greedy)) >= 0.12
