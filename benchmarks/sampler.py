"""Decode throughput of `rlm_jax.sampling.sample` vs HF `generate` and tunix's sampler (CPU).

One small Llama-shaped model (default: 4 layers, d=256, 4 query / 2 kv heads, vocab 1024) is
initialised once, exported with `rlm_jax.models.hf.export_hf`, and the same weights run in
  * ours:  `sample` (jitted prefill + `lax.while_loop` decode), greedy;
  * HF:    transformers `LlamaForCausalLM.from_pretrained(export)` + `generate(do_sample=False)`
           (PyTorch CPU, KV cache);
  * tunix: `tunix.generate.sampler.Sampler` on tunix's own `Llama3` model, loaded from the same
           export with tunix's safetensors loader; run in its own virtualenv (--tunix-python)
           as a subprocess, because it pins its own jax/flax.
Every row decodes exactly --new-tokens tokens (no EOS). Timings exclude compilation/warm-up,
take the median of --reps calls and wait for the result (block_until_ready / host copy).
tok/s = batch * new_tokens / wall seconds per call (prefill included). tok/cpu-s divides by
the CPU seconds the process used instead (all its threads): on a shared machine it is the
steadier measure of work per token. HF runs with --hf-threads torch threads (default 1: on a
busy 2-core machine 2 OpenMP threads spin-wait and were ~10x slower). The "agree" columns
give the fraction of generated tokens equal to ours, a check that all run the same model.

  python benchmarks/sampler.py                       # all three, batches 1,16,64
  python benchmarks/sampler.py --tunix-python=none   # ours and HF only
  python benchmarks/sampler.py --hf_model=DIR --batches=64 --prompt-len=100 --new-tokens=64 --threads=2
      # real model: ours vs transformers on DIR's weights, each side in its own process pinned
      # to the same --threads cpus; tok/s, tok per CPU-second, peak RSS per side, decode step ms
      # and its GFLOP/s as a share of the measured float32 matmul peak
  python benchmarks/sampler.py --hf_model=DIR --batches=64 --num-samples=8 --prompt-len=100 --new-tokens=64 --threads=2
      # a GRPO-style group: 8 samples of each of 8 prompts (ours: one prefill per prompt; HF:
      # generate(num_return_sequences=8))
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers as peer_setup  # pylint: disable=g-import-not-at-top,wrong-import-position

PAD = 0
NO_EOS = -1  # an id no model produces: every row runs to --new-tokens


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batches', default='1,16,64')
  p.add_argument('--prompt-len', type=int, default=32)
  p.add_argument('--new-tokens', type=int, default=128)
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--d-model', type=int, default=256)
  p.add_argument('--heads', type=int, default=4)
  p.add_argument('--kv-heads', type=int, default=2)
  p.add_argument('--head-dim', type=int, default=64)
  p.add_argument('--d-ff', type=int, default=704)
  p.add_argument('--vocab', type=int, default=1024)
  p.add_argument('--reps', type=int, default=3)
  p.add_argument('--tunix-python', default=peer_setup.tunix_python(),
                 help=f"python of a virtualenv with google-tunix==0.1.7 (`{peer_setup.SETUP} tunix`); 'none' to skip")
  p.add_argument('--skip-hf', action='store_true')
  p.add_argument('--hf-reps', type=int, default=1, help='timed HF calls per batch (they are slow)')
  p.add_argument('--hf-threads', type=int, default=1,
                 help='torch threads; 2 OpenMP threads on a busy 2-core machine spin-wait and ran 10x slower')
  p.add_argument('--hf_model', default='',
                 help='real-model mode: an HF Llama/Qwen2 folder (config.json + safetensors); ours vs '
                      'transformers on its weights, each in its own process pinned to --threads cpus')
  p.add_argument('--threads', type=int, default=0, help='real-model mode: cpus for each side (0 = all)')
  p.add_argument('--num-samples', type=int, default=1,
                 help='real-model mode: samples per prompt (a GRPO group): batch/G distinct prompts, '
                      'temperature-1 sampling; ours prefills each prompt once, HF `num_return_sequences`')
  p.add_argument('--worker', default='', help=argparse.SUPPRESS)  # internal: 'tunix', 'real-ours', 'real-hf'
  p.add_argument('--workdir', default='', help=argparse.SUPPRESS)
  return p.parse_args(argv)


def _median_time(fn, reps: int) -> tuple[float, float]:
  """Median wall seconds and median CPU seconds (all threads of this process) of `fn()`."""
  wall, cpu = [], []
  for _ in range(reps):
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - w0)
    cpu.append(time.process_time() - c0)
  return statistics.median(wall), statistics.median(cpu)


def _result(batch, args, wall_cpu, **extra):
  wall, cpu = wall_cpu
  n = batch * args.new_tokens
  return dict(sec=wall, tok_s=n / wall, tok_cpu_s=n / cpu, **extra)


def _prompts(batch: int, args) -> np.ndarray:
  rng = np.random.RandomState(batch)
  return rng.randint(3, args.vocab, (batch, args.prompt_len)).astype(np.int32)


# ----------------------------------------------------------------------------- ours + HF


def build_and_export(args, out_dir: str):
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from rlm_jax.models import hf  # pylint: disable=g-import-not-at-top
  from rlm_jax.models.transformer import ModelConfig, init_model  # pylint: disable=g-import-not-at-top

  # rope_theta 1e6: tunix's Llama3 applies RoPE with its built-in 1e6 whatever the config says.
  cfg = ModelConfig(
      vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
      n_kv_heads=args.kv_heads, head_dim=args.head_dim, d_ff=args.d_ff, rope_theta=1e6,
      norm_eps=1e-5, init_std=0.05,
  )
  graphdef, state = nnx.split(init_model(cfg, seed=0))
  hf.export_hf(graphdef, state, out_dir, {'bos_token_id': 1, 'eos_token_id': 2, 'pad_token_id': PAD})
  return cfg, graphdef, state


def run_ours(graphdef, state, batches, args):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from rlm_jax.sampling.sampler import SamplingConfig, sample  # pylint: disable=g-import-not-at-top

  scfg = SamplingConfig(max_new_tokens=args.new_tokens, eos_id=NO_EOS, pad_id=PAD, greedy=True)
  out = {}
  for b in batches:
    tokens = jnp.asarray(_prompts(b, args))
    mask = jnp.ones(tokens.shape, bool)
    call = lambda: sample(graphdef, state, tokens, mask, jax.random.key(0), scfg).tokens_BxT.block_until_ready()
    t0 = time.perf_counter()
    generated = np.asarray(call())  # compile + first run
    compile_s = time.perf_counter() - t0
    out[b] = _result(b, args, _median_time(call, args.reps), compile_s=compile_s, tokens=generated)
  return out


def run_hf(path, batches, args):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.hf_threads)
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
  model.generation_config.eos_token_id = None
  out = {}
  for b in batches:
    ids = torch.tensor(_prompts(b, args), dtype=torch.int64)
    mask = torch.ones_like(ids)

    def call(n=args.new_tokens):
      with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, pad_token_id=PAD, use_cache=True)

    call(4)  # warm-up (torch has no compile step; this pays the first-call costs)
    generated = []
    time_one = lambda: generated.append(call().numpy()[:, args.prompt_len:])
    out[b] = _result(b, args, _median_time(time_one, args.hf_reps), tokens=generated[0])
  return out, f'torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}'


# ----------------------------------------------------------------------------- tunix


class _IdTokenizer:
  """The methods tunix's TokenizerAdapter needs; prompts are passed as ids, so unused mostly."""

  def encode(self, text, **kw):
    return [int(t) for t in text.split()]

  def decode(self, ids, **kw):
    return ' '.join(map(str, ids))

  def bos_id(self):
    return 1

  def eos_id(self):
    return 2

  def pad_id(self):
    return PAD


def tunix_worker(args):
  """Runs inside the tunix virtualenv: prints one JSON line with timings and tokens."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  from tunix.generate import sampler as tsampler  # pylint: disable=g-import-not-at-top
  from tunix.models.llama3 import model as tmodel  # pylint: disable=g-import-not-at-top
  from tunix.models.llama3 import params as tparams  # pylint: disable=g-import-not-at-top

  cfg = tmodel.ModelConfig(
      num_layers=args.layers, vocab_size=args.vocab, embed_dim=args.d_model, hidden_dim=args.d_ff,
      num_heads=args.heads, head_dim=args.head_dim, num_kv_heads=args.kv_heads, rope_theta=1_000_000,
      norm_eps=1e-5, shd_config=tmodel.ShardingConfig.get_default_sharding(is_sampling=True),
  )
  model = tparams.create_model_from_safe_tensors(args.workdir, cfg)
  cache = tsampler.CacheConfig(cache_size=args.prompt_len + args.new_tokens, num_layers=args.layers,
                               num_kv_heads=args.kv_heads, head_dim=args.head_dim)
  sampler = tsampler.Sampler(model, _IdTokenizer(), cache)
  sampler.eos_ids = jnp.array([NO_EOS])
  total = args.prompt_len + args.new_tokens
  out = {}
  for b in [int(x) for x in args.batches.split(',')]:
    prompts = jnp.asarray(_prompts(b, args))

    # The device part of Sampler.__call__ (ids in, token buffer out), without its host-side
    # string tokenisation and per-row detokenisation.
    def call():
      st = sampler.init_sample_state(prompts, total_sampling_steps=total, include_logits=False,
                                     forbidden_token_ids=None, temperature=0.0, top_p=None, top_k=None,
                                     seed=jax.random.PRNGKey(0), beam_size=None)
      st = sampler._compiled_prefill_fn(sampler._flattened_transformer_state, st, None, echo=False)  # pylint: disable=protected-access
      st = sampler._compiled_decode_fn(sampler._flattened_transformer_state, st)  # pylint: disable=protected-access
      return st.token_buffer.block_until_ready()

    t0 = time.perf_counter()
    buf = np.asarray(call())
    compile_s = time.perf_counter() - t0
    wall_cpu = _median_time(call, args.reps)
    # Token t of the answer sits at buffer column prompt_len + t (the prefill writes the first).
    gen = buf[:, args.prompt_len: args.prompt_len + args.new_tokens]
    out[b] = _result(b, args, wall_cpu, compile_s=compile_s, tokens=gen.tolist())
  info = f'google-tunix {metadata.version("google-tunix")}, jax {jax.__version__}'
  print('TUNIX_RESULT ' + json.dumps({'info': info, 'results': out}))


def run_tunix(path, args):
  py = args.tunix_python
  if py in ('', 'none'):
    return None, 'not available: skipped (--tunix-python=none)'
  if not os.path.exists(py):
    return None, peer_setup.missing('tunix', py)
  cmd = [py, os.path.abspath(__file__), '--worker=tunix', f'--workdir={path}'] + [
      a for a in sys.argv[1:] if not a.startswith(('--worker', '--workdir', '--tunix-python'))
  ]
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'XLA_FLAGS')}
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, check=False)
  for line in proc.stdout.splitlines():
    if line.startswith('TUNIX_RESULT '):
      res = json.loads(line[len('TUNIX_RESULT '):])
      return {int(b): dict(r, tokens=np.asarray(r['tokens'])) for b, r in res['results'].items()}, res['info']
  tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
  return None, f'not available: tunix run failed (exit {proc.returncode}): {tail}'


# ----------------------------------------------------------------------------- real model


def _pin(args):
  """Both sides of the real-model mode run on the same cpus (before jax / torch start)."""
  n = args.threads or os.cpu_count()
  os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:n]))
  return n


def _real_prompts(b, args, vocab):
  rng = np.random.RandomState(b)
  return rng.randint(3, min(vocab, 32000), (b, args.prompt_len)).astype(np.int32)


def real_worker(args):
  """One side of the real-model mode; prints one JSON line (timings, tokens, peak RSS)."""
  import resource  # pylint: disable=g-import-not-at-top
  n = _pin(args)
  with open(os.path.join(args.hf_model, 'config.json')) as f:
    vocab = json.load(f)['vocab_size']
  out = {}
  if args.worker == 'real-ours':
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from rlm_jax.models import hf  # pylint: disable=g-import-not-at-top
    from rlm_jax.sampling.sampler import SamplingConfig, sample  # pylint: disable=g-import-not-at-top
    import mfu  # pylint: disable=g-import-not-at-top  (benchmarks/mfu.py: FLOP counts, matmul peak)
    from flax import nnx  # pylint: disable=g-import-not-at-top
    graphdef, state = hf.load_hf(args.hf_model)
    g = args.num_samples
    info = f'jax {jax.__version__}'
    mcfg = nnx.merge(graphdef, state).cfg
    out_peak = mfu.measured_cpu_peak('float32')
    for b in [int(x) for x in args.batches.split(',')]:
      tokens = jnp.asarray(_real_prompts(b // g, args, vocab))

      def call(k=args.new_tokens):
        scfg = SamplingConfig(max_new_tokens=k, eos_id=NO_EOS, pad_id=PAD, greedy=g == 1)
        return sample(graphdef, state, tokens, jnp.ones(tokens.shape, bool), jax.random.key(0), scfg,
                      num_samples=g).tokens_BxT.block_until_ready()

      t0 = time.perf_counter()
      generated = np.asarray(call())
      compile_s = time.perf_counter() - t0
      call(1)  # compile the prefill-only call
      res = _result(b, args, _median_time(call, args.reps), compile_s=compile_s, tokens=generated.tolist())
      out[b] = dict(res, **_decode_step(res, _median_time(lambda: call(1), args.reps)[0], b, args,
                                        _decode_flops_per_row(mfu, mcfg, args), out_peak))
  else:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(n)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_model, dtype=torch.float32,
                                                              local_files_only=True).eval()
    model.generation_config.eos_token_id = None
    info = f'torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}'
    g = args.num_samples
    for b in [int(x) for x in args.batches.split(',')]:
      ids = torch.tensor(_real_prompts(b // g, args, vocab), dtype=torch.int64)
      sampling = dict(do_sample=True, num_return_sequences=g, temperature=1.0, top_k=0) if g > 1 else dict(
          do_sample=False)

      def call(k=args.new_tokens):
        torch.manual_seed(0)
        with torch.inference_mode():
          return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=k,
                                min_new_tokens=k, pad_token_id=PAD, use_cache=True, **sampling)

      call(2)
      generated = []
      timed = lambda: generated.append(call().numpy()[:, args.prompt_len:])
      res = _result(b, args, _median_time(timed, args.hf_reps), tokens=generated[0].tolist())
      out[b] = dict(res, **_decode_step(res, _median_time(lambda: call(1), args.hf_reps)[0], b, args, None, None))
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print('REAL_RESULT ' + json.dumps({'info': info, 'threads': n, 'rss_mib': rss, 'results': out}))


def _decode_flops_per_row(mfu, cfg, args) -> float:
  """FLOPs of the decode steps of one row: every matmul weight once per token, attention over
  the mean filled context (prompt + new/2)."""
  attn = 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * (args.prompt_len + args.new_tokens / 2)
  return args.new_tokens * (2.0 * mfu.matmul_params(cfg) + attn)


def _decode_step(res, prefill_s, rows, args, flops_per_row, peak_tflops):
  """Seconds per decode step: (full call - a 1-token call) / (new_tokens - 1), the prefill and
  the first token cancel; with the step's FLOPs, the achieved GFLOP/s and its share of the
  measured float32 matmul peak (`benchmarks/mfu.py`)."""
  step = max(res['sec'] - prefill_s, 1e-9) / max(args.new_tokens - 1, 1)
  out = {'step_ms': 1e3 * step, 'prefill_s': prefill_s}
  if flops_per_row is not None:
    gflops = rows * flops_per_row / args.new_tokens / step / 1e9
    out.update(step_gflops=gflops, peak_gflops=1e3 * peak_tflops, peak_frac=gflops / (1e3 * peak_tflops))
  return out


def run_real(args):
  """Ours vs transformers on the weights in --hf_model, one process each (peak RSS per side)."""
  res = {}
  for side in ('real-ours', 'real-hf'):
    cmd = [sys.executable, os.path.abspath(__file__), f'--worker={side}'] + [
        a for a in sys.argv[1:] if not a.startswith('--worker')]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    line = [l for l in proc.stdout.splitlines() if l.startswith('REAL_RESULT ')]
    if not line:
      raise SystemExit(f'{side} failed:\n{proc.stderr[-3000:]}')
    res[side] = json.loads(line[0][len('REAL_RESULT '):])
  o, h = res['real-ours'], res['real-hf']
  g = args.num_samples
  how = 'greedy' if g == 1 else f'{g} samples per prompt (batch/{g} prompts), temperature 1'
  print(f'model: {args.hf_model}; prompt {args.prompt_len} random ids, {args.new_tokens} new tokens, {how}, '
        f'no EOS; {o["threads"]} cpus each side; ours: {o["info"]}; hf: {h["info"]}')
  cols = ('batch', 'ours tok/s', 'HF tok/s', 'ours/HF', 'ours tok/cpu-s', 'HF tok/cpu-s', 'ours/HF cpu',
          'ours s', 'HF s', 'ours step ms', 'HF step ms', 'ours GFLOP/s', 'of peak', 'agree')
  print(' | '.join(cols))
  for b in o['results']:
    a, c = o['results'][b], h['results'][b]
    agree = float((np.asarray(a['tokens']) == np.asarray(c['tokens'])).mean()) if g == 1 else None
    row = [b, f'{a["tok_s"]:.0f}', f'{c["tok_s"]:.0f}', f'{a["tok_s"] / c["tok_s"]:.2f}', f'{a["tok_cpu_s"]:.0f}',
           f'{c["tok_cpu_s"]:.0f}', f'{a["tok_cpu_s"] / c["tok_cpu_s"]:.2f}', f'{a["sec"]:.2f}', f'{c["sec"]:.2f}',
           f'{a["step_ms"]:.0f}', f'{c["step_ms"]:.0f}', f'{a["step_gflops"]:.0f}', f'{a["peak_frac"]:.2f}',
           _fmt(agree, '.3f')]
    print(' | '.join(str(v).rjust(len(k)) for v, k in zip(row, cols)))
  peak = next(iter(o['results'].values()))['peak_gflops']
  print(f'peak RSS MiB (whole process, all batches): ours {o["rss_mib"]:.0f}, HF {h["rss_mib"]:.0f}; '
        f'float32 matmul peak measured in the ours process: {peak:.0f} GFLOP/s ({o["threads"]} cpus); step = '
        f'(full call - 1-token call) / (new tokens - 1)')


# ----------------------------------------------------------------------------- main


def _fmt(x, spec):
  return '-' if x is None else format(x, spec)


def main(argv=None):
  args = parse_args(argv)
  if args.worker == 'tunix':
    return tunix_worker(args)
  if args.worker in ('real-ours', 'real-hf'):
    return real_worker(args)
  if args.hf_model:
    return run_real(args)
  # Run from a checkout without installing: the repository root holds the package.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax  # pylint: disable=g-import-not-at-top

  batches = [int(x) for x in args.batches.split(',')]
  with tempfile.TemporaryDirectory() as tmp:
    cfg, graphdef, state = build_and_export(args, tmp)
    print(f'model: {cfg.n_layers} layers, d={cfg.d_model}, heads {cfg.n_heads}/{cfg.n_kv_heads} (GQA), '
          f'head_dim {cfg.head_dim}, d_ff {cfg.d_ff}, vocab {cfg.vocab_size}, fp32; prompt {args.prompt_len}, '
          f'{args.new_tokens} new tokens, greedy, no EOS; median of {args.reps}')
    print(f'ours: jax {jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} device), '
          f'{os.cpu_count()} cpus')
    tunix, tunix_info = run_tunix(tmp, args)  # before ours, so the two jax processes never overlap
    print(f'tunix: {tunix_info}')
    ours = run_ours(graphdef, state, batches, args)
    hf_res, hf_info = (None, 'skipped') if args.skip_hf else run_hf(tmp, batches, args)
    print(f'hf: {hf_info}')

  print()
  cols = ('batch', 'ours tok/s', 'HF tok/s', 'tunix tok/s', 'ours/HF', 'ours/tunix',
          'ours tok/cpu-s', 'HF tok/cpu-s', 'tunix tok/cpu-s', 'agree HF', 'agree tunix')
  print(' | '.join(cols))
  for b in batches:
    o = ours[b]
    h = hf_res[b] if hf_res else None
    t = tunix[b] if tunix else None
    agree = lambda r: None if r is None else float((r['tokens'] == o['tokens']).mean())
    row = [str(b), _fmt(o['tok_s'], '.0f'), _fmt(h and h['tok_s'], '.0f'), _fmt(t and t['tok_s'], '.0f'),
           _fmt(h and o['tok_s'] / h['tok_s'], '.2f'), _fmt(t and o['tok_s'] / t['tok_s'], '.2f'),
           _fmt(o['tok_cpu_s'], '.0f'), _fmt(h and h['tok_cpu_s'], '.0f'), _fmt(t and t['tok_cpu_s'], '.0f'),
           _fmt(agree(h), '.3f'), _fmt(agree(t), '.3f')]
    print(' | '.join(v.rjust(len(c)) for v, c in zip(row, cols)))
  compile_ours = ', '.join('B=%d: %.1f' % (b, ours[b]['compile_s']) for b in batches)
  compile_tunix = ', '.join('B=%d: %.1f' % (b, tunix[b]['compile_s']) for b in batches) if tunix else '-'
  print(f'compile+first call s: ours {compile_ours}; tunix {compile_tunix}')


if __name__ == '__main__':
  main()
