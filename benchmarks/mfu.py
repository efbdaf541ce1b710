"""Model FLOPs utilisation (MFU) of the SFT train step, and decode throughput.

  python benchmarks/mfu.py                                   # tiny model, any CPU, < 1 min
  python benchmarks/mfu.py --preset=1b --dtype=bfloat16      # ~1.2B Llama-3.2-1B shape, GPU/TPU
  python benchmarks/mfu.py --preset=1b --dtype=bfloat16 --batch=8 --remat=full --mesh=1,-1,1
  python benchmarks/mfu.py --preset=1b --dtype=bfloat16 --attention=cudnn  # cuDNN flash attention

Train step = `rlm_jax.training.sft.sft_step` (forward, completion-only cross-entropy,
backward, global-norm clip, AdamW) jitted with the state donated, on a mesh over all local
devices (default (1, -1, 1): FSDP; the batch is split over the devices).

FLOPs (PaLM appendix B convention; matmuls only, 2 FLOPs per multiply-add):
  N_mm   = matmul parameters = per layer [D·H·Dh + 2·D·KVH·Dh + H·Dh·D + 3·D·F] · n_layers
           + D·V (LM head; the embedding lookup is not a matmul)
  train  = 6 · N_mm · tokens  +  12 · n_layers · H · Dh · L · tokens
           (the attention term counts the full L×L score matrix, which this model computes;
           recomputation under remat is NOT counted: MFU, not hardware utilisation)
  decode = per generated token 2 · N_mm + 4 · n_layers · H · Dh · T, T = cache slots
           (prompt + new tokens: every step attends over all slots, masked), plus the prefill.
MFU = model FLOPs / (seconds · devices · peak). The XLA column is the compiled program's own
count (`compiled.cost_analysis()['flops']` · devices): it includes remat recomputation and
the optimizer, so XLA/model ≈ 1.0 without remat and up to 4/3 with full remat (the LM head
and the loss are not rematerialised: 1.26 for the tiny preset).

Peak (dense, per device) comes from a table by `device_kind` (H100 SXM / H200 989 TFLOP/s
bf16, A100 312, TPU v4 275, v5e 197, v5p 459, v6e 918; float32 on GPUs counts TF32 tensor-core
peak, on TPUs the bf16 one, as XLA's default precision uses them), or `--peak-tflops`. On CPU
it is measured: the best rate of a jitted square matmul in the run's dtype. Decode also shows
memory-bandwidth utilisation (weights + KV cache read per step / seconds / peak bandwidth).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rlm_jax import sharding  # pylint: disable=g-import-not-at-top
from rlm_jax.models.transformer import ModelConfig, Transformer
from rlm_jax.sampling.sampler import SamplingConfig, generate
from rlm_jax.training.sft import sft_step
from rlm_jax.training.state import OptimConfig, create_train_state, make_optimizer

PRESETS = {
    # name: (d_model, n_layers, n_heads, n_kv_heads, head_dim, d_ff, vocab, tie, seq, batch, remat)
    'tiny': (128, 2, 4, 2, 32, 352, 1024, False, 128, 8, 'none'),
    '125m': (768, 12, 12, 12, 64, 2048, 32000, False, 1024, 16, 'none'),
    '350m': (1024, 24, 16, 16, 64, 2816, 32000, False, 2048, 8, 'dots'),
    # Llama-3.2-1B shape: 1.24B parameters (0.26B of them the tied 128k-vocab embedding).
    # Batch 4 x 2048 with 'dots' remat (attention recomputed, projections kept) fits 80 GB.
    '1b': (2048, 16, 32, 8, 64, 8192, 128256, True, 2048, 4, 'dots'),
}

# Dense peak TFLOP/s per device: (substring of device_kind, lower-case) -> {dtype: peak}.
# float32 on NVIDIA = TF32 tensor cores; on TPU float32 matmuls run at bf16 rate by default.
PEAK_TFLOPS = [
    ('h100 pcie', {'bfloat16': 756.0, 'float16': 756.0, 'float32': 378.0}),
    ('h100', {'bfloat16': 989.4, 'float16': 989.4, 'float32': 494.7}),
    ('h200', {'bfloat16': 989.4, 'float16': 989.4, 'float32': 494.7}),
    ('a100', {'bfloat16': 312.0, 'float16': 312.0, 'float32': 156.0}),
    ('tpu v4', {'bfloat16': 275.0, 'float32': 275.0}),
    ('tpu v5 lite', {'bfloat16': 197.0, 'float32': 197.0}),
    ('tpu v5e', {'bfloat16': 197.0, 'float32': 197.0}),
    ('tpu v5p', {'bfloat16': 459.0, 'float32': 459.0}),
    ('tpu v5', {'bfloat16': 459.0, 'float32': 459.0}),  # v5p reports 'TPU v5'
    ('tpu v6 lite', {'bfloat16': 918.0, 'float32': 918.0}),
    ('tpu v6e', {'bfloat16': 918.0, 'float32': 918.0}),
]
# Peak memory bandwidth, TB/s per device.
PEAK_TBPS = [('h100 pcie', 2.0), ('h100', 3.35), ('h200', 4.8), ('a100', 2.0), ('tpu v4', 1.2),
             ('tpu v5 lite', 0.82), ('tpu v5e', 0.82), ('tpu v5p', 2.76), ('tpu v5', 2.76),
             ('tpu v6 lite', 1.64), ('tpu v6e', 1.64)]


def table_lookup(table, kind: str):
  kind = kind.lower()
  for key, value in table:
    if key in kind:
      return value
  return None


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--preset', default='tiny', choices=sorted(PRESETS))
  for name in ('d_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'd_ff', 'vocab',
               'seq_len', 'batch'):
    p.add_argument('--' + name.replace('_', '-'), type=int, default=None,
                   help='override the preset')
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'],
                 help='compute dtype')
  p.add_argument('--param-dtype', default='float32', choices=['float32', 'bfloat16'],
                 help='master weights (float32: bf16 compute with fp32 master weights)')
  p.add_argument('--remat', default=None, choices=['none', 'full', 'dots'])
  p.add_argument('--attention', default='einsum', choices=['einsum', 'xla', 'cudnn'],
                 help="train step's attention (model.attention; 'cudnn': fused flash attention, NVIDIA GPUs)")
  p.add_argument('--mesh', default='1,-1,1', help="('data', 'fsdp', 'tensor') sizes")
  p.add_argument('--steps', type=int, default=5, help='timed train steps')
  p.add_argument('--decode-batch', type=int, default=None, help='default: --batch')
  p.add_argument('--prompt-len', type=int, default=None, help='default: seq_len // 4')
  p.add_argument('--new-tokens', type=int, default=None, help='default: seq_len // 4')
  p.add_argument('--skip-decode', action='store_true')
  p.add_argument('--peak-tflops', type=float, default=0.0,
                 help='per-device peak; 0 = table by device kind (measured on CPU)')
  return p.parse_args(argv)


def model_config(args) -> tuple[ModelConfig, int, int]:
  d, n, h, kv, dh, ff, v, tie, seq, batch, remat = PRESETS[args.preset]
  pick = lambda flag, default: default if flag is None else flag
  cfg = ModelConfig(vocab_size=pick(args.vocab, v), d_model=pick(args.d_model, d),
                    n_layers=pick(args.n_layers, n), n_heads=pick(args.n_heads, h),
                    n_kv_heads=pick(args.n_kv_heads, kv), head_dim=pick(args.head_dim, dh),
                    d_ff=pick(args.d_ff, ff), tie_embeddings=tie, dtype=args.dtype,
                    param_dtype=args.param_dtype, remat=pick(args.remat, remat), attention=args.attention)
  return cfg, pick(args.seq_len, seq), pick(args.batch, batch)


def matmul_params(cfg: ModelConfig) -> int:
  d, h, kv, dh, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
  per_layer = d * h * dh + 2 * d * kv * dh + h * dh * d + 3 * d * f
  return cfg.n_layers * per_layer + d * cfg.vocab_size


def train_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
  tokens = batch * seq
  return (6.0 * matmul_params(cfg) * tokens
          + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq * tokens)


def decode_flops(cfg: ModelConfig, batch: int, prompt: int, new: int) -> float:
  slots = prompt + new
  attn = 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * slots  # per query token
  return batch * (prompt + new) * (2.0 * matmul_params(cfg) + attn)


def measured_cpu_peak(dtype: str, n: int = 1024, reps: int = 5) -> float:
  """Best TFLOP/s of a jitted [n, n] @ [n, n] chain (x8) on the first device."""
  a = jnp.ones((n, n), dtype) * 0.01

  @jax.jit
  def chain(x):
    for _ in range(8):
      x = x @ a
    return x

  chain(a).block_until_ready()
  best = math.inf
  for _ in range(reps):
    t = time.perf_counter()
    chain(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 8 * 2.0 * n**3 / best / 1e12


def _xla_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return None if not cost or 'flops' not in cost else float(cost['flops'])


def _temp_gib(compiled) -> float | None:
  try:
    m = compiled.memory_analysis()
    return None if m is None else (m.temp_size_in_bytes + m.argument_size_in_bytes) / 2**30
  except (AttributeError, NotImplementedError):
    return None


def _fmt(x, digits=3):
  if x is None:
    return '-'
  if 100 <= abs(x) < 1e9:
    return f'{x:,.0f}'
  if x == 0 or 1e-3 <= abs(x) < 100:
    return f'{x:.{digits}g}'
  return f'{x:.2e}'


def bench_train(cfg, seq, batch, mesh, rules, steps):
  init = lambda: Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, params = sharding.init_sharded(init, mesh, rules)
  tx = make_optimizer(OptimConfig(learning_rate=1e-4))
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, cfg.vocab_size, size=(batch, seq), dtype=np.int32)
  loss_mask = np.ones((batch, seq), bool)
  loss_mask[:, : seq // 4] = False  # a prompt quarter, as in SFT
  host = {'tokens': tokens, 'mask': np.ones((batch, seq), bool), 'loss_mask': loss_mask}
  with sharding.use_mesh_rules(mesh, rules):
    state = create_train_state(params, tx, mesh, rules)
    data = sharding.shard_batch(host, mesh, rules)
    t = time.perf_counter()
    compiled = jax.jit(sft_step, static_argnums=(0, 1), donate_argnums=(2,)).lower(
        graphdef, tx, state, data).compile()
    compile_s = time.perf_counter() - t
    state, metrics = compiled(state, data)  # warm-up
    float(metrics['loss'])
    t = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, data)
    loss = float(metrics['loss'])  # waits for the last step
    seconds = (time.perf_counter() - t) / steps
  xla = _xla_flops(compiled)
  return dict(seconds=seconds, compile_s=compile_s, loss=loss, gib=_temp_gib(compiled),
              xla_flops=None if xla is None else xla * mesh.size,
              params=sum(x.size for x in jax.tree.leaves(state.params)))


def bench_decode(cfg, batch, prompt_len, new_tokens, mesh, rules):
  cfg = dataclasses.replace(cfg, remat='none')
  graphdef, params = sharding.init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh,
                                           rules)
  scfg = SamplingConfig(max_new_tokens=new_tokens, eos_id=-1, pad_id=0, greedy=True)
  rng = np.random.default_rng(1)
  prompt = rng.integers(1, cfg.vocab_size, size=(batch, prompt_len), dtype=np.int32)
  mask = np.ones((batch, prompt_len), bool)
  fn = jax.jit(lambda p, x, m, k: generate(graphdef, p, x, m, k, scfg).tokens_BxT)
  with sharding.use_mesh_rules(mesh, rules):
    x, m = sharding.shard_batch((prompt, mask), mesh, rules)
    key = jax.random.key(0)
    t = time.perf_counter()
    compiled = fn.lower(params, x, m, key).compile()
    compile_s = time.perf_counter() - t
    compiled(params, x, m, key).block_until_ready()
    times = []
    for _ in range(3):
      t = time.perf_counter()
      compiled(params, x, m, key).block_until_ready()
      times.append(time.perf_counter() - t)
  seconds = min(times)
  slots = prompt_len + new_tokens
  itemsize = jnp.dtype(cfg.compute_dtype).itemsize
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  kv_bytes = 2 * cfg.n_layers * batch * slots * cfg.n_kv_heads * cfg.head_dim * itemsize
  return dict(seconds=seconds, compile_s=compile_s,
              flops=decode_flops(cfg, batch, prompt_len, new_tokens),
              bytes=new_tokens * (weight_bytes + kv_bytes))


def main(argv=None):
  args = parse_args(argv)
  cfg, seq, batch = model_config(args)
  mesh_shape = tuple(int(s) for s in args.mesh.split(','))
  mesh = sharding.make_mesh(sharding.MeshConfig(shape=mesh_shape))
  rules = sharding.DEFAULT_RULES
  n_dev = mesh.size
  kind = jax.devices()[0].device_kind
  platform = jax.devices()[0].platform
  if args.peak_tflops:
    peak, peak_src = args.peak_tflops, 'flag'
  elif platform == 'cpu':
    peak, peak_src = measured_cpu_peak(args.dtype), f'measured {args.dtype} matmul'
  else:
    entry = table_lookup(PEAK_TFLOPS, kind)
    if entry is None or args.dtype not in entry:
      raise SystemExit(f"error: no peak for device_kind={kind!r}, dtype={args.dtype}; pass "
                       f"--peak-tflops")
    peak, peak_src = entry[args.dtype], f'table, {args.dtype}'
  bw = table_lookup(PEAK_TBPS, kind)

  n_mm = matmul_params(cfg)
  print(f'device: {kind} x{n_dev} ({platform}), mesh {dict(mesh.shape)}; peak '
        f'{_fmt(peak)} TFLOP/s per device ({peak_src})')
  print(f'model: preset {args.preset}: D={cfg.d_model} layers={cfg.n_layers} '
        f'H={cfg.n_heads}/KVH={cfg.n_kv_heads} Dh={cfg.head_dim} F={cfg.d_ff} V={cfg.vocab_size} '
        f'tied={cfg.tie_embeddings}; matmul params N_mm={n_mm / 1e6:.1f}M; '
        f'compute {cfg.dtype}, params {cfg.param_dtype}, remat {cfg.remat}, attention {cfg.attention}')

  tr = bench_train(cfg, seq, batch, mesh, rules, args.steps)
  flops = train_flops(cfg, batch, seq)
  tokens = batch * seq
  achieved = flops / tr['seconds'] / n_dev / 1e12
  rows = [('train step', f'{batch}x{seq}', tr['seconds'] * 1e3, tokens / tr['seconds'],
           flops / 1e12, None if tr['xla_flops'] is None else tr['xla_flops'] / 1e12, achieved,
           achieved / peak, None, tr['compile_s'])]
  if not args.skip_decode:
    db = args.decode_batch or batch
    pl = args.prompt_len or max(1, seq // 4)
    nt = args.new_tokens or max(1, seq // 4)
    dec = bench_decode(cfg, db, pl, nt, mesh, rules)
    d_ach = dec['flops'] / dec['seconds'] / n_dev / 1e12
    mbu = None if bw is None else dec['bytes'] / dec['seconds'] / n_dev / (bw * 1e12)
    rows.append(('decode (greedy)', f'{db}x({pl}+{nt})', dec['seconds'] * 1e3,
                 db * nt / dec['seconds'], dec['flops'] / 1e12, None, d_ach, d_ach / peak, mbu,
                 dec['compile_s']))

  header = ('what', 'BxL', 'ms/call', 'tokens/s', 'model TFLOP', 'XLA TFLOP', 'TFLOP/s/dev',
            'MFU', 'mem BW util', 'compile s')
  cells = [header] + [tuple(r[:2]) + tuple(
      f'{v:.1%}' if i in (7, 8) and v is not None else _fmt(v) for i, v in enumerate(r)
      if i >= 2) for r in rows]
  widths = [max(len(str(c[i])) for c in cells) for i in range(len(header))]
  for j, c in enumerate(cells):
    print('  '.join(str(x).rjust(w) if i else str(x).ljust(w)
                    for i, (x, w) in enumerate(zip(c, widths))))
    if j == 0:
      print('  '.join('-' * w for w in widths))
  ratio = None if tr['xla_flops'] is None else tr['xla_flops'] / flops
  print(f'train: loss {tr["loss"]:.3f} after {args.steps + 1} steps; params '
        f'{tr["params"] / 1e6:.1f}M; XLA/model FLOPs = {_fmt(ratio)} (remat {cfg.remat}: '
        f'recompute and optimizer are in XLA\'s count only); XLA buffers (arguments + temp) '
        f'{_fmt(tr["gib"])} GiB per device')


if __name__ == '__main__':
  main()
