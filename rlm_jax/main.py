"""Entry point: `python -m rlm_jax.main --config=configs/X.py [--config.a.b=v] --workdir=DIR`.

Builds the typed experiment config once (unknown keys and bad values fail here with one line),
joins a multi-process job if one is configured, runs the pipeline (resuming from `<workdir>`
if it holds checkpoints) and prints the results.

`--workdir` is a local directory (made absolute) or a URL such as `gs://bucket/run` (kept as
it is; checkpoints, metrics, results and config.json are written there through etils.epath).

Multi-process: `config.distributed` (coordinator_address '' | 'auto' | 'host:port',
num_processes, process_id, local_device_ids) says how to join; the launcher's environment
variables RLM_COORDINATOR, RLM_NUM_PROCESSES, RLM_PROCESS_ID, RLM_LOCAL_DEVICE_IDS override
it field by field (a variable that is set and non-empty wins over the config; unset ones
leave the config value), so one config serves every host and the launcher fills in the rank.
"""

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
  from rlm_jax.experiment import config as config_lib

  cfg = config_lib.parse(_CONFIG.value)
  # Before any other jax call; a no-op for a single process. Env (launchers) overrides config.
  try:
    distributed.initialize(cfg.distributed)
  except distributed.DistributedError as e:
    raise configlib.ConfigError(str(e)) from e
  from rlm_jax import checkpoint  # heavy imports after the flags are checked
  from rlm_jax.experiment import loop, runner

  workdir = checkpoint.prepare_workdir(_WORKDIR.value)
  checkpoint.check_resumable(workdir, _CONFIG.value)  # before anything in workdir is written
  try:
    experiment = runner.Experiment(cfg, workdir)
  except (ValueError, FileNotFoundError) as e:  # bad values only visible once the run is built
    raise configlib.ConfigError(str(e)) from e
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    checkpoint.write_config(workdir, _CONFIG.value)
  try:
    results = experiment.run()
  except loop.TrainingDiverged as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(3)
  if results.get('preempted'):
    print(f'preempted: checkpoint saved in {workdir}/ckpt; rerun the same command to resume')
    return
  print('\nHeld-out accuracy (' + str(cfg.eval.size) + f' tasks, {cfg.task.domain}, levels {cfg.task.levels}):')
  print(loop.format_results(results, cfg.eval.strategies, cfg.rl.algo, 'SFT' if cfg.sft.steps else 'START'))


if __name__ == '__main__':
  configlib.run_main(main)
