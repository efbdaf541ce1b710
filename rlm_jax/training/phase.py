"""What a phase-2 algorithm declares, so the experiment can run it from one registry table.

An algorithm is one module (`training/grpo.py`, `rloo.py`, ...) that ends with

    ALGORITHM = Algorithm(name='grpo', config=GRPOConfig, build=build_phase, ...)

and one line in `training/algorithms.py`. `build(ctx, section)` gets the run's pieces (a
`PhaseContext`, built by the experiment runner) and the typed `config.rl.<name>` section and
returns a `Phase`: the initial state pytree (checkpointed as `ckpt/<name>`), a step function
(state, batch, i) -> (state, metrics) that dispatches compiled programs, the batch of
iteration i, and how to read the trained policy (and value model) back out of the state.
The experiment owns the loop around it (checkpoints, resume, metrics, evaluation); the
algorithm owns its state and its compiled step. Metrics are the step's scalar dict, logged
as `<name>/<key>`; a 'finite' entry (bool) is checked and dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

# The capabilities an algorithm can declare; the runner refuses a config that asks for one
# the chosen algorithm lacks (one line naming the key), instead of an `if algo ==` chain.
CAPABILITIES = ('lora', 'microbatches', 'rollout_mesh', 'host_reward')


@dataclasses.dataclass
class PhaseContext:
  """The pieces of a run an algorithm builds its phase from (duck-typed, filled by the runner).

  Attributes:
    rl: the generic `config.rl` section (`experiment.config.RLConfig`): iterations,
      prompts_per_iteration, group_size, sampling knobs, optim, reward, microbatches...
    seed: the run's seed; keys are functions of (seed, iteration).
    tok: the tokenizer (special ids: eos_id, pad_id, step_id).
    task: `config.task` (prompt_len, completion_len, answer_len).
    value_mode: `config.value.mode` ('mse' | 'bce').
    mesh, rules: the training mesh and its logical-axis rules.
    policy: (graphdef, params) after phase 1 (LoRA form when LoRA is on).
    value: (graphdef, params) of the phase-1 value model, or None.
    models: the run's `experiment.models.ModelBuilder` (value_model, actor_critic, optimizer).
    pool: the phase-2 problems (`experiment.data.Data`).
    device_batch: (host arrays, row indices) -> device batch (multi-process aware).
    prompts: iteration -> row indices of `pool` for that iteration.
    sampling: the rollout `SamplingConfig` (rl.temperature, top_k, top_p; task lengths).
    host_scorer: (tasks, group_size) -> scorer for `rl.reward_on='host'`.
    rollout_at: a `grpo.Placement` for `rl.rollout_mesh`, or None (the training mesh).
    sft_data: the SFT split's host arrays (tokens, mask, loss_mask; `encoding.encode_sft`),
      empty when the run has no solver traces: what a data mix against forgetting draws from.
  """

  rl: Any
  seed: int
  tok: Any
  task: Any
  value_mode: str
  mesh: Any
  rules: Any
  policy: tuple[Any, Any]
  value: tuple[Any, Any] | None
  models: Any
  pool: Any
  device_batch: Callable
  prompts: Callable[[int], Any]
  sampling: Any
  host_scorer: Callable
  rollout_at: Any = None
  sft_data: Any = None


@dataclasses.dataclass
class Phase:
  """A built phase-2 algorithm (see the module docstring)."""

  state: Any
  step: Callable[[Any, Any, int], tuple[Any, dict]]
  batch: Callable[[int], Any]
  policy: Callable[[Any], tuple[Any, Any]]
  value: Callable[[Any], tuple[Any, Any] | None] = lambda state: None


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """A registry entry.

  Attributes:
    name: the `rl.algo` value; also its config section `rl.<name>` and checkpoint `ckpt/<name>`.
    config: frozen dataclass of `config.rl.<name>`.
    build: (PhaseContext, section) -> Phase.
    capabilities: subset of CAPABILITIES this algorithm supports.
    policy_path: where the policy params sit in the checkpointed state (inference restores
      them from there without rebuilding the phase).
    value_path: where the value model's params sit, or None.
    policy_head: the value head the policy model carries ('none'; PPO's actor-critic: 'sigmoid').
    trains_value: the phase trains a value model (built from `config.value`) even when phase 1
      has none.
    requires_value: the phase reads the phase-1 value model / PRM (`value.enabled` must be True).
  """

  name: str
  config: type
  build: Callable[[PhaseContext, Any], Phase]
  capabilities: frozenset[str] = frozenset()
  policy_path: tuple[str, ...] = ('params',)
  value_path: tuple[str, ...] | None = None
  policy_head: str = 'none'
  trains_value: bool = False
  requires_value: bool = False

  def __post_init__(self):
    unknown = set(self.capabilities) - set(CAPABILITIES)
    if unknown:
      raise ValueError(f'Algorithm {self.name}: unknown capabilities {sorted(unknown)} '
                       f'(allowed: {", ".join(CAPABILITIES)})')


def iteration_key(seed: int, offset: int, i: int):
  """The PRNG key of iteration i of a phase (a function of (seed, i): resumes reproduce it)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.random.fold_in(jax.random.key(seed + offset), i)
