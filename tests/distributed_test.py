"""Tests for rlm_jax.distributed: two local processes joined by jax.distributed.

Each worker process (this file run as a script) gets 2 fake CPU devices; together they
form a 4-device mesh with CPU collectives (gloo) between the processes. Each process loads
only its half of a global batch, runs SFT steps with `sft_step_jit`, and saves/restores an
orbax checkpoint. The pytest process runs the same steps on 4 of its 8 devices with the
whole batch and compares.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ('data', 'fsdp', 'tensor'). The batch is split over data x fsdp, so every mesh is data
# parallel across the two processes; 'fsdp' also splits the parameters across them.
_MESHES = {"fsdp": (1, 4, 1), "dp": (4, 1, 1), "dp_tp": (2, 1, 2)}
_STEPS = 3
_GLOBAL_BATCH = 8
_LEN = 8
_TIMEOUT_S = 300  # generous: the CI machine may be shared; an idle 2-core box needs ~20 s


# ----------------------------------------------------------------------------------------
# In-process: config, environment, slices (8 fake devices, one process).


def test_config_defaults_are_single_process():
  from rlm_jax import distributed
  cfg = distributed.DistributedConfig()
  assert not cfg.is_multi_process
  assert distributed.initialize(cfg, environ={}) is False


@pytest.mark.parametrize("kwargs,message", [
    (dict(coordinator_address="node0"), "distributed.coordinator_address='node0': must be '', "
                                        "'auto' or 'host:port'"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2),
     "distributed.process_id=2: must be in [0, num_processes=2)"),
    (dict(num_processes=2), "distributed.num_processes=2 needs distributed.coordinator_address "
                            "('host:port' or 'auto')"),
    (dict(num_processes=0), "distributed.num_processes=0: must be >= 1"),
    (dict(local_device_ids=(0, -1)), "distributed.local_device_ids=(0, -1): must be >= 0"),
])
def test_config_errors_are_one_line(kwargs, message):
  from rlm_jax import distributed
  with pytest.raises(distributed.DistributedError) as e:
    distributed.DistributedConfig(**kwargs)
  assert str(e.value) == message


def test_initialize_after_jax_was_used_names_the_job():
  import jax
  from rlm_jax import distributed
  jax.devices()  # the backend is up: too late to join a job
  cfg = distributed.DistributedConfig(coordinator_address="localhost:1", num_processes=2)
  with pytest.raises(distributed.DistributedError) as e:
    distributed.initialize(cfg, environ={})
  assert str(e.value).startswith("jax.distributed.initialize failed with coordinator "
                                 "localhost:1, process 0 of 2: jax.distributed.initialize() "
                                 "must be called before any JAX calls")
  # The environment turns a single-process config into a job, too.
  with pytest.raises(distributed.DistributedError, match="process 1 of 4"):
    distributed.initialize(distributed.DistributedConfig(),
                           environ={"RLM_COORDINATOR": "h:9", "RLM_NUM_PROCESSES": "4",
                                    "RLM_PROCESS_ID": "1"})


def test_environment_overrides_config():
  from rlm_jax import distributed
  base = distributed.DistributedConfig(coordinator_address="a:1", num_processes=4, process_id=3)
  env = {"RLM_COORDINATOR": "node7:1234", "RLM_NUM_PROCESSES": "16", "RLM_PROCESS_ID": "5",
         "RLM_LOCAL_DEVICE_IDS": "2,3"}
  got = distributed.resolve(base, env)
  assert got == distributed.DistributedConfig(coordinator_address="node7:1234",
                                              num_processes=16, process_id=5,
                                              local_device_ids=(2, 3))
  assert distributed.resolve(base, {"RLM_COORDINATOR": "auto"}).coordinator_address == "auto"
  assert distributed.resolve(base, {"RLM_PROCESS_ID": " "}) == base  # blank = unset
  with pytest.raises(distributed.DistributedError) as e:
    distributed.resolve(base, {"RLM_PROCESS_ID": "two"})
  assert str(e.value) == "RLM_PROCESS_ID='two': must be an integer"
  with pytest.raises(distributed.DistributedError) as e:
    distributed.resolve(base, {"RLM_PROCESS_ID": "4"})
  assert str(e.value) == ("after environment overrides (process_id=4): distributed.process_id=4: "
                          "must be in [0, num_processes=4)")


def test_process_slice():
  from rlm_jax import distributed
  assert [distributed.process_slice(12, p, 4) for p in range(4)] == [
      slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 12)]
  assert distributed.process_slice(5) == slice(0, 5)  # one process here: everything
  with pytest.raises(distributed.DistributedError) as e:
    distributed.process_slice(10, 0, 4)
  assert str(e.value).startswith("10 items cannot be split evenly over 4 processes")
  with pytest.raises(distributed.DistributedError, match=r"process_index=4 must be in \[0, "):
    distributed.process_slice(8, 4, 4)


def test_single_process_host_local_to_global_equals_shard_batch():
  from rlm_jax import distributed, sharding
  from rlm_jax.sharding import DEFAULT_RULES, MeshConfig
  mesh = sharding.make_mesh(MeshConfig(shape=(2, 2, 2)))
  batch = {"tokens": np.arange(24, dtype=np.int32).reshape(8, 3), "w": np.arange(8.0)}
  assert distributed.batch_slice(8, mesh, DEFAULT_RULES) == slice(0, 8)
  got = distributed.host_local_to_global(batch, mesh, DEFAULT_RULES)
  want = sharding.shard_batch(batch, mesh, DEFAULT_RULES)
  for k in batch:
    assert got[k].sharding == want[k].sharding
    assert got[k].sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(got[k]), batch[k])
  with pytest.raises(sharding.ShardingError) as e:
    distributed.host_local_to_global({"tokens": np.zeros((6, 2))}, mesh, DEFAULT_RULES)
  assert str(e.value).startswith("batch leaf 'tokens' with local shape (6, 2) on sharding")


# ----------------------------------------------------------------------------------------
# Two processes.


def _model_cfg():
  from rlm_jax.models.transformer import ModelConfig
  return ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                     head_dim=8, d_ff=32)


def _global_batch() -> dict:
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 32, size=(_GLOBAL_BATCH, _LEN)).astype(np.int32)
  loss_mask = np.zeros((_GLOBAL_BATCH, _LEN), bool)
  loss_mask[:, 3:] = True  # a 'prompt' of 4 tokens, then the completion
  return {"tokens": tokens, "mask": np.ones((_GLOBAL_BATCH, _LEN), bool),
          "loss_mask": loss_mask}


def _train(mesh_shape, devices, ckpt_dir: str | None, keep_params: bool = False) -> dict:
  """SFT steps on `devices` with this process's rows; returns losses (+ checkpoint check).

  With `keep_params` (single process only), out['params'] holds the trained params on host.
  """
  import jax
  from flax import nnx

  from rlm_jax import distributed, sharding
  from rlm_jax.checkpoint import Checkpointer
  from rlm_jax.models.transformer import Transformer
  from rlm_jax.sharding import DEFAULT_RULES, MeshConfig
  from rlm_jax.training.sft import sft_step_jit
  from rlm_jax.training.state import OptimConfig, create_train_state, make_optimizer

  mesh = sharding.make_mesh(MeshConfig(shape=mesh_shape), devices=devices)
  cfg = _model_cfg()
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  # Weights from numpy, placed shard by shard (`init_sharded` is tested in sharding_test;
  # its compile would double this test's CPU time in each of the three processes).
  rng = np.random.default_rng(0)

  def place(path, a, s):
    name = jax.tree_util.keystr(path, simple=True, separator=".")
    w = np.ones(a.shape, a.dtype) if ".scale" in name else (
        0.02 * rng.standard_normal(a.shape)).astype(a.dtype)
    return jax.make_array_from_callback(a.shape, s, lambda index: w[index])

  params = jax.tree_util.tree_map_with_path(
      place, abstract, sharding.state_shardings(abstract, mesh, DEFAULT_RULES))
  tx = make_optimizer(OptimConfig(learning_rate=3e-2))
  rows = distributed.batch_slice(_GLOBAL_BATCH, mesh, DEFAULT_RULES)
  local = {k: v[rows] for k, v in _global_batch().items()}
  out = {"rows": [rows.start, rows.stop],
         "process_slice": [distributed.process_slice(_GLOBAL_BATCH).start,
                           distributed.process_slice(_GLOBAL_BATCH).stop],
         "losses": [], "grad_norms": []}
  with sharding.use_mesh_rules(mesh, DEFAULT_RULES):
    state = create_train_state(params, tx, mesh, DEFAULT_RULES)
    batch = distributed.host_local_to_global(local, mesh, DEFAULT_RULES)
    out["global_batch_shape"] = list(batch["tokens"].shape)
    for _ in range(_STEPS):
      state, metrics = sft_step_jit(graphdef, tx, state, batch)
      # Replicated scalars: every process can read them.
      out["losses"].append(float(metrics["loss"]))
      out["grad_norms"].append(float(metrics["grad_norm"]))
  out["step_compiles"] = sft_step_jit._cache_size()  # pylint: disable=protected-access
  wq = state.params["layers"][0]["attn"]["wq"].get_value()
  out["wq_spec"] = str(wq.sharding.spec)
  out["wq_local_shards"] = len(wq.addressable_shards)
  if keep_params:
    out["params"] = jax.device_get(state.params)
  if ckpt_dir is not None:
    with Checkpointer(ckpt_dir, save_every=1, keep=2) as ckpt:
      ckpt.save(_STEPS, state.params, {"step": _STEPS, "losses": out["losses"]}, force=True)
      ckpt.wait()
      target = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state.params)
      restored, extra = ckpt.restore(target)
    diffs = [float(np.max(np.abs(np.asarray(a.data) - np.asarray(b.data))))
             for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(restored))
             for a, b in zip(x.addressable_shards, y.addressable_shards)]
    out["restore_max_diff"] = max(diffs)
    out["restore_extra"] = extra
  return out


def _worker(process_id: int, port: int, outdir: str, mesh_name: str) -> None:
  import jax
  # CPU collectives across processes; gloo is also jax 0.10's default, set for clarity.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  from rlm_jax import distributed
  cfg = distributed.DistributedConfig(coordinator_address=f"localhost:{port}",
                                      num_processes=2, process_id=process_id,
                                      initialization_timeout=60)
  assert distributed.initialize(cfg)
  assert distributed.initialize(cfg)  # idempotent
  result = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "devices": jax.device_count(), "local_devices": jax.local_device_count()}
  result.update(_train(_MESHES[mesh_name], jax.devices(), os.path.join(outdir, "ckpt")))
  with open(os.path.join(outdir, f"result{process_id}.json"), "w") as f:
    json.dump(result, f)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(outdir: str, mesh_name: str) -> list[subprocess.Popen]:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
             PYTHONPATH=_REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  for k in ("RLM_COORDINATOR", "RLM_NUM_PROCESSES", "RLM_PROCESS_ID", "RLM_LOCAL_DEVICE_IDS"):
    env.pop(k, None)
  port = _free_port()
  return [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(i), str(port), outdir,
                            mesh_name],
                           env=env, cwd=_REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True) for i in range(2)]


@pytest.mark.parametrize("mesh_name", [
    "fsdp",
    pytest.param("dp", marks=pytest.mark.slow),
    pytest.param("dp_tp", marks=pytest.mark.slow),
])
def test_two_processes_match_one_process(tmp_path, mesh_name):
  import jax
  from flax import nnx

  from rlm_jax import sharding
  from rlm_jax.checkpoint import Checkpointer
  from rlm_jax.models.transformer import Transformer
  from rlm_jax.sharding import DEFAULT_RULES, MeshConfig

  procs = _launch(str(tmp_path), mesh_name)
  t0 = time.time()
  # The single-process reference runs meanwhile: the same mesh on 4 of the 8 devices.
  shape = _MESHES[mesh_name]
  ref = _train(shape, jax.devices()[:4], None, keep_params=True)
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=max(10.0, _TIMEOUT_S - (time.time() - t0)))[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise AssertionError(f"two-process run did not finish in {_TIMEOUT_S} s") from None
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  results = [json.load(open(tmp_path / f"result{i}.json")) for i in range(2)]

  for i, got in enumerate(results):
    assert (got["process_index"], got["process_count"]) == (i, 2)
    assert (got["devices"], got["local_devices"]) == (4, 2)
    # Each process loaded half of the batch: rows [0, 4) or [4, 8), as process_slice says.
    assert got["rows"] == got["process_slice"] == [4 * i, 4 * i + 4]
    assert got["global_batch_shape"] == [_GLOBAL_BATCH, _LEN]
    assert got["step_compiles"] == 1  # the 3 steps ran one compiled program
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["grad_norms"], ref["grad_norms"], rtol=1e-5)
    # Orbax: both processes wrote their shards and read them back unchanged.
    assert got["restore_max_diff"] == 0.0
    assert got["restore_extra"] == {"step": _STEPS, "losses": got["losses"]}
  # Training moved: the loss of the same batch went down over the steps.
  assert ref["losses"][-1] < ref["losses"][0] - 0.05
  # The single process loaded the whole batch.
  assert ref["rows"] == [0, _GLOBAL_BATCH]
  # The layout is the one asked for; with 'fsdp' each process holds 2 of the 4 shards.
  assert results[0]["wq_spec"] == {"fsdp": "P('fsdp',)", "dp": "P()",
                                   "dp_tp": "P(None, 'tensor')"}[mesh_name]
  # The two-process checkpoint restores in one process and matches the reference weights.
  mesh = sharding.make_mesh(MeshConfig(shape=shape), devices=jax.devices()[:4])
  cfg = _model_cfg()
  _, abstract = sharding.abstract_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh,
                                          DEFAULT_RULES)
  with Checkpointer(tmp_path / "ckpt", save_every=1, keep=2, create=False) as ckpt:
    assert ckpt.all_steps() == [_STEPS]
    restored, _ = ckpt.restore(abstract)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(restored),
                          jax.tree.leaves(ref["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
