"""rlm_jax.solve: checkpoint loading in the training layout, solving a task file, CLI errors."""
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
from rlm_jax.training import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, 'configs', 'tiny.py')


def _cfg():
  return configlib.load_config(TINY)


def test_loads_the_latest_training_checkpoint(tmp_path):
  """A checkpoint written as the training pipeline writes it (TrainState with the phase's
  optimizer under <run>/ckpt/<phase>) restores to exactly the saved policy weights."""
  cfg = _cfg()
  tok, graphdef, fresh = solve.load_policy(cfg, None, True, seed=1)
  trained = jax.tree.map(lambda x: x + 0.5, fresh)
  optim = configlib.from_config(pipeline.RLConfig, cfg.rl, 'rl').optim
  state = create_train_state(trained, make_optimizer(optim))
  with ckpt_lib.Checkpointer(tmp_path / 'ckpt' / 'grpo', save_every=1, keep=2) as ck:
    ck.save(3, state, {'step': 3}, force=True)
  # An SFT phase exists too: the GRPO phase wins.
  sft_optim = configlib.from_config(pipeline.SFTConfig, cfg.sft, 'sft').optim
  with ckpt_lib.Checkpointer(tmp_path / 'ckpt' / 'sft', save_every=1, keep=2) as ck:
    ck.save(1, create_train_state(fresh, make_optimizer(sft_optim)), {'step': 1}, force=True)
  assert solve.find_checkpoint_dir(str(tmp_path)) == (str(tmp_path / 'ckpt' / 'grpo'), 'grpo')
  _, _, params = solve.load_policy(cfg, str(tmp_path), False, seed=0)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert solve.find_checkpoint_dir(str(tmp_path), 'sft') == (str(tmp_path / 'ckpt' / 'sft'), 'sft')
  with pytest.raises(configlib.ConfigError, match='no ckpt/<grpo'):
    solve.find_checkpoint_dir(str(tmp_path / 'ckpt' / 'nothing'))
  # The SFT phase restored explicitly is the other weights.
  _, _, sft = solve.load_policy(cfg, str(tmp_path), False, seed=0, phase='sft')
  np.testing.assert_array_equal(np.asarray(jax.tree.leaves(sft)[0]), np.asarray(jax.tree.leaves(fresh)[0]))
  with pytest.raises(configlib.ConfigError, match='--checkpoint is required'):
    solve.load_policy(cfg, None, False, seed=0)


def test_solve_writes_one_record_per_task_in_order():
  cfg = _cfg()
  tok, graphdef, params = solve.load_policy(cfg, None, True, seed=0)
  tasks = tasks_lib.generate_dataset('arithmetic', 3, 5, levels=(1,))
  sc = search_config.get_config()
  sc.batch_size = 2  # 3 tasks -> two batches, the last one padded
  sc.reward = 'answer'
  sc.lm.update(step_tokens=6, completion_tokens=12)
  setup = search_config.build(sc)
  records = solve.solve(cfg, setup, 'chain', tasks, tok, graphdef, params)
  assert len(records) == 3
  for r in records:
    assert set(r) == {'output', 'score', 'policy_tokens', 'model_calls'}
    assert isinstance(r['output'], str) and 0 < r['policy_tokens'] <= 12 and r['model_calls'] == 1
    assert tasks_lib.verify(tasks[0], r['output']) in (-1, 0, 1, 2)
  # Greedy decoding of the same prompt gives the same text whatever the batch position.
  again = solve.solve(cfg, setup, 'chain', tasks[2:] + tasks[:2], tok, graphdef, params)
  assert again[0]['output'] == records[2]['output']


def test_cli_names_a_bad_strategy():
  proc = subprocess.run(
      [sys.executable, '-m', 'rlm_jax.solve', f'--config={TINY}', '--random_init', '--tasks=x.json',
       '--out=/dev/null', '--strategy=astar'], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith('error: --strategy=astar: must be one of chain')


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
  cfg = _cfg()
  _, _, params = solve.load_policy(cfg, None, True, seed=0)
  wider = jax.tree.map(lambda x: jnp.concatenate([x, x], axis=-1) if x.ndim == 2 else x, params)
  optim = configlib.from_config(pipeline.RLConfig, cfg.rl, 'rl').optim
  with ckpt_lib.Checkpointer(tmp_path / 'ckpt' / 'grpo', save_every=1, keep=1) as ck:
    ck.save(0, create_train_state(wider, make_optimizer(optim)), {'step': 0}, force=True)
  with pytest.raises(configlib.ConfigError, match='not a checkpoint of the policy in --config'):
    solve.load_policy(cfg, str(tmp_path), False, seed=0)
