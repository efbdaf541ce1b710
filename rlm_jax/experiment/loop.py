"""The resumable host loop every phase runs in, and the run's results file.

The loop only dispatches compiled steps and logs: step t+1 is dispatched before step t's
metrics are pulled. Each phase checkpoints into its own directory (`<workdir>/ckpt/<phase>`)
and resumes from the latest complete step; batches and keys are functions of (seed, step), so
a resumed run follows the same trajectory.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
from etils import epath

from rlm_jax import checkpoint as ckpt_lib
from rlm_jax import configlib
from rlm_jax import metrics as metrics_lib


class TrainingDiverged(RuntimeError):
  """A non-finite loss or gradient; the message names the phase and step."""


def run_phase(name: str, num_steps: int, step_offset: int, state, step_fn, batch_fn, stop, *,
              workdir: str, checkpoint, metrics: metrics_lib.MetricWriter):
  """Runs steps [resumed step, num_steps) of phase `name`. Returns (state, finished).

  Args:
    name: phase name: checkpoint folder `ckpt/<name>` and metric prefix `<name>/`.
    num_steps: steps of the phase.
    step_offset: metrics step of the phase's step 0.
    state: initial state pytree (its structure, shardings and dtypes are the restore target).
    step_fn: (state, batch, step) -> (state, metrics dict); a 'finite' entry is checked.
    batch_fn: step -> batch.
    stop: () -> bool, True once a preemption signal arrived (save and return).
    workdir, checkpoint: the run folder and the `checkpoint` config section.
    metrics: the run's writer.

  Returns:
    (state, finished): finished is False when stopped early by `stop`. Besides the step's own
    metrics each row logs `<name>/seconds`, the step's wall time (the first step's includes
    compiling): their sum over the phase is its training time, across resumes.

  Raises:
    TrainingDiverged: a non-finite loss or gradient (the last good checkpoint stays).
    ConfigError: the phase's checkpoint does not fit `state` (a run of another config).
  """
  ck = ckpt_lib.Checkpointer(os.path.join(workdir, 'ckpt', name), save_every=checkpoint.save_every,
                             keep=checkpoint.keep)
  start = 0
  if ck.latest_step() is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    try:
      state, extra = ck.restore(abstract)
    except (ValueError, KeyError, TypeError) as e:  # orbax: the saved tree differs from this model
      ck.close()
      first = ' '.join(str(e).split())[:200]
      raise configlib.ConfigError(f'{ck.directory}: the checkpoint does not match this config ({first}); '
                                  'use a new --workdir for another model') from e
    start = extra['step'] + 1
  if start < num_steps:  # drop metrics logged after the checkpoint we resume from
    metrics.truncate_after(step_offset + start - 1)
  pending = None  # metrics of the previous step, pulled after the next step is dispatched
  warned = []

  def flush(item):
    step, m = item
    m = jax.device_get(m)
    if not bool(m.pop('finite', True)):
      raise TrainingDiverged(f'{name}: non-finite loss or gradient at step {step}; '
                             f'the last good checkpoint in {ck.directory} is kept')
    if not warned and float(m.get('truncated', 0.0)) >= 1.0:  # a silent no-op run otherwise
      warned.append(step)
      print(f'warning: {name} step {step}: every completion was cut at task.completion_len before its end '
            '(no answer to reward); raise task.completion_len', file=sys.stderr)
    metrics.write(step_offset + step, {f'{name}/{k}': v for k, v in m.items()})

  finished = True
  bar = metrics_lib.progress(range(start, num_steps), total=num_steps, initial=start, desc=name)
  tick = time.perf_counter()
  try:
    for step in bar:
      state, m = step_fn(state, batch_fn(step), step)
      if pending is not None:
        flush(pending)
      stopping = stop()
      ck.save(step, state, {'step': step}, force=stopping or step == num_steps - 1)
      # Wall seconds of the step, from the previous step's end (its batch, dispatch, the wait
      # for the previous step's metrics, its checkpoint): summed over a phase, its training time.
      now = time.perf_counter()
      pending, tick = (step, dict(m, seconds=now - tick)), now
      if stopping:
        finished = False
        break
    if pending is not None:
      flush(pending)
  finally:
    bar.close()
    ck.close()
  return state, finished


class Results:
  """`<workdir>/results.json`: held-out metrics per phase tag ('sft', 'rl'), written atomically."""

  def __init__(self, workdir: str):
    self.path = epath.Path(workdir) / 'results.json'  # workdir may be gs://...

  def load(self) -> dict:
    if self.path.exists():
      return json.loads(self.path.read_text())
    return {}

  def put(self, tag: str, values: dict) -> None:
    results = self.load()
    results[tag] = values
    if jax.process_index() == 0:
      tmp = self.path.with_name(self.path.name + '.tmp')
      tmp.write_text(json.dumps(results, indent=1))
      tmp.replace(self.path)  # a kill leaves the old or the new file


def format_results(results: dict, strategies, rl_name: str = 'rl', sft_name: str = 'SFT') -> str:
  """Markdown table: one row per phase, one column per strategy (held-out accuracy).

  `sft_name` labels the phase-1 row ('START' for a run without SFT steps).
  """
  head = '| after | ' + ' | '.join(strategies) + ' |'
  lines = [head, '|' + '---|' * (len(strategies) + 1)]
  for phase, name in (('sft', sft_name), ('rl', rl_name.upper())):
    if phase in results:
      cells = [f"{results[phase].get(f'{s}/accuracy', float('nan')):.3f}" for s in strategies]
      lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)
