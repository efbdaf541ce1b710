"""Write a run's policy as an HF folder that `transformers` loads (`from_pretrained`).

  python -m rlm_jax.export --workdir=runs/main --out=runs/main/hf [--phase=sft] [--dtype=bfloat16]

The policy is rebuilt from the run folder exactly as `solve` does (`experiment.models.load_run`:
HF start, LoRA adapters merged into the weights, PPO's actor-critic without its value head);
`--phase` picks the phase (default: the run's last). A run that started from an HF folder keeps
that folder's config fields (token ids, rope settings, ...) and its tokenizer files are copied;
a character-tokenizer run writes the weights and config only (its tokenizer is `rlm_jax`'s).
The library function is `experiment.models.export_run`.
"""

from __future__ import annotations

from absl import flags

from rlm_jax import configlib

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder of rlm_jax.main (config.json + ckpt/).')
_OUT = flags.DEFINE_string('out', None, 'HF folder to write.')
_PHASE = flags.DEFINE_string('phase', None, 'Policy phase of the run (default: its last phase with a checkpoint).')
_DTYPE = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16', 'float16'],
                           'Dtype of the written tensors (default: the parameters\').')


def main(argv):
  if len(argv) > 1:
    raise configlib.ConfigError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _WORKDIR.value or not _OUT.value:
    raise configlib.ConfigError('--workdir (a run folder) and --out (the HF folder to write) are required')
  from rlm_jax.experiment import models as models_lib  # heavy imports after the flags are checked
  out = models_lib.export_run(_WORKDIR.value, _OUT.value, _PHASE.value, _DTYPE.value)
  print(f'wrote {out}')


if __name__ == '__main__':
  configlib.run_main(main)
