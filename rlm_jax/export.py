"""Write a run's policy as an HF folder that `transformers` loads (`from_pretrained`).

  python -m rlm_jax.export --workdir=runs/main --out=runs/main/hf [--phase=sft] [--dtype=bfloat16]

The policy is rebuilt from the run folder exactly as `solve` does (`experiment.models.load_run`:
HF start, LoRA adapters merged into the weights, PPO's actor-critic without its value head);
`--phase` picks the phase (default: the run's last). A run that started from an HF folder keeps
that folder's config fields (token ids, rope settings, ...) and its tokenizer files are copied;
a character-tokenizer run writes the weights and config only (its tokenizer is `rlm_jax`'s).
"""

from __future__ import annotations

import os
import shutil

from absl import flags

from rlm_jax import configlib

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder of rlm_jax.main (config.json + ckpt/).')
_OUT = flags.DEFINE_string('out', None, 'HF folder to write.')
_PHASE = flags.DEFINE_string('phase', None, 'Policy phase of the run (default: its last phase with a checkpoint).')
_DTYPE = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16', 'float16'],
                           'Dtype of the written tensors (default: the parameters\').')

# Tokenizer files of an HF folder, copied next to the exported weights.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model',
                   'vocab.json', 'merges.txt', 'chat_template.jinja', 'generation_config.json')


def export_run(workdir: str, out: str, phase: str | None = None, dtype: str | None = None) -> str:
  """Writes the policy of `workdir` (phase `phase`) to the HF folder `out`; returns `out`."""
  from rlm_jax.experiment import models as models_lib  # pylint: disable=g-import-not-at-top
  from rlm_jax.models import hf as hf_lib  # pylint: disable=g-import-not-at-top

  run = models_lib.load_run(workdir, phase)
  graphdef, params = run.policy  # export_hf writes the LM weights only (PPO's value head stays behind)
  template = run.cfg.hf_checkpoint or None
  hf_lib.export_hf(graphdef, params, out, template, dtype=dtype)
  tok_dir = run.cfg.tokenizer.path or run.cfg.hf_checkpoint
  if run.cfg.tokenizer.kind == 'hf' and tok_dir:
    for name in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(tok_dir, name)):
        shutil.copy(os.path.join(tok_dir, name), os.path.join(out, name))
  return out


def main(argv):
  if len(argv) > 1:
    raise configlib.ConfigError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _WORKDIR.value or not _OUT.value:
    raise configlib.ConfigError('--workdir (a run folder) and --out (the HF folder to write) are required')
  out = export_run(_WORKDIR.value, _OUT.value, _PHASE.value, _DTYPE.value)
  print(f'wrote {out}')


if __name__ == '__main__':
  configlib.run_main(main)
