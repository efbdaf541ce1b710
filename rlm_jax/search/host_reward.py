"""The task verifier on host as a jittable search reward (problems with many right answers).

`lm.answer_reward_fn` matches a solution's final step with the solver's answer tokens on
device: exact for tasks with one answer text, wrong for domains where any solution meeting the
constraints is right (Countdown: `unique_solution` False, any expression reaching the target).
`HostReward` instead sends the solution tokens to host through `jax.pure_callback`, decodes
them (step delimiters as text) and scores them with `tasks.verify`, the function GRPO's host
scorer (`experiment.data.host_scorer`) calls, with the same rule: a row that does not end in
EOS scores -1 without being decoded.

    reward = HostReward(tok, pool_tasks)  # built once: a static argument, hashed by identity
    model = lm.make_search_model(gd, options, ids, reward_fn=reward)
    params = lm.LMParams(policy=state, reward=jnp.asarray(problem_ids_P))  # a new round: new ids
    result = jax.jit(partial(mcts_search, model=model, config=cfg))(params, key, prompt, mask)

The task list stays on host, closed over by the callback; what travels per round is the table
of the round's global problem indices (`LMParams.reward`), so a new batch of problems does not
recompile. The callback runs inside `lax.while_loop` / `lax.switch` (MCTS uses both); it is
called once per expansion with every child row (non-terminal rows cost one comparison on
host). It has not been exercised with several processes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlm_jax import tasks as tasks_lib
from rlm_jax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SOLVED = 2  # the verifier's score of a solved task


def verify_rows(tok: Tokenizer, tasks: Sequence[dict], tokens_BxL: np.ndarray, mask_BxL: np.ndarray,
                task_B: np.ndarray) -> np.ndarray:
  """Verifier scores of solution rows, on host (numpy in, numpy out).

  Args:
    tok: the tokenizer (decodes step delimiters as their text).
    tasks: the task dicts that `task_B` indexes.
    tokens_BxL, mask_BxL: solution tokens (no prompt) and their real positions.
    task_B: index into `tasks` of each row's problem.

  Returns:
    int32 [B]: `tasks.verify` of the decoded row when its last real token is EOS; -1 for an
    unfinished or empty row, an index outside `tasks`, or a verifier that raised.
  """
  tokens_BxL, mask_BxL, task_B = np.asarray(tokens_BxL), np.asarray(mask_BxL, bool), np.asarray(task_B)
  out = np.full(task_B.shape, -1, np.int32)
  for r in range(task_B.shape[0]):
    seq = tokens_BxL[r][mask_BxL[r]]
    g = int(task_B[r])
    if not seq.size or int(seq[-1]) != tok.eos_id or not 0 <= g < len(tasks):
      continue
    try:
      out[r] = tasks_lib.verify(tasks[g], tok.decode(seq))
    except Exception:  # pylint: disable=broad-except
      # A search must not die on one row; the tasks were parsed when the reward was built.
      log.exception('verifier raised on a solution of problem %d; scoring -1', g)
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class HostReward:
  """Jittable verifier reward over a fixed list of tasks (hashed by identity: build it once
  per run and the programs that take it as a static argument compile once).

  As a `reward_fn` (`lm.make_search_model`, `SearchModel.reward_fn`):
  `reward(problems_P, tokens_BxL, mask_BxL, problem_B) -> reward_B` float32, +1 solved, -1
  otherwise (the convention of `lm.answer_reward_fn`), where problems_P (`LMParams.reward`)
  maps the search's problem ids (0..P-1) to indices into `tasks`.

  `score_fn(out, batch)`: the verifier score of sampled rows (the `score_fn` contract of
  `labels.MCLabelSetup` and the rollout setups), `batch['problem']` indexing `tasks`.

  Attributes:
    tok: the tokenizer.
    tasks: the task dicts (e.g. the whole phase-2 pool), parsed once here: a malformed task
      fails when the reward is built, not inside a search.
  """

  tok: Tokenizer
  tasks: tuple

  def __post_init__(self):
    object.__setattr__(self, 'tasks', tuple(self.tasks))
    for i, task in enumerate(self.tasks):
      try:
        tasks_lib.domain_of(task).parse_task(task)
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f'HostReward: task {i} ({str(task.get("problem", ""))[:40]!r}) is malformed: {e}') from e

  def scores(self, tokens_BxL, mask_BxL, task_B) -> jax.Array:
    """Verifier scores int32 [B] of solution rows (`verify_rows` through a host callback)."""
    host = lambda t, m, i: verify_rows(self.tok, self.tasks, t, m, i)
    return jax.pure_callback(host, jax.ShapeDtypeStruct(task_B.shape, jnp.int32), tokens_BxL, mask_BxL,
                             task_B.astype(jnp.int32), vmap_method='sequential')

  def __call__(self, problems_P, tokens_BxL, mask_BxL, problem_B) -> jax.Array:
    task_B = jnp.asarray(problems_P, jnp.int32)[problem_B]
    return jnp.where(self.scores(tokens_BxL, mask_BxL, task_B) == SOLVED, 1.0, -1.0).astype(jnp.float32)

  def score_fn(self, out, batch: dict) -> jax.Array:
    t = out.tokens_BxT.shape[1]
    return self.scores(out.tokens_BxT, jnp.arange(t)[None] < out.lengths_B[:, None], batch['problem'])
