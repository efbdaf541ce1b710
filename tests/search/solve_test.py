"""rlm_jax.solve and experiment.models.load_run: a run folder's models, solving a task file, CLI errors."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlm_jax import checkpoint as ckpt_lib
from rlm_jax import configlib
from rlm_jax import solve
from rlm_jax import tasks as tasks_lib
from rlm_jax.search import config as search_config
from rlm_jax.training.state import create_train_state, make_optimizer
from rlm_jax.experiment import config as config_lib
from rlm_jax.experiment import models as models_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, 'configs', 'tiny.py')


def _cfg():
  return configlib.load_config(TINY)


def _run_folder(path, cfg, phases):
  """A run folder as `rlm_jax.main` writes it: config.json and TrainStates in ckpt/<phase>."""
  os.makedirs(path, exist_ok=True)
  ckpt_lib.write_config(str(path), cfg)
  typed = config_lib.parse(cfg)
  for phase, (step, params) in phases.items():
    optim = typed.sft.optim if phase == 'sft' else typed.rl.optim
    with ckpt_lib.Checkpointer(path / 'ckpt' / phase, save_every=1, keep=2) as ck:
      ck.save(step, create_train_state(params, make_optimizer(optim)), {'step': step}, force=True)


def test_load_run_rebuilds_the_latest_phase_from_the_run_folder(tmp_path):
  """A run folder (config.json + checkpoints in the training layout) restores to exactly the
  saved policy weights; the last phase wins, --phase picks another."""
  cfg = _cfg()
  tok, _, (graphdef, fresh) = solve.random_models(cfg, seed=1)
  trained = jax.tree.map(lambda x: x + 0.5, fresh)
  _run_folder(tmp_path, cfg, {'grpo': (3, trained), 'sft': (1, fresh)})
  run = models_lib.load_run(str(tmp_path))
  assert (run.phase, run.step, run.value) == ('grpo', 3, None)
  for a, b in zip(jax.tree.leaves(run.policy[1]), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  sft = models_lib.load_run(os.path.relpath(tmp_path), 'sft')  # `--workdir=runs/x` style
  np.testing.assert_array_equal(np.asarray(jax.tree.leaves(sft.policy[1])[0]), np.asarray(jax.tree.leaves(fresh)[0]))
  with pytest.raises(configlib.ConfigError, match='--phase=ppo: the run in .* has the policy phases sft, grpo'):
    models_lib.load_run(str(tmp_path), 'ppo')
  with pytest.raises(configlib.ConfigError, match='no config.json there'):
    models_lib.load_run(str(tmp_path / 'ckpt'))


def test_solve_writes_one_record_per_task_in_order():
  tok, cfg, (graphdef, params) = solve.random_models(_cfg(), seed=0)
  tasks = tasks_lib.generate_dataset('arithmetic', 3, 5, levels=(1,))
  sc = search_config.get_config()
  sc.batch_size = 2  # 3 tasks -> two batches, the last one padded
  sc.reward = 'answer'
  sc.lm.update(step_tokens=6, completion_tokens=12)
  setup = search_config.build(sc)
  records = solve.solve(cfg.task, setup, 'chain', tasks, tok, graphdef, params)
  assert len(records) == 3
  for r in records:
    assert set(r) == {'output', 'score', 'policy_tokens', 'model_calls'}
    assert isinstance(r['output'], str) and 0 < r['policy_tokens'] <= 12 and r['model_calls'] == 1
    assert tasks_lib.verify(tasks[0], r['output']) in (-1, 0, 1, 2)
  # Greedy decoding of the same prompt gives the same text whatever the batch position.
  again = solve.solve(cfg.task, setup, 'chain', tasks[2:] + tasks[:2], tok, graphdef, params)
  assert again[0]['output'] == records[2]['output']


def test_cli_names_a_bad_strategy():
  proc = subprocess.run(
      [sys.executable, '-m', 'rlm_jax.solve', f'--config={TINY}', '--random_init', '--tasks=x.json',
       '--out=/dev/null', '--strategy=astar'], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith('error: --strategy=astar: must be one of chain')


def test_cli_needs_a_run_folder_or_random_init(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'rlm_jax.solve', '--tasks=x.json', '--out=/dev/null'], cwd=REPO, capture_output=True,
      text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == 'error: give --workdir=RUN (a run folder), or --config=FILE --random_init'


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
  cfg = _cfg()
  _, _, (_, params) = solve.random_models(cfg, seed=0)
  wider = jax.tree.map(lambda x: jnp.concatenate([x, x], axis=-1) if x.ndim == 2 else x, params)
  _run_folder(tmp_path, cfg, {'grpo': (0, wider)})
  with pytest.raises(configlib.ConfigError, match=r'ckpt/grpo/0: parameter /embed has shape \(104, 64\) in the '
                     r'checkpoint, \(104, 32\) in the model of config.json'):
    models_lib.load_run(str(tmp_path))
