"""Step labels for value / PRM training: solver traces, Monte Carlo rollouts, MCTS q-values.

Every source produces P(correct) per step in [0, 1] (the scale `value.py` expects):

  (a) solver labels (host, text): the solver's reference steps are all correct (1); a negative
      trace corrupts one step and labels it and every later step 0. Whether a corrupted final
      step is really wrong is decided by the task verifier.
  (b) Monte Carlo labels (device, O-PRM / Math-Shepherd): for each prefix "question + steps
      1..k" sample M completions and label step k with the fraction that ends correct; the
      final step's label is the outcome of the trace itself. One compiled program with the
      jittable answer reward (`rewards.final_step_score`) or any `score_fn`.
  (c) MCTS q-values (device): steps and their q in [q_min, q_max] -> a PRM batch with
      (q − q_min) / (q_max − q_min) on each step's last token.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlm_jax import tasks as tasks_lib
from rlm_jax.data import encoding
from rlm_jax.data.steps import StepEnds, as_step_ends
from rlm_jax.data.tokenizer import Tokenizer, pad_batch
from rlm_jax.sampling.sampler import SampleOutput, SamplingConfig, StopReason, generate
from rlm_jax.search import tree as tree_lib
from rlm_jax.training import value as value_lib
from rlm_jax.training.rewards import final_step_score

# --- (a) solver labels --------------------------------------------------------------------

# Edits that change what a step claims: a digit, a truth value, a SAT literal, a negation.
_EDIT_PATTERNS = (
    (re.compile(r'\d'), None),
    (re.compile(r'\bTrue\b'), 'False'),
    (re.compile(r'\bFalse\b'), 'True'),
    (re.compile(r'(?<==)T\b'), 'F'),
    (re.compile(r'(?<==)F\b'), 'T'),
    (re.compile(r' is not '), ' is '),
    (re.compile(r' is (?!not )'), ' is not '),
)


def corrupt_step(step: str, rng: np.random.Generator) -> str | None:
  """One random edit that changes the claim of `step`; None if the step offers no edit site.

  Candidate edits: replace one digit by another digit, swap True/False, flip a `=T`/`=F`
  literal, add or remove a negation (" is " <-> " is not "). One candidate is drawn uniformly.
  """
  sites = []
  for pattern, repl in _EDIT_PATTERNS:
    for m in pattern.finditer(step):
      sites.append((m.start(), m.end(), repl))
  if not sites:
    return None
  start, end, repl = sites[int(rng.integers(len(sites)))]
  if repl is None:  # a digit: any other digit
    repl = str(int(rng.choice([d for d in range(10) if str(d) != step[start]])))
  return step[:start] + repl + step[end:]


def solver_labels(tasks: Sequence[dict], seed: int, negatives_per_task: int = 1,
                  max_tries: int = 16) -> list[dict]:
  """Labelled step traces from solver solutions, with corrupted negatives (host side).

  For each task: one positive record (its `steps`, all labelled 1) and up to
  `negatives_per_task` negatives: step k (uniform) is corrupted with `corrupt_step`; steps
  before k keep label 1, step k and later get 0 (the trace is wrong from its first error on).
  When k is the final step, the corrupted trace must not be solved according to
  `tasks.verify`, else another corruption is drawn (e.g. a SAT flip that still satisfies
  every clause). A task whose steps offer no wrong corruption in `max_tries` gets fewer
  negatives. Deterministic in (seed, task position, negative index).

  Args:
    tasks: task dicts with `problem` and `steps` (from `tasks.generate_dataset`).
    seed: base seed.
    negatives_per_task: corrupted traces per task.
    max_tries: corruption draws per negative.

  Returns:
    records {'task', 'problem', 'steps', 'labels' (floats), 'first_error' (-1 = none)}.

  Raises:
    ValueError: a task without steps, or whose own steps the verifier does not accept.
  """
  records = []
  for i, task in enumerate(tasks):
    steps = list(task.get('steps') or [])
    if not steps:
      raise ValueError(f'task {i} has no solver steps (field "steps")')
    if tasks_lib.verify(task, '\n'.join(steps)) != 2:
      raise ValueError(f'task {i}: the verifier does not accept its own solver steps')
    n = len(steps)
    records.append({'task': i, 'problem': task['problem'], 'steps': steps, 'labels': [1.0] * n,
                    'first_error': -1})
    for j in range(negatives_per_task):
      rng = np.random.default_rng((int(seed), i, j))
      for _ in range(max_tries):
        k = int(rng.integers(n))
        bad = corrupt_step(steps[k], rng)
        if bad is None:
          continue
        new = steps[:k] + [bad] + steps[k + 1:]
        if k == n - 1 and tasks_lib.verify(task, '\n'.join(new)) == 2:
          continue
        records.append({'task': i, 'problem': task['problem'], 'steps': new,
                        'labels': [1.0] * k + [0.0] * (n - k), 'first_error': k})
        break
  return records


def encode_step_labels(tok: Tokenizer, records: Sequence[dict], length: int,
                       max_steps: int) -> dict[str, np.ndarray]:
  """Records -> fixed-shape arrays for `value.prm_batch` (host numpy).

  Sequences use the SFT layout (`encoding`): BOS problem STEP | step STEP ... last EOS,
  right-padded to `length`.

  Returns:
    dict tokens [B, length] int32, mask [B, length] bool, completion_start [B] int32,
    step_labels [B, max_steps] float32, step_valid [B, max_steps] bool.
  """
  rows, starts = [], []
  labels = np.zeros((len(records), max_steps), np.float32)
  valid = np.zeros((len(records), max_steps), bool)
  for i, rec in enumerate(records):
    if len(rec['steps']) != len(rec['labels']):
      raise ValueError(f"record {i}: {len(rec['steps'])} steps but {len(rec['labels'])} labels")
    if len(rec['steps']) > max_steps:
      raise ValueError(f"record {i} has {len(rec['steps'])} steps, more than max_steps={max_steps}")
    prompt = encoding.prompt_ids(tok, rec)
    rows.append(prompt + encoding.completion_ids(tok, rec['steps']))
    starts.append(len(prompt))
    labels[i, :len(rec['labels'])] = rec['labels']
    valid[i, :len(rec['labels'])] = True
  tokens, mask = pad_batch(rows, length, tok.pad_id, side='right', what='labelled trace')
  return {'tokens': tokens, 'mask': mask, 'completion_start': np.asarray(starts, np.int32),
          'step_labels': labels, 'step_valid': valid}


# --- (b) Monte Carlo rollout labels -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MCLabelSetup:
  """Static settings of Monte Carlo step labelling (hashable: a static jit argument).

  num_rollouts: M completions sampled from each prefix.
  max_steps: S, steps labelled per trace (later steps are ignored).
  sampling: how continuations are sampled; max_new_tokens is the budget for the rest of the
    solution (its stop_at_step must be False).
  step_id: the step delimiter.
  step_ends: the tokenizer's step-end tables (`StepEnds.of(tok)`); None: only step_id ends a
    step. Used for the step ends of the traces and the default final-step match.
  score_fn: jittable (SampleOutput, batch rows repeated) -> verifier score, given the whole
    solution of each rollout (the trace's steps up to the prefix's end, then the sampled
    continuation; e.g. `host_reward.HostReward.score_fn`); None = the final step must equal
    batch['answer'] (`final_step_score`, which reads the continuation: it holds the final
    step). Score 2 counts as correct.
  """

  num_rollouts: int
  max_steps: int
  sampling: SamplingConfig
  step_id: int
  score_fn: Callable[[SampleOutput, dict], jax.Array] | None = None
  step_ends: StepEnds | None = None

  @property
  def step(self) -> StepEnds | int:
    return self.step_id if self.step_ends is None else self.step_ends

  def __post_init__(self):
    if self.num_rollouts < 1 or self.max_steps < 1:
      raise ValueError(f'MCLabelSetup: num_rollouts={self.num_rollouts} and '
                       f'max_steps={self.max_steps} must be >= 1')
    if self.sampling.stop_at_step:
      raise ValueError('MCLabelSetup.sampling.stop_at_step must be False: rollouts run to the end')


def _score(setup: MCLabelSetup, out: SampleOutput, batch: dict) -> jax.Array:
  if setup.score_fn is not None:
    return setup.score_fn(out, batch)
  return final_step_score(out.tokens_BxT, out.lengths_B, out.stop_reason_B, batch['answer'],
                          batch['answer_len'], setup.step)


def step_ends(completion_BxT, completion_mask_BxT, step_id: StepEnds | int, eos_id: int, max_steps: int):
  """Index of the token closing each step (step delimiter or EOS), in order.

  `step_id` is the tokenizer's `StepEnds` (a delimiter merged into or split over tokens ends a
  step at the token completing it) or the delimiter id.

  Returns:
    (ends_BxS int32 (T where the step does not exist), valid_BxS bool).
  """
  t = completion_BxT.shape[1]
  mask_BxT = completion_mask_BxT.astype(bool)
  is_sep_BxT = mask_BxT & (as_step_ends(step_id).mask(completion_BxT, mask_BxT) | (completion_BxT == eos_id))
  pos_BxT = jnp.where(is_sep_BxT, jnp.arange(t)[None], t)
  ends_BxT = jnp.sort(pos_BxT, axis=1)
  if max_steps > t:
    ends_BxT = jnp.pad(ends_BxT, ((0, 0), (0, max_steps - t)), constant_values=t)
  ends_BxS = ends_BxT[:, :max_steps].astype(jnp.int32)
  return ends_BxS, ends_BxS < t


def mc_rollout_labels(graphdef: nnx.GraphDef, params: nnx.State, setup: MCLabelSetup,
                      batch: dict, key: jax.Array) -> dict:
  """Monte Carlo step labels: fraction of M sampled completions from each prefix that are correct.

  For step k of a trace the prefix is "prompt + completion up to and including the token that
  closes step k", right-aligned (left-padded) for the sampler; all B·S prefixes, each repeated
  M times, are sampled in one batch. A step closed by EOS is the end of the solution: its
  label is the trace's own outcome (no sampling needed; its sampled rows are ignored).

  Args:
    graphdef, params: the policy that completes prefixes.
    setup: static settings.
    batch: prompt [B, Lp] (left-padded) and prompt_mask; completion [B, T] (right-padded,
      steps closed by step_id, the last by EOS) and completion_mask; plus what the scorer
      reads (answer [B, A], answer_len [B] for the default).
    key: PRNG key of the rollouts.

  Returns:
    dict labels [B, S] (P(correct), 0 on invalid steps), valid [B, S] bool, num_correct
    [B, S] int32 (out of M; for a final step M·outcome), outcome [B] float32 (the trace
    itself correct).
  """
  sc = setup.sampling
  prompt_BxLp, prompt_mask_BxLp = batch['prompt'], batch['prompt_mask'].astype(bool)
  comp_BxT, comp_mask_BxT = batch['completion'], batch['completion_mask'].astype(bool)
  b, lp = prompt_BxLp.shape
  t = comp_BxT.shape[1]
  s, m = setup.max_steps, setup.num_rollouts
  w = lp + t

  ends_BxS, valid_BxS = step_ends(comp_BxT, comp_mask_BxT, setup.step, sc.eos_id, s)
  ends_c_BxS = jnp.minimum(ends_BxS, t - 1)
  is_final_BxS = valid_BxS & (jnp.take_along_axis(comp_BxT, ends_c_BxS, axis=1) == sc.eos_id)

  # Prefix k = seq[:lp + end_k + 1], shifted right so that its last token sits in slot w - 1.
  seq_BxW = jnp.concatenate([prompt_BxLp, comp_BxT], axis=1)
  seq_mask_BxW = jnp.concatenate([prompt_mask_BxLp, comp_mask_BxT], axis=1)
  src_BxSxW = jnp.arange(w)[None, None] - (t - 1 - ends_c_BxS)[..., None]
  src_c_BxSxW = jnp.clip(src_BxSxW, 0, w - 1)
  gather = lambda x: jnp.take_along_axis(jnp.broadcast_to(x[:, None], (b, s, w)), src_c_BxSxW, axis=2)
  keep_BxSxW = (src_BxSxW >= 0) & gather(seq_mask_BxW)
  prefix_BxSxW = jnp.where(keep_BxSxW, gather(seq_BxW), sc.pad_id)

  rows = lambda x: jnp.repeat(x.reshape((b * s,) + x.shape[2:]), m, axis=0)  # (b, s, m) order
  out = generate(graphdef, params, rows(prefix_BxSxW), rows(keep_BxSxW), key, sc)
  batch_rep = jax.tree.map(lambda x: jnp.repeat(x, s * m, axis=0), batch)
  if setup.score_fn is not None:  # the scorer judges whole solutions: trace steps 1..k + rollout
    pre_mask_BxSxT = comp_mask_BxT[:, None] & (jnp.arange(t)[None, None] <= ends_c_BxS[..., None])
    pre_BxSxT = jnp.broadcast_to(comp_BxT[:, None], (b, s, t))
    tn = out.tokens_BxT.shape[1]
    sol_tokens = jnp.concatenate([rows(pre_BxSxT), out.tokens_BxT], axis=1)
    sol_mask = jnp.concatenate([rows(pre_mask_BxSxT), jnp.arange(tn)[None] < out.lengths_B[:, None]], axis=1)
    sol_tokens, sol_mask, sol_len = tree_lib.pack(sol_tokens, sol_mask, sc.pad_id, align='left')
    out = SampleOutput(sol_tokens, jnp.zeros(sol_tokens.shape, jnp.float32), sol_len, out.stop_reason_B)
  correct_BxSxM = (_score(setup, out, batch_rep) == 2).reshape(b, s, m)
  num_correct_BxS = correct_BxSxM.sum(axis=2).astype(jnp.int32)

  lengths_B = comp_mask_BxT.sum(axis=1).astype(jnp.int32)
  last_B = jnp.take_along_axis(comp_BxT, jnp.maximum(lengths_B - 1, 0)[:, None], axis=1)[:, 0]
  reason_B = jnp.where((lengths_B > 0) & (last_B == sc.eos_id), StopReason.EOS, StopReason.LENGTH)
  trace = SampleOutput(jnp.where(comp_mask_BxT, comp_BxT, sc.pad_id), jnp.zeros(comp_BxT.shape, jnp.float32),
                       lengths_B, reason_B.astype(jnp.int32))
  outcome_B = (_score(setup, trace, batch) == 2).astype(jnp.float32)

  num_correct_BxS = jnp.where(is_final_BxS, (m * outcome_B)[:, None].astype(jnp.int32), num_correct_BxS)
  num_correct_BxS = jnp.where(valid_BxS, num_correct_BxS, 0)
  labels_BxS = num_correct_BxS.astype(jnp.float32) / m
  return {'labels': labels_BxS, 'valid': valid_BxS, 'num_correct': num_correct_BxS,
          'outcome': outcome_B}


mc_rollout_labels_jit = jax.jit(mc_rollout_labels, static_argnums=(0, 2))


def trace_prm_batch(batch: dict, step_labels_BxS, step_valid_BxS, step_id: StepEnds | int, eos_id: int) -> dict:
  """PRM batch over [prompt | completion] rows of a rollout-style batch (as for
  `mc_rollout_labels`): step k's label on the token that closes step k. Jittable."""
  lp = batch['prompt'].shape[1]
  tokens_BxL = jnp.concatenate([batch['prompt'], batch['completion']], axis=1)
  mask_BxL = jnp.concatenate([batch['prompt_mask'], batch['completion_mask']], axis=1).astype(bool)
  start_B = jnp.full((tokens_BxL.shape[0],), lp, jnp.int32)
  return value_lib.prm_batch(tokens_BxL, mask_BxL, start_B, step_labels_BxS, step_valid_BxS,
                             step_id, eos_id)


# --- (b') the policy's own samples, checked against the solver ---------------------------

def follow_labels(completion_BxT, completion_mask_BxT, reference_BxT, correct_B, step_id: StepEnds | int,
                  eos_id: int, max_steps: int) -> dict:
  """Step labels of sampled traces from the solver's trace of the same problem (jittable).

  A step is right while the sample still agrees token for token with the solver's trace up to
  the token that closes it; from the first differing token on, every step is wrong. A sample
  whose final answer the verifier accepts (`correct_B`) is right at every step (another valid
  route). So the negatives are the policy's own mistakes, where it first left the solution,
  which a PRM must rank for best-of-N and search, unlike the corruptions of `solver_labels`.
  For domains whose solvers admit many equally valid orders of steps a deviation is not always
  an error: there this labels some right steps wrong.

  Args:
    completion_BxT, completion_mask_BxT: sampled completions (right-padded) and their tokens.
    reference_BxT: the solver's completion of each row's problem (same tokenizer; any id that
      no sample produces, e.g. -1, beyond its end).
    correct_B: bool, the sample is verified correct.
    step_id: the tokenizer's `StepEnds` or the delimiter id; eos_id: EOS.
    max_steps: S, steps labelled per trace.

  Returns:
    dict labels [B, S] float32 (1 right, 0 wrong or invalid), valid [B, S] bool,
    first_diff [B] int32 (T when the sample equals the reference over all its tokens).
  """
  t = completion_BxT.shape[1]
  ends_BxS, valid_BxS = step_ends(completion_BxT, completion_mask_BxT, step_id, eos_id, max_steps)
  differ_BxT = completion_mask_BxT.astype(bool) & (completion_BxT != reference_BxT)
  first_diff_B = jnp.where(differ_BxT.any(axis=1), jnp.argmax(differ_BxT, axis=1), t).astype(jnp.int32)
  right_BxS = (ends_BxS < first_diff_B[:, None]) | jnp.asarray(correct_B, bool)[:, None]
  return {'labels': (right_BxS & valid_BxS).astype(jnp.float32), 'valid': valid_BxS, 'first_diff': first_diff_B}


# --- (c) MCTS q-values --------------------------------------------------------------------

def q_value_batch(prompt_BxLp, prompt_mask_BxLp, step_tokens_BxSxK, step_mask_BxSxK, q_BxS,
                  valid_BxS, pad_id: int, q_min: float = -1.0, q_max: float = 1.0) -> dict:
  """PRM / value batch from the steps along search paths and their q-values. Jittable, generic.

  The steps of each row (each padded on either side within its K slots) are packed one after
  another behind the prompt; step s's label (q − q_min) / (q_max − q_min), clipped to [0, 1],
  sits on its last token: the token that closes it (delimiter or EOS), or for a step cut at
  the step-length limit its last generated token, which is where search reads that node's
  value.

  Args:
    prompt_BxLp, prompt_mask_BxLp: prompts (any padding).
    step_tokens_BxSxK, step_mask_BxSxK: S steps per row, K token slots each (e.g. the tree's
      `step_tokens_BxNxL` gathered at `search.export.path_targets(...).node_BxS`).
    q_BxS: q-value of the node each step creates (`path_targets(...).q_BxS`).
    valid_BxS: steps on the path; invalid and empty steps are dropped.
    pad_id: token id for the freed slots.
    q_min, q_max: range of q (rewards −1 / +1 give the default).

  Returns:
    dict(tokens, mask, targets, target_mask) of [B, Lp + S·K] arrays (see `value.py`).
  """
  if not q_max > q_min:
    raise ValueError(f'q_value_batch: q_max={q_max} must be > q_min={q_min}')
  b, s, k = step_tokens_BxSxK.shape
  smask_BxSxK = step_mask_BxSxK.astype(bool) & jnp.asarray(valid_BxS, bool)[..., None]
  len_BxS = smask_BxSxK.sum(-1).astype(jnp.int32)
  offset_BxS = jnp.cumsum(len_BxS, axis=1) - len_BxS
  rank_BxSxK = jnp.cumsum(smask_BxSxK, axis=-1) - 1
  n = s * k
  dest_BxSxK = jnp.where(smask_BxSxK, offset_BxS[..., None] + rank_BxSxK, n)  # n = dropped

  def pack(dest, src, fill):
    return jnp.full((n,), fill, src.dtype).at[dest.reshape(-1)].set(src.reshape(-1), mode='drop')

  comp_BxN = jax.vmap(pack, (0, 0, None))(dest_BxSxK, step_tokens_BxSxK, pad_id)
  comp_mask_BxN = jnp.arange(n)[None] < len_BxS.sum(1)[:, None]
  end_BxS = jnp.where(len_BxS > 0, offset_BxS + len_BxS - 1, n)
  p_BxS = jnp.clip((jnp.asarray(q_BxS, jnp.float32) - q_min) / (q_max - q_min), 0.0, 1.0)
  targets_BxN = jax.vmap(pack, (0, 0, None))(end_BxS, p_BxS, 0.0)
  tmask_BxN = jax.vmap(pack, (0, 0, None))(end_BxS, jnp.ones_like(p_BxS), 0.0)

  lp = prompt_BxLp.shape[1]
  zeros = jnp.zeros((b, lp), jnp.float32)
  return {'tokens': jnp.concatenate([prompt_BxLp, comp_BxN.astype(prompt_BxLp.dtype)], axis=1),
          'mask': jnp.concatenate([prompt_mask_BxLp.astype(bool), comp_mask_BxN], axis=1),
          'targets': jnp.concatenate([zeros, targets_BxN], axis=1),
          'target_mask': jnp.concatenate([zeros, tmask_BxN], axis=1)}
