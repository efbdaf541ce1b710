"""Entry point: `python -m rlm_jax.main --config=configs/X.py [--config.a.b=v] --workdir=DIR`.

Builds the typed experiment config once (unknown keys and bad values fail here with one line),
runs the pipeline (resuming from `<workdir>` if it holds checkpoints) and prints the results.
"""

import os
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from rlm_jax import configlib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics, results).')


def main(argv):
  if len(argv) > 1:
    raise configlib.ConfigError(f'unexpected arguments: {" ".join(argv[1:])}')
  if _CONFIG.value is None:
    raise configlib.ConfigError('--config is required, e.g. --config=configs/main.py')
  if not _WORKDIR.value:
    raise configlib.ConfigError('--workdir is required (a directory for checkpoints and metrics)')
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from rlm_jax import distributed  # heavy imports after the flags are checked
  from rlm_jax.training import pipeline

  # Multi-host: RLM_COORDINATOR (host:port or 'auto'), RLM_NUM_PROCESSES, RLM_PROCESS_ID, as set
  # by experiments/tpu.py and experiments/slurm; a no-op for a single process.
  distributed.initialize(distributed.DistributedConfig())

  cfg = configlib.from_config(pipeline.ExperimentConfig, _CONFIG.value, '')
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(_CONFIG.value.to_json_best_effort(indent=1))
  try:
    experiment = pipeline.Experiment(cfg, workdir)
  except (ValueError, FileNotFoundError) as e:  # bad values only visible once the run is built
    raise configlib.ConfigError(str(e)) from e
  try:
    results = experiment.run()
  except pipeline.TrainingDiverged as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(3)
  if results.get('preempted'):
    print(f'preempted: checkpoint saved in {workdir}/ckpt; rerun the same command to resume')
    return
  print('\nHeld-out accuracy (' + str(cfg.eval.size) + f' tasks, {cfg.task.domain}, levels {cfg.task.levels}):')
  print(pipeline.format_results(results, cfg.eval.strategies, cfg.rl.algo))


if __name__ == '__main__':
  configlib.run_main(main)
