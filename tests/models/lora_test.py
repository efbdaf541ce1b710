"""LoRA: identity at init, hand-computed effective weights, only adapters train, merged export."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlm_jax import sharding
from rlm_jax.models import hf
from rlm_jax.models import lora
from rlm_jax.models import transformer as tfm
from rlm_jax.sampling.sampler import SamplingConfig, sample
from rlm_jax.training import sft
from rlm_jax.training.state import OptimConfig, create_train_state, make_optimizer

CFG = tfm.ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1,
                      head_dim=8, d_ff=32)


def _tokens(b=2, l=7, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, l), 1, CFG.vocab_size)


@functools.lru_cache(maxsize=None)
def _base():
  # Jitted init: one compile instead of one per eager op (the CPU is shared).
  gdef, _ = nnx.split(nnx.eval_shape(lambda: tfm.init_model(CFG, seed=0)))
  return gdef, jax.jit(lambda: nnx.state(tfm.init_model(CFG, seed=0)))()


@functools.partial(jax.jit, static_argnums=0)
def _logits(gdef, state, x):
  return nnx.merge(gdef, state)(x).logits_BxLxV


def _lora(cfg=lora.LoraConfig(rank=4, alpha=8.0), seed=1):
  gdef, state = _base()
  return (gdef, state) + lora.add_lora(gdef, state, cfg, seed=seed)


def _randomise_b(state, seed=2):
  """Non-zero B everywhere (a trained adapter), so the adapters change the model."""
  leaves = []
  for i, (p, v) in enumerate(nnx.to_flat_state(state)):
    if p[-1] == 'lora_b':
      v = v.replace(value=0.1 * jax.random.normal(jax.random.key(seed + i), v.get_value().shape))
    leaves.append((p, v))
  return nnx.from_flat_state(leaves)


def _flat(state):
  return {'.'.join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_zero_b_gives_the_base_model_exactly():
  gdef, base, lgdef, lstate = _lora()
  x = _tokens()
  np.testing.assert_array_equal(_logits(lgdef, lstate, x), _logits(gdef, base, x))
  # A is random (so gradients reach B), B is zero.
  flat = _flat(lstate)
  a = flat['adapters.layers.0.attn.wq.lora_a']
  assert a.shape == (16, 4) and 0 < np.abs(a).max() <= 1 / 4  # bound 1/sqrt(fan_in=16)
  assert not np.any(flat['adapters.layers.0.attn.wq.lora_b'])


def test_targets_shapes_and_logical_axes():
  gdef, base, lgdef, lstate = _lora(lora.LoraConfig(rank=3, targets=('attn.wq', 'attn.wo',
                                                                      'layers.1.mlp.w_*')))
  adapters = lstate[lora.ADAPTERS]
  assert list(adapters.keys()) == ['layers.0.attn.wo', 'layers.0.attn.wq', 'layers.1.attn.wo',
                                   'layers.1.attn.wq', 'layers.1.mlp.w_down',
                                   'layers.1.mlp.w_gate', 'layers.1.mlp.w_up']
  # wq [D, H, Dh]: input D.  wo [H, Dh, D]: input (H, Dh).  w_down [F, D].
  wq, wo, down = (adapters[k] for k in ('layers.0.attn.wq', 'layers.0.attn.wo',
                                        'layers.1.mlp.w_down'))
  assert wq['lora_a'].get_value().shape == (16, 3)
  assert wq['lora_b'].get_value().shape == (3, 2, 8)
  assert wq['lora_a'].get_metadata()['logical_axes'] == ('embed', None)
  assert wq['lora_b'].get_metadata()['logical_axes'] == (None, 'heads', 'head_dim')
  assert wo['lora_a'].get_value().shape == (2, 8, 3)
  assert wo['lora_a'].get_metadata()['logical_axes'] == ('heads', 'head_dim', None)
  assert wo['lora_b'].get_metadata()['logical_axes'] == (None, 'embed')
  assert down['lora_a'].get_value().shape == (32, 3) and down['lora_b'].get_value().shape == (3, 16)


def test_effective_weight_is_w_plus_scaled_ab_by_hand():
  gdef, base, lgdef, lstate = _lora(lora.LoraConfig(rank=2, alpha=3.0, targets=('mlp.w_up',)))
  flat = []
  for p, v in nnx.to_flat_state(lstate):
    name = '.'.join(map(str, p))
    if name == 'adapters.layers.0.mlp.w_up.lora_a':
      v = v.replace(value=jnp.zeros((16, 2)).at[0, 0].set(1.0).at[5, 1].set(2.0))
    if name == 'adapters.layers.0.mlp.w_up.lora_b':
      v = v.replace(value=jnp.zeros((2, 32)).at[0, 7].set(0.5).at[1, 7].set(-1.0))
    flat.append((p, v))
  lstate = nnx.from_flat_state(flat)
  _, eff = lora.effective_params(lgdef, lstate)
  w = np.asarray(base['layers'][0]['mlp']['w_up'].get_value())
  want = w.copy()
  # scale = 3/2; (A·B)[0, 7] = 1·0.5, (A·B)[5, 7] = 2·(-1).
  want[0, 7] += 1.5 * 0.5
  want[5, 7] += 1.5 * -2.0
  np.testing.assert_allclose(eff['layers'][0]['mlp']['w_up'].get_value(), want, atol=1e-7)
  # Layer 1's adapter still has B = 0; untargeted weights pass through.
  np.testing.assert_array_equal(eff['layers'][1]['mlp']['w_up'].get_value(),
                                base['layers'][1]['mlp']['w_up'].get_value())
  np.testing.assert_array_equal(eff['embed'].get_value(), base['embed'].get_value())


def test_sft_updates_only_the_adapters_and_merge_matches():
  gdef, base, lgdef, lstate = _lora()
  tx = lora.lora_optimizer(make_optimizer(OptimConfig(learning_rate=1e-2, weight_decay=0.1)),
                           lstate)
  state = create_train_state(lstate, tx)
  # Adam moments exist for the adapters only: 2 x (adapter params), nothing for the base.
  n_adapter = sum(x.size for x in jax.tree.leaves(lstate[lora.ADAPTERS]))
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert n_opt == 2 * n_adapter
  before = _flat(state.params)
  tokens = np.asarray(_tokens(4, 9, seed=3))
  batch = {'tokens': tokens, 'mask': np.ones_like(tokens, bool),
           'loss_mask': np.arange(9)[None].repeat(4, 0) >= 3}
  losses = []
  for _ in range(5):
    state, m = sft.sft_step_jit(lgdef, tx, state, batch)
    losses.append(float(m['loss']))
  assert losses[-1] < losses[0] - 0.02
  after = _flat(state.params)
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  # Every lora_b moved (lora_a too, once b is non-zero); no base weight did, weight decay
  # included.
  adapter_keys = {k for k in before if k.startswith('adapters.')}
  assert changed == adapter_keys and len(adapter_keys) == 2 * 2 * 7

  # Merged: a plain Transformer with the same logits (fp32, 1e-5).
  mgdef, merged = lora.merge_lora(lgdef, state.params)
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  assert _flat(merged).keys() == _flat(base).keys()
  assert type(nnx.merge(mgdef, merged)) is tfm.Transformer
  x = _tokens(3, 8, seed=4)
  got = _logits(mgdef, merged, x)
  np.testing.assert_allclose(got, _logits(lgdef, state.params, x), atol=1e-5)
  assert np.abs(got - _logits(gdef, base, x)).max() > 1e-3


def test_merged_export_reloads_with_the_same_logits(tmp_path):
  _, _, lgdef, lstate = _lora()
  lstate = _randomise_b(lstate)
  out = hf.export_hf(*lora.merge_lora(lgdef, lstate), str(tmp_path / 'merged'))
  gdef, state = hf.load_hf(out)
  x = _tokens(2, 6, seed=5)
  np.testing.assert_allclose(_logits(gdef, state, x), _logits(lgdef, lstate, x), atol=1e-5)


def test_sampler_runs_the_adapted_model():
  """Rollouts (GRPO) merge the LoRA graphdef in the sampler: tokens equal the merged model's."""
  _, _, lgdef, lstate = _lora()
  lstate = _randomise_b(lstate)
  mgdef, merged = lora.merge_lora(lgdef, lstate)
  prompt = _tokens(2, 4, seed=6)
  mask = jnp.ones_like(prompt, bool)
  cfg = SamplingConfig(max_new_tokens=5, greedy=True, eos_id=-1, step_id=-1, pad_id=0)
  got = sample(lgdef, lstate, prompt, mask, jax.random.key(0), cfg)
  want = sample(mgdef, merged, prompt, mask, jax.random.key(0), cfg)
  np.testing.assert_array_equal(got.tokens_BxT, want.tokens_BxT)
  np.testing.assert_allclose(got.logprobs_BxT, want.logprobs_BxT, atol=1e-5)


def test_adapters_are_placed_by_the_rules_on_a_mesh():
  mesh = sharding.make_mesh(sharding.MeshConfig(shape=(1, 4, 2)))
  gdef, base = _base()
  base = jax.device_put(base, sharding.state_shardings(base, mesh, sharding.DEFAULT_RULES))
  lgdef, lstate = lora.add_lora(gdef, base, lora.LoraConfig(rank=4), mesh=mesh)
  ad = lstate[lora.ADAPTERS]['layers.0.attn.wq']
  # Specs come without trailing Nones (the form jit returns, so steps compile once).
  assert ad['lora_a'].get_value().sharding.spec == jax.sharding.PartitionSpec('fsdp')
  assert ad['lora_b'].get_value().sharding.spec == jax.sharding.PartitionSpec(None, 'tensor')
  # The base is reused as placed.
  assert lstate['base']['embed'].get_value() is base['embed'].get_value()
  with sharding.use_mesh_rules(mesh, sharding.DEFAULT_RULES):
    got = _logits(lgdef, lstate, _tokens(4, 5))
  np.testing.assert_allclose(got, _logits(gdef, _base()[1], _tokens(4, 5)), atol=1e-5)


@pytest.mark.parametrize('kwargs,message', [
    (dict(rank=0), 'lora.rank=0: must be an integer >= 1'),
    (dict(alpha=0.0), 'lora.alpha=0.0: must be > 0'),
    (dict(targets='attn.wq'), "lora.targets='attn.wq': must be a non-empty tuple of patterns"),
    (dict(dtype='int8'), "lora.dtype='int8': must be one of"),
])
def test_config_errors_are_one_line(kwargs, message):
  with pytest.raises(lora.LoraError) as e:
    lora.LoraConfig(**kwargs)
  assert str(e.value).startswith(message)


def test_pattern_that_matches_nothing_is_named():
  gdef, base = _base()
  with pytest.raises(lora.LoraError) as e:
    lora.add_lora(gdef, base, lora.LoraConfig(targets=('attn.wq', 'attn.q_proj')))
  assert str(e.value).startswith("lora.targets: pattern 'attn.q_proj' matches no weight of the "
                                 "model (weights look like: embed, layers.0.attn.wk")
  with pytest.raises(lora.LoraError, match='params hold no LoRA adapters'):
    lora.lora_optimizer(make_optimizer(OptimConfig()), base)


@pytest.mark.slow  # ~15 s of CPU: a GRPO iteration compile; rollouts are covered above
def test_grpo_learns_a_bandit_through_the_adapters_only():
  """One-token bandit (as tests/training/grpo_test.py): GRPO on a LoRA policy moves only A, B."""
  from rlm_jax.training import grpo, losses
  from rlm_jax.training.rewards import RewardConfig

  cfg = tfm.ModelConfig(vocab_size=8, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                        head_dim=8, d_ff=32)
  good = 5
  gdef, base = nnx.split(tfm.init_model(cfg, seed=0))
  lgdef, params = lora.add_lora(gdef, base, lora.LoraConfig(rank=2, alpha=4.0,
                                                            targets=('lm_head', 'mlp.w_up')))
  setup = grpo.GRPOSetup(
      group_size=8, loss=losses.GRPOConfig(max_completion_length=3, num_iterations=2),
      sampling=SamplingConfig(max_new_tokens=3, eos_id=2, pad_id=0, temperature=1.0),
      reward=RewardConfig(), step_id=3,
      score_fn=lambda out, batch: jnp.where(out.tokens_BxT[:, 0] == good, 2, 0))
  batch = {'prompt': jnp.ones((4, 2), jnp.int32), 'prompt_mask': jnp.ones((4, 2), bool),
           'answer': jnp.zeros((4, 1), jnp.int32), 'answer_len': jnp.ones((4,), jnp.int32)}
  tx = lora.lora_optimizer(make_optimizer(OptimConfig(learning_rate=5e-2, grad_clip=0.0)),
                           params)

  def p_good(g, s):
    return float(jax.nn.softmax(_logits(g, s, jnp.ones((1, 2), jnp.int32))[0, -1])[good])

  p0 = p_good(lgdef, params)
  before = _flat(params)
  state = create_train_state(params, tx)
  for i in range(15):
    state, _ = grpo.grpo_iteration_jit(lgdef, tx, setup, state, None, batch, jax.random.key(i))
  after = _flat(state.params)
  assert all(np.array_equal(before[k], after[k]) for k in before if k.startswith('base.'))
  p1 = p_good(lgdef, state.params)
  assert p0 < 0.3 and p1 > 0.8, (p0, p1)
  # The merged policy is the trained one.
  assert abs(p_good(*lora.merge_lora(lgdef, state.params)) - p1) < 1e-5
