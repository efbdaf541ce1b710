"""Accuracy of the search strategies at (roughly) equal policy tokens, as a markdown table.

  # scripted toy task (no training needed; the PRM is informative but noisy), 3 seeds:
  python experiments/compare_strategies.py --policy=toy --problems=512 --budget=8 --num_seeds=3
  # a trained run (its folder: config.json + checkpoints), synthetic domain of its config:
  python experiments/compare_strategies.py --policy=checkpoint --workdir=runs/main --problems=200 --budget=8
  # the same pipeline with random weights (smoke test):
  python experiments/compare_strategies.py --policy=random --config=configs/tiny.py --problems=8

`--budget M` sets every strategy's knobs so that it generates about M greedy completions'
worth of tokens: best-of-N and self-consistency sample N = M completions; beam search and
MCTS get widths / simulations sized to M * (completion tokens). The measured policy tokens and
model calls per problem are in the table, so the comparison can be checked. Seconds are wall
time on this machine (toy: after compilation; checkpoints: including it).

The toy table also runs MCTS guided by the negated PRM (a value model that is wrong on
purpose) and, with `--num_seeds`, reports the mean and range over seeds (seed s draws the
problems' targets and policy logits from `--seed + s`; all seeds share one compiled call).

At inference nothing sees the verifier: best-of-N ranks by PRM-min (toy) or the value head /
the policy's own log-prob (checkpoints), MCTS and beam search score terminal steps with the
value model. Accuracy is the verifier's verdict on the chosen answer. A run folder's value
model / PRM (phase `value`, or the alphazero phase's own) guides beam search, MCTS and
best-of-N; a run without one runs beam search and MCTS blind (all values 0); the table says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

from rlm_jax.search import beam as beam_lib  # noqa: E402
from rlm_jax.search import completions  # noqa: E402
from rlm_jax.search import mcts as mcts_lib  # noqa: E402
from rlm_jax.search import toy  # noqa: E402


@dataclasses.dataclass
class Row:
  strategy: str
  accuracy: float  # mean over seeds
  policy_tokens: float
  model_calls: float
  seconds: float
  seed_accuracy: tuple = ()  # per seed (toy with --num_seeds)


def strategy_configs(budget: int, completion_steps: int, step_tokens: int, completion_tokens: int,
                     scorer: str, max_depth: int):
  """Table label -> (strategy name, function, config) at about `budget` completions' worth of
  tokens."""
  k = 3
  e = min(budget, 4)
  wb = max(1, budget // e)
  # MCTS: about budget * completion_tokens / (K * step_tokens) expansions, one walker.
  sims = max(2, round(budget * completion_tokens / (k * step_tokens)))
  del completion_steps
  return {
      'greedy': ('chain', completions.chain, completions.ChainConfig(greedy=True)),
      f'best-of-{budget} ({scorer})': ('best_of_n', completions.best_of_n,
                                       completions.BestOfNConfig(num_samples=budget, scorer=scorer)),
      f'self-consistency@{budget}': ('self_consistency', completions.self_consistency,
                                     completions.SelfConsistencyConfig(num_samples=budget, answer_len=8)),
      f'beam {wb}x{e}': ('beam', beam_lib.beam_search,
                         beam_lib.BeamConfig(beam_width=wb, expansions=e, max_depth=max_depth)),
      f'mcts S={sims} K={k}': ('mcts', mcts_lib.mcts_search, mcts_lib.MCTSConfig(
          num_simulations=sims, num_children=k, num_walkers=1, max_depth=max_depth, gamma=1.0,
          answer='best_terminal')),
  }


def _table(rows: list[Row], title: str) -> str:
  seeds = any(len(r.seed_accuracy) > 1 for r in rows)
  extra = ' seed range |' if seeds else ''
  lines = [title, '', f'| strategy | accuracy |{extra} policy tokens / problem | model calls / problem | seconds |',
           '|---|---|' + ('---|' if seeds else '') + '---|---|---|']
  for r in rows:
    rng = f' {min(r.seed_accuracy):.3f}-{max(r.seed_accuracy):.3f} |' if seeds else ''
    lines.append(f'| {r.strategy} | {r.accuracy:.3f} |{rng} {r.policy_tokens:.0f} | {r.model_calls:.1f} | '
                 f'{r.seconds:.2f} |')
  return '\n'.join(lines)


# ------------------------------------------------------------------------------------------


TOY_TASK = toy.ToyTask(num_actions=3, horizon=4, value_confidence=0.6, value_noise=0.5)
TOY_SKILL = 0.8  # logit bonus of the right action (policy logits N(0, 1)): greedy solves ~37%


def negated_value(model):
  """The same SearchModel with the value / PRM's sign flipped: a value model that is wrong."""
  return model._replace(value_fn=lambda params, nodes: -model.value_fn(params, nodes))


def compare_toy(problems: int, budget: int, seed: int, num_seeds: int = 1, batch: int = 512):
  """The scripted toy task: H = 4 steps of A = 3 actions, a PRM whose sign is right and whose
  size carries deterministic noise (|noise| <= .5 < confidence .6), so it ranks prefixes
  noisily. Seeds are stacked along the problem axis (one compiled call per strategy)."""
  task = TOY_TASK
  model = toy.make_model(task, with_reward=False)  # inference: no verifier inside the search
  verifier = toy.make_model(task).reward_fn
  per_seed = [toy.make_params(jax.random.key(seed + s), problems, task, skill=TOY_SKILL, noise=1.0)
              for s in range(num_seeds)]
  params = jax.tree.map(lambda *x: jnp.concatenate(x), *per_seed)
  total = problems * num_seeds
  batch = min(batch, total)
  h = task.horizon
  configs = {name: (fn, cfg, model) for name, (_, fn, cfg) in
             strategy_configs(budget, h, 2, 2 * h, 'prm_min', max_depth=h).items()}
  mcts_name = next(n for n in configs if n.startswith('mcts'))
  configs[f'{mcts_name} (negated PRM)'] = configs[mcts_name][:2] + (negated_value(model),)
  rows = []
  for name, (fn, cfg, m) in configs.items():
    run = jax.jit(functools.partial(fn, model=m, config=cfg))
    batches = [jnp.arange(start, start + batch) % total for start in range(0, total, batch)]
    pr, pm = toy.prompts(batch, task)
    jax.block_until_ready(run(params, jax.random.key(seed), pr, pm, problem_B=batches[0]).score_B)  # compile
    t0 = time.perf_counter()
    results = [run(params, jax.random.key(seed + i), pr, pm, problem_B=ids) for i, ids in enumerate(batches)]
    jax.block_until_ready([r.score_B for r in results])
    secs = time.perf_counter() - t0
    correct, tokens, calls = [], [], []
    for start, ids, res in zip(range(0, total, batch), batches, results):
      mask = jnp.arange(res.tokens_BxL.shape[1]) < res.lengths_B[:, None]
      ok = verifier(params, res.tokens_BxL, mask, ids) > 0
      n = min(batch, total - start)
      correct += list(np.asarray(ok)[:n])
      tokens += list(np.asarray(res.policy_tokens_B)[:n])
      calls += list(np.asarray(res.model_calls_B)[:n])
    seed_acc = tuple(float(a) for a in np.reshape(correct, (num_seeds, problems)).mean(axis=1))
    rows.append(Row(name, float(np.mean(seed_acc)), float(np.mean(tokens)), float(np.mean(calls)), secs,
                    seed_acc))
  seeds = f', seeds {seed}..{seed + num_seeds - 1}' if num_seeds > 1 else f', seed {seed}'
  title = (f'Toy task (H={h} steps, A={task.num_actions} actions, noisy PRM), {problems} problems{seeds}, '
           f'budget {budget} completions')
  return rows, title


def compare_lm(config, workdir, phase, problems: int, budget: int, seed: int):
  """A run's policy (and value model) on held-out problems of its config's domain.

  `workdir`: a run folder (`experiment.models.load_run`); None: `config`'s model with random
  weights (smoke test).
  """
  from flax import nnx

  from rlm_jax import solve
  from rlm_jax import tasks as tasks_lib
  from rlm_jax.experiment import models as models_lib
  from rlm_jax.search import config as search_config

  if workdir is None:
    tok, cfg, (graphdef, params) = solve.random_models(config, config.seed)
    value = None
  else:
    run = models_lib.load_run(workdir, phase)
    tok, cfg, (graphdef, params), value = run.tok, run.cfg, run.policy, run.value
  task_cfg = cfg.task
  tasks = tasks_lib.generate_dataset(task_cfg.domain, problems, task_cfg.seed + 1, levels=task_cfg.levels)
  head = nnx.merge(graphdef, params).cfg.value_head != 'none'  # PPO's actor-critic
  has_value = value is not None or head
  step_tokens = max(8, task_cfg.completion_len // 4)
  scfg = search_config.get_config()
  scfg.batch_size = min(32, problems)
  scfg.lm.update(step_tokens=step_tokens, completion_tokens=task_cfg.completion_len,
                 value_from_policy=head and value is None)
  scfg.seed = seed
  depth = max(2, task_cfg.completion_len // step_tokens + 1)
  configs = strategy_configs(budget, depth, step_tokens, task_cfg.completion_len,
                             'orm' if has_value else 'logprob', max_depth=depth)
  rows = []
  for name, (key, _, cfg_s) in configs.items():
    if key == 'self_consistency':  # the LM config names the answer marker as text
      scfg.self_consistency.update(num_samples=cfg_s.num_samples, answer_marker='Answer: ', answer_len=8)
    else:
      scfg[key].update({f.name: getattr(cfg_s, f.name) for f in dataclasses.fields(cfg_s)})
    setup = search_config.build(scfg)
    t0 = time.perf_counter()
    records = solve.solve(task_cfg, setup, key, tasks, tok, graphdef, params, value=value,
                          prompt_format=cfg.tokenizer.prompt_format())
    secs = time.perf_counter() - t0
    acc = np.mean([tasks_lib.verify(t, r['output']) == 2 for t, r in zip(tasks, records)])
    rows.append(Row(name, float(acc), float(np.mean([r['policy_tokens'] for r in records])),
                    float(np.mean([r['model_calls'] for r in records])), secs))
  blind = '' if has_value else ' (no value model: beam and MCTS run blind)'
  title = f'{task_cfg.domain}, levels {task_cfg.levels}, {problems} problems, budget {budget}{blind}'
  return rows, title


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--policy', choices=('toy', 'random', 'checkpoint'), default='toy')
  p.add_argument('--config', default=None, help='experiment config (random)')
  p.add_argument('--workdir', default=None, help='run folder (checkpoint)')
  p.add_argument('--phase', default=None, help='policy phase of the run (default: its last)')
  p.add_argument('--problems', type=int, default=128)
  p.add_argument('--budget', type=int, default=8)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--num_seeds', type=int, default=1, help='toy: seeds seed .. seed + num_seeds - 1')
  p.add_argument('--out', default=None, help='also write the table (markdown) and rows (JSON next to it)')
  args = p.parse_args(argv)
  if args.policy == 'toy':
    if args.num_seeds < 1:
      p.error(f'--num_seeds={args.num_seeds}: must be >= 1')
    rows, title = compare_toy(args.problems, args.budget, args.seed, args.num_seeds)
  elif args.policy == 'random':
    if not args.config:
      p.error('--policy=random needs --config')
    from rlm_jax import configlib
    rows, title = compare_lm(configlib.load_config(args.config), None, None, args.problems, args.budget, args.seed)
  else:
    if not args.workdir:
      p.error('--policy=checkpoint needs --workdir (a run folder)')
    rows, title = compare_lm(None, args.workdir, args.phase, args.problems, args.budget, args.seed)
  table = _table(rows, title)
  print(table)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(table + '\n')
    with open(os.path.splitext(args.out)[0] + '.json', 'w') as f:
      json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
  return rows


if __name__ == '__main__':
  main()
