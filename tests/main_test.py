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
# One CPU device; unoptimised XLA compiles as in conftest.py (compiling is what tiny runs spend time on).
ENV = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS='--xla_backend_optimization_level=0', JAX_PLATFORMS='cpu')


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


# ----------------------------------------------------------------------------------------
# Workdirs that are URLs, config.lora, config.distributed.


def _tiny_config(**sections):
  from rlm_jax import configlib
  c = configlib.load_config(os.path.join(REPO, 'configs', 'tiny.py'))
  c.unlock()
  for name, value in sections.items():  # keys merged into the config's own section
    c[name].update(value)
  return c


def test_prepare_workdir_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  from etils.epath import testing as epath_testing
  from rlm_jax import configlib
  from rlm_jax.checkpoint import prepare_workdir

  monkeypatch.chdir(tmp_path)
  assert prepare_workdir('runs/a') == str(tmp_path / 'runs' / 'a') and (tmp_path / 'runs' / 'a').is_dir()
  local = lambda p: str(tmp_path / os.fspath(p)[len('gs://'):]) if os.fspath(p).startswith('gs://') else p
  one = lambda fn, p, *a, **k: fn(local(p), *a, **k)
  with epath_testing.mock_epath(makedirs=one, mkdir=one, exists=one, isdir=one):
    assert prepare_workdir('gs://bucket/run1') == 'gs://bucket/run1'
  assert (tmp_path / 'bucket' / 'run1').is_dir() and not (tmp_path / 'gs:').exists()
  with pytest.raises(configlib.ConfigError) as e:
    prepare_workdir('hdfs://cluster/run')
  assert str(e.value).startswith("--workdir='hdfs://cluster/run': URL scheme 'hdfs' is not supported")


def test_lora_and_distributed_sections_are_checked_at_start_up(tmp_path):
  from rlm_jax import configlib
  from rlm_jax.experiment import config as config_lib
  from rlm_jax.experiment import runner

  build = lambda **s: config_lib.parse(_tiny_config(**s))
  cfg = build()
  assert cfg.lora.lora_config() is None and not cfg.distributed.is_multi_process  # defaults
  cfg = build(lora=dict(rank=4, alpha=8.0), distributed=dict(coordinator_address='auto'))
  assert cfg.lora.lora_config().scale == 2.0 and cfg.distributed.is_multi_process
  for sections, message in [
      (dict(lora=dict(rank=2, targetz=('wq',))), 'config.lora.targetz: unknown key (allowed: alpha, '
                                                 'dtype, rank, targets)'),
      (dict(lora=dict(rank=-1)), 'config.lora: lora.rank=-1: must be an integer >= 0 (0 = off)'),
      (dict(distributed=dict(num_processes=2)),
       "config.distributed: distributed.num_processes=2 needs distributed.coordinator_address "
       "('host:port' or 'auto')"),
  ]:
    with pytest.raises(configlib.ConfigError) as e:
      build(**sections)
    assert str(e.value) == message
  c = _tiny_config(lora=dict(rank=2))
  c.rl.algo = 'ppo'
  with pytest.raises(configlib.ConfigError, match=r"^lora.rank=2: rl.algo='ppo' does not support it "
                     r"\(algorithms that do: grpo, rloo, process_grpo, em\)$"):
    config_lib.parse(c)
  c = _tiny_config(lora=dict(rank=2, targets=('attn.wz',)))
  with pytest.raises(ValueError, match=r"lora.targets: pattern 'attn.wz' matches no weight"):
    runner.Experiment(config_lib.parse(c), str(tmp_path))


def test_environment_overrides_config_distributed(tmp_path):
  """config.distributed is single-process; RLM_NUM_PROCESSES=2 from the launcher wins and,
  without a coordinator, fails as one line before any work."""
  config = tmp_path / 'cfg.py'
  config.write_text('import importlib.util\n'
                    f'spec = importlib.util.spec_from_file_location("tiny", {os.path.join(REPO, "configs", "tiny.py")!r})\n'
                    'tiny = importlib.util.module_from_spec(spec)\n'
                    'spec.loader.exec_module(tiny)\n'
                    'def get_config():\n'
                    '  c = tiny.get_config()\n'
                    '  c.distributed.update(coordinator_address="", num_processes=1, process_id=0)\n'
                    '  return c\n')
  res = subprocess.run([sys.executable, '-m', 'rlm_jax.main', f'--config={config}',
                        f'--workdir={tmp_path / "w"}'], cwd=REPO, capture_output=True, text=True,
                       env=dict(ENV, RLM_NUM_PROCESSES='2'), timeout=120)
  lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
  assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
  assert lines[0] == ('error: after environment overrides (num_processes=2): distributed.num_processes=2 '
                      "needs distributed.coordinator_address ('host:port' or 'auto')")
  assert not (tmp_path / 'w').exists()  # nothing written before the job is joined


@pytest.mark.slow  # end to end: SFT + eval compiles on 8 fake devices (29 s on the shared 2 cores)
def test_lora_pipeline_trains_only_the_adapters(tmp_path):
  """A tiny SFT run (2 steps, 2 microbatches) with lora.rank=2: the base weights in the final
  checkpoint equal the initial ones bit for bit, every adapter moved; eval runs merged."""
  import jax
  import numpy as np
  from flax import nnx
  from rlm_jax import checkpoint, configlib
  from rlm_jax.experiment import config as config_lib
  from rlm_jax.experiment import runner
  from rlm_jax.training.state import create_train_state

  c = _tiny_config(lora=dict(rank=2, alpha=4.0, targets=('attn.wq', 'mlp.w_up')))
  c.sft.update(steps=2, microbatches=2)
  c.sft.optim.update(warmup_steps=0, decay_steps=0)
  c.rl.algo = 'none'
  c.eval.update(strategies=('greedy',), size=4, batch_size=4)
  cfg = config_lib.parse(c)
  exp = runner.Experiment(cfg, str(tmp_path))
  results = exp.run()
  assert set(results) == {'sft'} and 'greedy/accuracy' in results['sft']
  graphdef, init = exp.models.init_policy()
  abstract = create_train_state(init, exp.models.optimizer(cfg.sft.optim, init), exp.mesh, exp.rules)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract)
  with checkpoint.Checkpointer(tmp_path / 'ckpt' / 'sft', save_every=1, keep=1) as ck:
    final, extra = ck.restore(abstract)
  assert extra == {'step': 1}
  flat = lambda p: {'.'.join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(p)}
  before, after = flat(init), flat(final.params)
  moved = sorted(k for k in before if not np.array_equal(before[k], after[k]))
  assert moved == [f'adapters.layers.0.{w}.lora_{ab}' for w in ('attn.wq', 'mlp.w_up') for ab in 'ab']
  assert sum(k.startswith('base.') for k in before) > 5


@pytest.mark.parametrize('overrides, message', [
    (('--config.sft.batch_size=100',),
     'error: sft.batch_size=100: more than task.train_size=64 problems (each batch draws distinct problems)'),
    (('--config.rl.prompts_per_iteration=500',),
     'error: rl.prompts_per_iteration=500: more than the {n} problems of the phase-2 pool (task.rl_size=120)'),
    (('--config.model.d_model=48',),
     'error: config.model.d_model=48: the checkpoints in {w}/ckpt were written with 32; use another --workdir '
     '(or the same config to resume)'),
])
def test_bad_inputs_are_one_line_at_start_up_and_write_nothing(tmp_path, overrides, message):
  """Through the CLI: one line naming the key, exit status 2, before any step; a run folder
  with checkpoints of another model keeps its config.json."""
  work = tmp_path / 'run'
  if 'd_model' in overrides[0]:  # a run folder of configs/tiny.py with a checkpoint in it
    from rlm_jax import checkpoint, configlib
    os.makedirs(work / 'ckpt' / 'sft' / '0')
    checkpoint.write_config(str(work), configlib.load_config(os.path.join(REPO, 'configs', 'tiny.py')))
  before = (work / 'config.json').read_text() if (work / 'config.json').exists() else None
  res = _run(work, *overrides, timeout=600)
  lines = [l for l in res.stderr.strip().splitlines() if l.strip() and not l.startswith('task.')]
  assert res.returncode == 2, res.stderr[-2000:]
  if '{n}' in message:  # the pool size depends on the generator's duplicates
    assert lines[-1].startswith(message.split('{n}')[0]) and lines[-1].endswith(message.split('{n}')[1])
  else:
    assert lines[-1] == message.format(w=work)
  assert not (work / 'metrics.jsonl').exists()
  if before is not None:
    assert (work / 'config.json').read_text() == before
  else:
    assert not (work / 'config.json').exists()
