"""Smoke-test experiment: a minute-scale run of the whole pipeline (used by the tests).

Command:
  python -m rlm_jax.main --config=configs/tiny.py --workdir=/tmp/rlm_tiny
Hardware: any CPU. Wall time: well under a minute. Expected: it finishes and prints a
table; the model is far too small and short-trained for meaningful accuracy.
"""
import ml_collections

from rlm_jax import configlib


def get_config() -> ml_collections.ConfigDict:
  c = configlib.import_config('main', __file__).get_config()
  c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64)
  c.task.update(levels=(1,), train_size=64, rl_size=120, prompt_len=20, completion_len=24, answer_len=10)
  c.sft.update(steps=6, batch_size=8)
  c.sft.optim.update(warmup_steps=1, decay_steps=5)
  c.rl.update(iterations=4, prompts_per_iteration=4, group_size=4)
  c.eval.update(size=8, batch_size=8, strategies=('greedy', 'self_consistency'), num_samples=2)
  c.checkpoint.update(save_every=1, keep=2)
  return c
