"""Tests for rlm_jax.checkpoint: cadence, retention, sharded restore, atomicity, preemption."""
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlm_jax.checkpoint import COMMIT_FILE
from rlm_jax.checkpoint import CheckpointNotFoundError
from rlm_jax.checkpoint import Checkpointer
from rlm_jax.checkpoint import install_preemption_handler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(step):
  return {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4) + step,
          "opt": {"count": jnp.asarray(step, jnp.int32),
                  "mu": jnp.full((5,), step * 0.5, jnp.bfloat16)}}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_every_n_and_keep_last_k(tmp_path):
  ckpt = Checkpointer(tmp_path / "ckpt", save_every=3, keep=2)
  assert ckpt.latest_step() is None
  saved = [ckpt.save(s, _state(s), {"step": s}) for s in range(11)]
  assert saved == [s % 3 == 0 for s in range(11)]
  assert ckpt.all_steps() == [6, 9]
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["6", "9"]
  # End of training: forced save of a step that is not a multiple of 3; old ones rotate out.
  assert ckpt.save(10, _state(10), {"step": 10, "note": "final"}, force=True)
  assert not ckpt.save(10, _state(10), force=True)  # same step twice: no-op
  assert ckpt.all_steps() == [9, 10]
  state, extra = ckpt.restore(_abstract(_state(0)))
  _assert_tree_equal(state, _state(10))
  assert extra == {"step": 10, "note": "final"}
  state, extra = ckpt.restore(_abstract(_state(0)), step=9)
  _assert_tree_equal(state, _state(9))
  assert extra == {"step": 9}
  ckpt.close()
  # A new process resumes from what is on disk.
  again = Checkpointer(tmp_path / "ckpt", save_every=3, keep=2)
  assert again.latest_step() == 10
  again.close()


def test_restore_uses_target_shardings(tmp_path):
  mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  w = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("a", "b")))
  with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
    ckpt.save(0, {"w": w})
    # Restore onto a different layout than the one saved.
    target = {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32,
                                        sharding=NamedSharding(mesh, P(None, ("a", "b"))))}
    state, extra = ckpt.restore(target)
  assert extra == {}
  assert state["w"].sharding == target["w"].sharding
  assert state["w"].addressable_shards[0].data.shape == (8, 1)
  np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(64.0).reshape(8, 8))


class _Toy(nnx.Module):

  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (8, 4)), logical_axes=("embed", "mlp"))
    self.b = nnx.Param(jnp.zeros((4,)), logical_axes=("mlp",))


def test_nnx_state_roundtrip_into_abstract_sharded_state(tmp_path):
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  state = nnx.state(_Toy(nnx.Rngs(0)))
  abstract = nnx.state(nnx.eval_shape(lambda: _Toy(nnx.Rngs(1))))
  sharding = NamedSharding(mesh, P("fsdp"))
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=sharding if x.ndim == 2 else
                                     NamedSharding(mesh, P())), abstract)
  with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
    ckpt.save(3, state, {"step": 3})
    restored, extra = ckpt.restore(abstract)
  assert extra == {"step": 3}
  assert isinstance(restored, nnx.State)
  assert restored["w"].get_value().sharding == sharding
  np.testing.assert_array_equal(np.asarray(restored["w"].get_value()),
                                np.asarray(state["w"].get_value()))
  assert restored["w"].get_metadata()["logical_axes"] == ("embed", "mlp")


def test_async_save(tmp_path):
  ckpt = Checkpointer(tmp_path, save_every=2, keep=3, async_save=True)
  for s in range(5):
    ckpt.save(s, _state(s))
  ckpt.wait()
  assert ckpt.all_steps() == [0, 2, 4]
  _assert_tree_equal(ckpt.restore(_abstract(_state(0)))[0], _state(4))
  ckpt.close()


def test_missing_checkpoint_errors_name_the_directory(tmp_path):
  ckpt = Checkpointer(tmp_path / "empty", save_every=1, keep=1)
  with pytest.raises(CheckpointNotFoundError) as e:
    ckpt.restore(_abstract(_state(0)))
  assert str(e.value) == f"no complete checkpoint in {tmp_path / 'empty'}"
  ckpt.save(1, _state(1))
  with pytest.raises(CheckpointNotFoundError) as e:
    ckpt.restore(_abstract(_state(0)), step=4)
  assert str(e.value) == (f"no complete checkpoint for step 4 in {tmp_path / 'empty'} "
                          "(available: [1])")
  ckpt.close()
  with pytest.raises(CheckpointNotFoundError, match="does not exist"):
    Checkpointer(tmp_path / "nope", save_every=1, keep=1, create=False)
  with pytest.raises(ValueError, match="keep=0"):
    Checkpointer(tmp_path, save_every=1, keep=0)


def test_half_written_directories_are_ignored(tmp_path):
  d = tmp_path / "ckpt"
  with Checkpointer(d, save_every=1, keep=5) as ckpt:
    ckpt.save(5, _state(5), {"step": 5})
  # What a killed save leaves behind: a tmp dir with partial contents ...
  shutil.copytree(d / "5", d / "7.orbax-checkpoint-tmp-1700000000000000")
  os.remove(d / "7.orbax-checkpoint-tmp-1700000000000000" / COMMIT_FILE)
  # ... and a half-copied step dir (interrupted cp/rsync): named like a step, no commit file.
  shutil.copytree(d / "5", d / "8")
  os.remove(d / "8" / COMMIT_FILE)
  shutil.rmtree(d / "8" / "state")
  ckpt = Checkpointer(d, save_every=1, keep=5)
  assert ckpt.latest_step() == 5
  assert ckpt.all_steps() == [5]
  state, extra = ckpt.restore(_abstract(_state(0)))
  _assert_tree_equal(state, _state(5))
  assert extra == {"step": 5}
  with pytest.raises(CheckpointNotFoundError, match="step 8"):
    ckpt.restore(_abstract(_state(0)), step=8)
  assert not os.path.exists(d / "7.orbax-checkpoint-tmp-1700000000000000")  # cleaned up
  ckpt.close()


_CHILD = """
import sys, time
import jax, jax.numpy as jnp
import orbax.checkpoint as ocp
from rlm_jax.checkpoint import Checkpointer

directory, mode = sys.argv[1], sys.argv[2]
ckpt = Checkpointer(directory, save_every=1, keep=3)
ckpt.save(1, {{'w': jnp.full((4,), 1.0)}}, {{'step': 1}})
if mode == 'block_finalize':
  # Everything is written; stop right before the commit (rename) and wait to be killed.
  async def _blocked(self):
    print('FINALIZING', flush=True)
    time.sleep(600)
  ocp._src.path.atomicity.AtomicRenameTemporaryPath.finalize = _blocked
big = {{'w': jax.random.normal(jax.random.key(0), ({n},))}}
jax.block_until_ready(big)
print('SAVING', flush=True)
ckpt.save(2, big, {{'step': 2}})
print('SAVED', flush=True)
time.sleep(600)
"""


def _spawn(tmp_path, mode, n):
  script = tmp_path / "child.py"
  script.write_text(_CHILD.format(n=n))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO] + sys.path))
  return subprocess.Popen([sys.executable, str(script), str(tmp_path / "ckpt"), mode],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env=env)


def _tmp_dirs(d):
  return [n for n in os.listdir(d) if ".orbax-checkpoint-tmp" in n]


def _check_after_kill(d, expect_latest):
  ckpt = Checkpointer(d, save_every=1, keep=3)
  assert ckpt.latest_step() == expect_latest
  target = {"w": jax.ShapeDtypeStruct((4,), jnp.float32,
                                      sharding=jax.sharding.SingleDeviceSharding(
                                          jax.devices()[0]))}
  state, extra = ckpt.restore(target, step=1)
  np.testing.assert_array_equal(np.asarray(state["w"]), np.ones(4))
  assert extra == {"step": 1}
  # Training resumes and the step that was lost can be written again.
  assert ckpt.save(2, {"w": jnp.full((4,), 2.0)}, {"step": 2})
  state, extra = ckpt.restore(target)
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full(4, 2.0))
  assert extra == {"step": 2} and ckpt.all_steps() == [1, 2]
  ckpt.close()


def test_sigkill_before_commit_leaves_previous_checkpoint(tmp_path):
  proc = _spawn(tmp_path, "block_finalize", n=1 << 16)
  try:
    lines = []
    for line in proc.stdout:
      lines.append(line.strip())
      if line.strip() == "FINALIZING":
        break
    assert lines[-2:] == ["SAVING", "FINALIZING"]
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  d = tmp_path / "ckpt"
  # The killed save's arrays are on disk; only the commit (rename) is missing.
  tmp = _tmp_dirs(d)
  assert len(tmp) == 1 and tmp[0].startswith("2.")
  (state_dir,) = [n for n in os.listdir(d / tmp[0]) if n.startswith("state")]
  assert "_METADATA" in os.listdir(d / tmp[0] / state_dir)
  _check_after_kill(d, expect_latest=1)


def test_sigkill_during_real_save(tmp_path):
  # 64 MiB of random floats take ~0.5 s to write here; kill as soon as the tmp dir appears.
  proc = _spawn(tmp_path, "plain", n=1 << 24)
  d = tmp_path / "ckpt"
  try:
    assert proc.stdout.readline().strip() == "SAVING"
    deadline = time.monotonic() + 60
    while not _tmp_dirs(d) and not os.path.isdir(d / "2"):
      assert time.monotonic() < deadline
      time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  if os.path.isdir(d / "2"):
    pytest.skip("the save finished before the kill landed; nothing half-written to check")
  assert [n.split(".")[0] for n in _tmp_dirs(d)] == ["2"]
  _check_after_kill(d, expect_latest=1)


def test_preemption_handler_sigterm_saves_and_stops(tmp_path):
  previous = signal.getsignal(signal.SIGTERM)
  stop = install_preemption_handler()
  try:
    assert stop() is False
    ckpt = Checkpointer(tmp_path, save_every=50, keep=2)
    last = None
    for step in range(1000):
      if step == 7:
        os.kill(os.getpid(), signal.SIGTERM)  # what the scheduler sends
        time.sleep(0.01)  # the handler runs in the main thread between bytecodes
      stopping = stop()
      ckpt.save(step, _state(step), {"step": step}, force=stopping or step == 999)
      last = step
      if stopping:
        break
    ckpt.close()
    assert last == 7
    ckpt = Checkpointer(tmp_path, save_every=50, keep=2)
    assert ckpt.all_steps() == [0, 7]
    state, extra = ckpt.restore(_abstract(_state(0)))
    _assert_tree_equal(state, _state(7))
    assert extra == {"step": 7}
    ckpt.close()
  finally:
    stop.uninstall()
  assert signal.getsignal(signal.SIGTERM) == previous


def test_resolve_path_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  from rlm_jax.checkpoint import resolve_path
  monkeypatch.chdir(tmp_path)
  assert str(resolve_path("runs/a")) == str(tmp_path / "runs" / "a")
  assert str(resolve_path(tmp_path / "b")) == str(tmp_path / "b")
  for url in ("gs://bucket/run/ckpt", "s3://bucket/x"):
    assert str(resolve_path(url)) == url  # os.path.abspath would give <cwd>/gs:/bucket/...
  assert str(resolve_path("gs://bucket/run/") / "ckpt" / "3") == "gs://bucket/run/ckpt/3"
  with pytest.raises(ValueError) as e:
    resolve_path("hdfs://cluster/run")
  assert str(e.value) == ("'hdfs://cluster/run': URL scheme 'hdfs' is not supported by "
                          "etils.epath (use a local path or gs://, s3://, az://)")
  # A relative directory given to the Checkpointer lands under the current directory.
  ckpt = Checkpointer("rel/ckpt", save_every=1, keep=1)
  ckpt.save(0, _state(0))
  ckpt.close()
  assert str(ckpt.directory) == str(tmp_path / "rel" / "ckpt")
  assert (tmp_path / "rel" / "ckpt" / "0" / COMMIT_FILE).exists()
