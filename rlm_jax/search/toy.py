"""A scripted step-by-step task with known answers, for tests, benchmarks and strategy comparisons.

Problem p has a hidden path `target[p]` of H actions from {0..A-1}. A solution is H steps; step
j is the token `first_id + a_j` followed by the step delimiter (EOS after the last step). The
final answer is the last action; the verifier gives +1 when it equals `target[p, H-1]` and the
solution is complete, -1 otherwise (`reward_kind='path'`: +1 only for the whole target path,
a needle in A^H leaves).

The scripted policy follows a per-problem logit table while every step so far was correct;
after a wrong step it is lost (uniform), so errors compound as in real reasoning. The scripted
value / PRM scores a prefix +confidence if all its steps are correct and -confidence otherwise,
plus deterministic pseudo-noise. Everything is jittable and driven by `params`:
`{'target': int [P, H], 'logits': float [P, H, A]}`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from rlm_jax.search import tree as tree_lib
from rlm_jax.search.base import NodeBatch, SearchModel, Steps


@dataclasses.dataclass(frozen=True)
class ToyTask:
  """Shape and behaviour of the toy task (static).

  Attributes:
    num_actions: A.
    horizon: H steps per solution.
    first_id: token of action 0 (CharTokenizer ids: 0 PAD, 2 EOS, 3 STEP are special).
    pad_id, eos_id, step_id: special tokens.
    enumerate: next-step candidate k is action k mod A (deterministic) instead of a sample;
      makes trees exactly predictable. Completions (`to_end`) are still sampled.
    value_confidence: |value| of the scripted value model (0 = uninformative).
    value_noise: amplitude of the deterministic pseudo-noise added to values.
    reward_kind: 'final' (the last action decides) or 'path' (every action must match).
  """

  num_actions: int = 3
  horizon: int = 3
  first_id: int = 20
  pad_id: int = 0
  eos_id: int = 2
  step_id: int = 3
  enumerate: bool = False
  value_confidence: float = 0.5
  value_noise: float = 0.0
  reward_kind: str = 'final'

  def __post_init__(self):
    if self.reward_kind not in ('final', 'path'):
      raise ValueError(f"toy.reward_kind='{self.reward_kind}': must be 'final' or 'path'")


def make_params(key: jax.Array, num_problems: int, task: ToyTask, skill: float = 1.0,
                noise: float = 1.0) -> dict:
  """Random targets and policy logits: the correct action gets +skill, all actions N(0, noise)."""
  k1, k2 = jax.random.split(key)
  a, h = task.num_actions, task.horizon
  target = jax.random.randint(k1, (num_problems, h), 0, a)
  logits = noise * jax.random.normal(k2, (num_problems, h, a))
  logits = logits + skill * jax.nn.one_hot(target, a)
  return {'target': target.astype(jnp.int32), 'logits': logits.astype(jnp.float32)}


def prompts(num_problems: int, task: ToyTask, length: int = 4):
  """Dummy left-padded prompts (the toy reads the problem id, not the prompt)."""
  tok = jnp.full((num_problems, length), task.first_id + task.num_actions, jnp.int32)
  return tok, jnp.ones((num_problems, length), bool)


def _path_actions(task: ToyTask, tokens_MxT, depth_M):
  """Actions on each node's path (packed right-aligned two-token steps): (act_MxH, valid_MxH)."""
  t = tokens_MxT.shape[1]
  j_H = jnp.arange(task.horizon)
  pos = t - 2 * (depth_M[:, None] - j_H[None, :])
  valid = j_H[None, :] < depth_M[:, None]
  act = jnp.take_along_axis(tokens_MxT, jnp.clip(pos, 0, t - 1), axis=1) - task.first_id
  return jnp.where(valid, act, -1), valid


def _step_logits(task: ToyTask, params, problem_M, depth_M, lost_M):
  d = jnp.clip(depth_M, 0, task.horizon - 1)
  logits = params['logits'][problem_M, d]
  return jnp.where(lost_M[:, None], 0.0, logits)


def _hash_noise(x):
  """Deterministic pseudo-random number in [-1, 1) from a float array."""
  y = jnp.sin(x * 12.9898 + 78.233) * 43758.5453
  return 2.0 * (y - jnp.floor(y)) - 1.0


def make_model(task: ToyTask, *, with_value: bool = True, with_reward: bool = True) -> SearchModel:
  """Scripted policy / value / verifier of the toy task as a SearchModel."""
  a, h = task.num_actions, task.horizon

  def lost_of(params, act_MxH, valid_MxH, problem_M):
    wrong = valid_MxH & (act_MxH != params['target'][problem_M])
    return wrong.any(axis=1)

  def packed(nodes: NodeBatch) -> NodeBatch:
    # NodeBatch rows may hold padding gaps; the toy reads steps by position.
    tokens, mask, _ = tree_lib.pack(nodes.tokens_MxT, nodes.mask_MxT, task.pad_id, align='right')
    return nodes._replace(tokens_MxT=tokens, mask_MxT=mask)

  def policy_fn(params, key, nodes: NodeBatch, num: int, *, to_end: bool, greedy: bool) -> Steps:
    nodes = packed(nodes)
    m = nodes.depth_M.shape[0]
    act, valid = _path_actions(task, nodes.tokens_MxT, nodes.depth_M)
    lost0 = lost_of(params, act, valid, nodes.problem_M)
    rep = lambda x: jnp.repeat(x, num, axis=0)
    problem, depth, lost = rep(nodes.problem_M), rep(nodes.depth_M), rep(lost0)
    rows = m * num

    def one_step(carry, key_j):
      depth_R, lost_R = carry
      logits = _step_logits(task, params, problem, depth_R, lost_R)
      if task.enumerate and not to_end:
        pick = jnp.tile(jnp.arange(num) % a, m)
      elif greedy:
        pick = jnp.argmax(logits, axis=1)
      else:
        pick = jax.random.categorical(key_j, logits, axis=1)
      logp = jnp.take_along_axis(jax.nn.log_softmax(logits), pick[:, None], axis=1)[:, 0]
      live = depth_R < h
      correct = pick == params['target'][problem, jnp.clip(depth_R, 0, h - 1)]
      last = depth_R + 1 >= h
      tok = jnp.stack([task.first_id + pick, jnp.where(last, task.eos_id, task.step_id)], axis=1)
      tok = jnp.where(live[:, None], tok, task.pad_id)
      new = (depth_R + live.astype(jnp.int32), lost_R | (live & ~correct))
      return new, (tok, jnp.where(live, logp, 0.0), live)

    n_steps = h if to_end else 1
    keys = jax.random.split(key, n_steps)
    (_, _), (tok_SxRx2, logp_SxR, live_SxR) = jax.lax.scan(one_step, (depth, lost), keys)
    tokens = jnp.transpose(tok_SxRx2, (1, 0, 2)).reshape(rows, 2 * n_steps)
    live = live_SxR.T
    # Steps that did not happen are padding at the end already (depth only grows).
    lengths = 2 * live.sum(axis=1)
    terminal = (depth + live.sum(axis=1)) >= h
    return Steps(tokens.reshape(m, num, -1).astype(jnp.int32), lengths.reshape(m, num).astype(jnp.int32),
                 logp_SxR.sum(axis=0).reshape(m, num), (terminal & (lengths > 0)).reshape(m, num))

  def value_fn(params, nodes: NodeBatch):
    nodes = packed(nodes)
    t = nodes.tokens_MxT.shape[1]
    tok = nodes.tokens_MxT
    start_M = t - 2 * nodes.depth_M  # first column of the first step
    step_MxT = (jnp.arange(t)[None, :] - start_M[:, None]) // 2  # step of each column, <0: prompt
    act, valid = _path_actions(task, tok, nodes.depth_M)
    wrong = valid & (act != params['target'][nodes.problem_M])
    wrong_upto = jnp.cumsum(wrong, axis=1) > 0  # some step <= j was wrong
    bad = jnp.take_along_axis(wrong_upto, jnp.clip(step_MxT, 0, h - 1), axis=1)
    v = jnp.where(bad, -task.value_confidence, task.value_confidence)
    v = jnp.where(step_MxT < 0, 0.0, v)  # the question alone: no information
    rank = jnp.cumsum(nodes.mask_MxT, axis=1)
    code = jnp.cumsum(jnp.where(nodes.mask_MxT, tok * (rank % 7 + 1), 0), axis=1)
    v = v + task.value_noise * _hash_noise(code.astype(jnp.float32) + 0.1 * nodes.problem_M[:, None])
    return jnp.clip(v, -1.0, 1.0).astype(jnp.float32)

  def reward_fn(params, tokens_MxL, mask_MxL, problem_M):
    l = tokens_MxL.shape[1]
    n = mask_MxL.sum(axis=1)
    last_tok = jnp.take_along_axis(tokens_MxL, jnp.clip(n - 1, 0, l - 1)[:, None], axis=1)[:, 0]
    act = tokens_MxL[:, 0:2 * h:2] - task.first_id  # actions sit at even positions
    target = params['target'][problem_M]
    if task.reward_kind == 'final':
      right = act[:, h - 1] == target[:, h - 1]
    else:
      right = jnp.all(act == target, axis=1)
    ok = (n == 2 * h) & (last_tok == task.eos_id) & right
    return jnp.where(ok, 1.0, -1.0)

  return SearchModel(policy_fn=policy_fn, value_fn=value_fn if with_value else None,
                     reward_fn=reward_fn if with_reward else None,
                     pad_id=task.pad_id, eos_id=task.eos_id, step_id=task.step_id)


def answer_ids(task: ToyTask) -> tuple[int, ...]:
  """No marker: the toy's answer is its last step."""
  del task
  return ()


# ------------------------------------------------------------------------------------------
# A tree given by tables, for hand-computed search tests.


def table_node_ids(num_actions: int, actions_MxD, valid_MxD):
  """Node of each path in the complete A-ary tree numbered breadth first (root 0, child a of
  node n is n * A + 1 + a): node_M."""
  def step(node_M, x):
    a_M, ok_M = x
    return jnp.where(ok_M, node_M * num_actions + 1 + a_M, node_M), None

  node0 = jnp.zeros(actions_MxD.shape[:1], jnp.int32)
  return jax.lax.scan(step, node0, (actions_MxD.T, valid_MxD.T))[0]


def make_table_model(num_actions: int, max_depth: int, task: ToyTask = ToyTask()) -> SearchModel:
  """A scripted tree whose every node is given by per-problem tables (node ids as
  `table_node_ids`, N = (A^(D+1) - 1) / (A - 1) nodes), driven by `params`:

    {'terminal': bool [P, N], 'value': float [P, N] (value / PRM of the node's state),
     'reward': float [P, N] (verifier reward of a terminal node), 'logprob': float [P, N]
     (log pi of the step into the node)}.

  Next-step candidate k is action k mod A (like `ToyTask.enumerate`); a step is the token
  `first_id + a` and then EOS if the node is terminal, else the step delimiter. Completions
  (`to_end`) take action 0 until a terminal node or depth D. The value callable scores every
  step end with the table; the reward callable reads the node the solution ends in.
  """
  a_n, d_max = num_actions, max_depth
  shape_task = dataclasses.replace(task, num_actions=a_n, horizon=d_max)

  def node_of(tokens_MxT, depth_M):
    act, valid = _path_actions(shape_task, tokens_MxT, depth_M)
    return table_node_ids(a_n, jnp.maximum(act, 0), valid)

  def packed(nodes: NodeBatch) -> NodeBatch:
    tokens, mask, _ = tree_lib.pack(nodes.tokens_MxT, nodes.mask_MxT, task.pad_id, align='right')
    return nodes._replace(tokens_MxT=tokens, mask_MxT=mask)

  def policy_fn(params, key, nodes: NodeBatch, num: int, *, to_end: bool, greedy: bool) -> Steps:
    del key, greedy  # deterministic
    nodes = packed(nodes)
    m = nodes.depth_M.shape[0]
    rep = lambda x: jnp.repeat(x, num, axis=0)
    node, depth, problem = rep(node_of(nodes.tokens_MxT, nodes.depth_M)), rep(nodes.depth_M), rep(nodes.problem_M)
    n_steps = d_max if to_end else 1
    first_pick = jnp.tile(jnp.arange(num) % a_n, m) if not to_end else jnp.zeros((m * num,), jnp.int32)

    def one_step(carry, j):
      node_R, depth_R, done_R = carry
      pick = jnp.where(j == 0, first_pick, 0)
      child = node_R * a_n + 1 + pick
      live = ~done_R & (depth_R < d_max)
      term = params['terminal'][problem, jnp.where(live, child, 0)]
      tok = jnp.stack([task.first_id + pick, jnp.where(term, task.eos_id, task.step_id)], axis=1)
      tok = jnp.where(live[:, None], tok, task.pad_id)
      logp = jnp.where(live, params['logprob'][problem, jnp.where(live, child, 0)], 0.0)
      new = (jnp.where(live, child, node_R), depth_R + live.astype(jnp.int32), done_R | (live & term))
      return new, (tok, logp, live, live & term)

    done0 = params['terminal'][problem, node]
    _, (tok_SxRx2, logp_SxR, live_SxR, term_SxR) = jax.lax.scan(
        one_step, (node, depth, done0), jnp.arange(n_steps))
    tokens = jnp.transpose(tok_SxRx2, (1, 0, 2)).reshape(m * num, 2 * n_steps)
    lengths = 2 * live_SxR.sum(axis=0)
    return Steps(tokens.reshape(m, num, -1).astype(jnp.int32), lengths.reshape(m, num).astype(jnp.int32),
                 logp_SxR.sum(axis=0).reshape(m, num), term_SxR.any(axis=0).reshape(m, num))

  def value_fn(params, nodes: NodeBatch):
    nodes = packed(nodes)
    t = nodes.tokens_MxT.shape[1]
    # Every column scores the node of the steps that end at or before it.
    start_M = t - 2 * nodes.depth_M
    steps_done_MxT = jnp.clip((jnp.arange(t)[None, :] - start_M[:, None] + 1) // 2, 0, d_max)
    act, valid = _path_actions(shape_task, nodes.tokens_MxT, nodes.depth_M)

    def node_upto(k_M):
      return table_node_ids(a_n, jnp.maximum(act, 0), valid & (jnp.arange(d_max)[None, :] < k_M[:, None]))

    node_MxT = jax.vmap(node_upto, in_axes=1, out_axes=1)(steps_done_MxT)
    return params['value'][nodes.problem_M[:, None], node_MxT].astype(jnp.float32)

  def reward_fn(params, tokens_MxL, mask_MxL, problem_M):
    n = mask_MxL.sum(axis=1)
    act = tokens_MxL[:, 0:2 * d_max:2] - task.first_id
    valid = jnp.arange(d_max)[None, :] < (n // 2)[:, None]
    node = table_node_ids(a_n, jnp.clip(act, 0, a_n - 1), valid)
    ok = params['terminal'][problem_M, node]
    return jnp.where(ok, params['reward'][problem_M, node], -1.0).astype(jnp.float32)

  return SearchModel(policy_fn=policy_fn, value_fn=value_fn, reward_fn=reward_fn,
                     pad_id=task.pad_id, eos_id=task.eos_id, step_id=task.step_id)


def table_params(num_actions: int, max_depth: int, nodes: dict, problems: int = 1) -> dict:
  """Tables for `make_table_model` from `{node: dict(value=, terminal=, reward=, logprob=)}`
  (unlisted nodes: value 0, non-terminal, reward -1, log pi = -log A), the same for every
  problem."""
  n = (num_actions ** (max_depth + 1) - 1) // (num_actions - 1)
  value, reward = np.zeros(n, np.float32), np.full(n, -1.0, np.float32)
  terminal = np.zeros(n, bool)
  logprob = np.full(n, -np.log(num_actions), np.float32)
  for node, spec in nodes.items():
    value[node] = spec.get('value', 0.0)
    terminal[node] = spec.get('terminal', False)
    reward[node] = spec.get('reward', -1.0)
    logprob[node] = spec.get('logprob', logprob[node])
  tile = lambda x: jnp.asarray(np.repeat(x[None], problems, axis=0))
  return {'value': tile(value), 'terminal': tile(terminal), 'reward': tile(reward), 'logprob': tile(logprob)}
