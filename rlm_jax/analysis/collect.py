"""Runs the search strategies of `rlm_jax.search` on a finished run and returns what they did.

`collect(workdir)` loads each phase's checkpoint, searches the run's own held-out tasks with
every (strategy, guide, budget) and returns the ROWs, TREEs and OUTPUTs of `files` as plain
records; `files.write_analysis` writes them, `python -m rlm_jax.analysis` does both. jax is
imported here only, inside the functions that need it.

Everything that reads the training side of a run (config schema, checkpoint layout, model
builder, held-out split) is in `checkpoint_phases` and `_load_phase`, through
`rlm_jax.experiment`; `_search` drives the search package on the loaded models. They sit at
the end of this file.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from rlm_jax.analysis import files
from rlm_jax.analysis import trees as trees_lib

# The knob of each strategy that a budget sets (the other knobs keep `search.config` defaults).
BUDGET_KNOBS = {'greedy': None, 'self_consistency': 'num_samples', 'best_of_n': 'num_samples',
                'beam': 'beam_width', 'mcts': 'num_simulations'}
DEFAULT_BUDGETS = {'greedy': (1,), 'self_consistency': (2, 4, 8), 'best_of_n': (2, 4, 8),
                   'beam': (1, 2, 4), 'mcts': (4, 8, 16)}


class Collected(NamedTuple):
  """What `collect` found, in the formats of `files` (`files.write_analysis(workdir, *c)`)."""

  rows: list[dict]  # ROW per (phase, strategy, guide, budget)
  trees: list[dict]  # TREE per kept MCTS problem
  outputs: list[dict]  # OUTPUT per (phase, strategy, guide, budget, problem)


def parse_budgets(text: str) -> dict[str, tuple[int, ...]]:
  """'greedy=1;mcts=4,8' -> {'greedy': (1,), 'mcts': (4, 8)}; names from BUDGET_KNOBS."""
  out = {}
  for part in filter(None, (p.strip() for p in text.split(';'))):
    name, _, values = part.partition('=')
    name = name.strip()
    if name not in BUDGET_KNOBS:
      raise ValueError(f"budgets: unknown strategy '{name}' (allowed: {', '.join(BUDGET_KNOBS)})")
    try:
      budget = tuple(int(v) for v in values.split(',') if v.strip())
    except ValueError:
      raise ValueError(f"budgets: '{part}' must be <strategy>=<int>[,<int>...]") from None
    if not budget or min(budget) < 1:
      raise ValueError(f"budgets: '{part}' needs at least one budget, each >= 1")
    out[name] = budget
  if not out:
    raise ValueError(f"budgets: '{text}' names no strategy")
  return out


def guides_for(name: str, has_value: bool, verifier: bool) -> list[str]:
  """What may rank the candidates of strategy `name`: 'policy' (its samples, votes, log-probs,
  priors), 'value' (the policy's value head), 'verifier' (the ground-truth reward: an oracle)."""
  if name in ('greedy', 'self_consistency'):
    return ['policy']
  return ['value' if has_value else 'policy'] + (['verifier'] if verifier else [])


def search_setup(base, name: str, budget: int, guide: str, value_from_policy: bool, value_scorer: str = 'orm'):
  """The `search.config` section of one (strategy, budget, guide): `base` (a ConfigDict from
  `search.config.get_config`, not modified) with the budget's knob (BUDGET_KNOBS) and the
  guide set; `value_from_policy`: values come from the policy's own value head (PPO's
  actor-critic), not a separate value model; `value_scorer` ranks value-guided best-of-N (the
  run's `eval.prm_scorer`, so analysis and the run's own evaluation agree). Returns a
  `search.config.SearchSetup`."""
  from rlm_jax.search import config as search_config

  c = base.copy_and_resolve_references()
  c.strategy = 'chain' if name == 'greedy' else name
  c.reward = 'answer' if guide == 'verifier' else 'none'
  c.lm.value_from_policy = value_from_policy
  if name == 'greedy':
    c.chain.update(greedy=True, score='none')
  elif name == 'best_of_n':
    c.best_of_n.update(num_samples=budget, scorer={'verifier': 'reward', 'value': value_scorer, 'policy': 'logprob'}[guide])
  else:
    knob = BUDGET_KNOBS[name]
    c[name][knob] = budget
  return search_config.build(c)


def collect(workdir: str | os.PathLike, *, phases: Sequence[str] | None = None,
            budgets: Mapping[str, Sequence[int]] = DEFAULT_BUDGETS, verifier: bool = True,
            num_problems: int = 0, num_trees: int = 8, seed: int = 0,
            log: Callable[[str], Any] = print) -> Collected:
  """Runs the search strategies on a run's held-out tasks (the run's own split and config).

  Args:
    workdir: a finished run.
    phases: policy phases to evaluate; None = every one with a checkpoint (`checkpoint_phases`).
    budgets: strategy -> budgets (see BUDGET_KNOBS). The other knobs are `search.config`
      defaults, except that completions are as long as the run's `task.completion_len` and
      sampling uses the run's `eval.temperature`.
    verifier: also run best-of-N, beam and MCTS guided by the task's verifier reward (an oracle
      upper bound). Without it, and without a value model in the run (its `value` phase, the
      alphazero phase's own, or PPO's value head), they rank by the policy alone (best-of-N by
      mean log-prob; beam and MCTS with all values 0).
    num_problems: first N held-out tasks (0 = all of them).
    num_trees: MCTS trees kept per phase and guide (largest MCTS budget, first problems).
    seed: search seed; a run at budget b uses `search.config` seed 1000 * seed + b.
    log: called with one progress line per (phase, strategy, guide, budget).

  Returns:
    The ROWs, TREEs and OUTPUTs of `files`; nothing is written.
  """
  for name in budgets:
    if name not in BUDGET_KNOBS:
      raise ValueError(f"budgets: unknown strategy '{name}' (allowed: {', '.join(BUDGET_KNOBS)})")
  workdir = files.check_workdir(workdir)
  phases = list(phases) if phases is not None else checkpoint_phases(workdir)
  if not phases:
    raise FileNotFoundError(f'{workdir}/ckpt: no complete checkpoint of a policy phase to analyse')
  from rlm_jax import tasks as tasks_lib  # after the checks: a bad argument fails before jax loads
  from rlm_jax.search import config as search_config

  rows, trees, outputs = [], [], []
  for phase in phases:
    policy = _load_phase(workdir, phase)
    task_list = policy.tasks[:num_problems] if num_problems > 0 else policy.tasks
    n = len(task_list)
    expected = [tasks_lib.answer_text(t) for t in task_list]
    base = search_config.get_config()
    base.lm.update(completion_tokens=policy.task.completion_len, temperature=policy.temperature)
    base.batch_size = min(base.batch_size, n)
    for name, name_budgets in budgets.items():
      for guide in guides_for(name, policy.has_value, verifier):
        for budget in name_budgets:
          setup = search_setup(base, name, budget, guide, policy.value_from_policy, policy.prm_scorer)
          setup = dataclasses.replace(setup, seed=seed * 1000 + budget)
          keep = num_trees if name == 'mcts' and budget == max(name_budgets) else 0
          t0 = time.perf_counter()
          records, kept = _search(policy, setup, task_list, keep)
          seconds = time.perf_counter() - t0
          scores = np.asarray([tasks_lib.verify(t, r['output']) for t, r in zip(task_list, records)])
          for i, (t, r) in enumerate(zip(task_list, records)):
            outputs.append({'phase': phase, 'strategy': name, 'budget': budget, 'guide': guide, 'index': i,
                            'level': t['level'], 'problem': t['problem'], 'expected': expected[i],
                            'output': r['output'], 'score': int(scores[i])})
          for i, t in enumerate(kept):
            t.update(phase=phase, strategy=name, budget=budget, guide=guide, score=int(scores[i]),
                     chosen_path=trees_lib.chosen_path(t),  # mcts.answer='best_terminal' (default)
                     task={'level': task_list[i]['level'], 'problem': task_list[i]['problem'],
                           'expected': expected[i]})
            trees.append(t)
          rows.append({'phase': phase, 'strategy': name, 'budget': budget, 'guide': guide,
                       'accuracy': float(np.mean(scores == 2)), 'invalid': float(np.mean(scores < 0)),
                       'policy_tokens': float(np.mean([r['policy_tokens'] for r in records])),
                       'model_calls': float(np.mean([r['model_calls'] for r in records])),
                       'num_problems': n, 'seconds': round(seconds, 2)})
          log(f"{phase} {name}={budget} ({guide}): accuracy {rows[-1]['accuracy']:.3f}, "
              f"{rows[-1]['policy_tokens']:.1f} policy tokens/problem, {seconds:.1f}s")
  return Collected(rows, trees, outputs)


# ------------------------------------------------------------------------------------------
# The run's side: what a run folder holds and how its models are searched.


class _Policy(NamedTuple):
  """A phase's models and what searching the run's held-out tasks with them needs."""

  tok: Any  # data.tokenizer.Tokenizer
  graphdef: Any  # the plain policy (LoRA merged)
  params: Any
  value: tuple[Any, Any] | None  # (graphdef, params) of the run's value model / PRM, or None
  value_from_policy: bool  # no value model, but the policy has a value head (PPO's actor-critic)
  tasks: list[dict]  # the run's held-out tasks, in order
  prompt_format: Any  # the run's data.encoding.PromptFormat
  task: Any  # the run's `task` section (prompt_len, answer_len, completion_len)
  temperature: float  # the run's eval.temperature
  prm_scorer: str  # the run's eval.prm_scorer (value-guided best-of-N)

  @property
  def has_value(self) -> bool:
    return self.value is not None or self.value_from_policy


def checkpoint_phases(workdir: str | os.PathLike) -> list[str]:
  """The run's policy phases with a complete checkpoint (`ckpt/<phase>`), in training order."""
  from rlm_jax.experiment import config as config_lib
  from rlm_jax.experiment import models as models_lib

  workdir = os.fspath(workdir)
  cfg = config_lib.parse(models_lib.read_run_config(workdir), strict=False)
  return [p for p in models_lib.phases_of(cfg) if p != 'value' and models_lib.phase_steps(workdir, p)]


def _load_phase(workdir: str, phase: str) -> _Policy:
  """The models of `<workdir>/ckpt/<phase>` (with the run's value model) and its held-out tasks.

  Every read of the training side of a run (config schema, checkpoint layout, model builder,
  data split) is here or in `checkpoint_phases`.
  """
  from flax import nnx

  from rlm_jax.experiment import data as data_lib
  from rlm_jax.experiment import models as models_lib

  run = models_lib.load_run(workdir, phase)
  graphdef, params = run.policy
  head = nnx.merge(graphdef, params).cfg.value_head != 'none'
  fmt = run.cfg.tokenizer.prompt_format()
  _, held = data_lib.build_data(run.tok, run.cfg.task, run.cfg.eval.size, fmt, traces=run.cfg.sft.steps > 0)
  return _Policy(run.tok, graphdef, params, run.value, head and run.value is None, list(held.tasks), fmt,
                 run.cfg.task, run.cfg.eval.temperature, run.cfg.eval.prm_scorer)


def _search(policy: _Policy, setup, tasks: Sequence[dict], num_trees: int) -> tuple[list[dict], list[dict]]:
  """Runs `setup.strategy` over `tasks` in fixed-shape batches of `setup.batch_size`.

  The batching, padding and keys of `rlm_jax.solve.solve`, so greedy decoding here reproduces
  the run's own evaluation; the trees come back as values instead of a JSONL file.

  Args:
    policy: from `_load_phase`.
    setup: a `search.config.SearchSetup`.
    tasks: the problems, in order.
    num_trees: export the search trees of the first this many problems (0: none).

  Returns:
    (records, trees): per task {'output', 'policy_tokens', 'model_calls'}, in task order; the
    `search.tree_to_json` dicts of the first `num_trees` tasks (none if the strategy keeps no
    tree).
  """
  import functools

  import jax
  import jax.numpy as jnp

  from rlm_jax import tasks as tasks_lib
  from rlm_jax.data import encoding
  from rlm_jax.search import config as search_config
  from rlm_jax.search import export
  from rlm_jax.search import lm

  tok = policy.tok
  ids = lm.TokenIds.of(tok)
  reward_fn = lm.answer_reward_fn(ids) if setup.reward == 'answer' else None
  value_graphdef, value_params = policy.value if policy.value is not None else (None, None)
  model = lm.make_search_model(policy.graphdef, setup.lm, ids, reward_fn=reward_fn, value_graphdef=value_graphdef)
  fn = jax.jit(functools.partial(search_config.build_strategy(setup, setup.strategy, tok.encode), model=model))
  bs = setup.batch_size
  records, trees = [], []
  for start in range(0, len(tasks), bs):
    chunk = list(tasks[start:start + bs])
    padded = chunk + [chunk[0]] * (bs - len(chunk))  # one compiled shape
    prompt, mask = encoding.encode_prompts(tok, padded, policy.task.prompt_len, policy.prompt_format)
    reward = None
    if reward_fn is not None:
      reward = lm.answer_table(tok, ['Answer: ' + tasks_lib.answer_text(t) for t in padded], policy.task.answer_len)
    res = fn(lm.LMParams(policy=policy.params, value=value_params, reward=reward),
             jax.random.fold_in(jax.random.key(setup.seed), start), jnp.asarray(prompt), jnp.asarray(mask))
    texts = lm.decode_result(tok, res)
    ptok, calls = jax.device_get((res.policy_tokens_B, res.model_calls_B))
    for i in range(len(chunk)):
      records.append({'output': texts[i], 'policy_tokens': int(ptok[i]), 'model_calls': int(calls[i])})
    wanted = min(len(chunk), num_trees - start)
    if wanted > 0 and res.tree is not None:
      host_tree = jax.device_get(res.tree)
      trees += [export.tree_to_json(host_tree, i, tok.decode) for i in range(wanted)]
  return records, trees
