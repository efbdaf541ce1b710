"""Every notebook of notebooks/ runs end to end on a real (tiny) run and writes its figures.

One module-scoped fixture trains configs/tiny.py, then runs `python -m rlm_jax.analysis` on it
with one small budget per strategy (the grpo checkpoint only; MCTS with and without the verifier); each notebook is then executed
with nbclient against that workdir.
"""
import glob
import json
import os
import subprocess
import sys
import time

import nbformat
import pytest

from rlm_jax import analysis

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, 'notebooks')
# One CPU device; unoptimised XLA compiles as in conftest.py (compiling is what tiny runs spend time on).
ENV = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS='--xla_backend_optimization_level=0', JAX_PLATFORMS='cpu')
BUDGETS = 'greedy=1;self_consistency=2;mcts=2'
FIGURES = {
    '01_training_curves.ipynb': ['training_sft.png', 'training_grpo.png', 'eval_accuracy.png'],
    '02_mcts_tree.ipynb': ['mcts_tree.png'],
    '03_test_time_scaling.ipynb': ['scaling.png'],
    '04_verifier_errors.ipynb': ['verifier_levels.png'],
}


def _run(*args):
  proc = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp('tiny_run'))
  _run('-m', 'rlm_jax.main', '--config=configs/tiny.py', f'--workdir={wd}')
  _run('-m', 'rlm_jax.analysis', f'--workdir={wd}', '--phases=grpo', f'--budgets={BUDGETS}',
       '--num_trees=2')
  return wd


def test_every_notebook_is_tested_and_generated():
  """The committed notebooks are exactly what make_notebooks.py writes, and all are covered."""
  assert sorted(os.path.basename(p) for p in glob.glob(f'{NOTEBOOKS}/*.ipynb')) == sorted(FIGURES)
  sys.path.insert(0, NOTEBOOKS)
  try:
    import make_notebooks
  finally:
    sys.path.remove(NOTEBOOKS)
  for name, nb in make_notebooks.NOTEBOOKS.items():
    on_disk = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    assert [c.source for c in on_disk.cells] == [c.source for c in nb.cells], f'{name}: rerun make_notebooks.py'
    assert 'parameters' in on_disk.cells[0].metadata.get('tags', []), name
    assert 'RLM_WORKDIR' in on_disk.cells[0].source, name


def test_collected_artifacts_agree_with_the_run(workdir):
  """Greedy decoding through the search package reproduces the training-time evaluation."""
  scaling = analysis.load_scaling(workdir)
  assert sorted(scaling.label) == ['greedy', 'mcts', 'mcts (verifier)', 'self_consistency']
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  final = results['rl'] if 'rl' in results else results['grpo']  # phase 2's evaluation
  greedy = scaling[scaling.strategy == 'greedy'].iloc[0]
  assert greedy.accuracy == final['greedy/accuracy']
  assert greedy.invalid == final['greedy/invalid']
  assert greedy.num_problems == 8  # configs/tiny.py: eval.size
  assert greedy.policy_tokens <= 24  # at most completion_len tokens per problem
  outputs = analysis.load_outputs(workdir)
  assert len(outputs) == 4 * 8
  trees = analysis.load_trees(workdir)
  assert sorted(t['guide'] for t in trees) == ['policy', 'policy', 'verifier', 'verifier']
  assert all(t['strategy'] == 'mcts' and t['chosen_path'][0] == 0 for t in trees)
  # Verifier-guided MCTS: terminal nodes carry the verifier reward (+-1) as their q.
  terminal = [n for t in trees if t['guide'] == 'verifier' for n in t['nodes'] if n['terminal']]
  assert all(n['reward'] in (-1.0, 1.0) and n['q'] == n['reward'] for n in terminal)


@pytest.mark.parametrize('name', sorted(FIGURES))
def test_notebook_runs_and_writes_figures(workdir, name, tmp_path):
  for png in FIGURES[name]:
    path = os.path.join(workdir, 'figures', png)
    if os.path.exists(path):
      os.remove(path)
  t0 = time.perf_counter()
  nb = analysis.run_notebook(os.path.join(NOTEBOOKS, name), workdir, timeout=120, save_to=tmp_path / name)
  seconds = time.perf_counter() - t0
  assert seconds < 60, f'{name} took {seconds:.0f}s'
  errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []) if o.output_type == 'error']
  assert not errors
  for png in FIGURES[name]:
    path = os.path.join(workdir, 'figures', png)
    assert os.path.getsize(path) > 5000, path  # a real plot, not an empty canvas
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
