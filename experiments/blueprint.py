"""Does a trained PRM make search beat the policy alone? Runs, table and figure, over seeds.

  python experiments/blueprint.py --seeds=0,1,2 --workdir=runs/blueprint [--trained]
  python experiments/blueprint.py --seeds=0 --workdir=/tmp/bp --config=configs/blueprint.py:smoke --problems=4
  python experiments/blueprint.py --seeds=0,1,2 --workdir=runs/blueprint_mc --config.value.labels=mc

Per seed it trains `--config` (default configs/blueprint.py: SFT, then a PRM) into
`<workdir>/seed<S>` (a finished run is reused; an interrupted one resumes), then searches the
run's held-out problems from the SFT policy with every strategy at every budget
(`rlm_jax.analysis.collect`, nothing sees the verifier): greedy; self-consistency (majority of
N samples); best-of-N ranked by the PRM; step-level beam search on the PRM; MCTS with the PRM
as its value model. Accuracy is plotted against policy tokens per problem as a multiple of
greedy's. With `--trained` it also trains, from the same SFT and PRM checkpoints (copied into
`<workdir>/seed<S>-<algo>`), outcome GRPO, process-supervised GRPO and the AlphaZero-style
loop for `rl.iterations` each, and reports their greedy accuracy. Extra `--config.a.b=v`
arguments go to every run (e.g. the PRM's label source).

Output: a markdown table (mean and range over seeds), `<workdir>/blueprint.json` (every row
of every seed) and `<workdir>/blueprint.png`; the targets of the claim are checked at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from rlm_jax import analysis  # noqa: E402
from seeds import machine  # noqa: E402  (experiments/seeds.py)

BUDGETS = {'greedy': (1,), 'self_consistency': (2, 4, 8, 16), 'best_of_n': (2, 4, 8, 16),
           'beam': (1, 2, 4), 'mcts': (2, 4, 8, 16)}
TRAINED = ('grpo', 'process_grpo', 'alphazero')
LABELS = {'greedy': 'greedy', 'self_consistency': 'self-consistency', 'best_of_n': 'PRM best-of-N',
          'beam': 'PRM beam', 'mcts': 'PRM MCTS'}


def train(config: str, seed: int, workdir: str, *overrides: str) -> dict:
  """`rlm_jax.main` as a subprocess (resumes a partial run); returns its results.json."""
  cmd = [sys.executable, '-m', 'rlm_jax.main', f'--config={config}', f'--config.seed={seed}',
         f'--workdir={workdir}', *overrides]
  print('$', ' '.join(cmd), flush=True)
  subprocess.run(cmd, cwd=REPO, check=True)
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def train_from(run: str, config: str, seed: int, algo: str, overrides=()) -> dict:
  """Phase 2 `algo` started from `run`'s SFT and value checkpoints."""
  out = f'{run}-{algo}'
  for phase in ('sft', 'value'):
    src, dst = os.path.join(run, 'ckpt', phase), os.path.join(out, 'ckpt', phase)
    if os.path.isdir(src) and not os.path.isdir(dst):
      shutil.copytree(src, dst)
  return train(config, seed, out, *overrides, f'--config.rl.algo={algo}')


def phase_seconds(run: str, phase: str) -> float:
  """Training wall seconds of `phase` in `run`: the sum of its logged `<phase>/seconds` (every
  step's wall time, across resumes; 0 for a run logged before that metric existed)."""
  from rlm_jax.analysis import files  # pylint: disable=g-import-not-at-top
  return float(sum(r.get(f'{phase}/seconds', 0.0) for r in files.read_metrics(run)))


def search_rows(run: str, seed: int, problems: int) -> list[dict]:
  """Every strategy at every budget on `run`'s held-out problems, cached in
  `<run>/blueprint_rows.json` (the searches of one seed take longer than its training): a
  cache written for the same number of problems is reused, and only the (strategy, budget)
  pairs it lacks are searched."""
  path = os.path.join(run, 'blueprint_rows.json')
  cached = []
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved.get('problems') == problems:
      cached = saved['rows']
  have = {(r['strategy'], r['budget']) for r in cached}
  todo = {k: tuple(b for b in v if (k, b) not in have) for k, v in BUDGETS.items()}
  todo = {k: v for k, v in todo.items() if v}
  if todo:
    got = analysis.collect(run, phases=['sft'], budgets=todo, verifier=False, num_problems=problems,
                           num_trees=0, seed=seed)
    cached = cached + [dict(r, seed=seed) for r in got.rows]
    with open(path + '.tmp', 'w') as f:
      json.dump({'problems': problems, 'rows': cached}, f, indent=1)
    os.replace(path + '.tmp', path)
  return [r for r in cached if r['budget'] in BUDGETS.get(r['strategy'], ())]


def summarise(rows: list[dict]) -> list[dict]:
  """Mean and range over seeds per (strategy, budget); tokens as a multiple of greedy's."""
  out = []
  keys = sorted({(r['strategy'], r['budget']) for r in rows}, key=lambda k: (list(BUDGETS).index(k[0]), k[1]))
  greedy = {r['seed']: r['policy_tokens'] for r in rows if r['strategy'] == 'greedy'}
  for strategy, budget in keys:
    sel = [r for r in rows if (r['strategy'], r['budget']) == (strategy, budget)]
    acc = np.array([r['accuracy'] for r in sel])
    x = np.array([r['policy_tokens'] / greedy[r['seed']] for r in sel])
    out.append({'strategy': strategy, 'budget': budget, 'accuracy': float(acc.mean()), 'min': float(acc.min()),
                'max': float(acc.max()), 'tokens_x': float(x.mean()), 'seeds': len(sel)})
  return out


def check_targets(summary: list[dict]) -> list[str]:
  """The claim's targets, each as a line with the numbers."""
  by = {(s['strategy'], s['budget']): s for s in summary}
  greedy = by[('greedy', 1)]
  lines = []
  mcts = [s for s in summary if s['strategy'] == 'mcts' and s['tokens_x'] <= 8.0]
  if mcts:
    best = max(mcts, key=lambda s: s['accuracy'])
    ok = best['min'] >= greedy['max'] and best['accuracy'] - greedy['accuracy'] >= 0.10
    lines.append(f"PRM MCTS >= greedy + 10 points at <= 8x tokens: {'met' if ok else 'NOT met'} "
                 f"(MCTS S={best['budget']}: {best['accuracy']:.3f} [{best['min']:.3f}-{best['max']:.3f}] at "
                 f"{best['tokens_x']:.1f}x vs greedy {greedy['accuracy']:.3f} [{greedy['min']:.3f}-{greedy['max']:.3f}])")
  for other in ('self_consistency', 'best_of_n'):
    for m in [s for s in summary if s['strategy'] == 'mcts']:
      peers = [s for s in summary if s['strategy'] == other and s['tokens_x'] >= m['tokens_x']]
      if not peers:
        continue
      peer = min(peers, key=lambda s: s['tokens_x'])  # the cheapest peer spending at least as much
      ok = m['accuracy'] - peer['accuracy'] >= 0.03 and m['min'] > peer['max']
      lines.append(f"PRM MCTS S={m['budget']} ({m['tokens_x']:.1f}x) >= {LABELS[other]} N={peer['budget']} "
                   f"({peer['tokens_x']:.1f}x) + 3 points, ranges apart: {'met' if ok else 'NOT met'} "
                   f"({m['accuracy']:.3f} [{m['min']:.3f}-{m['max']:.3f}] vs {peer['accuracy']:.3f} "
                   f"[{peer['min']:.3f}-{peer['max']:.3f}])")
  return lines


def table(summary: list[dict], trained: dict, seeds) -> str:
  lines = [f'Held-out accuracy, mean [min-max] over seeds {",".join(map(str, seeds))}:', '',
           '| strategy | budget | policy tokens (x greedy) | accuracy |', '|---|---|---|---|']
  for s in summary:
    fewer = f" ({s['seeds']} seeds)" if s['seeds'] < len(seeds) else ''
    lines.append(f"| {LABELS[s['strategy']]} | {s['budget']} | {s['tokens_x']:.1f} | "
                 f"{s['accuracy']:.3f} [{s['min']:.3f}-{s['max']:.3f}]{fewer} |")
  for algo, accs in trained.items():
    a = np.array(accs)
    lines.append(f'| {algo} policy, greedy | 1 | - | {a.mean():.3f} [{a.min():.3f}-{a.max():.3f}] |')
  return '\n'.join(lines)


def plot(summary: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for strategy in BUDGETS:
    pts = [s for s in summary if s['strategy'] == strategy]
    if not pts:
      continue
    x = [s['tokens_x'] for s in pts]
    y = np.array([s['accuracy'] for s in pts])
    err = np.array([[s['accuracy'] - s['min'] for s in pts], [s['max'] - s['accuracy'] for s in pts]])
    ax.errorbar(x, y, yerr=err, marker='o', capsize=3, label=LABELS[strategy])
  ax.set_xscale('log', base=2)
  ax.set_xlabel("policy tokens per problem (x greedy's)")
  ax.set_ylabel('held-out accuracy')
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--workdir', required=True)
  p.add_argument('--config', default=os.path.join('configs', 'blueprint.py'))
  p.add_argument('--problems', type=int, default=0, help='held-out problems searched (0: the run\'s eval.size)')
  p.add_argument('--trained', action='store_true', help='also train GRPO, process GRPO and AlphaZero from SFT')
  p.add_argument('--no_search', action='store_true',
                 help='skip the searches (with --trained: only the trained policies\' table)')
  p.add_argument('--algos', default=','.join(TRAINED),
                 help='with --trained: the phase-2 algorithms (e.g. grpo,process_grpo where the loop cannot score on host)')
  args, overrides = p.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith('--config.')]
  if bad:
    p.error(f'unknown arguments: {" ".join(bad)} (only --config.a.b=v overrides are passed on)')
  seeds = [int(s) for s in args.seeds.split(',')]
  algos = [a for a in args.algos.split(',') if a]
  if set(algos) - set(TRAINED):
    p.error(f'--algos={args.algos}: allowed {",".join(TRAINED)}')
  rows, trained, wall = [], {a: [] for a in algos} if args.trained else {}, {a: [] for a in algos}
  if trained:  # the start of every trained policy, as its own row
    trained = {'sft': [], **trained}
  for seed in seeds:
    run = os.path.join(os.path.abspath(args.workdir), f'seed{seed}')
    start = train(args.config, seed, run, *overrides)
    if trained:
      trained['sft'].append(start['sft']['greedy/accuracy'])
    if not args.no_search:
      rows += search_rows(run, seed, args.problems)
    for algo in algos if trained else ():
      trained[algo].append(train_from(run, args.config, seed, algo, overrides)['rl']['greedy/accuracy'])
      wall[algo].append(phase_seconds(f'{run}-{algo}', algo))
  summary = summarise(rows)
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, 'blueprint.json'), 'w') as f:
    json.dump({'seeds': seeds, 'rows': rows, 'summary': summary, 'trained': trained, 'trained_seconds': wall}, f,
              indent=1)
  if summary:
    plot(summary, os.path.join(args.workdir, 'blueprint.png'))
  print(f'\n{args.config} on {machine()}\n\n' + table(summary, trained, seeds) + '\n')
  for algo, secs in wall.items():
    if secs:
      print(f'- {algo}: {np.mean(secs):.0f} s of phase-2 training per seed [{min(secs):.0f}-{max(secs):.0f}] '
            f'(the runs\' own {algo}/seconds)')
  for line in check_targets(summary) if summary else ():
    print('-', line)
  return summary


if __name__ == '__main__':
  main()
