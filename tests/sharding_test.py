"""Tests for rlm_jax.sharding on 8 fake CPU devices (tests/conftest.py)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlm_jax import configlib
from rlm_jax import sharding
from rlm_jax.sharding import DEFAULT_RULES
from rlm_jax.sharding import MeshConfig
from rlm_jax.sharding import ShardingError


def _mesh(shape, devices=None):
  return sharding.make_mesh(MeshConfig(shape=shape), devices=devices)


def test_eight_fake_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize("shape,resolved", [
    ((1, -1, 1), (1, 8, 1)), ((-1, 1, 1), (8, 1, 1)), ((1, 1, -1), (1, 1, 8)),
    ((2, -1, 2), (2, 2, 2)), ((1, 4, 2), (1, 4, 2)),
])
def test_make_mesh_fill(shape, resolved):
  mesh = _mesh(shape)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.shape.values()) == resolved
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_on_given_devices():
  mesh = _mesh((1, 1, -1), devices=jax.devices()[:2])
  assert tuple(mesh.shape.values()) == (1, 1, 2)


@pytest.mark.parametrize("shape,message", [
    ((3, 1, 1), "mesh shape (3, 1, 1) ('data', 'fsdp', 'tensor') needs 3 devices, but there "
                "are 8"),
    ((3, -1, 1), "mesh shape (3, -1, 1) ('data', 'fsdp', 'tensor'): 8 devices are not "
                 "divisible by 3"),
    ((2, 2, 4), "mesh shape (2, 2, 4) ('data', 'fsdp', 'tensor') needs 16 devices, but "
                "there are 8"),
])
def test_make_mesh_bad_shape_one_line(shape, message):
  with pytest.raises(ShardingError) as e:
    _mesh(shape)
  assert str(e.value) == message


def test_mesh_config_validation_through_configlib():
  cfg = ml_collections.ConfigDict(dict(shape=(2, -1, -1)))
  with pytest.raises(configlib.ConfigError) as e:
    configlib.from_config(MeshConfig, cfg, "mesh")
  assert str(e.value) == "config.mesh: shape=(2, -1, -1): at most one entry may be -1"
  cfg = ml_collections.ConfigDict(dict(shape=(1, -1, 1), rules=(("embed", "fsdpp"),)))
  with pytest.raises(configlib.ConfigError) as e:
    configlib.from_config(MeshConfig, cfg, "mesh")
  assert str(e.value) == ("config.mesh: rules: 'embed' -> 'fsdpp': unknown mesh axis "
                          "(allowed: data, fsdp, tensor)")
  cfg = ml_collections.ConfigDict(dict(shape=[1, 2, 4], rules=[["batch", ["data", "fsdp"]],
                                                               ["embed", None]]))
  m = configlib.from_config(MeshConfig, cfg, "mesh")
  assert m == MeshConfig((1, 2, 4), (("batch", ("data", "fsdp")), ("embed", None)), 0.02)
  with pytest.raises(configlib.ConfigError, match=r"config.mesh.shape=\(1, 8\): must have 3"):
    configlib.from_config(MeshConfig, ml_collections.ConfigDict(dict(shape=(1, 8))), "mesh")


@pytest.mark.parametrize("axes,mesh_shape,shape,expected", [
    # Without a mesh: the rule table only.
    (("embed", "mlp"), None, None, P("fsdp", "tensor")),
    (("vocab", "embed"), None, None, P("tensor", "fsdp")),
    # 'batch' takes data+fsdp, so the activation's 'embed' cannot use fsdp again.
    (("batch", "length", "embed"), None, None, P(("data", "fsdp"))),
    (("heads", "head_dim", None), None, None, P("tensor")),
    # Mesh axes of size 1 are left out.
    (("batch", "length", "embed"), (1, 8, 1), (16, 5, 32), P("fsdp")),
    (("embed", "mlp"), (1, 1, 8), (32, 64), P(None, "tensor")),
    # Divisibility fallback: drop mesh axes from the end, then replicate.
    (("batch", "length"), (2, 4, 1), (8, 3), P(("data", "fsdp"))),
    (("batch", "length"), (2, 4, 1), (4, 3), P("data")),
    (("batch", "length"), (2, 4, 1), (3, 3), P()),
    (("embed", "kv_heads", "head_dim"), (1, 1, 8), (32, 2, 8), P()),
    (("embed", "kv_heads", "head_dim"), (1, 4, 2), (32, 2, 8), P("fsdp", "tensor")),
])
def test_logical_to_spec(axes, mesh_shape, shape, expected):
  mesh = None if mesh_shape is None else _mesh(mesh_shape)
  assert sharding.logical_to_spec(axes, DEFAULT_RULES, mesh, shape) == expected


def test_logical_to_spec_fallback_rules_and_errors():
  rules = (("batch", "fsdp"), ("embed", "fsdp"), ("embed", "tensor"), ("x", None))
  # First free candidate wins: embed falls back to 'tensor' once batch used 'fsdp'.
  assert sharding.logical_to_spec(("batch", "embed"), rules) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("embed", "x"), rules) == P("fsdp")
  with pytest.raises(ShardingError, match=r"^logical axis 'embd' has no rule \(known: batch, "
                     r"embed, x\)$"):
    sharding.logical_to_spec(("embd",), rules)
  with pytest.raises(ShardingError, match=r"logical axes \('embed',\) do not match shape "
                     r"\(2, 3\)"):
    sharding.logical_to_spec(("embed",), rules, _mesh((1, 8, 1)), (2, 3))


class Toy(nnx.Module):

  def __init__(self, rngs):
    self.emb = nnx.Param(jax.random.normal(rngs.params(), (16, 8)),
                         logical_axes=("vocab", "embed"))
    self.w = nnx.Param(jax.random.normal(rngs.params(), (8, 32)), logical_axes=("embed", "mlp"))
    self.kv = nnx.Param(jax.random.normal(rngs.params(), (8, 2, 4)),
                        logical_axes=("embed", "kv_heads", "head_dim"))
    self.scale = nnx.Param(jnp.ones((8,)), logical_axes=("norm",))
    self.plain = nnx.Param(jnp.arange(3.0))  # no logical_axes: replicated
    self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))

  def __call__(self, tokens):
    x = sharding.constrain(self.emb[...][tokens], ("batch", "embed"))
    return sharding.constrain(x @ self.w[...], ("batch", "mlp"))


# Parameter bytes of Toy: emb 512, w 1024, kv 256, scale 32, plain 12 -> 1836.
@pytest.mark.parametrize("mesh_shape,specs,shard_shapes,replicated_bytes", [
    ((1, 4, 2),
     dict(emb=P("tensor", "fsdp"), w=P("fsdp", "tensor"), kv=P("fsdp", "tensor"),
          scale=P(), plain=P()),
     dict(emb=(8, 2), w=(2, 16), kv=(2, 1, 4), scale=(8,), plain=(3,)), 32 + 12),
    ((1, 1, 8),
     dict(emb=P("tensor"), w=P(None, "tensor"), kv=P(), scale=P(),
          plain=P()),
     dict(emb=(2, 8), w=(8, 4), kv=(8, 2, 4), scale=(8,), plain=(3,)), 256 + 32 + 12),
    ((8, 1, 1),  # pure data parallel: copies along 'data' are intended, fraction 0
     dict(emb=P(), w=P(), kv=P(), scale=P(),
          plain=P()),
     dict(emb=(16, 8), w=(8, 32), kv=(8, 2, 4), scale=(8,), plain=(3,)), 0),
])
def test_init_sharded_follows_rules(mesh_shape, specs, shard_shapes, replicated_bytes):
  mesh = _mesh(mesh_shape)
  graphdef, state = sharding.init_sharded(lambda: Toy(nnx.Rngs(0)), mesh, DEFAULT_RULES)
  eager = nnx.state(Toy(nnx.Rngs(0)))  # same seed, built on one device
  for name, spec in specs.items():
    x = state[name].get_value()
    assert x.sharding == NamedSharding(mesh, spec), name
    assert {s.data.shape for s in x.addressable_shards} == {shard_shapes[name]}, name
    np.testing.assert_array_equal(np.asarray(x), np.asarray(eager[name].get_value()))
  assert state["count"].get_value().sharding.is_fully_replicated
  assert sharding.replicated_fraction(state, mesh) == pytest.approx(replicated_bytes / 1836)
  # The abstract twin (restore target) carries the same shardings.
  _, abstract = sharding.abstract_sharded(lambda: Toy(nnx.Rngs(0)), mesh, DEFAULT_RULES)
  assert isinstance(abstract["w"].get_value(), jax.ShapeDtypeStruct)
  assert abstract["w"].get_value().sharding == state["w"].get_value().sharding
  model = nnx.merge(graphdef, state)
  assert isinstance(model, Toy)


def test_check_sharded():
  mesh = _mesh((1, 1, 8))
  _, state = sharding.init_sharded(lambda: Toy(nnx.Rngs(0)), mesh, DEFAULT_RULES)
  sharding.check_sharded(state, mesh, 0.2)  # 300 / 1836 = 16.3% replicated
  with pytest.raises(ShardingError) as e:
    sharding.check_sharded(state, mesh, 0.1)
  assert str(e.value) == (
      "16.3% of parameter bytes are replicated on mesh {'data': 1, 'fsdp': 1, 'tensor': 8} "
      "(limit 10.0%); largest replicated: kv (256 B), scale (32 B), plain (12 B). Check the "
      "logical_axes of these parameters and config.mesh.rules")
  # The same state with every parameter copied to every device.
  replicated = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), state)
  assert sharding.replicated_fraction(replicated, mesh) == 1.0
  with pytest.raises(ShardingError, match=r"^100.0% of parameter bytes .* largest "
                     r"replicated: w \(1.0 KiB\), emb \(512 B\), kv \(256 B\)\. "):
    sharding.check_sharded(replicated, mesh, 0.02)
  one = _mesh((1, 1, 1), devices=jax.devices()[:1])
  assert sharding.replicated_fraction(nnx.state(Toy(nnx.Rngs(0))), one) == 0.0


def test_bad_logical_axes_name_the_param():
  class Bad(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.zeros((4, 4)), logical_axes=("embed",))
  with pytest.raises(ShardingError, match=r"^w: logical axes \('embed',\) do not match shape "
                     r"\(4, 4\)$"):
    sharding.init_sharded(Bad, _mesh((1, 8, 1)), DEFAULT_RULES)


def test_constrain_identity_without_mesh_and_applied_inside():
  x = jnp.ones((8, 16))
  assert sharding.constrain(x, ("batch", "embed")) is x
  mesh = _mesh((2, 4, 1))
  traces = []

  @jax.jit
  def f(x):
    traces.append(1)
    return sharding.constrain(x * 2, ("batch", "mlp"))

  with sharding.use_mesh_rules(mesh, DEFAULT_RULES):
    assert sharding.active_mesh() is mesh
    y = f(x)
  assert y.sharding.spec == P(("data", "fsdp"))
  assert {s.data.shape for s in y.addressable_shards} == {(1, 16)}
  assert sharding.active_mesh() is None
  # Outside the context the function is retraced (the mesh is part of jit's trace context),
  # so the constraint does not leak.
  z = f(x)
  assert len(traces) == 2 and z.sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(y), np.asarray(z))
  with sharding.use_mesh_rules(_mesh((1, 1, 1), jax.devices()[:1]), DEFAULT_RULES):
    assert sharding.constrain(x, ("batch", "embed")) is x


def test_toy_forward_sharded_matches_single_device():
  tokens = jnp.arange(8) % 16
  ref = Toy(nnx.Rngs(0))(tokens)
  mesh = _mesh((2, 2, 2))
  graphdef, state = sharding.init_sharded(lambda: Toy(nnx.Rngs(0)), mesh, DEFAULT_RULES)

  @jax.jit
  def fwd(state, tokens):
    return nnx.merge(graphdef, state)(tokens)

  with sharding.use_mesh_rules(mesh, DEFAULT_RULES):
    out = fwd(state, sharding.shard_batch(tokens, mesh, DEFAULT_RULES))
  assert out.sharding.spec == P(("data", "fsdp"), "tensor")
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_shard_batch():
  mesh = _mesh((2, 4, 1))
  batch = {"tokens": np.arange(16 * 5).reshape(16, 5), "lengths": np.arange(16),
           "seed": np.int32(3)}
  out = sharding.shard_batch(batch, mesh, DEFAULT_RULES)
  assert out["tokens"].sharding.spec == P(("data", "fsdp"))
  assert {s.data.shape for s in out["tokens"].addressable_shards} == {(2, 5)}
  assert out["lengths"].sharding.spec == P(("data", "fsdp"))
  assert out["seed"].sharding.spec == P()
  np.testing.assert_array_equal(np.asarray(out["tokens"]), batch["tokens"])
  with pytest.raises(ShardingError) as e:
    sharding.shard_batch({"tokens": np.zeros((6, 5))}, mesh, DEFAULT_RULES)
  assert str(e.value) == ("batch leaf 'tokens': dim 0 ('batch') of size 6 is not divisible "
                          "by mesh axes ('data', 'fsdp') of size 8")


# ----------------------------------------------------------------------------------------
# The real model: forward and one AdamW step agree between one device and 8 sharded.

from rlm_jax.models.transformer import ModelConfig  # noqa: E402
from rlm_jax.models.transformer import Transformer  # noqa: E402

# 8 heads so that tensor parallelism over 8 divides them; 2 kv heads stay replicated under
# TP=8 (divisibility fallback) and are split under TP=2.
_CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=8, n_kv_heads=2,
                   head_dim=8, d_ff=64, tie_embeddings=False, value_head="sigmoid",
                   value_hidden=16)
# eps=1e-4: with the default 1e-8 a first Adam step is ~lr*sign(g), which turns float noise
# in near-zero gradients into lr-sized differences; 1e-4 keeps the update continuous in g.
_TX = optax.adamw(1e-2, eps=1e-4, weight_decay=0.1)


def _batch():
  tokens = jax.random.randint(jax.random.key(1), (8, 12), 0, _CFG.vocab_size)
  lengths = jnp.array([12, 9, 12, 5, 12, 7, 12, 10])
  mask = jnp.arange(12)[None, :] < lengths[:, None]  # right padding
  return {"tokens": tokens, "mask": mask, "target": jnp.where(lengths % 2 == 0, 1.0, -1.0)}


def _loss(graphdef, params, batch):
  model = nnx.merge(graphdef, params)
  out = model(batch["tokens"][:, :-1], mask_BxL=batch["mask"][:, :-1])
  logp_BxLxV = jax.nn.log_softmax(out.logits_BxLxV)
  nll_BxL = -jnp.take_along_axis(logp_BxLxV, batch["tokens"][:, 1:, None], -1)[..., 0]
  m_BxL = batch["mask"][:, 1:]
  lm = (nll_BxL * m_BxL).sum() / m_BxL.sum()
  value = jnp.mean(((out.values_BxL - batch["target"][:, None]) ** 2) * m_BxL)
  return lm + value, out


def _run(mesh, host_params=None):
  """init -> forward -> one AdamW step on `mesh`; returns the results.

  Without `host_params` the parameters come from `init_sharded`; with them (to save an init
  compile per mesh) they are placed with `state_shardings` + `device_put`.
  """
  init_fn = lambda: Transformer(_CFG, rngs=nnx.Rngs(0))
  if host_params is None:
    graphdef, params = sharding.init_sharded(init_fn, mesh, DEFAULT_RULES)
  else:
    graphdef, _ = nnx.split(nnx.eval_shape(init_fn))
    params = jax.device_put(host_params,
                            sharding.state_shardings(host_params, mesh, DEFAULT_RULES))
  opt_shardings = sharding.state_shardings(jax.eval_shape(_TX.init, params), mesh,
                                           DEFAULT_RULES)
  opt_state = jax.jit(_TX.init, out_shardings=opt_shardings)(params)

  @jax.jit
  def step(params, opt_state, batch):
    (loss, out), grads = jax.value_and_grad(
        lambda p: _loss(graphdef, p, batch), has_aux=True)(params)
    updates, opt_state = _TX.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, out.logits_BxLxV, out.values_BxL

  with sharding.use_mesh_rules(mesh, DEFAULT_RULES):
    batch = sharding.shard_batch(_batch(), mesh, DEFAULT_RULES)
    new_params, new_opt, loss, logits, values = step(params, opt_state, batch)
  return dict(params=params, new_params=new_params, opt_state=new_opt, loss=loss,
              logits=logits, values=values)


@pytest.fixture(scope="module")
def single_device_run():
  return jax.tree.map(np.asarray, _run(_mesh((1, 1, 1), devices=jax.devices()[:1])))


@pytest.mark.parametrize("mesh_shape,name", [
    ((8, 1, 1), "DP"), ((1, 8, 1), "FSDP"), ((1, 1, 8), "TP"), ((1, 4, 2), "FSDPxTP"),
])
def test_transformer_sharded_matches_single_device(single_device_run, mesh_shape, name):
  mesh = _mesh(mesh_shape)
  ref = single_device_run
  # One mesh exercises init_sharded end to end; the others reuse the reference weights.
  via_init = name == "FSDPxTP"
  got = _run(mesh, host_params=None if via_init else ref["params"])
  # Parameters are really laid out as the rules say.
  wq = got["params"]["layers"][0]["attn"]["wq"].get_value()
  w_up = got["params"]["layers"][0]["mlp"]["w_up"].get_value()
  fsdp, tp = mesh.shape["fsdp"], mesh.shape["tensor"]
  assert {s.data.shape for s in wq.addressable_shards} == {(32 // fsdp, 8 // tp, 8)}, name
  assert {s.data.shape for s in w_up.addressable_shards} == {(32 // fsdp, 64 // tp)}, name
  # The optimizer moments follow the parameters (FSDP shards optimizer state too).
  mu_up = got["opt_state"][0].mu["layers"][0]["mlp"]["w_up"].get_value()
  assert mu_up.sharding.is_equivalent_to(w_up.sharding, 2)
  new_up = got["new_params"]["layers"][0]["mlp"]["w_up"].get_value()
  assert new_up.sharding.is_equivalent_to(w_up.sharding, 2)  # the step keeps the layout
  if fsdp * tp > 1:
    assert sharding.replicated_fraction(got["params"], mesh) < (0.2 if tp == 8 else 0.05)
  got = jax.tree.map(np.asarray, got)
  if via_init:  # sharded init draws exactly the same numbers as the one-device init
    for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(ref["params"])):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(got["logits"], ref["logits"], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got["values"], ref["values"], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got["loss"], ref["loss"], atol=1e-5, rtol=1e-5)
  for (path, a), (_, b) in zip(
      jax.tree_util.tree_leaves_with_path(got["new_params"]),
      jax.tree_util.tree_leaves_with_path(ref["new_params"])):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=f"{name} {path}")
  # The step changed the parameters by about lr, so the comparison above is not vacuous.
  delta = np.abs(ref["new_params"]["layers"][0]["mlp"]["w_up"].get_value()
                 - ref["params"]["layers"][0]["mlp"]["w_up"].get_value())
  assert delta.max() > 1e-3


def test_transformer_start_up_check(single_device_run):
  host = single_device_run["params"]
  mesh = _mesh((1, 8, 1))
  fsdp = jax.device_put(host, sharding.state_shardings(host, mesh, DEFAULT_RULES))
  # Only the norms and the value head's small tail stay whole: 129 of 16001 parameters.
  assert sharding.replicated_fraction(fsdp, mesh) == pytest.approx(129 / 16001)
  sharding.check_sharded(fsdp, mesh, 0.02)
  replicated = jax.device_put(host, NamedSharding(mesh, P()))
  with pytest.raises(ShardingError, match=r"^100.0% of parameter bytes are replicated on mesh "
                     r"\{'data': 1, 'fsdp': 8, 'tensor': 1\} \(limit 2.0%\); largest "
                     r"replicated: embed \(8.0 KiB\), layers.0.attn.wo \(8.0 KiB\), "
                     r"layers.0.attn.wq \(8.0 KiB\)\. "):
    sharding.check_sharded(replicated, mesh, 0.02)


# ----------------------------------------------------------------------------------------
# GRPO with the rollout on its own mesh (rlm_jax.training.grpo.grpo_iteration_on_meshes).


def test_grpo_rollout_on_a_tensor_parallel_mesh_matches_the_one_mesh_iteration():
  from rlm_jax.models import transformer as tfm
  from rlm_jax.sampling.sampler import SamplingConfig
  from rlm_jax.training import grpo, losses
  from rlm_jax.training.rewards import RewardConfig
  from rlm_jax.training.state import OptimConfig, create_train_state, make_optimizer

  cfg = tfm.ModelConfig(vocab_size=8, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                        head_dim=8, d_ff=32)
  train = grpo.Placement(_mesh((1, 8, 1)), DEFAULT_RULES)  # FSDP
  roll = grpo.Placement(_mesh((2, 1, 4)), DEFAULT_RULES)  # DP x TP
  graphdef, params = sharding.init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0)),
                                           train.mesh, DEFAULT_RULES)
  setup = grpo.GRPOSetup(
      group_size=8, loss=losses.GRPOConfig(max_completion_length=3),
      sampling=SamplingConfig(max_new_tokens=3, eos_id=2, pad_id=0, temperature=1.0),
      reward=RewardConfig(), step_id=3,
      score_fn=lambda out, batch: jnp.where(out.tokens_BxT[:, 0] == 5, 2, 0))
  batch = {"prompt": jnp.ones((4, 2), jnp.int32), "prompt_mask": jnp.ones((4, 2), bool),
           "answer": jnp.zeros((4, 1), jnp.int32), "answer_len": jnp.ones((4,), jnp.int32)}
  key = jax.random.key(7)
  tx = make_optimizer(OptimConfig(learning_rate=1e-2, grad_clip=0.0))

  # The reshard really changes the layout: w_up [embed, mlp] goes from fsdp to tensor.
  w_up = lambda p: p["layers"][0]["mlp"]["w_up"].get_value()
  moved = grpo.reshard_params(params, roll)
  assert w_up(params).sharding.spec == P("fsdp")
  assert w_up(moved).sharding.spec == P(None, "tensor") and w_up(moved).sharding.mesh == roll.mesh
  assert {s.data.shape for s in w_up(moved).addressable_shards} == {(16, 8)}
  np.testing.assert_array_equal(np.asarray(w_up(moved)), np.asarray(w_up(params)))

  compiled_updates = grpo.grpo_update_jit._cache_size()  # pylint: disable=protected-access
  with sharding.use_mesh_rules(train.mesh, train.rules):
    ro_two = grpo.rollout_on_mesh(graphdef, params, batch, key, setup, roll, train)
    # One mesh: the two halves of `grpo_iteration` (fused in grpo_iteration_jit; the halves
    # share the update program with the two-mesh path, which saves compiles here).
    ro_one = grpo.reshard_rows(grpo.rollout_jit(graphdef, params, batch, key, setup), train)
    state_one, m_one = grpo.grpo_update_jit(
        graphdef, tx, setup, create_train_state(jax.tree.map(jnp.copy, params), tx, train.mesh,
                                                train.rules), None, ro_one)
    state_two, m_two = grpo.grpo_iteration_on_meshes(
        graphdef, tx, setup, create_train_state(params, tx, train.mesh, train.rules), None, batch,
        key, roll, train)
  np.testing.assert_array_equal(np.asarray(ro_two["tokens"]), np.asarray(ro_one["tokens"]))
  assert ro_two["tokens"].sharding.mesh == train.mesh
  assert ro_two["tokens"].sharding.spec == P("fsdp")
  assert 0 < float(m_one["accuracy"]) < 1  # mixed rewards: the update is not a no-op
  for k in ("reward", "accuracy", "completion_length"):
    assert float(m_two[k]) == float(m_one[k]), k
  # Both paths ran the same update program (the resharded rollout has the training layout).
  assert grpo.grpo_update_jit._cache_size() == compiled_updates + 1  # pylint: disable=protected-access
  np.testing.assert_allclose(float(m_two["loss"]), float(m_one["loss"]), rtol=1e-5, atol=1e-7)
  assert w_up(state_two.params).sharding.spec == P("fsdp")  # the state stays on the train mesh
  for a, b in zip(jax.tree.leaves(state_two.params), jax.tree.leaves(state_one.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  delta = np.abs(np.asarray(w_up(state_one.params)) - np.asarray(w_up(params)))
  assert delta.max() > 1e-3
