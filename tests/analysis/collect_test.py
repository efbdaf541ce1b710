"""rlm_jax.analysis.collect: budgets and search setups, and a collection over a checkpoint that
returns (and does not write) what `python -m rlm_jax.solve` produces for the same search."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from rlm_jax import analysis
from rlm_jax import checkpoint as ckpt_lib
from rlm_jax import configlib
from rlm_jax import metrics as metrics_lib
from rlm_jax import solve
from rlm_jax import tasks as tasks_lib
from rlm_jax.analysis import files
from rlm_jax.experiment import data as data_lib
from rlm_jax.search import config as search_config
from rlm_jax.training.state import create_train_state, make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, 'configs', 'tiny.py')


def test_parse_budgets():
  assert analysis.parse_budgets('greedy=1; mcts=4,8') == {'greedy': (1,), 'mcts': (4, 8)}
  with pytest.raises(ValueError, match="unknown strategy 'mtcs'"):
    analysis.parse_budgets('mtcs=4')
  with pytest.raises(ValueError, match="'beam=x'"):
    analysis.parse_budgets('beam=x')
  with pytest.raises(ValueError, match='each >= 1'):
    analysis.parse_budgets('beam=0')
  with pytest.raises(ValueError, match='names no strategy'):
    analysis.parse_budgets(' ; ')


def test_search_setups_set_the_budget_knob_and_the_guide():
  base = search_config.get_config()
  assert analysis.guides_for('greedy', has_value=True, verifier=True) == ['policy']
  assert analysis.guides_for('mcts', has_value=False, verifier=True) == ['policy', 'verifier']
  assert analysis.guides_for('beam', has_value=True, verifier=False) == ['value']
  s = analysis.search_setup(base, 'greedy', 1, 'policy', False)
  assert (s.strategy, s.chain.greedy, s.reward) == ('chain', True, 'none')
  s = analysis.search_setup(base, 'best_of_n', 4, 'verifier', False)
  assert (s.best_of_n.num_samples, s.best_of_n.scorer, s.reward) == (4, 'reward', 'answer')
  assert analysis.search_setup(base, 'best_of_n', 4, 'policy', False).best_of_n.scorer == 'logprob'
  assert analysis.search_setup(base, 'best_of_n', 4, 'value', False, 'prm_min').best_of_n.scorer == 'prm_min'
  s = analysis.search_setup(base, 'mcts', 8, 'value', True)
  assert (s.mcts.num_simulations, s.lm.value_from_policy, s.reward) == (8, True, 'none')
  assert s.mcts.num_children == base.mcts.num_children  # other knobs keep their defaults
  assert analysis.search_setup(base, 'beam', 2, 'policy', False).beam.beam_width == 2
  assert analysis.search_setup(base, 'self_consistency', 3, 'policy', False).self_consistency.num_samples == 3
  assert base.mcts.num_simulations == 16  # the base config is not modified


@pytest.fixture(scope='module')
def fake_run(tmp_path_factory):
  """A run folder as `rlm_jax.main` leaves it (config.json, metrics.jsonl, ckpt/grpo), with a
  random policy (seed 1, not the run's seed 0, so a fresh init would not match it).

  Returns:
    (workdir, typed config, tok, graphdef, params).
  """
  workdir = tmp_path_factory.mktemp('fake_run')
  cfg = configlib.load_config(TINY)
  ckpt_lib.write_config(str(workdir), cfg)
  with metrics_lib.MetricWriter(workdir, enabled=True, tensorboard=False) as w:
    w.write(0, {'sft/loss': 1.0})
  tok, typed, (graphdef, params) = solve.random_models(cfg, seed=1)
  with ckpt_lib.Checkpointer(workdir / 'ckpt' / 'grpo', save_every=1, keep=1) as ck:
    ck.save(2, create_train_state(params, make_optimizer(typed.rl.optim)), {'step': 2}, force=True)
  return workdir, typed, tok, graphdef, params


def test_checkpoint_phases_are_the_run_policy_phases_with_a_checkpoint(fake_run):
  workdir = fake_run[0]
  assert analysis.checkpoint_phases(workdir) == ['grpo']
  (workdir / 'ckpt' / 'sft' / '1').mkdir(parents=True)  # a step without its commit file
  assert analysis.checkpoint_phases(workdir) == ['grpo']
  os.rmdir(workdir / 'ckpt' / 'sft' / '1')
  os.rmdir(workdir / 'ckpt' / 'sft')


def _solve(cfg, tok, graphdef, params, name, budget, tasks, trees_path=None):
  """The reference: one (strategy, budget) through `rlm_jax.solve`, configured as collect
  documents it (run's completion length and eval temperature, seed 1000 * seed + budget)."""
  base = search_config.get_config()
  base.lm.update(completion_tokens=cfg.task.completion_len, temperature=cfg.eval.temperature)
  base.batch_size = len(tasks)
  setup = dataclasses.replace(analysis.search_setup(base, name, budget, 'policy', False), seed=1000 + budget)
  return solve.solve(cfg.task, setup, setup.strategy, tasks, tok, graphdef, params, trees_path=trees_path)


def _held_out(cfg, tok, n):
  return data_lib.build_data(tok, cfg.task, cfg.eval.size)[1].tasks[:n]


def test_collect_returns_greedy_outputs_of_the_checkpoint(fake_run):
  """Greedy decoding of the checkpointed policy, returned as records; nothing is written."""
  workdir, cfg, tok, graphdef, params = fake_run
  lines = []
  found = analysis.collect(workdir, budgets={'greedy': (1,)}, num_problems=3, seed=1, log=lines.append)
  assert sorted(os.listdir(workdir)) == ['ckpt', 'config.json', 'metrics.jsonl']
  assert len(lines) == 1 and lines[0].startswith('grpo greedy=1 (policy): accuracy ')
  assert found.trees == []
  task_list = _held_out(cfg, tok, 3)
  want = _solve(cfg, tok, graphdef, params, 'greedy', 1, task_list)
  assert [(o['phase'], o['strategy'], o['index'], o['problem']) for o in found.outputs] == [
      ('grpo', 'greedy', i, t['problem']) for i, t in enumerate(task_list)]
  assert [o['output'] for o in found.outputs] == [r['output'] for r in want]
  assert [o['score'] for o in found.outputs] == [tasks_lib.verify(t, r['output']) for t, r in zip(task_list, want)]
  (row,) = found.rows
  assert (row['phase'], row['strategy'], row['budget'], row['guide'], row['num_problems']) == (
      'grpo', 'greedy', 1, 'policy', 3)
  assert row['policy_tokens'] == sum(r['policy_tokens'] for r in want) / 3
  assert row['accuracy'] == sum(o['score'] == 2 for o in found.outputs) / 3
  assert row['invalid'] == sum(o['score'] < 0 for o in found.outputs) / 3


@pytest.mark.slow
def test_collect_returns_the_mcts_trees_solve_writes(fake_run, tmp_path):
  """MCTS through collect: the same outputs as `rlm_jax.solve` and, in memory, the trees that
  solve writes to its --trees file (first num_trees problems), plus the analysis keys."""
  workdir, cfg, tok, graphdef, params = fake_run
  found = analysis.collect(workdir, budgets={'mcts': (2,)}, verifier=False, num_problems=3, num_trees=2, seed=1,
                           log=lambda _: None)
  task_list = _held_out(cfg, tok, 3)
  trees_path = tmp_path / 'solve_trees.jsonl'
  want = _solve(cfg, tok, graphdef, params, 'mcts', 2, task_list, trees_path=str(trees_path))
  assert [o['output'] for o in found.outputs] == [r['output'] for r in want]
  assert found.rows[0]['model_calls'] == sum(r['model_calls'] for r in want) / 3
  ref = [json.loads(line) for line in trees_path.read_text().splitlines()][:2]
  added = ('phase', 'strategy', 'budget', 'guide', 'score', 'chosen_path', 'task')
  assert [{k: v for k, v in t.items() if k not in added} for t in found.trees] == ref
  assert [t['task']['problem'] for t in found.trees] == [t['problem'] for t in task_list[:2]]
  assert [t['score'] for t in found.trees] == [o['score'] for o in found.outputs[:2]]
  for t in found.trees:
    files.validate_tree(t)
    assert t['chosen_path'] == analysis.chosen_path({'nodes': t['nodes']})


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'rlm_jax.analysis', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, PYTHONPATH=REPO))


@pytest.mark.parametrize('args, message', [
    ([], 'error: --workdir is required'),
    (['--workdir=/nonexistent/run'], 'error: /nonexistent/run: no metrics.jsonl'),
    (['--workdir=.', '--budgets=mtcs=4'], "error: budgets: unknown strategy 'mtcs'"),
])
def test_cli_errors_are_one_line(args, message):
  proc = _cli(*args)
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith(message) and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
