"""Llama / Qwen2-family decoder in Flax NNX, with an LM head and/or a value head.

One `Transformer` class covers the three model roles of the blueprint:
  * policy       = trunk + LM head             (`lm_head=True,  value_head='none'`)
  * value / PRM  = trunk + scalar MLP head      (`lm_head=False, value_head='sigmoid'|'logit'`)
  * actor-critic = one trunk with both heads    (`lm_head=True,  value_head=...`)

Attention is slot based, which makes left padding, right padding and a KV cache one
mechanism: a key in slot j is visible to a query in slot i iff j <= i and slot j holds a real
token. Rotary positions come from the caller (`positions_from_mask` for padded rows), so a
left-padded prompt gets the same positions as the unpadded one.

Every parameter carries `logical_axes` metadata; `rlm_jax.sharding` maps them to the mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlm_jax import sharding

_NEG_INF = -1e30
DECODE_PHASES = 4  # cache sizes a decode grows through (`decode_spans`)
MIN_PHASE_SLOTS = 32  # shorter phases save less attention than their extra compile costs


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder. Field names follow HF Llama/Qwen2 where they overlap."""

  vocab_size: int
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 2
  head_dim: int = 64
  d_ff: int = 704
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2 has biases on q, k and v.
  lm_head: bool = True
  value_head: Literal['none', 'sigmoid', 'logit'] = 'none'
  value_hidden: int = 0  # 0 -> d_model.
  dtype: str = 'float32'  # compute dtype, e.g. 'bfloat16'.
  param_dtype: str = 'float32'  # storage dtype of the master weights.
  remat: Literal['none', 'full', 'dots'] = 'none'
  init_std: float = 0.02
  # Attention of the forwards without a KV cache (training, log-prob and value passes):
  # 'einsum' (ours), or `jax.nn.dot_product_attention` with implementation 'xla' or 'cudnn'
  # (fused flash attention on NVIDIA GPUs, bfloat16/float16). Prefill and decode with a KV
  # cache always use ours (the cache layout is the one its contractions read).
  attention: Literal['einsum', 'xla', 'cudnn'] = 'einsum'

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f'model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}'
      )
    if self.head_dim % 2:
      raise ValueError(f'model.head_dim={self.head_dim} must be even (rotary embedding)')
    if not self.lm_head and self.value_head == 'none':
      raise ValueError("model has no head: set model.lm_head=True or model.value_head != 'none'")
    if self.tie_embeddings and not self.lm_head:
      raise ValueError('model.tie_embeddings=True needs model.lm_head=True')
    if self.attention not in ('einsum', 'xla', 'cudnn'):
      raise ValueError(f"model.attention='{self.attention}': must be one of 'einsum', 'xla', 'cudnn'")
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in ('float32', 'bfloat16', 'float16'):
        raise ValueError(
            f"model.{name}='{getattr(self, name)}': must be one of 'float32', 'bfloat16', 'float16'"
        )

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


class KVCache(NamedTuple):
  """Per-layer keys/values in T slots, plus which slots hold real tokens.

  Keys are stored [B, KVH, Dh, T] and values [B, KVH, T, Dh]: the layouts the two attention
  contractions read, so a decode step does not transpose the whole cache in every layer.
  """

  k: tuple[jax.Array, ...]  # n_layers x [B, KVH, Dh, T]
  v: tuple[jax.Array, ...]  # n_layers x [B, KVH, T, Dh]
  valid_BxT: jax.Array  # bool

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, size: int) -> 'KVCache':
    k_shape = (batch, cfg.n_kv_heads, cfg.head_dim, size)
    v_shape = (batch, cfg.n_kv_heads, size, cfg.head_dim)
    return cls(
        k=tuple(jnp.zeros(k_shape, cfg.compute_dtype) for _ in range(cfg.n_layers)),
        v=tuple(jnp.zeros(v_shape, cfg.compute_dtype) for _ in range(cfg.n_layers)),
        valid_BxT=jnp.zeros((batch, size), bool),
    )

  @property
  def size(self) -> int:
    return self.valid_BxT.shape[1]

  def resize(self, size: int) -> 'KVCache':
    """The same cache with `size` slots: empty slots appended, or the last ones dropped."""
    if size == self.size:
      return self
    if size < self.size:
      return KVCache(tuple(k[..., :size] for k in self.k), tuple(v[:, :, :size] for v in self.v),
                     self.valid_BxT[:, :size])
    pad = size - self.size
    grow = lambda x, axis: jnp.pad(x, [(0, pad) if a == axis else (0, 0) for a in range(x.ndim)])
    return KVCache(tuple(grow(k, 3) for k in self.k), tuple(grow(v, 2) for v in self.v), grow(self.valid_BxT, 1))


class ModelOutput(NamedTuple):
  logits_BxLxV: jax.Array | None
  values_BxL: jax.Array | None
  hidden_BxLxD: jax.Array
  cache: KVCache | None


def positions_from_mask(mask_BxL: jax.Array) -> jax.Array:
  """Rotary positions 0, 1, ... over the real tokens of each row (padding gets 0)."""
  return jnp.maximum(jnp.cumsum(mask_BxL.astype(jnp.int32), axis=1) - 1, 0)


def _param(rngs: nnx.Rngs, shape, axes, cfg: ModelConfig, std: float | None = None):
  std = cfg.init_std if std is None else std
  value = std * jax.random.normal(rngs.params(), shape, jnp.dtype(cfg.param_dtype))
  return nnx.Param(value, logical_axes=axes)


def _ones(shape, axes, cfg):
  return nnx.Param(jnp.ones(shape, jnp.dtype(cfg.param_dtype)), logical_axes=axes)


def _zeros(shape, axes, cfg):
  return nnx.Param(jnp.zeros(shape, jnp.dtype(cfg.param_dtype)), logical_axes=axes)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, cfg: ModelConfig):
    self.eps = cfg.norm_eps
    self.scale = _ones((dim,), ('norm',), cfg)

  def __call__(self, x):
    # Normalise in float32 (as HF Llama does), then scale in the compute dtype.
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return x32.astype(x.dtype) * self.scale[...].astype(x.dtype)


def rope_tables(positions_BxL: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos and sin [B, L, 1, head_dim/2] of the rotary angles; computed once per forward and
  shared by every layer's q and k."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles_BxLxF = positions_BxL[..., None].astype(jnp.float32) * inv_freq
  return jnp.cos(angles_BxLxF)[:, :, None, :], jnp.sin(angles_BxLxF)[:, :, None, :]


def apply_rope(x_BxLxHxD: jax.Array, positions_BxL: jax.Array, theta: float,
               tables: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
  """Rotary embedding in the half-split ('rotate_half') layout used by HF Llama/Qwen2.

  `tables` are `rope_tables(positions_BxL, ...)` when the caller has them already.
  """
  d = x_BxLxHxD.shape[-1]
  cos, sin = rope_tables(positions_BxL, d, theta) if tables is None else tables
  x = x_BxLxHxD.astype(jnp.float32)
  x1, x2 = x[..., : d // 2], x[..., d // 2 :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxD.dtype)


def decode_spans(prompt_len: int, max_new_tokens: int, n_phases: int = DECODE_PHASES) -> tuple[int, ...]:
  """Cache sizes of a decode split into phases over a growing cache.

  Decode step i writes slot prompt_len + i; the phase with cache size n runs the steps with
  prompt_len + i < n, then the cache grows (`KVCache.resize`) to the next size. A step thus
  attends over the slots up to the next boundary instead of all prompt_len + max_new_tokens,
  with the same outputs (later slots are never visible). Sizes go in equal steps up to the
  total, rounded up to multiples of 8: `n_phases` of them, fewer where a phase would be
  shorter than MIN_PHASE_SLOTS; sizes that hold no decode step are dropped. Each phase is
  one more `while_loop` body to compile, and growing the cache copies it once.
  """
  total = prompt_len + max_new_tokens
  n_phases = max(1, min(n_phases, total // MIN_PHASE_SLOTS))
  sizes = set()
  for k in range(1, n_phases + 1):
    n = -(-total * k // n_phases)  # ceil(total * k / n_phases)
    sizes.add(min(total, -(-n // 8) * 8))
  return tuple(sorted(n for n in sizes if n > prompt_len or n == total))


def _attend(q_BxJxRxLxD, k_BxJxDxT, v_BxJxTxD, visible_BxLxT, n_keys: int | None = None):
  """softmax(q·k / sqrt(Dh)) · v over the visible keys among the first `n_keys` slots.

  Returns:
    [B, J, R, L, Dh] in the compute dtype of q.
  """
  if n_keys is not None:
    k_BxJxDxT, v_BxJxTxD, visible_BxLxT = k_BxJxDxT[..., :n_keys], v_BxJxTxD[:, :, :n_keys], visible_BxLxT[..., :n_keys]
  dt, dh, l = q_BxJxRxLxD.dtype, q_BxJxRxLxD.shape[-1], q_BxJxRxLxD.shape[-2]
  if l == 1:  # decode: broadcast-multiply-sum reads the cache in place (no per-step transposes)
    scores = jnp.sum(q_BxJxRxLxD[..., None] * k_BxJxDxT[:, :, None, None], axis=-2, dtype=jnp.float32)
  else:
    scores = jnp.einsum('bkgld,bkdt->bkglt', q_BxJxRxLxD, k_BxJxDxT).astype(jnp.float32)
  scores = scores * (dh**-0.5)
  scores = jnp.where(visible_BxLxT[:, None, None, :, :], scores, _NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(dt)
  if l == 1:
    return jnp.sum(probs[..., None] * v_BxJxTxD[:, :, None, None], axis=-2, dtype=dt)
  return jnp.einsum('bkglt,bkth->bkglh', probs, v_BxJxTxD)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, kv, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.wq = _param(rngs, (d, h, dh), ('embed', 'heads', 'head_dim'), cfg)
    self.wk = _param(rngs, (d, kv, dh), ('embed', 'kv_heads', 'head_dim'), cfg)
    self.wv = _param(rngs, (d, kv, dh), ('embed', 'kv_heads', 'head_dim'), cfg)
    self.wo = _param(rngs, (h, dh, d), ('heads', 'head_dim', 'embed'), cfg)
    if cfg.qkv_bias:
      self.bq = _zeros((h, dh), ('heads', 'head_dim'), cfg)
      self.bk = _zeros((kv, dh), ('kv_heads', 'head_dim'), cfg)
      self.bv = _zeros((kv, dh), ('kv_heads', 'head_dim'), cfg)

  def __call__(self, x_BxLxD, positions_BxL, visible_BxLxT, kv_cache, cache_index, rope=None, *,
               n_keys=None, q_from=0):
    """`n_keys` (static): attend over the first n_keys key slots only (None: all of them).
    `q_from` (static): queries (and outputs) for positions q_from.. only; keys and values for all."""
    cfg = self.cfg
    dt = cfg.compute_dtype
    if rope is None:
      rope = rope_tables(positions_BxL, cfg.head_dim, cfg.rope_theta)
    q_rope = rope if not q_from else tuple(t[:, q_from:] for t in rope)
    q = jnp.einsum('bld,dhk->blhk', x_BxLxD[:, q_from:], self.wq[...].astype(dt))
    k = jnp.einsum('bld,dhk->blhk', x_BxLxD, self.wk[...].astype(dt))
    v = jnp.einsum('bld,dhk->blhk', x_BxLxD, self.wv[...].astype(dt))
    if cfg.qkv_bias:
      q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
    q = sharding.constrain(q, ('batch', 'length', 'heads', 'head_dim'))
    q = apply_rope(q, positions_BxL[:, q_from:], cfg.rope_theta, q_rope)
    k = apply_rope(k, positions_BxL, cfg.rope_theta, rope)
    if kv_cache is None and cfg.attention != 'einsum':
      out = jax.nn.dot_product_attention(q, k, v, mask=visible_BxLxT[:, None, q_from:], implementation=cfg.attention)
      return jnp.einsum('blhk,hkd->bld', out.astype(dt), self.wo[...].astype(dt)), None
    k_BxJxDxT = k.transpose(0, 2, 3, 1)
    v_BxJxTxD = v.transpose(0, 2, 1, 3)
    if kv_cache is not None:
      k_cache, v_cache = kv_cache
      k_BxJxDxT = jax.lax.dynamic_update_slice_in_dim(k_cache, k_BxJxDxT.astype(k_cache.dtype), cache_index, axis=3)
      v_BxJxTxD = jax.lax.dynamic_update_slice_in_dim(v_cache, v_BxJxTxD.astype(v_cache.dtype), cache_index, axis=2)
      new_kv = (k_BxJxDxT, v_BxJxTxD)
    else:
      new_kv = None
    b, l, h, dh = q.shape
    q_BxJxRxLxD = q.reshape(b, l, cfg.n_kv_heads, h // cfg.n_kv_heads, dh).transpose(0, 2, 3, 1, 4)
    k_BxJxDxT, v_BxJxTxD = k_BxJxDxT.astype(dt), v_BxJxTxD.astype(dt)
    out = _attend(q_BxJxRxLxD, k_BxJxDxT, v_BxJxTxD, visible_BxLxT[:, q_from:], n_keys)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, l, h, dh)
    out = jnp.einsum('blhk,hkd->bld', out, self.wo[...].astype(dt))
    return out, new_kv


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.w_gate = _param(rngs, (cfg.d_model, cfg.d_ff), ('embed', 'mlp'), cfg)
    self.w_up = _param(rngs, (cfg.d_model, cfg.d_ff), ('embed', 'mlp'), cfg)
    self.w_down = _param(rngs, (cfg.d_ff, cfg.d_model), ('mlp', 'embed'), cfg)

  def __call__(self, x_BxLxD):
    dt = self.cfg.compute_dtype
    gate = x_BxLxD @ self.w_gate[...].astype(dt)
    up = x_BxLxD @ self.w_up[...].astype(dt)
    h_BxLxF = sharding.constrain(jax.nn.silu(gate) * up, ('batch', 'length', 'mlp'))
    return h_BxLxF @ self.w_down[...].astype(dt)


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, positions, visible, kv_cache, cache_index, rope=None, *, n_keys=None, q_from=0):
    h, new_kv = self.attn(self.attn_norm(x), positions, visible, kv_cache, cache_index, rope, n_keys=n_keys,
                          q_from=q_from)
    x = x[:, q_from:] + h
    x = x + self.mlp(self.mlp_norm(x))
    return sharding.constrain(x, ('batch', 'length', 'embed')), new_kv


class ValueHead(nnx.Module):
  """Small MLP from the trunk's hidden state to one scalar per position."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    hidden = cfg.value_hidden or cfg.d_model
    self.w1 = _param(rngs, (cfg.d_model, hidden), ('embed', 'value_hidden'), cfg)
    self.b1 = _zeros((hidden,), ('value_hidden',), cfg)
    self.w2 = _param(rngs, (hidden, 1), ('value_hidden', None), cfg)
    self.b2 = _zeros((1,), (None,), cfg)

  def __call__(self, h_BxLxD):
    h = h_BxLxD.astype(jnp.float32)
    z = jax.nn.gelu(h @ self.w1[...].astype(jnp.float32) + self.b1[...])
    z_BxL = (z @ self.w2[...].astype(jnp.float32) + self.b2[...])[..., 0]
    if self.cfg.value_head == 'sigmoid':
      return 2.0 * jax.nn.sigmoid(z_BxL) - 1.0  # in (-1, 1) for +-1 targets (MSE).
    return z_BxL  # logit of P(correct) (BCE).


class Transformer(nnx.Module):
  """Decoder trunk with optional LM and value heads.

  Call with `tokens_BxL`, `positions_BxL` and `mask_BxL` (True on real tokens). Without a
  cache the L inputs attend causally among themselves. With `cache` (T slots) the new tokens
  are written to slots [cache_index, cache_index + L) and attend to every valid earlier slot.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'), cfg)
    self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg)
    if cfg.lm_head and not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'), cfg)
    if cfg.value_head != 'none':
      self.value_head = ValueHead(cfg, rngs)

  def __call__(
      self,
      tokens_BxL: jax.Array,
      positions_BxL: jax.Array | None = None,
      mask_BxL: jax.Array | None = None,
      *,
      cache: KVCache | None = None,
      cache_index: jax.Array | int = 0,
      logits: Literal['all', 'last', 'none'] = 'all',
      values: Literal['all', 'last', 'none'] = 'all',
      hidden_from: int = 0,
  ) -> ModelOutput:
    """Runs the trunk and the heads.

    Args:
      tokens_BxL, positions_BxL, mask_BxL, cache, cache_index: see the class docstring.
      logits: where the LM head runs: every position ('all', logits [B, L, V]), the last
        position only ('last', [B, 1, V]: a prefill needs nothing else), or nowhere ('none':
        the caller applies `lm_logits` to the hidden states it needs, e.g. in chunks).
      values: where the value head runs, the same choices ('last': values [B, 1]; a search
        reads a node's value at its last token only).
      hidden_from: positions the outputs start at (static; no cache): the last layer computes
        its queries, attention output and MLP for positions hidden_from.. only (its keys and
        values for all), so `hidden_BxLxD` (and logits, values) has L - hidden_from positions.
        A loss over completion tokens needs nothing before the last prompt position.

    Returns:
      ModelOutput; `logits_BxLxV` is None without an LM head or with logits='none',
      `values_BxL` without a value head or with values='none'.
    """
    cfg = self.cfg
    for name, where in (('logits', logits), ('values', values)):
      if where not in ('all', 'last', 'none'):
        raise ValueError(f"Transformer({name}={where!r}): must be 'all', 'last' or 'none'")
    b, l = tokens_BxL.shape
    if not 0 <= hidden_from < l or (hidden_from and cache is not None):
      raise ValueError(f'Transformer(hidden_from={hidden_from}): must be in [0, {l}) and used without a cache')
    if mask_BxL is None:
      mask_BxL = jnp.ones((b, l), bool)
    mask_BxL = mask_BxL.astype(bool)
    if positions_BxL is None:
      positions_BxL = positions_from_mask(mask_BxL)

    if cache is None:
      slots_q = jnp.arange(l)
      valid_BxT = mask_BxL
      slots_k = slots_q
    else:
      if l > cache.size:
        raise ValueError(f'{l} input tokens do not fit a KV cache of {cache.size} slots')
      slots_q = cache_index + jnp.arange(l)
      valid_BxT = jax.lax.dynamic_update_slice_in_dim(cache.valid_BxT, mask_BxL, cache_index, axis=1)
      slots_k = jnp.arange(cache.size)
    visible_BxLxT = valid_BxT[:, None, :] & (slots_k[None, None, :] <= slots_q[None, :, None])
    n_keys = None
    if cache is not None and isinstance(cache_index, (int, np.integer)) and cache_index + l < cache.size:
      # Slots from cache_index + L on are never visible: with a static index (a prefill)
      # attention skips them. A traced index (a decode step) reads all T slots; the sampler
      # keeps T short by growing the cache in phases (`decode_spans`). Choosing a static
      # prefix per step with lax.switch measured slower on CPU: the slice is copied.
      n_keys = int(cache_index) + l

    x = self.embed[...].astype(cfg.compute_dtype)[tokens_BxL]
    x = sharding.constrain(x, ('batch', 'length', 'embed'))
    new_k, new_v = [], []
    rope = rope_tables(positions_BxL, cfg.head_dim, cfg.rope_theta)  # once, not once per layer
    for i, block in enumerate(self.layers):
      kv = None if cache is None else (cache.k[i], cache.v[i])
      q_from = hidden_from if i == len(self.layers) - 1 else 0
      x, new_kv = _call_block(block, cfg.remat, n_keys, q_from, x, positions_BxL, visible_BxLxT, kv, cache_index,
                              rope)
      if new_kv is not None:
        new_k.append(new_kv[0])
        new_v.append(new_kv[1])
    h_BxLxD = self.final_norm(x)

    logits_out = values_out = None
    if cfg.lm_head and logits != 'none':
      logits_out = self.lm_logits(h_BxLxD[:, -1:] if logits == 'last' else h_BxLxD)
    if cfg.value_head != 'none' and values != 'none':
      values_out = self.value_head(h_BxLxD[:, -1:] if values == 'last' else h_BxLxD)
    new_cache = None if cache is None else KVCache(tuple(new_k), tuple(new_v), valid_BxT)
    return ModelOutput(logits_out, values_out, h_BxLxD, new_cache)

  def lm_head_DxV(self) -> jax.Array:
    """The LM head's [D, V] weight in the compute dtype (the embedding's transpose if tied)."""
    if not self.cfg.lm_head:
      raise ValueError('model.lm_head=False: this model has no LM head')
    w_DxV = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
    return w_DxV.astype(self.cfg.compute_dtype)

  def lm_logits(self, h_BxLxD: jax.Array) -> jax.Array:
    """float32 logits [B, L, V] of final-norm hidden states (`ModelOutput.hidden_BxLxD`)."""
    logits_BxLxV = (h_BxLxD @ self.lm_head_DxV()).astype(jnp.float32)
    return sharding.constrain(logits_BxLxV, ('batch', 'length', 'vocab'))


def _call_block(block: Block, remat: str, n_keys: int | None, q_from: int, *args):
  if remat == 'none':
    return block(*args, n_keys=n_keys, q_from=q_from)
  # 'full' saves only the block inputs; 'dots' also keeps matmul outputs (less recompute).
  policy = {'full': None, 'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}[remat]
  # The static n_keys and q_from stay out of the traced arguments.
  return nnx.remat(lambda blk, *a: blk(*a, n_keys=n_keys, q_from=q_from), policy=policy)(block, *args)


def count_params(state) -> int:
  return sum(x.size for x in jax.tree.leaves(state))


def init_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
  """Builds a model on the default device (tests, notebooks). For meshes use `sharding.init_sharded`."""
  return Transformer(cfg, rngs=nnx.Rngs(params=seed))
