"""End-to-end reliability of `python -m rlm_jax.main`: config errors, kill -9 and SIGTERM
resume to the same result, a diverging run stops with a clear message."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS='', JAX_PLATFORMS='cpu')


def _cmd(workdir, *overrides):
  return [sys.executable, '-m', 'rlm_jax.main', '--config=configs/tiny.py', f'--workdir={workdir}', *overrides]


def _run(workdir, *overrides, timeout=300):
  return subprocess.run(_cmd(workdir, *overrides), cwd=REPO, env=ENV, capture_output=True, text=True,
                        timeout=timeout)


def _start(workdir, *overrides):
  return subprocess.Popen(_cmd(workdir, *overrides), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(proc, path, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path)):
      return
    if proc.poll() is not None:
      raise AssertionError(f'run ended before {path} appeared: {proc.stderr.read()[-2000:]}')
    time.sleep(0.05)
  raise AssertionError(f'no checkpoint in {path} after {timeout}s')


def _final(workdir):
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return results, rows


@pytest.mark.parametrize('override, culprit', [
    ('--config.sft.stepz=3', 'stepz'),
    ('--config.rl.grpo.loss_type=foo', 'loss_type'),
    ('--config.mesh.shape=(3,1,1)', 'shape'),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, override, culprit):
  res = _run(tmp_path / 'w', override, timeout=120)
  assert res.returncode != 0
  lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and culprit in lines[0], res.stderr[-2000:]


def test_kill9_and_sigterm_resume_to_the_uninterrupted_result(tmp_path):
  ref = _run(tmp_path / 'ref')
  assert ref.returncode == 0, ref.stderr[-3000:]
  assert '| SFT |' in ref.stdout and '| GRPO |' in ref.stdout

  work = tmp_path / 'interrupted'
  proc = _start(work)
  _wait_for_checkpoint(proc, work / 'ckpt' / 'sft')
  proc.kill()  # SIGKILL mid-SFT
  proc.wait()
  proc = _start(work)
  _wait_for_checkpoint(proc, work / 'ckpt' / 'grpo')
  proc.send_signal(signal.SIGTERM)  # clean stop mid-GRPO
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-3000:]
  assert 'preempted' in out
  res = _run(work)
  assert res.returncode == 0, res.stderr[-3000:]

  ref_results, ref_rows = _final(tmp_path / 'ref')
  results, rows = _final(work)
  assert results == ref_results  # CPU runs are bit-for-bit deterministic
  last = lambda rs, key: [r[key] for r in rs if key in r][-1]
  assert last(rows, 'grpo/loss') == last(ref_rows, 'grpo/loss')
  steps = [r['step'] for r in rows if 'grpo/loss' in r]
  assert steps == sorted(set(steps))  # no duplicated rows after the resumes


def test_diverging_run_stops_naming_the_step_and_keeps_checkpoints(tmp_path):
  res = _run(tmp_path / 'w', '--config.sft.optim.learning_rate=1e30', '--config.sft.optim.grad_clip=0.0',
             '--config.sft.steps=6')
  assert res.returncode == 3, res.stderr[-3000:]
  msg = [l for l in res.stderr.splitlines() if l.startswith('error:')]
  assert msg and 'non-finite' in msg[0] and 'step' in msg[0], res.stderr[-2000:]
  ckpt = tmp_path / 'w' / 'ckpt' / 'sft'
  assert any(d.isdigit() for d in os.listdir(ckpt))
