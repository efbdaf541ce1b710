"""`loop.run_phase`: metrics rows, the per-step wall seconds, and a resume that continues them."""
import time

import jax.numpy as jnp
import ml_collections
import numpy as np

from rlm_jax import metrics as metrics_lib
from rlm_jax.experiment import loop


def _run(workdir, num_steps, stop_after=None, sleep=0.05):
  calls = []

  def step_fn(state, batch, step):
    time.sleep(sleep)
    calls.append(step)
    return {'x': state['x'] + batch}, {'loss': jnp.float32(step), 'finite': jnp.bool_(True)}

  stop = lambda: stop_after is not None and len(calls) >= stop_after
  ck = ml_collections.ConfigDict({'save_every': 1, 'keep': 2})
  with metrics_lib.MetricWriter(workdir) as metrics:
    state, done = loop.run_phase('toy', num_steps, 10, {'x': jnp.zeros((), jnp.float32)}, step_fn,
                                 lambda i: jnp.float32(i), stop, workdir=workdir, checkpoint=ck, metrics=metrics)
  return float(state['x']), done, calls


def test_steps_log_their_wall_seconds_and_a_resume_continues(tmp_path):
  """Every row has toy/seconds >= the step's own sleep; a stopped phase resumes at the next
  step, and the sum of the rows' seconds covers every step exactly once."""
  state, done, calls = _run(str(tmp_path), 5, stop_after=2)
  assert (done, calls, state) == (False, [0, 1], 1.0)
  state, done, calls = _run(str(tmp_path), 5)
  assert (done, calls, state) == (True, [2, 3, 4], 0 + 1 + 2 + 3 + 4)
  rows = [r for r in metrics_lib.read_metrics(tmp_path) if 'toy/loss' in r]
  assert [r['step'] for r in rows] == [10, 11, 12, 13, 14]
  assert [r['toy/loss'] for r in rows] == [0, 1, 2, 3, 4]
  seconds = np.array([r['toy/seconds'] for r in rows])
  assert (seconds >= 0.05).all() and seconds.sum() < 5 * 0.05 + 30  # no step counted twice
