"""pandas tables of a run: training curves, held-out results, tree nodes, test-time scaling,
verifier outcomes.

Each `load_*` reads a file through `files` (validated there); the table functions take the same
records whether they come from disk or straight from `collect`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from rlm_jax.analysis import files
from rlm_jax.analysis import trees as trees_lib

# ------------------------------------------------------------------------------------------
# Training curves and held-out results.


def load_metrics(workdir: str | os.PathLike) -> pd.DataFrame:
  """All metrics of a run as one frame: index 'step', one column per '<phase>/<name>'.

  Rows logged at the same step (e.g. a phase's last step and an evaluation) are merged; a
  metric not logged at a step is NaN.
  """
  frame = pd.DataFrame(files.read_metrics(workdir)).groupby('step', sort=True).first()
  return frame.astype(float)


def phase_curves(metrics: pd.DataFrame, phase: str) -> pd.DataFrame:
  """The columns of one phase ('sft', 'grpo', 'eval') with the prefix dropped, rows that log it."""
  prefix = phase + '/'
  cols = [c for c in metrics.columns if c.startswith(prefix)]
  if not cols:
    phases = sorted({c.split('/')[0] for c in metrics.columns})
    raise KeyError(f"no metrics of phase '{phase}' (phases in this run: {', '.join(phases)})")
  out = metrics[cols].dropna(how='all')
  return out.rename(columns={c: c[len(prefix):] for c in cols})


def smooth(values: Sequence[float] | np.ndarray, weight: float = 0.6) -> np.ndarray:
  """TensorBoard's debiased exponential moving average; NaNs are skipped and stay NaN.

  s_t = m_t / (1 - weight^n_t), m_t = weight m_{t-1} + (1 - weight) x_t, n_t = finite values so
  far; the debiasing keeps the first points from being pulled towards 0.

  Args:
    values: [T] numbers.
    weight: in [0, 1); 0 returns the values unchanged.

  Returns:
    [T] float64.
  """
  if not 0.0 <= weight < 1.0:
    raise ValueError(f'smooth: weight={weight} must be in [0, 1)')
  x = np.asarray(values, dtype=np.float64)
  out = np.full_like(x, np.nan)
  m, n = 0.0, 0
  for t, v in enumerate(x):
    if not np.isfinite(v):
      continue
    m = weight * m + (1.0 - weight) * v
    n += 1
    out[t] = m / (1.0 - weight ** n)
  return out


def results_table(results: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
  """results.json as a long frame: columns phase, strategy, metric, level (NaN if overall), value."""
  rows = []
  for phase, res in results.items():
    if not isinstance(res, Mapping):
      continue  # e.g. a 'preempted' flag
    for key, value in res.items():
      strategy, _, metric = key.rpartition('/')
      level = float('nan')
      if metric.startswith('accuracy_level'):
        level, metric = int(metric[len('accuracy_level'):]), 'accuracy'
      rows.append({'phase': phase, 'strategy': strategy, 'metric': metric, 'level': level, 'value': value})
  return pd.DataFrame(rows, columns=['phase', 'strategy', 'metric', 'level', 'value'])


def eval_accuracy(results: pd.DataFrame) -> pd.DataFrame:
  """Held-out accuracy of a `results_table`: rows (phase, strategy), columns 'all' then levels."""
  acc = results[results.metric == 'accuracy']
  rows = list(dict.fromkeys(zip(acc.phase, acc.strategy)))
  levels = sorted(int(v) for v in acc.level.dropna().unique())
  table = pd.DataFrame(np.nan, index=pd.MultiIndex.from_tuples(rows, names=['phase', 'strategy']),
                       columns=['all'] + levels)
  for r in acc.itertuples(index=False):
    table.loc[(r.phase, r.strategy), 'all' if pd.isna(r.level) else int(r.level)] = r.value
  return table


# ------------------------------------------------------------------------------------------
# Search trees.


def node_table(tree: Mapping, only: Sequence[int] | None = None) -> pd.DataFrame:
  """One row per node (or per id of `only`, in that order): id, depth, visits, q, prior, reward,
  terminal, text (newlines shown as '\\n')."""
  by_id = {n['id']: n for n in tree['nodes']}
  ids = list(only) if only is not None else sorted(by_id)
  rows = []
  for i in ids:
    n = by_id[i]
    text = n['text'] if isinstance(n['text'], str) else ' '.join(map(str, n['text']))
    rows.append({'id': i, 'depth': n['depth'], 'visits': n['visits'], 'q': trees_lib.node_q(n),
                 'prior': float('nan') if n['prior'] is None else n['prior'],
                 'reward': float('nan') if n['reward'] is None else n['reward'],
                 'terminal': bool(n['terminal']), 'text': text.replace('\n', '\\n')})
  return pd.DataFrame(rows).set_index('id')


# ------------------------------------------------------------------------------------------
# Test-time compute scaling.


def run_label(strategy: str, guide: str | None = None) -> str:
  """'mcts' for a policy-only run, 'mcts (verifier)' / 'mcts (value)' for guided ones."""
  return strategy if guide in (None, 'policy') else f'{strategy} ({guide})'


def scaling_table(rows: Sequence[Mapping], where: str = 'scaling rows') -> pd.DataFrame:
  """ROW dicts -> frame sorted by (phase in training order, label, policy_tokens), with
  `label` (`run_label`), `tokens_x`: policy tokens relative to greedy decoding of the same
  phase (NaN without a greedy row), and `accuracy_se`: the binomial standard error
  sqrt(a (1 - a) / num_problems) (NaN without num_problems)."""
  files.validate_scaling(rows, where)
  df = pd.DataFrame(list(rows))
  if 'phase' not in df:
    df['phase'] = ''
  df['label'] = [run_label(s, g) for s, g in zip(df.strategy, df.guide)]
  order = {p: i for i, p in enumerate(files.phases_in(df.phase))}
  df = df.assign(_order=df.phase.map(order)).sort_values(['_order', 'label', 'policy_tokens'], kind='stable')
  df = df.drop(columns='_order').reset_index(drop=True)
  greedy = df[df.strategy == 'greedy'].groupby('phase').policy_tokens.first()
  df['tokens_x'] = df.policy_tokens / df.phase.map(greedy)
  n = df['num_problems'] if 'num_problems' in df else np.nan
  df['accuracy_se'] = np.sqrt(df.accuracy * (1.0 - df.accuracy) / n)
  return df


def load_scaling(workdir_or_file: str | os.PathLike) -> pd.DataFrame:
  """`<workdir>/analysis/scaling.json` (or a file of that format) as a `scaling_table`."""
  return scaling_table(files.read_scaling(workdir_or_file))


def best_within(scaling: pd.DataFrame, max_tokens: float) -> pd.DataFrame:
  """Per (phase, label): the row with the best accuracy among those spending at most
  `max_tokens` policy tokens per problem (ties: fewer tokens). Runs with no such row are left
  out."""
  ok = scaling[scaling.policy_tokens <= max_tokens]
  ok = ok.sort_values(['accuracy', 'policy_tokens'], ascending=[False, True], kind='stable')
  return ok.groupby(['phase', 'label'], sort=True).head(1).set_index(['phase', 'label']).sort_index()


def markdown_table(df: pd.DataFrame, floatfmt: str = '.3f') -> str:
  """A frame as a Markdown table (no extra dependency)."""
  cells = lambda vals: '| ' + ' | '.join(
      format(v, floatfmt) if isinstance(v, float) else str(v) for v in vals) + ' |'
  lines = [cells(df.columns), '|' + '---|' * len(df.columns)]
  lines += [cells(r) for r in df.itertuples(index=False)]
  return '\n'.join(lines)


# ------------------------------------------------------------------------------------------
# Verifier outcomes.


def load_outputs(workdir_or_file: str | os.PathLike) -> pd.DataFrame:
  """`<workdir>/analysis/outputs.jsonl` (or a file of that format) as a frame, one row per OUTPUT."""
  return pd.DataFrame(files.read_outputs(workdir_or_file))


def score_table(outputs: pd.DataFrame, by: Sequence[str] = ('strategy', 'budget', 'level')) -> pd.DataFrame:
  """Fraction of outputs per verifier score (columns invalid, wrong, partial, solved) and the
  count n, per group of `by`."""
  groups = outputs.groupby(list(by), sort=True)
  out = pd.DataFrame({name: groups.score.apply(lambda s, v=v: float(np.mean(s == v)))
                      for v, name in files.SCORE_NAMES.items()})
  out['n'] = groups.size()
  return out


def add_run_labels(outputs: pd.DataFrame) -> pd.DataFrame:
  """A copy with column 'run' = `run_label('<strategy> <budget>', guide)`, e.g. 'mcts 16 (verifier)'."""
  guide = outputs.guide if 'guide' in outputs else [None] * len(outputs)
  return outputs.assign(run=[run_label(f'{s} {b}', g) for s, b, g in zip(outputs.strategy, outputs.budget, guide)])


def level_accuracy(outputs: pd.DataFrame) -> pd.DataFrame:
  """Accuracy (score 2) with rows '<strategy> <budget>' (plus ' (<guide>)' for runs guided by
  a value head or the verifier, see `run_label`) and one column per level, plus 'all'."""
  df = add_run_labels(outputs)
  df = df.assign(solved=(df.score == 2).astype(float))
  table = df.pivot_table(index='run', columns='level', values='solved', aggfunc='mean')
  table['all'] = df.groupby('run').solved.mean()
  return table


def error_examples(outputs: pd.DataFrame, kind: str, n: int = 5, max_chars: int = 120) -> pd.DataFrame:
  """Up to `n` outputs of one verifier outcome ('invalid', 'wrong', 'partial', 'solved'),
  spread over levels (round robin, lowest level first); long outputs are cut to `max_chars`."""
  codes = {v: k for k, v in files.SCORE_NAMES.items()}
  if kind not in codes:
    raise ValueError(f"error_examples: kind '{kind}' must be one of {', '.join(codes)}")
  sel = outputs[outputs.score == codes[kind]]
  picked = []
  per_level = [g for _, g in sel.groupby('level', sort=True)]
  for i in range(n):
    for g in per_level:
      if i < len(g) and len(picked) < n:
        picked.append(g.iloc[i])
  cols = ['strategy', 'budget'] + (['guide'] if 'guide' in outputs else []) + ['level', 'problem', 'expected', 'output']
  if not picked:
    return pd.DataFrame(columns=cols)
  cut = lambda s: s if len(s) <= max_chars else s[:max_chars - 3] + '...'
  df = pd.DataFrame(picked)[cols].reset_index(drop=True)
  df['output'] = df.output.map(lambda s: cut(s.replace('\n', '\\n')))
  return df


def at_largest_budget(outputs: pd.DataFrame) -> pd.DataFrame:
  """The records of each run's largest budget (per phase and guide when those columns exist)."""
  keys = [k for k in ('phase', 'strategy', 'guide') if k in outputs]
  return outputs[outputs.budget == outputs.groupby(keys).budget.transform('max')]
