"""FLOPs of the RL log-prob pass (forward + backward), by XLA's cost analysis of the compiled program.

`rollout.completion_logprobs` runs the last layer from the last prompt position on
(`Transformer(hidden_from=Lp - 1)`); the other column is the same pass with the last layer at
every position (`hidden_from=0`, then the slice). Counted, not timed: the figure does not move
with the machine's load.

  python benchmarks/logprob_flops.py          # the shape of benchmarks/grpo.py
  python benchmarks/logprob_flops.py --rows=64 --prompt-len=100 --completion-len=64
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from rlm_jax.models import transformer as tfm
from rlm_jax.models.transformer import positions_from_mask
from rlm_jax.training import losses
from rlm_jax.training.rollout import completion_logprobs


def _all_positions(gd, params, seq, mask, lp):
  model = nnx.merge(gd, params)
  out = model(seq, positions_from_mask(mask), mask, logits='none')
  return losses.lm_head_logprobs(out.hidden_BxLxD[:, lp - 1:-1], model.lm_head_DxV(), seq[:, lp:], 1.0, 1024)


def gflops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost['flops'] / 1e9


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--rows', type=int, default=32)
  p.add_argument('--prompt-len', type=int, default=32)
  p.add_argument('--completion-len', type=int, default=64)
  p.add_argument('--layers', type=int, default=4)
  args = p.parse_args()
  cfg = tfm.ModelConfig(vocab_size=1024, d_model=256, n_layers=args.layers, n_heads=4, n_kv_heads=2, head_dim=64,
                        d_ff=704)
  gd, params = nnx.split(tfm.init_model(cfg))
  lp, length = args.prompt_len, args.prompt_len + args.completion_len
  seq, mask = jnp.ones((args.rows, length), jnp.int32), jnp.ones((args.rows, length), bool)
  passes = {'last layer from the last prompt position': lambda p: completion_logprobs(gd, p, seq, mask, lp)[0].sum(),
            'last layer at every position': lambda p: _all_positions(gd, p, seq, mask, lp)[0].sum()}
  print(f'{args.layers} layers, d=256, vocab 1024; {args.rows} rows x ({lp} prompt + {args.completion_len}) tokens')
  print('| pass | forward GFLOP | forward + backward GFLOP |')
  print('|---|---|---|')
  for name, fn in passes.items():
    print(f'| {name} | {gflops(fn, params):.2f} | {gflops(jax.grad(fn), params):.2f} |')


if __name__ == '__main__':
  main()
