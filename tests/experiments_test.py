"""experiments/tpu.py: exact --dry-run command lines, and the remote run/stop scripts executed
locally (bash, a fake python) to prove that overrides with spaces and quotes arrive intact;
experiments/make_figures.py on a run whose analysis is already collected."""
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
  spec = importlib.util.spec_from_file_location('tpu_launcher',
                                                os.path.join(_REPO, 'experiments', 'tpu.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


tpu = _load()
T = ['--name=rlm-v5p', '--zone=us-east5-a', '--project=my-proj', '--dry-run']


def _dry(capsys, *argv):
  assert tpu.main(list(argv)) == 0
  out = capsys.readouterr().out
  return out.splitlines()


def _remote(line: str) -> str:
  """The --command=... script of a printed gcloud ssh line."""
  argv = shlex.split(line)
  assert argv[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']
  (command,) = [a for a in argv if a.startswith('--command=')]
  return command[len('--command='):]


def test_create(capsys):
  assert _dry(capsys, 'create', *T, '--accelerator-type=v5p-32', '--version=v2-alpha-tpuv5',
              '--spot') == [
      'gcloud compute tpus tpu-vm create rlm-v5p --zone=us-east5-a --project=my-proj '
      '--accelerator-type=v5p-32 --version=v2-alpha-tpuv5 --spot']


def test_delete_and_logs(capsys):
  assert _dry(capsys, 'delete', '--name=rlm-v5p', '--zone=us-east5-a', '--dry-run') == [
      'gcloud compute tpus tpu-vm delete rlm-v5p --zone=us-east5-a --quiet']
  assert _dry(capsys, 'logs', *T, '--worker=all', '--lines=20', '--follow') == [
      'gcloud compute tpus tpu-vm ssh rlm-v5p --zone=us-east5-a --project=my-proj --worker=all '
      "'--command=tail -n 20 -f rlm_logs/rlm-v5p.log'"]


_INSTALL = ('command -v python3.11 >/dev/null || { sudo apt-get update -qq && sudo apt-get '
            'install -y -qq python3.11 python3.11-venv; }; python3.11 -m venv rlm_venv; '
            'rlm_venv/bin/pip install -q --upgrade pip; rlm_venv/bin/pip install -q -e '
            "'rlm_jax[hf]' 'jax[tpu]==0.10.2'; rlm_venv/bin/python -c 'import jax; "
            "print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'")


def test_setup_from_git(capsys):
  (line,) = _dry(capsys, 'setup', *T, '--repo=https://github.com/org/rlm_jax.git', '--ref=v0.1',
                 '--extras=hf')
  assert line.startswith('gcloud compute tpus tpu-vm ssh rlm-v5p --zone=us-east5-a '
                         '--project=my-proj --worker=all ')
  assert _remote(line) == (
      'set -euo pipefail; [ -d rlm_jax/.git ] || git clone -q '
      'https://github.com/org/rlm_jax.git rlm_jax; git -C rlm_jax fetch -q origin v0.1; '
      'git -C rlm_jax checkout -q FETCH_HEAD; ' + _INSTALL)


def test_setup_ships_this_checkout(capsys):
  lines = _dry(capsys, 'setup', *T, '--extras=hf', '--iap')
  assert lines[:2] == [
      'git -C . archive --format=tar.gz --prefix=rlm_jax/ -o /tmp/rlm-v5p-rlm_jax.tar.gz HEAD',
      'gcloud compute tpus tpu-vm scp /tmp/rlm-v5p-rlm_jax.tar.gz rlm-v5p:rlm_jax.tar.gz '
      '--zone=us-east5-a --project=my-proj --worker=all --tunnel-through-iap']
  assert lines[2].startswith('gcloud compute tpus tpu-vm ssh rlm-v5p --zone=us-east5-a '
                             '--project=my-proj --worker=all --tunnel-through-iap ')
  assert _remote(lines[2]) == ('set -euo pipefail; rm -rf rlm_jax; tar xzf rlm_jax.tar.gz; '
                               'rm rlm_jax.tar.gz; ' + _INSTALL)


_OVERRIDES = ['--config.sft.steps=20', '--config.task.name=two words', "--config.note=it's $HOME"]


def test_run_exact_line(capsys):
  (line,) = _dry(capsys, 'run', *T, '--config=configs/main.py', '--workdir=gs://bkt/run 1',
                 '--env=XLA_FLAGS=--xla_a --xla_b', '--', *_OVERRIDES)
  assert line == (
      "gcloud compute tpus tpu-vm ssh rlm-v5p --zone=us-east5-a --project=my-proj --worker=all "
      "'--command=set -eu; mkdir -p rlm_logs; cd rlm_jax; env RLM_COORDINATOR=auto "
      "'\"'\"'XLA_FLAGS=--xla_a --xla_b'\"'\"' setsid nohup $HOME/rlm_venv/bin/python -m "
      "rlm_jax.main --config=configs/main.py '\"'\"'--workdir=gs://bkt/run 1'\"'\"' "
      "--config.sft.steps=20 '\"'\"'--config.task.name=two words'\"'\"' "
      "'\"'\"'--config.note=it'\"'\"'\"'\"'\"'\"'\"'\"'s $HOME'\"'\"' "
      "> $HOME/rlm_logs/rlm-v5p.log 2>&1 < /dev/null & echo $! > $HOME/rlm_logs/rlm-v5p.pid; "
      "echo \"started pid $(cat $HOME/rlm_logs/rlm-v5p.pid) on $(hostname), log "
      "~/rlm_logs/rlm-v5p.log\"'")


def _bash(script: str, home) -> str:
  return subprocess.run(['bash', '-c', script], cwd=home, env={'HOME': str(home),
                                                              'PATH': os.environ['PATH']},
                        capture_output=True, text=True, check=True, timeout=20).stdout


def test_remote_run_and_stop_scripts_execute(capsys, tmp_path):
  """Runs the printed remote scripts with bash as a worker would (python faked)."""
  (tmp_path / 'rlm_jax').mkdir()
  fake = tmp_path / 'rlm_venv' / 'bin' / 'python'
  fake.parent.mkdir(parents=True)
  fake.write_text('#!/bin/bash\nprintf "%s\\n" "$PWD" "$RLM_COORDINATOR" "$XLA_FLAGS" "$@" '
                  '> "$HOME/argv.txt"\nexec sleep 30\n')
  fake.chmod(0o755)
  (line,) = _dry(capsys, 'run', *T, '--config=configs/main.py', '--workdir=gs://bkt/run 1',
                 '--env=XLA_FLAGS=--xla_a --xla_b', '--', *_OVERRIDES)
  out = _bash(_remote(line), tmp_path)
  assert re.fullmatch(r'started pid \d+ on \S+, log ~/rlm_logs/rlm-v5p.log\n', out)
  argv_file = tmp_path / 'argv.txt'
  for _ in range(100):
    if argv_file.exists() and argv_file.read_text().count('\n') == 10:
      break
    time.sleep(0.05)
  assert argv_file.read_text().splitlines() == [
      str(tmp_path / 'rlm_jax'), 'auto', '--xla_a --xla_b', '-m', 'rlm_jax.main',
      '--config=configs/main.py', '--workdir=gs://bkt/run 1', *_OVERRIDES]
  pid = int((tmp_path / 'rlm_logs' / 'rlm-v5p.pid').read_text())
  assert _alive(pid)  # still running, detached from the launching shell

  (line,) = _dry(capsys, 'stop', *T)
  assert _bash(_remote(line), tmp_path).startswith(f'sent SIGTERM to {pid} on ')
  for _ in range(100):
    if not _alive(pid):
      break
    time.sleep(0.05)
  assert not _alive(pid)
  (line,) = _dry(capsys, 'stop', *T)
  os.remove(tmp_path / 'rlm_logs' / 'rlm-v5p.pid')
  assert _bash(_remote(line), tmp_path).startswith('no run on ')


def _alive(pid: int) -> bool:
  """Running (a reparented zombie counts as gone)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


@pytest.mark.parametrize('argv,message', [
    (['run', '--name=Big', '--zone=z', '--config=c', '--workdir=w'],
     "error: --name='Big': lowercase letters, digits and -, starting with a letter"),
    (['setup', '--name=a', '--zone=z', '--remote-dir=../x'],
     "error: --remote-dir='../x': a plain path under $HOME (letters, digits, _ . / -)"),
    (['run', '--name=a', '--zone=z', '--config=c', '--workdir=w', '--env=1X=2'],
     "error: --env='1X=2': must be KEY=VALUE"),
    (['logs', '--name=a', '--zone=z', '--worker=first'],
     "error: --worker='first': a host index or 'all'"),
])
def test_bad_arguments_one_line(capsys, argv, message):
  assert tpu.main(argv) == 2
  assert capsys.readouterr().err.strip() == message


def test_overrides_only_for_run(capsys):
  with pytest.raises(SystemExit):
    tpu.main(['delete', '--name=a', '--zone=z', '--', '--config.x=1'])
  assert 'arguments after -- are only for run (got --config.x=1)' in capsys.readouterr().err


def test_jax_pin_matches_setup_py():
  text = open(os.path.join(_REPO, 'setup.py')).read()
  assert f"'jax=={tpu.JAX_VERSION}'" in text


def test_slurm_template_sets_the_distributed_variables_per_task(tmp_path):
  """Runs the sbatch script with fake scontrol/srun (2 tasks) and a fake python."""
  path = os.path.join(_REPO, 'experiments', 'slurm', 'train.sbatch')
  subprocess.run(['bash', '-n', path], check=True)
  bin_ = tmp_path / 'bin'
  bin_.mkdir()
  scripts = {
      'scontrol': 'echo gpu-node-07; echo gpu-node-08',
      # Drop srun's own flags, then run the task command as tasks 0 and 1.
      'srun': 'while [[ $1 == --* ]]; do shift; done\n'
              'for i in 0 1; do SLURM_PROCID=$i "$@" || exit; done',
      'python': 'printf "%s|" "$PWD" "$RLM_COORDINATOR" "$RLM_NUM_PROCESSES" "$RLM_PROCESS_ID" '
                '"$@"; echo',
  }
  for name, body in scripts.items():
    (bin_ / name).write_text(f'#!/bin/bash\n{body}\n')
    (bin_ / name).chmod(0o755)
  env = {'PATH': f'{bin_}:{os.environ["PATH"]}', 'HOME': str(tmp_path),
         'SLURM_JOB_NODELIST': 'gpu-node-[07-08]', 'SLURM_NTASKS': '2', 'SLURM_JOB_ID': '4242',
         'SLURM_SUBMIT_DIR': str(tmp_path), 'RLM_PYTHON': str(bin_ / 'python')}
  out = subprocess.run(['bash', path, 'configs/main.py', '/shared/run 1', "--config.x=a 'b'"],
                       env=env, capture_output=True, text=True, check=True, timeout=20).stdout
  assert out.splitlines() == [
      'rlm: 2 processes, coordinator gpu-node-07:16242, workdir /shared/run 1',
      f"{tmp_path}|gpu-node-07:16242|2|0|-m|rlm_jax.main|--config=configs/main.py|"
      f"--workdir=/shared/run 1|--config.x=a 'b'|",
      f"{tmp_path}|gpu-node-07:16242|2|1|-m|rlm_jax.main|--config=configs/main.py|"
      f"--workdir=/shared/run 1|--config.x=a 'b'|",
  ]


# ------------------------------------------------------------------------------------------
# experiments/make_figures.py


def _load_make_figures():
  path = os.path.join(_REPO, 'experiments', 'make_figures.py')
  spec = importlib.util.spec_from_file_location('make_figures', path)
  module = importlib.util.module_from_spec(spec)
  saved = list(sys.path)
  try:
    spec.loader.exec_module(module)
  finally:
    sys.path[:] = saved  # the script puts the checkout first on sys.path
  return module


def test_make_figures_reuses_the_analysis_and_prints_the_tables(tmp_path, monkeypatch, capsys):
  """With `<workdir>/analysis/` complete it does not search again: it runs every notebook
  (stubbed: each writes a PNG), copies the PNGs to --out and prints the README's tables."""
  from rlm_jax import analysis
  from rlm_jax import metrics as metrics_lib

  make_figures = _load_make_figures()
  workdir = tmp_path / 'run'
  with metrics_lib.MetricWriter(workdir, enabled=True, tensorboard=False) as w:
    w.write(0, {'sft/loss': 1.0})
  (workdir / 'results.json').write_text(
      '{"sft": {"greedy/accuracy": 0.5, "greedy/accuracy_level1": 0.75}, "rl": {"greedy/accuracy": 0.625}}')
  rows = [{'phase': 'grpo', 'strategy': 'greedy', 'budget': 1, 'guide': 'policy', 'accuracy': 0.5,
           'policy_tokens': 20.0, 'num_problems': 100},
          {'phase': 'grpo', 'strategy': 'mcts', 'budget': 8, 'guide': 'verifier', 'accuracy': 0.9,
           'policy_tokens': 300.0, 'num_problems': 100}]
  analysis.write_analysis(workdir, rows, [], [{'strategy': 'greedy', 'budget': 1, 'level': 1, 'problem': 'p',
                                              'expected': '1', 'output': 'Answer: 1', 'score': 2}])
  ran = []

  def fake_notebook(path, wd, save_to):
    ran.append(os.path.basename(path))
    with open(os.path.join(analysis.figures_dir(wd), ran[-1].replace('.ipynb', '.png')), 'wb') as f:
      f.write(b'\x89PNG')

  monkeypatch.setattr(analysis, 'run_notebook', fake_notebook)
  monkeypatch.setattr(analysis, 'collect', lambda *a, **k: pytest.fail('searched again'))
  out_dir = tmp_path / 'figures_out'
  assert make_figures.main([f'--workdir={workdir}', f'--out={out_dir}']) == 0
  out = capsys.readouterr().out
  notebooks = ['01_training_curves.ipynb', '02_mcts_tree.ipynb', '03_test_time_scaling.ipynb',
               '04_verifier_errors.ipynb']
  assert ran == notebooks
  assert sorted(os.listdir(out_dir)) == [n.replace('.ipynb', '.png') for n in notebooks]
  assert ('| phase | strategy | all | 1 |\n|---|---|---|---|\n| sft | greedy | 0.500 | 0.750 |\n'
          '| rl | greedy | 0.625 | nan |') in out
  # tokens_x: mcts spends 300 / 20 = 15 times greedy's tokens; se = sqrt(.9 * .1 / 100) = .03.
  assert '| grpo | mcts (verifier) | 8 | 0.900 | 0.030 | 300.000 | 15.000 |' in out


def test_seeds_table_has_per_seed_rows_then_mean_and_range():
  import importlib.util
  spec = importlib.util.spec_from_file_location('seeds', os.path.join(_REPO, 'experiments', 'seeds.py'))
  seeds = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(seeds)
  results = {0: {'sft': {'greedy/accuracy': 0.5}, 'rl': {'greedy/accuracy': 0.6}},
             1: {'sft': {'greedy/accuracy': 0.7}, 'rl': {'greedy/accuracy': 0.9}}}
  lines = seeds.table(results, ['greedy/accuracy']).splitlines()
  assert lines[2:] == ['| 0 | sft | 0.500 |', '| 0 | rl | 0.600 |', '| 1 | sft | 0.700 |', '| 1 | rl | 0.900 |',
                       '| mean [range] | sft | 0.600 [0.500-0.700] |', '| mean [range] | rl | 0.750 [0.600-0.900] |']


def test_prm_ranking_of_policy_samples_by_hand():
  """Two problems x 3 samples. Problem 0: samples right/wrong/right, final-token P .2/.9/.4 —
  best-of-3 picks the wrong one, within-problem pairs (right, wrong): (.2 < .9), (.4 < .9) -> 0;
  problem 1: wrong/right/wrong, P .1/.8/.8 — picks the right one, pairs (.8 > .1), (.8 = .8)
  -> 1 + 1/2. AUROC (0 + 0 + 1 + .5) / 4 = .375. The min-over-steps score ranks every right
  sample first: AUROC 1, best-of-3 1. No sample right: pass@3 counts only problems with one."""
  spec = importlib.util.spec_from_file_location('prm_quality', os.path.join(_REPO, 'experiments', 'prm_quality.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  right = [[1, 0, 1], [0, 1, 0]]
  got = mod.ranking_metrics(right, [[.2, .9, .4], [.1, .8, .8]], [[.9, .1, .8], [.0, .7, .3]])
  assert got['sample_accuracy'] == 0.5 and got['pass_at_n'] == 1.0 and got['samples'] == 3
  assert got['best_of_n_last'] == 0.5 and got['best_of_n_min'] == 1.0
  assert got['auroc_within_last'] == 0.375 and got['auroc_within_min'] == 1.0
  assert mod.ranking_metrics([[0, 0], [1, 0]], [[0, 1], [1, 0]], [[0, 1], [1, 0]])['pass_at_n'] == 0.5


def test_prm_step_metrics_on_checked_samples_by_hand():
  """Steps (problem, step, P, label) of 4 sampled traces, the 4th closing no step. Trace A
  (problem 0) right, wrong, wrong at P .9/.2/.3; B (problem 0) wrong, wrong at .4/.1; C
  (problem 1) right, right at .35/.7. Pooled: positives .9, .35, .7 over negatives .2, .3, .4,
  .1 win 4 + 3 + 4 of 12 pairs; within problem 0 the one positive .9 beats all 4 (problem 1
  has no wrong step); first steps: .9 and .35 against .4 -> 1/2. First wrong step: B at step 1,
  A at step 2, out of 4 traces."""
  spec = importlib.util.spec_from_file_location('prm_quality', os.path.join(_REPO, 'experiments', 'prm_quality.py'))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  problem = np.array([0, 0, 0, 0, 0, 1, 1])
  step = np.array([0, 1, 2, 0, 1, 0, 1])
  p = np.array([.9, .2, .3, .4, .1, .35, .7])
  label = np.array([1, 0, 0, 0, 0, 1, 1])
  got = mod.step_metrics(problem, step, p, label, samples=4)
  assert abs(got['step_auroc'] - 11 / 12) < 1e-9 and got['step_auroc_within'] == 1.0 and got['step1_auroc'] == 0.5
  assert (got['first_wrong_step1'], got['first_wrong_step2'], got['first_wrong_later']) == (0.25, 0.25, 0.0)
