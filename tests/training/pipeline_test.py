"""Data splits of the pipeline: SFT problems, held-out problems and the phase-2 pool."""

import pytest

from rlm_jax.data.tokenizer import CharTokenizer
from rlm_jax.training import pipeline


def _splits(rl_size):
  cfg = pipeline.TaskConfig(domain='arithmetic', levels=(1, 2, 3), train_size=300, rl_size=rl_size,
                            prompt_len=24, completion_len=40, answer_len=12)
  tok = CharTokenizer()
  train, held = pipeline.build_data(tok, cfg, eval_size=60)
  return tok, cfg, train, held


def test_rl_pool_is_disjoint_deduplicated_and_reproducible():
  tok, cfg, train, held = _splits(rl_size=900)
  pool = pipeline.build_rl_pool(tok, cfg, (train, held))
  problems = [t['problem'] for t in pool.tasks]
  assert len(set(problems)) == len(problems)
  assert not set(problems) & {t['problem'] for t in train.tasks + held.tasks}
  # Level 1 has few distinct problems, so dropping duplicates and SFT/held-out ones shrinks the
  # pool below rl_size, but the harder levels are almost all fresh.
  assert 300 < len(problems) < 900
  assert sum(t['level'] == 3 for t in pool.tasks) > 250
  assert pool.prompt.shape == (len(problems), cfg.prompt_len) and pool.answer.shape[0] == len(problems)
  # The encoded answer is the canonical final step of each problem.
  first = tok.decode(pool.answer[0, : pool.answer_len[0]])
  assert first == 'Answer: ' + pool.tasks[0]['solution']
  again = pipeline.build_rl_pool(tok, cfg, (train, held))
  assert [t['problem'] for t in again.tasks] == problems


def test_rl_pool_that_is_all_duplicates_is_a_one_line_error():
  tok, cfg, train, held = _splits(rl_size=3)
  with pytest.raises(ValueError, match='task.rl_size=3') as e:
    pipeline.build_rl_pool(tok, cfg, (train, held, pipeline.build_rl_pool(tok, cfg, (train, held))))
  assert '\n' not in str(e.value)


def test_device_batch_per_process_path_equals_plain_rows(tmp_path):
  """The multi-process path (each process reads its rows, arrays assembled on the mesh) gives
  the same global batch as plain arrays, laid out along the batch axes."""
  import jax
  import numpy as np

  from rlm_jax import configlib

  cfg = configlib.from_config(pipeline.ExperimentConfig, configlib.load_config('configs/tiny.py'), '')
  exp = pipeline.Experiment(cfg, str(tmp_path))
  assert 0 < len(exp.rl_pool.tasks) <= 120 and exp.rl_pool is not exp.train
  idx = np.array([5, 0, 63, 7, 12, 40, 33, 2])
  for arrays in (exp.train.sft, exp.rl_pool.prompt_batch()):
    plain = exp.device_batch(arrays, idx, per_process=False)
    sharded = exp.device_batch(arrays, idx, per_process=True)
    assert plain.keys() == sharded.keys() == arrays.keys()
    for k in arrays:
      np.testing.assert_array_equal(np.asarray(sharded[k]), arrays[k][idx])
      np.testing.assert_array_equal(np.asarray(plain[k]), arrays[k][idx])
      # mesh (1, 8, 1): rows split over the 8 'fsdp' devices, one row each.
      assert sharded[k].sharding.shard_shape(sharded[k].shape)[0] == 1
  assert jax.device_count() == 8
