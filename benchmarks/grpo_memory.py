"""Peak host memory (max RSS) of one GRPO iteration with a large vocabulary.

The LM head is the memory hog of a GRPO update: float32 logits [B·G, L, V] for every
position of every row. This script runs `grpo_iteration_jit` once (compile + run) on a small
trunk with SmolLM2's vocabulary (49152) and prints the process's peak RSS, so the effect of
the log-prob path (LM head over completion positions only, in chunks) can be read off:

  python benchmarks/grpo_memory.py                       # default chunking
  python benchmarks/grpo_memory.py --chunk_tokens=0      # one chunk: whole [B·G, T, V]
  PYTHONPATH=<checkout of an older commit> python benchmarks/grpo_memory.py   # older code

On CPU the compiled program's buffers live in the process heap, so max RSS tracks them.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import time

import jax
import jax.numpy as jnp
from flax import nnx

from rlm_jax.models import transformer as tfm
from rlm_jax.sampling.sampler import SamplingConfig
from rlm_jax.training import grpo, losses
from rlm_jax.training.rewards import RewardConfig
from rlm_jax.training.state import OptimConfig, create_train_state, make_optimizer


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--vocab', type=int, default=49152)
  ap.add_argument('--prompts', type=int, default=8)
  ap.add_argument('--group', type=int, default=8)
  ap.add_argument('--prompt_len', type=int, default=64)
  ap.add_argument('--completion_len', type=int, default=64)
  ap.add_argument('--num_iterations', type=int, default=2)
  ap.add_argument('--chunk_tokens', type=int, default=None, help='GRPOSetup.logprob_chunk_tokens (default: its default)')
  args = ap.parse_args()

  cfg = tfm.ModelConfig(vocab_size=args.vocab, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=32,
                        d_ff=128)
  gdef, params = nnx.split(tfm.init_model(cfg, seed=0))
  tx = make_optimizer(OptimConfig(learning_rate=1e-4))
  loss = losses.GRPOConfig(max_completion_length=args.completion_len, num_iterations=args.num_iterations)
  sampling = SamplingConfig(max_new_tokens=args.completion_len, eos_id=-1, pad_id=0, temperature=1.0)
  score = lambda out, batch: jnp.where(out.tokens_BxT[:, 0] % 2 == 0, 2, 0)
  setup = grpo.GRPOSetup(group_size=args.group, loss=loss, sampling=sampling, reward=RewardConfig(), step_id=3,
                         score_fn=score)
  if args.chunk_tokens is not None:
    setup = dataclasses.replace(setup, logprob_chunk_tokens=args.chunk_tokens)
  b, lp = args.prompts, args.prompt_len
  batch = {'prompt': jax.random.randint(jax.random.key(1), (b, lp), 4, args.vocab),
           'prompt_mask': jnp.ones((b, lp), bool)}
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  state = create_train_state(params, tx)
  t0 = time.perf_counter()
  state, m = grpo.grpo_iteration_jit(gdef, tx, setup, state, None, batch, jax.random.key(2))
  jax.block_until_ready(m)
  wall = time.perf_counter() - t0
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  n = b * args.group
  full = n * (lp + args.completion_len) * args.vocab * 4 / 2**20
  print(f'rows {n} | L {lp}+{args.completion_len} | V {args.vocab} | chunk_tokens {args.chunk_tokens} | '
        f'f32 [B·G, L, V] would be {full:.0f} MiB | max RSS before {rss0:.0f} MiB, after {rss:.0f} MiB | '
        f'compile+run {wall:.1f} s | loss {float(m["loss"]):.4g}')


if __name__ == '__main__':
  main()
