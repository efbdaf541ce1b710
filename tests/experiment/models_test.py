"""experiment.models: the one builder, run folders (HF start + LoRA, value models) and export."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlm_jax import checkpoint as ckpt_lib
from rlm_jax import configlib
from rlm_jax.data.tokenizer import CharTokenizer
from rlm_jax.experiment import config as config_lib
from rlm_jax.experiment import models as models_lib
from rlm_jax.models import hf
from rlm_jax.models import lora as lora_lib
from rlm_jax.models import transformer as tfm
from rlm_jax.training.state import create_train_state

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, 'configs', 'tiny.py')


def _hf_folder(path):
  tok = CharTokenizer()
  cfg = tfm.ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                        d_ff=48, tie_embeddings=False)
  gdef, state = nnx.split(tfm.init_model(cfg, seed=3))
  hf.export_hf(gdef, state, str(path))
  return str(path)


def test_hf_lora_run_folder_loads_merged_and_exports_with_logit_parity(tmp_path):
  """A run that started from an HF folder with LoRA adapters: load_run rebuilds the policy with
  the adapters merged (equal to merging by hand), and `export` writes an HF folder whose logits
  in transformers equal ours."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  src = _hf_folder(tmp_path / 'base')
  config = configlib.load_config(TINY, [f'hf_checkpoint={src}', 'lora.rank=2', 'rl.algo=none'])
  cfg = config_lib.parse(config)
  builder = models_lib.ModelBuilder(cfg, models_lib.load_run_tokenizer(cfg))
  graphdef, params = builder.init_policy()
  # Trained adapters: B is zero at init, make it count.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 if 'lora_b' in jax.tree_util.keystr(p) else x, params)
  run_dir = tmp_path / 'run'
  os.makedirs(run_dir)
  ckpt_lib.write_config(str(run_dir), config)
  tx = builder.optimizer(cfg.sft.optim, params)
  with ckpt_lib.Checkpointer(run_dir / 'ckpt' / 'sft', save_every=1, keep=1) as ck:
    ck.save(5, create_train_state(params, tx), {'step': 5}, force=True)

  run = models_lib.load_run(str(run_dir))
  assert (run.phase, run.step, run.value) == ('sft', 5, None)
  tokens = jnp.asarray(np.random.default_rng(0).integers(4, 90, (2, 9)))
  got = nnx.merge(*run.policy)(tokens).logits_BxLxV
  want = nnx.merge(*lora_lib.merge_lora(graphdef, params))(tokens).logits_BxLxV
  base = nnx.merge(*hf.load_hf(src))(tokens).logits_BxLxV
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  assert np.abs(np.asarray(got) - np.asarray(base)).max() > 1e-3  # the adapters are in the weights

  out = models_lib.export_run(str(run_dir), str(tmp_path / 'hf'))
  ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = ref(input_ids=torch.tensor(np.asarray(tokens), dtype=torch.int64)).logits.numpy()
  np.testing.assert_allclose(theirs, np.asarray(got), atol=1e-4, rtol=1e-4)


def test_builder_refuses_a_char_tokenizer_on_another_vocabulary(tmp_path):
  tok = CharTokenizer()
  cfg = tfm.ModelConfig(vocab_size=tok.vocab_size + 100, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                        head_dim=8, d_ff=32)
  gdef, state = nnx.split(tfm.init_model(cfg, seed=0))
  hf.export_hf(gdef, state, str(tmp_path / 'big'))
  parsed = config_lib.parse(configlib.load_config(TINY, [f'hf_checkpoint={tmp_path / "big"}']))
  with pytest.raises(configlib.ConfigError) as e:
    models_lib.ModelBuilder(parsed, tok)
  assert str(e.value) == (f"hf_checkpoint={tmp_path / 'big'}: a {tok.vocab_size + 100}-token vocabulary with "
                          f"tokenizer.kind='char' ({tok.vocab_size} ids); set tokenizer.kind='hf'")


def test_export_cli_needs_a_run_folder_and_an_output():
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, '-m', 'rlm_jax.export', '--out=x'], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == ('error: --workdir (a run folder) and --out (the HF folder to '
                                                  'write) are required')


@pytest.mark.slow  # a whole alphazero smoke run (SFT, value phase, 2 rounds) then MCTS through solve
def test_alphazero_run_folder_gives_solve_its_value_model(tmp_path):
  import subprocess
  import sys
  run_dir = tmp_path / 'az'
  subprocess.run([sys.executable, '-m', 'rlm_jax.main', f'--config={REPO}/configs/alphazero.py:smoke',
                  f'--workdir={run_dir}'], cwd=REPO, check=True, capture_output=True, timeout=900)
  run = models_lib.load_run(str(run_dir))
  assert run.phase == 'alphazero' and run.value is not None
  assert nnx.merge(*run.value).cfg.value_head == 'sigmoid'
  sft = models_lib.load_run(str(run_dir), 'sft')  # the phase-1 value model comes along
  assert sft.value is not None
  from rlm_jax import tasks as tasks_lib
  tasks_file = tmp_path / 'tasks.jsonl'
  tasks_lib.save_tasks(str(tasks_file), tasks_lib.generate_dataset('arithmetic', 3, 9, levels=(1,)))
  out = tmp_path / 'out.jsonl'
  proc = subprocess.run([sys.executable, '-m', 'rlm_jax.solve', f'--workdir={run_dir}', f'--tasks={tasks_file}',
                         f'--out={out}', '--strategy=mcts', '--search_config.mcts.num_simulations=2',
                         '--search_config.lm.step_tokens=6', '--search_config.lm.completion_tokens=24'],
                        cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'with its value model' in proc.stderr
  assert len(out.read_text().splitlines()) == 3
