"""Hugging Face Llama / Qwen2 checkpoints in and out of the Flax `Transformer`, without torch.

A checkpoint folder holds `config.json` and safetensors weights, either one `model.safetensors`
or several files listed in `model.safetensors.index.json`. Loading reads one tensor at a time
with `safetensors.safe_open` (numpy), reshapes it to our layout and places it on the devices
right away (with its mesh sharding when a mesh is given: each device gets only its slice), so
the host never holds more than one tensor. Export goes the other way, one file shard at a time.

Layouts (HF stores linear weights as [out, in]):
  q_proj.weight [H*Dh, D]   <->  wq [D, H, Dh]        q_proj.bias [H*Dh] <-> bq [H, Dh]
  k/v_proj.weight [KVH*Dh, D] <-> wk/wv [D, KVH, Dh]  k/v_proj.bias      <-> bk/bv [KVH, Dh]
  o_proj.weight [D, H*Dh]   <->  wo [H, Dh, D]
  gate/up_proj.weight [F, D] <-> w_gate/w_up [D, F];  down_proj.weight [D, F] <-> w_down [F, D]
  lm_head.weight [V, D]     <->  lm_head [D, V];      embed_tokens.weight [V, D] <-> embed
Both use the same half-split ('rotate_half') rotary layout, so q/k need no permutation.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

import jax
import ml_dtypes  # noqa: F401  registers bfloat16 with numpy so safetensors can read bf16 files.
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from rlm_jax import errors
from rlm_jax.models.transformer import ModelConfig, Transformer

_ARCHITECTURES = {'LlamaForCausalLM': 'llama', 'Qwen2ForCausalLM': 'qwen2'}
_INDEX = 'model.safetensors.index.json'
_SINGLE = 'model.safetensors'
# Buffers some older checkpoints carry; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)


class HFFormatError(errors.Error):
  """A checkpoint or config that this module cannot map; the message names the culprit."""


# ----------------------------------------------------------------------------- config


def _read_config(path_or_dict: Any) -> tuple[dict, str]:
  if isinstance(path_or_dict, Mapping):
    return dict(path_or_dict), 'config'
  if hasattr(path_or_dict, 'to_dict'):  # a transformers PretrainedConfig
    return path_or_dict.to_dict(), 'config'
  path = os.fspath(path_or_dict)
  file = os.path.join(path, 'config.json') if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise FileNotFoundError(f'HF config not found: {file}')
  with open(file) as f:
    return json.load(f), file


def _rope_theta(c: dict, where: str) -> float:
  scaling = c.get('rope_scaling')
  if scaling:
    kind = scaling.get('rope_type', scaling.get('type', 'default'))
    if kind != 'default':
      raise HFFormatError(f"{where}: rope_scaling.rope_type='{kind}' is not supported (only 'default')")
  params = c.get('rope_parameters')
  if params:
    kind = params.get('rope_type', 'default')
    if kind != 'default':
      raise HFFormatError(f"{where}: rope_parameters.rope_type='{kind}' is not supported (only 'default')")
    if 'rope_theta' in params:
      return float(params['rope_theta'])
  return float(c.get('rope_theta', 10_000.0))


def config_from_hf(path_or_dict: Any, **overrides) -> ModelConfig:
  """Builds a `ModelConfig` from an HF LlamaConfig / Qwen2Config.

  Args:
    path_or_dict: a checkpoint folder, a config.json path, a dict, or a transformers config.
    **overrides: ModelConfig fields to set on top (e.g. dtype='bfloat16').

  Returns:
    The frozen ModelConfig (Qwen2 -> qkv_bias=True). Anything the Flax model cannot express
    (other architectures, rope scaling, sliding windows, o_proj/MLP biases, other activations)
    raises HFFormatError naming the field.
  """
  c, where = _read_config(path_or_dict)
  archs = c.get('architectures') or []
  for a in archs:
    if a not in _ARCHITECTURES:
      raise HFFormatError(f"{where}: architectures={archs} not supported (only {sorted(_ARCHITECTURES)})")
  model_type = c.get('model_type') or (_ARCHITECTURES[archs[0]] if archs else None)
  if model_type not in ('llama', 'qwen2'):
    raise HFFormatError(f"{where}: model_type='{model_type}' not supported (only 'llama', 'qwen2')")
  if c.get('hidden_act', 'silu') != 'silu':
    raise HFFormatError(f"{where}: hidden_act='{c['hidden_act']}' not supported (only 'silu')")
  for flag in ('attention_bias', 'mlp_bias', 'use_sliding_window'):
    if c.get(flag):
      raise HFFormatError(f'{where}: {flag}=True is not supported')
  for field in ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'vocab_size'):
    if field not in c:
      raise HFFormatError(f'{where}: missing field {field}')
  heads = int(c['num_attention_heads'])
  kw = dict(
      vocab_size=int(c['vocab_size']),
      d_model=int(c['hidden_size']),
      n_layers=int(c['num_hidden_layers']),
      n_heads=heads,
      n_kv_heads=int(c.get('num_key_value_heads') or heads),
      head_dim=int(c.get('head_dim') or c['hidden_size'] // heads),
      d_ff=int(c['intermediate_size']),
      rope_theta=_rope_theta(c, where),
      norm_eps=float(c.get('rms_norm_eps', 1e-6)),
      tie_embeddings=bool(c.get('tie_word_embeddings', False)),
      qkv_bias=model_type == 'qwen2',
  )
  kw.update(overrides)
  return ModelConfig(**kw)


# ----------------------------------------------------------------------------- name table


@dataclasses.dataclass(frozen=True)
class _Entry:
  path: tuple  # path in the nnx state
  hf_shape: tuple[int, ...]
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _table(cfg: ModelConfig) -> dict[str, _Entry]:
  """HF tensor name -> where and how it lives in our state (LM trunk and head only)."""
  d, h, kv, dh, f, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  same = lambda w: w

  def proj(heads):  # [heads*Dh, D] <-> [D, heads, Dh]
    return (lambda w: w.T.reshape(d, heads, dh)), (lambda w: w.reshape(d, heads * dh).T)

  def bias(heads):  # [heads*Dh] <-> [heads, Dh]
    return (lambda b: b.reshape(heads, dh)), (lambda b: b.reshape(heads * dh))

  t = {
      'model.embed_tokens.weight': _Entry(('embed',), (v, d), same, same),
      'model.norm.weight': _Entry(('final_norm', 'scale'), (d,), same, same),
  }
  if cfg.lm_head and not cfg.tie_embeddings:
    t['lm_head.weight'] = _Entry(('lm_head',), (v, d), np.transpose, np.transpose)
  for i in range(cfg.n_layers):
    p, a = f'model.layers.{i}.', ('layers', i)
    t[p + 'input_layernorm.weight'] = _Entry(a + ('attn_norm', 'scale'), (d,), same, same)
    t[p + 'post_attention_layernorm.weight'] = _Entry(a + ('mlp_norm', 'scale'), (d,), same, same)
    for name, ours, n in (('q', 'wq', h), ('k', 'wk', kv), ('v', 'wv', kv)):
      t[f'{p}self_attn.{name}_proj.weight'] = _Entry(a + ('attn', ours), (n * dh, d), *proj(n))
      if cfg.qkv_bias:
        t[f'{p}self_attn.{name}_proj.bias'] = _Entry(a + ('attn', 'b' + name), (n * dh,), *bias(n))
    t[p + 'self_attn.o_proj.weight'] = _Entry(
        a + ('attn', 'wo'), (d, h * dh), lambda w: w.T.reshape(h, dh, d), lambda w: w.reshape(h * dh, d).T
    )
    t[p + 'mlp.gate_proj.weight'] = _Entry(a + ('mlp', 'w_gate'), (f, d), np.transpose, np.transpose)
    t[p + 'mlp.up_proj.weight'] = _Entry(a + ('mlp', 'w_up'), (f, d), np.transpose, np.transpose)
    t[p + 'mlp.down_proj.weight'] = _Entry(a + ('mlp', 'w_down'), (d, f), np.transpose, np.transpose)
  return t


def _weight_files(path: str) -> dict[str, str]:
  """HF tensor name -> safetensors file that holds it."""
  index = os.path.join(path, _INDEX)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get('weight_map')
    if not isinstance(weight_map, dict):
      raise HFFormatError(f'{index}: no weight_map')
    for name, file in weight_map.items():
      if not os.path.isfile(os.path.join(path, file)):
        raise HFFormatError(f'{index}: tensor {name} points to missing file {file}')
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  single = os.path.join(path, _SINGLE)
  if os.path.isfile(single):
    with safe_open(single, 'np') as f:
      return {name: single for name in f.keys()}
  raise FileNotFoundError(f'no {_SINGLE} or {_INDEX} in {path} (only safetensors checkpoints are read)')


# ----------------------------------------------------------------------------- load


def load_hf(
    path: str,
    *,
    dtype: str = 'float32',
    param_dtype: str = 'float32',
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
    **overrides,
) -> tuple[nnx.GraphDef, nnx.State]:
  """Loads an HF Llama / Qwen2 safetensors checkpoint into a (graphdef, state) pair.

  Args:
    path: folder with config.json and model.safetensors (or model.safetensors.index.json and
      its shards).
    dtype: compute dtype of the model.
    param_dtype: storage dtype of the loaded weights (bf16 files are upcast if float32).
    mesh: place every tensor with the sharding its logical axes get under `rules`; each
      device receives only its slice. None -> the default device.
    rules: logical-axis rule table for `rlm_jax.sharding.state_shardings` (with `mesh`);
      None -> `sharding.DEFAULT_RULES`.
    **overrides: other ModelConfig fields (e.g. remat='full').

  Returns:
    (graphdef, state) of a `Transformer` with an LM head; `nnx.merge` them for a module.
  """
  cfg = config_from_hf(path, dtype=dtype, param_dtype=param_dtype, **overrides)
  if not cfg.lm_head or cfg.value_head != 'none':
    raise HFFormatError('load_hf builds a policy (lm_head=True, value_head=none); add heads after loading')
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  shardings = None
  if mesh is not None:
    from rlm_jax import sharding  # pylint: disable=g-import-not-at-top

    rules = sharding.DEFAULT_RULES if rules is None else rules
    shardings = dict(nnx.to_flat_state(sharding.state_shardings(abstract, mesh, rules)))

  table = _table(cfg)
  files = _weight_files(path)
  for name, file in files.items():
    if name not in table and not name.endswith(_IGNORED_SUFFIXES):
      if name == 'lm_head.weight' and cfg.tie_embeddings:
        continue  # some tied checkpoints store the head anyway; the embedding is the source.
      raise HFFormatError(f'unexpected tensor {name} in {file} (not part of a {cfg.n_layers}-layer model)')
  for name in table:
    if name not in files:
      raise HFFormatError(f'missing tensor {name} in {path}')

  by_file: dict[str, list[str]] = {}
  for name in table:
    by_file.setdefault(files[name], []).append(name)
  leaves = {}
  for file, names in by_file.items():
    with safe_open(file, 'np') as f:
      for name in names:
        entry = table[name]
        try:
          w = f.get_tensor(name)
        except Exception as e:  # pylint: disable=broad-except
          raise HFFormatError(f'cannot read tensor {name} from {file}: {e}') from e
        if tuple(w.shape) != entry.hf_shape:
          raise HFFormatError(f'tensor {name} in {file} has shape {tuple(w.shape)}, expected {entry.hf_shape}')
        w = np.ascontiguousarray(entry.to_ours(w).astype(param_dtype))
        leaves[entry.path] = _place(w, None if shardings is None else shardings[entry.path])
        del w  # one host tensor at a time

  flat = []
  for p, var in nnx.to_flat_state(abstract):
    if p not in leaves:
      raise HFFormatError(f'no HF tensor maps to parameter {"/".join(map(str, p))}')
    flat.append((p, var.replace(value=leaves[p])))
  return graphdef, nnx.from_flat_state(flat)


def _place(w: np.ndarray, sharding) -> jax.Array:
  if sharding is None:
    return jax.device_put(w)
  if isinstance(sharding, nnx.Variable):
    sharding = sharding.get_value()
  # Each addressable device copies only its own index range out of the host tensor.
  return jax.make_array_from_callback(w.shape, sharding, lambda idx: w[idx])


# ----------------------------------------------------------------------------- export


def _hf_config(cfg: ModelConfig, template: Any, dtype: str) -> dict:
  if template is None:
    c = {}
  else:
    c, _ = _read_config(template)
  model_type = c.get('model_type') or ('qwen2' if cfg.qkv_bias else 'llama')
  if model_type not in ('llama', 'qwen2'):
    raise HFFormatError(f"template model_type='{model_type}' not supported (only 'llama', 'qwen2')")
  if cfg.qkv_bias != (model_type == 'qwen2'):
    raise HFFormatError(
        f"model.qkv_bias={cfg.qkv_bias} does not fit template model_type='{model_type}' (qwen2 <-> qkv biases)"
    )
  rope = dict(c.get('rope_parameters') or {}, rope_type='default', rope_theta=cfg.rope_theta)
  c.pop('rope_scaling', None)
  c.update(
      architectures=['Qwen2ForCausalLM' if model_type == 'qwen2' else 'LlamaForCausalLM'],
      model_type=model_type,
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.d_model,
      intermediate_size=cfg.d_ff,
      num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.n_kv_heads,
      head_dim=cfg.head_dim,
      hidden_act='silu',
      rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta,
      rope_parameters=rope,
      tie_word_embeddings=cfg.tie_embeddings,
      torch_dtype=dtype,
      dtype=dtype,
  )
  if model_type == 'llama':
    c.update(attention_bias=False, mlp_bias=False)
  else:
    c.update(use_sliding_window=False)
    c.pop('layer_types', None)  # recomputed from num_hidden_layers
  return c


def _to_host(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def export_hf(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    out_dir: str,
    hf_config_or_template: Any = None,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 4 * 2**30,
) -> str:
  """Writes a model as an HF checkpoint folder (config.json + safetensors), without torch.

  Args:
    graphdef, state: a `Transformer` with an LM head (a value head is not exported).
    out_dir: folder to write (created if needed).
    hf_config_or_template: an HF config (dict, folder, config.json or transformers config) whose
      other fields (token ids, max_position_embeddings, ...) are kept; the architecture fields
      are overwritten from the model. None -> a fresh Llama (or Qwen2 if qkv_bias) config.
    dtype: 'float32' | 'bfloat16' | 'float16' for the written tensors; None -> param dtype.
    max_shard_bytes: files larger than this are split, with model.safetensors.index.json.
      Host memory holds at most one file's tensors.

  Returns:
    out_dir. With several processes every process must call this (sharded arrays are
    gathered); only process 0 writes.
  """
  model = nnx.merge(graphdef, state)
  cfg = model.cfg
  if not cfg.lm_head:
    raise HFFormatError('export_hf needs a model with an LM head (model.lm_head=True)')
  dtype = dtype or cfg.param_dtype
  if dtype not in ('float32', 'bfloat16', 'float16'):
    raise HFFormatError(f"export dtype='{dtype}': must be one of 'float32', 'bfloat16', 'float16'")
  np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == 'bfloat16' else np.dtype(dtype)
  config = _hf_config(cfg, hf_config_or_template, dtype)
  values = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)

  table = _table(cfg)
  shards: list[list[str]] = [[]]
  size = 0
  for name, entry in table.items():
    nbytes = int(np.prod(entry.hf_shape)) * np_dtype.itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  files = [_SINGLE] if len(shards) == 1 else [
      f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))
  ]
  weight_map, total = {}, 0
  for file, names in zip(files, shards):
    tensors = {}
    for name in names:
      entry = table[name]
      w = table[name].to_hf(_to_host(values[entry.path].get_value())).astype(np_dtype)
      tensors[name] = np.ascontiguousarray(w)
      weight_map[name] = file
      total += w.nbytes
    if writer:
      save_file(tensors, os.path.join(out_dir, file), metadata={'format': 'pt'})
    del tensors
  if writer:
    if len(files) > 1:
      with open(os.path.join(out_dir, _INDEX), 'w') as f:
        json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
      json.dump(config, f, indent=2, sort_keys=True)
  return out_dir
