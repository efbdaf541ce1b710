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
