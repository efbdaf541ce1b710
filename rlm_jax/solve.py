"""Answer a task file with a trained run's models and a search strategy.

  python -m rlm_jax.solve --workdir=runs/main --tasks=held_out.json.bz2 --strategy=mcts \\
      --out=outputs.jsonl [--phase=sft] [--trees=trees.jsonl]
  python -m rlm_jax.tasks verify --tasks=held_out.json.bz2 --outputs=outputs.jsonl

`--workdir` is a run folder of `rlm_jax.main`: its `config.json` rebuilds exactly the run's
models (HF start, LoRA merged, PPO's actor-critic, the value model / PRM of a `value` or
`alphazero` phase) through `experiment.models.load_run`; the policy is the last phase with a
checkpoint, or `--phase`. When the run has a value model, MCTS, beam search and PRM-ranked
best-of-N use it. The search knobs come from `--search_config` (default:
`rlm_jax/search/config.py`), overridable as `--search_config.mcts.num_simulations=32`;
`--strategy` overrides `search_config.strategy`. `--config=FILE --random_init` runs the
config's model with random weights instead (smoke tests, no run folder).

Output: one JSON line per task, `{"output": text, "score", "policy_tokens", "model_calls"}`,
in task order: the format `python -m rlm_jax.tasks verify` reads. A summary line (problems,
mean policy tokens and model calls per problem, seconds) goes to stdout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from absl import flags
from ml_collections import config_flags

from rlm_jax import configlib

_SEARCH_DEFAULT = os.path.join(os.path.dirname(__file__), 'search', 'config.py')
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config (with --random_init only).',
                                          lock_config=True)
_SEARCH = config_flags.DEFINE_config_file('search_config', _SEARCH_DEFAULT, 'Search config file.',
                                          lock_config=True)
_STRATEGY = flags.DEFINE_string('strategy', None, 'chain | best_of_n | self_consistency | beam | mcts '
                                '(default: search_config.strategy).')
_TASKS = flags.DEFINE_string('tasks', None, 'Task file: x1 .json/.json.bz2, JSONL, or GSM8K JSONL.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder of rlm_jax.main (config.json + ckpt/).')
_RANDOM_INIT = flags.DEFINE_bool('random_init', False, 'Random policy weights of --config (smoke tests).')
_OUT = flags.DEFINE_string('out', None, 'Output JSONL (one {"output": ...} per task).')
_TREES = flags.DEFINE_string('trees', None, 'Optional JSONL of search trees (mcts, beam).')
_LIMIT = flags.DEFINE_integer('limit', 0, 'Answer only the first N tasks (0: all).')
_PHASE = flags.DEFINE_string('phase', None, 'Policy phase of the run (default: its last phase with a '
                             'checkpoint).')


def random_models(config, seed: int):
  """(tokenizer, policy graphdef, params) of an experiment ConfigDict's model, random weights."""
  from rlm_jax.experiment import config as config_lib
  from rlm_jax.experiment import models as models_lib

  cfg = config_lib.parse(config)
  tok = models_lib.load_run_tokenizer(cfg)
  builder = models_lib.ModelBuilder(dataclasses.replace(cfg, seed=seed, hf_checkpoint=''), tok)
  return tok, cfg, builder.plain_policy(*builder.init_policy())


def solve(task, setup, strategy: str, tasks: list[dict], tok, graphdef, params, *, value=None,
          prompt_format=None, trees_path=None):
  """Runs `strategy` over `tasks` in fixed-shape batches. Returns one record per task.

  Args:
    task: the run's `task` section (prompt_len, answer_len).
    setup: a `search.config.SearchSetup`.
    strategy: a name of `search.config.STRATEGY_NAMES`.
    tasks: task dicts.
    tok, graphdef, params: tokenizer and plain policy.
    value: (graphdef, params) of a value model / PRM, or None (search runs blind: q = 0).
    prompt_format: the run's `data.encoding.PromptFormat` (`cfg.tokenizer.prompt_format()`);
      None = the default format.
    trees_path: optional JSONL of search trees (mcts, beam).
  """
  import functools

  import jax
  import jax.numpy as jnp

  from rlm_jax import tasks as tasks_lib
  from rlm_jax.data import encoding
  from rlm_jax.search import config as search_config
  from rlm_jax.search import export
  from rlm_jax.search import lm

  ids = lm.TokenIds.of(tok)
  reward_fn = lm.answer_reward_fn(ids) if setup.reward == 'answer' else None
  model = lm.make_search_model(graphdef, setup.lm, ids, reward_fn=reward_fn,
                               value_graphdef=value[0] if value is not None else None)
  fn = jax.jit(functools.partial(search_config.build_strategy(setup, strategy, tok.encode), model=model))
  bs = setup.batch_size
  records, trees = [], []
  for start in range(0, len(tasks), bs):
    chunk = tasks[start:start + bs]
    padded = chunk + [chunk[0]] * (bs - len(chunk))  # one compiled shape
    prompt, mask = encoding.encode_prompts(tok, padded, task.prompt_len, prompt_format or encoding.DEFAULT_FORMAT)
    reward = None
    if reward_fn is not None:
      reward = lm.answer_table(tok, ['Answer: ' + tasks_lib.answer_text(t) for t in padded], task.answer_len)
    params_all = lm.LMParams(policy=params, value=value[1] if value is not None else None, reward=reward)
    res = fn(params_all, jax.random.fold_in(jax.random.key(setup.seed), start), jnp.asarray(prompt),
             jnp.asarray(mask))
    texts = lm.decode_result(tok, res)
    score, ptok, calls = jax.device_get((res.score_B, res.policy_tokens_B, res.model_calls_B))
    for i in range(len(chunk)):
      records.append({'output': texts[i], 'score': float(score[i]), 'policy_tokens': int(ptok[i]),
                      'model_calls': int(calls[i])})
      if trees_path and res.tree is not None:
        trees.append(export.tree_to_json(res.tree, i, tok.decode))
  if trees_path and trees:
    with open(trees_path, 'w') as f:
      for t in trees:
        f.write(json.dumps(t) + '\n')
  return records


def main(argv):
  if len(argv) > 1:
    raise configlib.ConfigError(f'unexpected arguments: {" ".join(argv[1:])}')
  if bool(_WORKDIR.value) == bool(_RANDOM_INIT.value):
    raise configlib.ConfigError('give --workdir=RUN (a run folder), or --config=FILE --random_init')
  if _RANDOM_INIT.value and _CONFIG.value is None:
    raise configlib.ConfigError('--random_init needs --config (the experiment config of the model)')
  if not _TASKS.value or not _OUT.value:
    raise configlib.ConfigError('--tasks and --out are required')
  from rlm_jax import tasks as tasks_lib
  from rlm_jax.search import config as search_config

  setup = search_config.build(_SEARCH.value, 'search_config')
  strategy = _STRATEGY.value or setup.strategy
  if strategy not in search_config.STRATEGY_NAMES:
    raise configlib.ConfigError(f"--strategy={strategy}: must be one of {', '.join(search_config.STRATEGY_NAMES)}")
  try:
    tasks = tasks_lib.load_tasks(_TASKS.value)
  except (OSError, ValueError) as e:
    raise configlib.ConfigError(f'--tasks={_TASKS.value}: {e}') from e
  if _LIMIT.value:
    tasks = tasks[:_LIMIT.value]
  if not tasks:
    raise configlib.ConfigError(f'--tasks={_TASKS.value}: no tasks')
  if _RANDOM_INIT.value:
    tok, cfg, (graphdef, params) = random_models(_CONFIG.value, _CONFIG.value.seed)
    value = None
  else:
    from rlm_jax.experiment import models as models_lib
    run = models_lib.load_run(_WORKDIR.value, _PHASE.value)
    tok, cfg, (graphdef, params), value = run.tok, run.cfg, run.policy, run.value
  fmt = cfg.tokenizer.prompt_format()
  check_prompt_lengths(tok, tasks, cfg.task.prompt_len, _TASKS.value, fmt)
  t0 = time.perf_counter()
  records = solve(cfg.task, setup, strategy, tasks, tok, graphdef, params, value=value, prompt_format=fmt,
                  trees_path=_TREES.value)
  with open(_OUT.value, 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
  n = len(records)
  print(f'{strategy}: {n} problems, {sum(r["policy_tokens"] for r in records) / n:.1f} policy tokens and '
        f'{sum(r["model_calls"] for r in records) / n:.1f} model calls per problem, '
        f'{time.perf_counter() - t0:.1f}s -> {_OUT.value}')


def check_prompt_lengths(tok, tasks, prompt_len: int, where: str, fmt=None) -> None:
  """One line naming the first task whose prompt does not fit the run's task.prompt_len."""
  from rlm_jax.data import encoding
  for i, t in enumerate(tasks):
    n = len(encoding.prompt_ids(tok, t, fmt or encoding.DEFAULT_FORMAT))
    if n > prompt_len:
      raise configlib.ConfigError(f'{where}: task {i} has a {n}-token prompt, more than the run\'s '
                                  f'task.prompt_len={prompt_len}')


if __name__ == '__main__':
  configlib.run_main(main)
