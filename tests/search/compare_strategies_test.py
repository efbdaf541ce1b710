"""experiments/compare_strategies.py runs end to end on the scripted toy task."""
import importlib.util
import os
import sys

import pytest

_PATH = os.path.join(os.path.dirname(__file__), '..', '..', 'experiments', 'compare_strategies.py')


@pytest.mark.slow
def test_toy_comparison_table(tmp_path):
  spec = importlib.util.spec_from_file_location('compare_strategies', _PATH)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # dataclasses look their module up
  spec.loader.exec_module(mod)
  out = tmp_path / 'table.md'
  rows = mod.main(['--policy=toy', '--problems=16', '--budget=4', f'--out={out}'])
  assert [r.strategy.split()[0] for r in rows] == ['greedy', 'best-of-4', 'self-consistency@4', 'beam', 'mcts']
  greedy = rows[0]
  assert greedy.policy_tokens == 8 and greedy.model_calls == 1  # H=4 steps of 2 tokens, one sample
  for r in rows:
    assert 0.0 <= r.accuracy <= 1.0
  for r in rows[1:]:  # every other strategy spends more, at most about the budget
    assert greedy.policy_tokens < r.policy_tokens <= 4 * greedy.policy_tokens * 1.25
  assert 'mcts' in out.read_text() and (tmp_path / 'table.json').exists()
