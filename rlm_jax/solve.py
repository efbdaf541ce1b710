"""Answer a task file with a trained policy and a search strategy.

  python -m rlm_jax.solve --config=configs/main.py --checkpoint=runs/main \\
      --tasks=held_out.json.bz2 --strategy=mcts --out=outputs.jsonl [--trees=trees.jsonl]
  python -m rlm_jax.tasks verify --tasks=held_out.json.bz2 --outputs=outputs.jsonl

`--config` is the experiment config the policy was trained with (tokenizer, model, task
lengths). The search knobs come from `--search_config` (default: `rlm_jax/search/config.py`),
overridable as `--search_config.mcts.num_simulations=32`; `--strategy` overrides
`search_config.strategy`. `--checkpoint` is a run directory (its `ckpt/<phase>`: `--phase`, or
the first of grpo, ppo, em, sft present), a phase directory, or omitted with `--random_init`
for a smoke test.

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
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config the policy was trained with.',
                                          lock_config=True)
_SEARCH = config_flags.DEFINE_config_file('search_config', _SEARCH_DEFAULT, 'Search config file.',
                                          lock_config=True)
_STRATEGY = flags.DEFINE_string('strategy', None, 'chain | best_of_n | self_consistency | beam | mcts '
                                '(default: search_config.strategy).')
_TASKS = flags.DEFINE_string('tasks', None, 'Task file: x1 .json/.json.bz2, JSONL, or GSM8K JSONL.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Run directory or checkpoint phase directory.')
_RANDOM_INIT = flags.DEFINE_bool('random_init', False, 'Random policy weights (smoke tests, no checkpoint).')
_OUT = flags.DEFINE_string('out', None, 'Output JSONL (one {"output": ...} per task).')
_TREES = flags.DEFINE_string('trees', None, 'Optional JSONL of search trees (mcts, beam).')
_LIMIT = flags.DEFINE_integer('limit', 0, 'Answer only the first N tasks (0: all).')
_PHASE = flags.DEFINE_string('phase', None, 'Checkpoint phase of a run directory (default: the first of '
                             'grpo, ppo, em, sft present).')


# Phase-2 algorithms of the training pipeline (their directory is named after the algorithm),
# preferred over the SFT phase.
PHASES = ('grpo', 'ppo', 'em', 'sft')


def find_checkpoint_dir(path: str, phase: str | None = None) -> tuple[str, str]:
  """(directory with numbered steps, phase name) for a run or phase directory.

  A run directory holds `ckpt/<phase>/`; without `phase` the first of PHASES present wins.
  """
  path = os.path.abspath(path)
  for name in ((phase,) if phase else PHASES):
    cand = os.path.join(path, 'ckpt', name)
    if os.path.isdir(cand):
      return cand, name
  if os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path)):
    return path, phase or os.path.basename(path)
  want = f'ckpt/{phase}' if phase else 'ckpt/<' + '|'.join(PHASES) + '>'
  raise configlib.ConfigError(f'--checkpoint={path}: no {want} or step directories there')


def load_policy(cfg, checkpoint: str | None, random_init: bool, seed: int, phase: str | None = None):
  """(tokenizer, graphdef, params) of the policy described by the experiment config `cfg`.

  A 'ppo' phase holds an actor-critic (the policy plus a 'sigmoid' value head, as the
  pipeline builds it); search can read that head with `lm.value_from_policy=True`.
  """
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  from flax import nnx

  from rlm_jax import checkpoint as ckpt_lib
  from rlm_jax.data.tokenizer import load_tokenizer
  from rlm_jax.models.transformer import ModelConfig, Transformer
  from rlm_jax.training import pipeline
  from rlm_jax.training.state import TrainState, make_optimizer

  tok_cfg = configlib.from_config(pipeline.TokenizerConfig, cfg.tokenizer, 'tokenizer')
  tok = load_tokenizer(tok_cfg.kind, tok_cfg.path, tok_cfg.step_delimiter)
  model_cfg = configlib.from_config(ModelConfig, cfg.model, 'model')
  if model_cfg.vocab_size == 0:
    model_cfg = dataclasses.replace(model_cfg, vocab_size=tok.vocab_size)
  if random_init:
    graphdef, params = nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(params=seed)))
    return tok, graphdef, params
  if not checkpoint:
    raise configlib.ConfigError('--checkpoint is required (or --random_init for a smoke test)')
  directory, phase = find_checkpoint_dir(checkpoint, phase)
  if phase == 'ppo':
    model_cfg = dataclasses.replace(model_cfg, value_head='sigmoid')
  make = lambda: Transformer(model_cfg, rngs=nnx.Rngs(params=seed))
  graphdef, abstract_params = nnx.split(nnx.eval_shape(make))
  optim_cfg = (configlib.from_config(pipeline.SFTConfig, cfg.sft, 'sft') if phase == 'sft'
               else configlib.from_config(pipeline.RLConfig, cfg.rl, 'rl')).optim
  tx = make_optimizer(optim_cfg)
  abstract = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                            abstract_params)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  # Read-only: a plain manager (no tmp-directory cleanup) so a run still writing here is safe.
  steps = sorted(int(d) for d in os.listdir(directory)
                 if d.isdigit() and os.path.exists(os.path.join(directory, d, ckpt_lib.COMMIT_FILE)))
  if not steps:
    raise configlib.ConfigError(f'--checkpoint: no complete checkpoint in {directory}')
  with ocp.CheckpointManager(directory, item_names=('state', 'extra')) as mngr:
    try:
      out = mngr.restore(steps[-1], args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except ValueError as e:  # orbax: the saved tree does not match the model of the config
      raise configlib.ConfigError(f'--checkpoint={directory}: not a checkpoint of the policy in --config '
                                  f'({str(e).splitlines()[0][:200]})') from e
  print(f'loaded {phase} step {steps[-1]} from {directory}', file=sys.stderr)
  return tok, graphdef, out.state.params


def solve(cfg, setup, strategy: str, tasks: list[dict], tok, graphdef, params, *, trees_path=None):
  """Runs `strategy` over `tasks` in fixed-shape batches. Returns one record per task."""
  import functools

  import jax
  import jax.numpy as jnp

  from rlm_jax import tasks as tasks_lib
  from rlm_jax.data import encoding
  from rlm_jax.search import config as search_config
  from rlm_jax.search import export
  from rlm_jax.search import lm
  from rlm_jax.training import pipeline

  task_cfg = configlib.from_config(pipeline.TaskConfig, cfg.task, 'task')
  ids = lm.TokenIds.of(tok)
  reward_fn = lm.answer_reward_fn(ids) if setup.reward == 'answer' else None
  model = lm.make_search_model(graphdef, setup.lm, ids, reward_fn=reward_fn)
  fn = jax.jit(functools.partial(search_config.build_strategy(setup, strategy, tok.encode), model=model))
  bs = setup.batch_size
  records, trees = [], []
  for start in range(0, len(tasks), bs):
    chunk = tasks[start:start + bs]
    padded = chunk + [chunk[0]] * (bs - len(chunk))  # one compiled shape
    prompt, mask = encoding.encode_prompts(tok, padded, task_cfg.prompt_len)
    reward = None
    if reward_fn is not None:
      reward = lm.answer_table(tok, ['Answer: ' + tasks_lib.answer_text(t) for t in padded], task_cfg.answer_len)
    params_all = lm.LMParams(policy=params, reward=reward)
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
  if _CONFIG.value is None:
    raise configlib.ConfigError('--config is required (the experiment config of the policy)')
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
  tok, graphdef, params = load_policy(_CONFIG.value, _CHECKPOINT.value, _RANDOM_INIT.value, _CONFIG.value.seed,
                                      _PHASE.value)
  t0 = time.perf_counter()
  records = solve(_CONFIG.value, setup, strategy, tasks, tok, graphdef, params, trees_path=_TREES.value)
  with open(_OUT.value, 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')
  n = len(records)
  print(f'{strategy}: {n} problems, {sum(r["policy_tokens"] for r in records) / n:.1f} policy tokens and '
        f'{sum(r["model_calls"] for r in records) / n:.1f} model calls per problem, '
        f'{time.perf_counter() - t0:.1f}s -> {_OUT.value}')


if __name__ == '__main__':
  configlib.run_main(main)
