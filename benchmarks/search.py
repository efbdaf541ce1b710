"""Search throughput: (a) MCTS bookkeeping vs mctx with a trivial model, (b) overhead with a real
tiny transformer.

  python benchmarks/search.py            # both parts, prints two tables
  python benchmarks/search.py --part a   # only the mctx comparison
  python benchmarks/search.py --part b --b-batch=1024   # B*W*K = 8192 rows per simulation (GPU)

(a) Trivial model (random candidates / values, no network), K = 16 actions or candidate steps,
    S = 64 simulations, B = 256 and B = 1024 trees. mctx `gumbel_muzero_policy` expands one
    node per tree per simulation (one `recurrent_fn` row). Our MCTS expands up to W leaves per
    tree per simulation, each into K evaluated children. "leaf exp/s" counts expansions (policy
    rows of K candidates; mctx: recurrent_fn rows), "nodes/s" counts created, evaluated nodes.
(b) A tiny random Transformer (char vocab) as policy + value head at B = 256, with node states
    always at the widest width ('full') and at widths by depth ('halving', the default; the
    column "per simulation" lists the children's state width of each simulation); the
    children's values read from the policy's decode ('decode', actor-critic) or by the same
    weights as a separate value model ('value pass': each leaf's state read once for its K
    children, `SearchModel.extension_value_fn`; 'whole states': over every child state). The same
    policy / value calls the search makes, at the same widths, are timed alone in one compiled
    program whose inputs depend on the previous call's outputs (nothing can be hoisted); the
    rest of the search's time is bookkeeping (selection, tree writes, backup, state building).
    Cross-check: the same search with a trivial model (random steps of the same width) is pure
    bookkeeping.

Timings: wall clock and process CPU time (all threads) after one warm-up (compile) run. Part (a):
the median over max(--repeats, 10) rounds, each round running every search once in turn (so
mctx and ours see the same machine load); part (b): the minimum over --repeats runs. On a
shared machine the CPU-time ratio is the steadier one.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import mctx
from flax import nnx

from rlm_jax.search import expansion
from rlm_jax.search import mcts as mcts_lib
from rlm_jax.search.base import NodeBatch, SearchModel, Steps


def _time(fn, *args, repeats: int) -> tuple[float, float]:
  """(wall, process CPU) seconds of one call: the minimum over `repeats` runs after a warm-up.

  The minimum is the least disturbed run; on a shared machine the CPU time (all threads of
  this process) is the steadier of the two numbers.
  """
  jax.block_until_ready(fn(*args))  # compile + warm up
  wall, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return min(wall), min(cpu)


# ------------------------------------------------------------------------------------------
# (a) Trivial models.


def trivial_model(vocab: int = 16, step_tokens: int = 1) -> SearchModel:
  """Random steps and values; both read the node states so none of the search's prefix
  building is optimised away."""

  def policy_fn(params, key, nodes: NodeBatch, num, *, to_end, greedy):
    del params, to_end, greedy
    m = nodes.tokens_MxT.shape[0]
    salt = (nodes.tokens_MxT[:, -1:] + nodes.depth_M[:, None])[..., None]
    tok = (jax.random.randint(key, (m, num, step_tokens), 0, vocab) + salt) % vocab + 4
    logp = jax.random.normal(jax.random.fold_in(key, 1), (m, num))
    # Lengths and terminal flags depend on the sample as they do for a real policy (always
    # the full width and False here: tok >= 4).
    length = jnp.minimum(tok[..., 0], 0) + step_tokens
    return Steps(tok.astype(jnp.int32), length, logp, tok[..., 0] < 0)

  def value_fn(params, nodes: NodeBatch):
    del params
    v = jnp.sin(nodes.tokens_MxT[:, -1].astype(jnp.float32) * 12.9898 + nodes.depth_M)
    return jnp.broadcast_to(v[:, None], nodes.tokens_MxT.shape)

  return SearchModel(policy_fn, value_fn, None, pad_id=0, eos_id=2, step_id=3)


def build_ours(b: int, k: int, s: int, w: int):
  """(call, expansions, nodes) of our search on B trees."""
  cfg = mcts_lib.MCTSConfig(num_simulations=s, num_children=k, num_walkers=w, max_depth=16,
                            merge_duplicates=False, gamma=1.0)
  model = trivial_model(k)
  fn = jax.jit(functools.partial(mcts_lib.mcts_search, model=model, config=cfg))
  prompt = jnp.full((b, 1), 5, jnp.int32)
  mask = jnp.ones((b, 1), bool)
  call = lambda: fn(None, jax.random.key(0), prompt, mask)
  t = jax.device_get(call().tree)
  expansions = int((t.first_child_BxN >= 0).sum())
  nodes = int(t.num_nodes_B.sum()) - b
  return call, expansions, nodes


def build_mctx(b: int, k: int, s: int):
  def recurrent_fn(params, key, action, embedding):
    del params, action
    k1, k2 = jax.random.split(key)
    out = mctx.RecurrentFnOutput(reward=jnp.zeros((b,)), discount=jnp.ones((b,)),
                                 prior_logits=jax.random.normal(k1, (b, k)),
                                 value=jax.random.normal(k2, (b,)))
    return out, embedding

  def search(key):
    k1, k2, k3 = jax.random.split(key, 3)
    root = mctx.RootFnOutput(prior_logits=jax.random.normal(k1, (b, k)), value=jax.random.normal(k2, (b,)),
                             embedding=jnp.zeros((b,)))
    return mctx.gumbel_muzero_policy(None, k3, root, recurrent_fn, num_simulations=s,
                                     max_num_considered_actions=k)

  fn = jax.jit(search)
  return (lambda: fn(jax.random.key(0))), b * s, b * s


def _time_rounds(calls: dict, repeats: int) -> dict:
  """Median (wall, CPU) seconds of each call over `repeats` rounds after a warm-up; every round
  runs each call once, in turn, so all of them see the same machine load."""
  for call in calls.values():
    jax.block_until_ready(call())  # compile + warm up
  wall, cpu = {n: [] for n in calls}, {n: [] for n in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(call())
      wall[name].append(time.perf_counter() - t0)
      cpu[name].append(time.process_time() - c0)
  return {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in calls}


def part_a(repeats: int, batches=(256, 1024), walkers=(1, 4)):
  k, s = 16, 64
  repeats = max(repeats, 10)
  print(f'\n(a) trivial model, K={k}, S={s} ({jax.devices()[0].platform}, {jax.device_count()} devices); '
        f'median of {repeats} interleaved rounds')
  print('| search | B | ms/search (wall) | ms/search (CPU) | leaf exp/s (wall) | vs mctx (wall) | '
        'vs mctx (CPU) | nodes/s (wall) |')
  print('|' + '---|' * 8)
  for b in batches:
    built = {'mctx gumbel_muzero': build_mctx(b, k, s)}
    for w in walkers:
      built[f'rlm_jax mcts W={w}'] = build_ours(b, k, s, w)
    times = _time_rounds({n: v[0] for n, v in built.items()}, repeats)
    (wall0, cpu0), (_, exp0, _) = times['mctx gumbel_muzero'], built['mctx gumbel_muzero']
    base_w, base_c = exp0 / wall0, exp0 / cpu0
    for name, (_, exp, nodes) in built.items():
      wall, cpu = times[name]
      print(f'| {name} | {b} | {1e3 * wall:.1f} | {1e3 * cpu:.1f} | {exp / wall:.0f} | '
            f'{exp / wall / base_w:.2f}x | {exp / cpu / base_c:.2f}x | {nodes / wall:.0f} |', flush=True)


# ------------------------------------------------------------------------------------------
# (b) Tiny transformer: share of the wall time outside the model calls.


def _models_alone(model, params, key, prompt, mask, depths, cfg, ls, t_full):
  """The model calls one search makes, alone: the root value call, then per simulation one
  policy call on B*W node states (K samples each) and, unless the policy's decode returned the
  children's values (actor-critic), one value call on their B*W*K children, at the widths the
  search used (`depths[s]` steps of state in simulation s)."""
  b, lp = prompt.shape
  w, k = cfg.num_walkers, cfg.num_children
  acc = expansion.last_values(model, params, expansion.root_nodes(prompt, mask, jnp.arange(b), 0)).sum()
  last_M = jnp.repeat(prompt[:, -1], w)
  for s, d in enumerate(depths):
    t_node = lp + d * ls
    t_child = min(t_node + ls, t_full)
    pad = lambda x, t: jnp.pad(x, ((0, 0), (t - lp, 0))).repeat(w, 0)
    # Each call's inputs (tokens and masks, hence positions) depend on the previous call's
    # outputs, as in the search, so the compiler cannot hoist any of their work out of the loop.
    live_M = last_M >= 0
    nodes = NodeBatch(pad(prompt, t_node).at[:, -1].set(last_M), pad(mask, t_node) & live_M[:, None],
                      jnp.zeros((b * w,), jnp.int32), jnp.arange(b * w) % b)
    steps = model.policy_fn(params, jax.random.fold_in(key, s), nodes, k, to_end=False, greedy=False)
    first = steps.tokens_MxKxL[..., 0].reshape(-1)
    if steps.value_MxK is not None:
      v = steps.value_MxK.reshape(-1)
    elif model.extension_value_fn is not None:  # each node's state read once for its K children
      v = expansion.end_values(model, params, nodes, steps.tokens_MxKxL,
                               jnp.arange(ls) < steps.lengths_MxK[..., None])
    else:
      children = NodeBatch(pad(prompt, t_child).repeat(k, 0).at[:, -1].set(first),
                           pad(mask, t_child).repeat(k, 0) & (first >= 0)[:, None],
                           jnp.ones((b * w * k,), jnp.int32), jnp.arange(b * w * k) % b)
      v = expansion.last_values(model, params, children)
    last_M = jnp.where(v.reshape(-1, k)[:, 0] > 2.0, first[::k], last_M)
    acc = acc + v.sum() + steps.logprob_MxK.sum()
  return acc + last_M.sum()


def part_b(repeats: int, b: int = 256, walkers: int = 2):
  from rlm_jax.data.tokenizer import CharTokenizer
  from rlm_jax.models.transformer import ModelConfig, Transformer
  from rlm_jax.search import lm

  tok = CharTokenizer()
  mcfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                     d_ff=128, value_head='sigmoid')
  gd, st = nnx.split(Transformer(mcfg, rngs=nnx.Rngs(params=0)))
  opts = lm.LMOptions(step_tokens=8, completion_tokens=32, value_from_policy=True)
  separate = lm.make_search_model(gd, dataclasses.replace(opts, value_from_policy=False), lm.TokenIds.of(tok),
                                  value_graphdef=gd)
  models = {  # the actor-critic's values read from its decode, or the same weights as a value model
      'decode': (lm.make_search_model(gd, opts, lm.TokenIds.of(tok)), lm.LMParams(policy=st)),
      'value pass': (separate, lm.LMParams(policy=st, value=st)),
      'value pass, whole states': (separate._replace(extension_value_fn=None), lm.LMParams(policy=st, value=st))}
  ids = tok.encode('What is 12+30?', bos=True) + [tok.step_id]
  lp = len(ids)
  prompt = jnp.tile(jnp.asarray(ids)[None], (b, 1))
  mask = jnp.ones_like(prompt, bool)
  key = jax.random.key(0)
  base = mcts_lib.MCTSConfig(num_simulations=4, num_children=4, num_walkers=walkers, max_depth=4)
  w, k, d, ls = base.num_walkers, base.num_children, base.max_depth, opts.step_tokens
  t_full = lp + d * ls
  print(f'\n(b) tiny transformer (d=64, 2 layers, vocab {tok.vocab_size}), B={b}, K={k}, W={w}, '
        f'S={base.num_simulations}, step {ls} tokens, prompt {lp}, widest state {t_full} tokens, '
        f'B*W*K = {b * w * k} rows per simulation; on {jax.devices()[0].device_kind}')
  print('| state widths | child values | per simulation | search wall s | nodes/s | model calls alone | outside (wall) | '
        'search CPU s | model calls alone | outside (CPU) | trivial model (wall) |')
  print('|' + '---|' * 11)
  for width, values in (('full', 'decode'), ('halving', 'decode'), ('halving', 'value pass'),
                        ('halving', 'value pass, whole states')):
    model, params = models[values]
    cfg = dataclasses.replace(base, state_width=width)
    search = jax.jit(functools.partial(mcts_lib.mcts_search, model=model, config=cfg))
    t_search, c_search = _time(search, params, key, prompt, mask, repeats=repeats)
    result = jax.device_get(search(params, key, prompt, mask))
    depths = [int(x) for x in result.extra['state_depth_S']]
    nodes = int(result.tree.num_nodes_B.sum()) - b  # created, evaluated children
    alone = jax.jit(functools.partial(_models_alone, model, depths=depths, cfg=cfg, ls=ls, t_full=t_full))
    t_models, c_models = _time(alone, params, key, prompt, mask, repeats=repeats)
    # Cross-check: the same search (shapes, knobs) with a trivial model is all bookkeeping.
    trivial = jax.jit(functools.partial(mcts_lib.mcts_search, model=trivial_model(64, ls), config=cfg))
    t_book, _ = _time(trivial, None, key, prompt, mask, repeats=repeats)
    widths = '/'.join(str(lp + min(x + 1, d) * ls) for x in depths)  # the children's states
    print(f'| {width} | {values} | {widths} | {t_search:.3f} | {nodes / t_search:.0f} | {t_models:.3f} | {100 * (1 - t_models / t_search):.1f}% | '
          f'{c_search:.3f} | {c_models:.3f} | {100 * (1 - c_models / c_search):.1f}% | '
          f'{t_book:.4f} ({100 * t_book / t_search:.1f}%) |', flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--part', choices=('a', 'b', 'both'), default='both')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--b-batch', type=int, default=256, help='part (b): trees B')
  p.add_argument('--b-walkers', type=int, default=2, help='part (b): walkers W per tree')
  args = p.parse_args()
  if args.part in ('a', 'both'):
    part_a(args.repeats)
  if args.part in ('b', 'both'):
    part_b(args.repeats, args.b_batch, args.b_walkers)


if __name__ == '__main__':
  main()
