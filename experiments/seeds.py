"""An experiment config over seeds: runs, per-seed table, mean and range (the README's tables).

  python experiments/seeds.py --config=configs/main.py --seeds=0,1,2 --workdir=runs/main_seeds

Each seed runs `python -m rlm_jax.main --config=CONFIG --config.seed=S` into `<workdir>/seed<S>`
(a finished run is reused, an interrupted one resumes); extra `--config.a.b=v` arguments are
passed to every run. The table has one row per seed and phase, then the mean and [min-max] of
each held-out metric over the seeds, and names the machine it ran on. Per-seed numbers differ
between CPU types; compare means and ranges.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_seed(config: str, seed: int, workdir: str, overrides) -> dict:
  path = os.path.join(workdir, 'results.json')
  cmd = [sys.executable, '-m', 'rlm_jax.main', f'--config={config}', f'--config.seed={seed}', f'--workdir={workdir}',
         *overrides]
  print('$', ' '.join(cmd), flush=True)
  subprocess.run(cmd, cwd=REPO, check=True)
  with open(path) as f:
    return json.load(f)


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      names = [l.split(':', 1)[1].strip() for l in f if l.startswith('model name')]
    cpu = f'{names[0]} x{len(names)}' if names else cpu
  except OSError:
    pass
  return f'{cpu}, {platform.system()}'


def table(results: dict[int, dict], metrics) -> str:
  phases = [p for p in ('sft', 'rl') if all(p in r for r in results.values())]
  head = '| seed | phase | ' + ' | '.join(metrics) + ' |'
  lines = [head, '|' + '---|' * (len(metrics) + 2)]
  for seed, r in results.items():
    for p in phases:
      lines.append(f'| {seed} | {p} | ' + ' | '.join(f"{r[p].get(m, float('nan')):.3f}" for m in metrics) + ' |')
  for p in phases:
    cells = []
    for m in metrics:
      v = np.array([r[p].get(m, np.nan) for r in results.values()])
      cells.append(f'{np.nanmean(v):.3f} [{np.nanmin(v):.3f}-{np.nanmax(v):.3f}]')
    lines.append(f'| mean [range] | {p} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', required=True)
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--workdir', required=True)
  args, overrides = p.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith('--config.')]
  if bad:
    p.error(f'unknown arguments: {" ".join(bad)} (only --config.a.b=v overrides are passed on)')
  results = {}
  for s in (int(x) for x in args.seeds.split(',')):
    results[s] = run_seed(args.config, s, os.path.join(os.path.abspath(args.workdir), f'seed{s}'), overrides)
  metrics = sorted({k for r in results.values() for ph in r.values() if isinstance(ph, dict) for k in ph
                    if k.endswith('/accuracy') or k.startswith('prm/auroc')})
  text = table(results, metrics)
  print(f'\n{args.config}, seeds {args.seeds}, on {machine()}:\n\n{text}')
  with open(os.path.join(args.workdir, 'seeds.json'), 'w') as f:
    json.dump({'config': args.config, 'seeds': list(results), 'machine': machine(), 'results': results}, f, indent=1)
  return results


if __name__ == '__main__':
  main()
