"""Phase 1b: the value model / PRM, trained on step labels of the training problems.

Labels (`config.value.labels`, `training.labels`): the solver's traces (and corrupted ones),
Monte Carlo rollouts from the SFT policy, MCTS q-values, or the SFT policy's own samples judged
against the solver's trace or by the task's step checker. The label set is a function of
(seed, SFT policy), rebuilt when the phase (re)starts.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from rlm_jax import tasks as tasks_lib
from rlm_jax.data import encoding
from rlm_jax.data.steps import StepEnds
from rlm_jax.experiment import data as data_lib
from rlm_jax.sampling.sampler import SamplingConfig, sample
from rlm_jax.search import host_reward
from rlm_jax.search import lm as search_lm
from rlm_jax.training import alphazero as az_lib
from rlm_jax.training import labels as labels_lib
from rlm_jax.training import value as value_lib

KEYS = ('tokens', 'mask', 'targets', 'target_mask')


def label_chunks(exp, idx: np.ndarray):
  """Fixed-shape device batches of training problems `idx` (the last chunk padded with its
  first row): yields (chunk index, number of real rows, batch); `batch['problem']` is each
  row's index into `exp.train.tasks`."""
  n, size = len(idx), exp.cfg.value.label_batch
  arrays = dict(exp.train.prompt_batch(), problem=np.arange(len(exp.train.tasks), dtype=np.int32))
  for c, lo in enumerate(range(0, n, size)):
    rows = idx[lo:lo + size]
    full = np.concatenate([rows, np.repeat(rows[:1], size - len(rows))])
    yield c, len(rows), exp.device_batch(arrays, full)


def value_data(exp, graphdef, policy_params) -> dict[str, np.ndarray]:
  """Step-labelled rows for value training (host numpy, `value.value_step` layout).

  Deterministic in (seed, policy): the label sources of `value.labels` over `value.num_traces`
  training problems (see `experiment.config.ValueConfig`), their rows pooled in the order
  named. `exp` is the `Experiment`.
  """
  cfg, v = exp.cfg, exp.cfg.value
  n = min(v.num_traces, len(exp.train.tasks))
  idx = np.sort(np.random.default_rng((cfg.seed, 6)).choice(len(exp.train.tasks), n, replace=False))
  parts = [_SOURCES[source](exp, graphdef, policy_params, idx) for source in v.label_sources]
  return {k: np.concatenate([p[k] for p in parts]) for k in KEYS}


def _solver_rows(exp, graphdef, policy_params, idx):
  """Solver traces and `negatives_per_task` corrupted copies (`labels.solver_labels`)."""
  del graphdef, policy_params
  cfg, v, tok = exp.cfg, exp.cfg.value, exp.tok
  records = labels_lib.solver_labels([exp.train.tasks[i] for i in idx], cfg.seed, v.negatives_per_task)
  enc = labels_lib.encode_step_labels(tok, records, cfg.task.prompt_len + cfg.task.completion_len, v.max_steps)
  rows = value_lib.prm_batch(enc['tokens'], enc['mask'], enc['completion_start'], enc['step_labels'],
                             enc['step_valid'], StepEnds.of(tok), tok.eos_id)
  return {k: np.asarray(jax.device_get(rows[k])) for k in KEYS}


def label_verifier(exp):
  """How Monte Carlo and MCTS labels judge a finished solution: None for the final-step match
  on device, or the task verifier on host (`host_reward.HostReward` over the training split)
  when matching the solver's answer text would be wrong (training problems with many right
  answers, `unique_solution` False, e.g. Countdown) or the run scores on host
  (`rl.reward_on='host'`). A label source builds it once for all its chunks (a static
  argument of the labelling program, hashed by identity)."""
  many = any(t.get('unique_solution') is False for t in exp.train.tasks)
  if many or exp.cfg.rl.reward_on == 'host':
    return host_reward.HostReward(exp.tok, exp.train.tasks)
  return None


def _sampling(exp) -> SamplingConfig:
  cfg, tok = exp.cfg, exp.tok
  return SamplingConfig(max_new_tokens=cfg.task.completion_len, eos_id=tok.eos_id, pad_id=tok.pad_id,
                        step_id=tok.step_id, temperature=cfg.value.temperature)


def _mc_rows(exp, graphdef, policy_params, idx):
  """One SFT-policy trace per problem, each step labelled by its rollouts' success rate."""
  cfg, v, tok = exp.cfg, exp.cfg.value, exp.tok
  key, scfg, parts = jax.random.key(cfg.seed + 17), _sampling(exp), []
  verifier = label_verifier(exp)
  setup = labels_lib.MCLabelSetup(num_rollouts=v.mc_rollouts, max_steps=v.max_steps, sampling=scfg,
                                  step_id=tok.step_id, step_ends=StepEnds.of(tok),
                                  score_fn=None if verifier is None else verifier.score_fn)
  for c, real, batch in label_chunks(exp, idx):
    k_trace, k_roll = jax.random.split(jax.random.fold_in(key, c))
    out = sample(graphdef, policy_params, batch['prompt'], batch['prompt_mask'], k_trace, scfg)
    t = out.tokens_BxT.shape[1]
    batch = dict(batch, completion=out.tokens_BxT,
                 completion_mask=jnp.arange(t)[None] < out.lengths_B[:, None])
    lab = labels_lib.mc_rollout_labels_jit(graphdef, policy_params, setup, batch, k_roll)
    rows = labels_lib.trace_prm_batch(batch, lab['labels'], lab['valid'], StepEnds.of(tok), tok.eos_id)
    parts.append({k: np.asarray(jax.device_get(rows[k]))[:real] for k in KEYS})
  return {k: np.concatenate([p[k] for p in parts]) for k in KEYS}


def _policy_samples(exp, graphdef, policy_params, idx):
  """The SFT policy's `value.samples_per_task` samples of each training problem `idx`, by
  chunks: yields (batch rows repeated per sample, completion [R, T], completion mask, the task
  of each row, number of real rows)."""
  cfg, v = exp.cfg, exp.cfg.value
  key, scfg, m = jax.random.key(cfg.seed + 17), _sampling(exp), v.samples_per_task
  for c, real, batch in label_chunks(exp, idx):
    out = sample(graphdef, policy_params, batch['prompt'], batch['prompt_mask'], jax.random.fold_in(key, c), scfg,
                 num_samples=m)
    t = out.tokens_BxT.shape[1]
    rep = jax.tree.map(lambda x: jnp.repeat(x, m, axis=0), batch)
    comp_mask = jnp.arange(t)[None] < out.lengths_B[:, None]
    rows_idx = idx[c * v.label_batch:c * v.label_batch + real]
    tasks = [exp.train.tasks[i] for i in rows_idx] + [exp.train.tasks[rows_idx[0]]] * (len(batch['prompt']) - real)
    yield rep, out, comp_mask, [t for t in tasks for _ in range(m)], real * m


def _policy_rows(exp, graphdef, policy_params, idx):
  """The SFT policy's own samples, checked against the solver's trace and the verifier."""
  v, tok = exp.cfg.value, exp.tok
  m, ends, parts = v.samples_per_task, StepEnds.of(tok), []
  for rep, out, comp_mask, tasks, real in _policy_samples(exp, graphdef, policy_params, idx):
    t = out.tokens_BxT.shape[1]
    # The verifier decides (an answer other than the solver's may be right, e.g. Countdown).
    tokens_np, lengths_np = np.asarray(jax.device_get(out.tokens_BxT)), np.asarray(jax.device_get(out.lengths_B))
    correct = jnp.asarray(data_lib.host_scorer(tok, tasks, 1)(tokens_np, lengths_np) == 2)
    reference = np.full((len(tasks), t), -1, np.int64)
    for r, task in enumerate(tasks):
      if r % m == 0:
        ids = encoding.completion_ids(tok, task['steps'])[:t]
      reference[r, :len(ids)] = ids
    lab = labels_lib.follow_labels(out.tokens_BxT, comp_mask, jnp.asarray(reference), correct, ends, tok.eos_id,
                                   v.max_steps)
    rows = labels_lib.trace_prm_batch(dict(rep, completion=out.tokens_BxT, completion_mask=comp_mask),
                                      lab['labels'], lab['valid'], ends, tok.eos_id)
    parts.append({k: np.asarray(jax.device_get(rows[k]))[:real] for k in KEYS})
  return {k: np.concatenate([p[k] for p in parts]) for k in KEYS}


def _checked_rows(exp, graphdef, policy_params, idx):
  """The SFT policy's own samples, each step judged by the task's step checker
  (`tasks.check_steps`: exact process labels where the domain has one, e.g. Countdown)."""
  v, tok = exp.cfg.value, exp.tok
  ends, parts = StepEnds.of(tok), []
  for rep, out, comp_mask, tasks, real in _policy_samples(exp, graphdef, policy_params, idx):
    ends_BxS, valid_BxS = labels_lib.step_ends(out.tokens_BxT, comp_mask, ends, tok.eos_id, v.max_steps)
    tokens_np, ends_np, valid_np = (np.asarray(jax.device_get(x)) for x in (out.tokens_BxT, ends_BxS, valid_BxS))
    labels = np.zeros(valid_np.shape, np.float32)
    for r in range(real):
      labels[r, :valid_np[r].sum()] = step_labels(tok, tasks[r], tokens_np[r], ends_np[r][valid_np[r]])
    rows = labels_lib.trace_prm_batch(dict(rep, completion=out.tokens_BxT, completion_mask=comp_mask),
                                      jnp.asarray(labels), valid_BxS, ends, tok.eos_id)
    parts.append({k: np.asarray(jax.device_get(rows[k]))[:real] for k in KEYS})
  return {k: np.concatenate([p[k] for p in parts]) for k in KEYS}


def step_labels(tok, task: dict, tokens_T: np.ndarray, ends_K: np.ndarray) -> list[int]:
  """The step checker's labels of one sampled completion's first K closed steps.

  Each step's text is its tokens after the previous step's closing token up to its own,
  decoded and stripped of the delimiter. Only a step closed by EOS is the answer step: when
  the K-th step is not (a longer or truncated trace) it is checked as an intermediate step.
  """
  starts = np.concatenate([[0], ends_K[:-1] + 1])
  texts = [tok.decode(tokens_T[a:b + 1]).strip() for a, b in zip(starts, ends_K)]
  if len(ends_K) and tokens_T[ends_K[-1]] == tok.eos_id:
    return tasks_lib.check_steps(task, texts)
  return tasks_lib.check_steps(task, texts + [''])[:len(texts)]


def _mcts_rows(exp, graphdef, policy_params, idx):
  """The AlphaZero loop's search without a value model (none exists yet): best-path q-values."""
  cfg, tok = exp.cfg, exp.tok
  key, rl, parts = jax.random.key(cfg.seed + 17), cfg.rl, []
  az = dict(cfg.rl.sections)['alphazero']
  setup = az_lib.make_setup(dataclasses.replace(az, use_value_model=False),
                            search_lm.TokenIds.of(tok), cfg.task.prompt_len, cfg.task.completion_len, cfg.value.mode,
                            rl.temperature, rl.top_k, rl.top_p, reward=label_verifier(exp))
  for c, real, batch in label_chunks(exp, idx):
    rows = az_lib.search_rows_jit(graphdef, None, setup, policy_params, None, batch, jax.random.fold_in(key, c))
    parts.append({k: np.asarray(jax.device_get(rows[k]))[:real] for k in KEYS})
  return {k: np.concatenate([p[k] for p in parts]) for k in KEYS}


_SOURCES = {'solver': _solver_rows, 'mc': _mc_rows, 'policy': _policy_rows, 'checked': _checked_rows,
            'mcts': _mcts_rows}


def run_value(exp, graphdef, sft_params, stop):
  """Phase-1 value / PRM training. Returns ((value graphdef, params), finished)."""
  from rlm_jax.training.state import create_train_state, make_optimizer  # pylint: disable=g-import-not-at-top
  cfg, v = exp.cfg, exp.cfg.value
  vgd, vparams = exp.models.value_model(sft_params)
  tx = make_optimizer(v.optim)
  state = create_train_state(vparams, tx, exp.mesh, exp.rules)
  offset = cfg.sft.steps + 1
  data = {}

  def batch_fn(step):
    if not data:  # built only when the phase has steps left to run
      data.update(value_data(exp, graphdef, sft_params))
      m = data['target_mask'] > 0
      mean = float(data['targets'][m].mean()) if m.any() else 0.0
      exp.metrics.write(offset + step, {'value/label_rows': len(m), 'value/labels': int(m.sum()),
                                        'value/label_mean': mean})
    n = len(data['tokens'])
    idx = np.random.default_rng((cfg.seed, 4, step)).choice(n, v.batch_size, replace=n < v.batch_size)
    return {k: jnp.asarray(x[idx]) for k, x in data.items()}

  step_fn = lambda st, b, i: value_lib.value_step_jit(vgd, tx, st, b, v.mode)
  state, done = exp.run_phase('value', v.steps, offset, state, step_fn, batch_fn, stop)
  return (vgd, state.params), done


def prm_quality(exp, value, max_problems: int = 256) -> dict:
  """Step-level quality of a value model / PRM on held-out traces whose step correctness the
  solver knows (`labels.solver_labels`: each problem's solution, all steps right, and one
  corrupted copy, wrong from the corrupted step on).

  Returns:
    {'prm/auroc', 'prm/auroc_within', 'prm/accuracy', 'prm/num_steps', 'prm/num_positive'}
    (`training.prm_metrics`; `auroc_within` pairs only steps of the same problem,
    P(correct) > 0.5 counts as predicting a right step); {} when the held-out problems have no
    solution steps (e.g. answer-only datasets).
  """
  from rlm_jax.training import prm_metrics  # pylint: disable=g-import-not-at-top
  held = held_out_predictions(exp, value, max_problems)
  if held is None:
    return {}
  records, p_NxL, rows = held
  problem_NxL = np.broadcast_to(np.asarray([r['task'] for r in records])[:, None], p_NxL.shape)
  m = prm_metrics.step_metrics(p_NxL, np.asarray(rows['targets']), np.asarray(rows['target_mask']) > 0,
                               scale='prob', groups=problem_NxL)
  return {f'prm/{k}': v for k, v in m.items()}


def held_out_predictions(exp, value, max_problems: int = 256):
  """The value model's P(correct) on the solver-labelled held-out traces of `prm_quality`.

  Returns:
    (records of `labels.solver_labels` over the first `max_problems` held-out problems with
    steps (record['task'] indexes those problems), p_NxL float P(correct) per position, the
    `value.prm_batch` rows (targets / target_mask mark the labelled steps)); None when no
    held-out problem has solution steps.
  """
  cfg, v, tok = exp.cfg, exp.cfg.value, exp.tok
  tasks = [t for t in exp.held.tasks if t.get('steps')][:max_problems]
  if not tasks:
    return None
  records = labels_lib.solver_labels(tasks, cfg.seed + 1, 1)
  enc = labels_lib.encode_step_labels(tok, records, cfg.task.prompt_len + cfg.task.completion_len, v.max_steps)
  rows = value_lib.prm_batch(enc['tokens'], enc['mask'], enc['completion_start'], enc['step_labels'],
                             enc['step_valid'], StepEnds.of(tok), tok.eos_id)
  vgd, vparams = value
  preds = []
  size = v.label_batch
  predict = jax.jit(lambda p, t, m: value_lib.predict(vgd, p, t, m))
  n = len(records)
  for lo in range(0, n, size):
    idx = np.arange(lo, lo + size) % n  # fixed shape: the last chunk wraps around
    preds.append(np.asarray(predict(vparams, jnp.asarray(rows['tokens'])[idx], jnp.asarray(rows['mask'])[idx])))
  values_NxL = np.concatenate(preds)[:n]
  from flax import nnx  # pylint: disable=g-import-not-at-top
  head = nnx.merge(vgd, vparams).cfg.value_head
  p_NxL = np.asarray(value_lib.prob_correct(jnp.asarray(values_NxL), head))
  return records, p_NxL, rows
