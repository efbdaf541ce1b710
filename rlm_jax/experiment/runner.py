"""An experiment run: phase 1 SFT (and optionally the value model), phase 2 from the registry,
held-out evaluation after each phase.

    cfg = experiment.config.parse(configlib.load_config('configs/main.py'))
    results = Experiment(cfg, workdir).run()

Phase 2 is whatever `training.algorithms.ALGORITHMS[cfg.rl.algo]` builds (see
`training/phase.py`): the runner gives it a `PhaseContext` and runs its steps in the resumable
loop (`experiment.loop.run_phase`); it has no per-algorithm code.
"""

from __future__ import annotations

import numpy as np

import jax

from rlm_jax import checkpoint as ckpt_lib
from rlm_jax import distributed
from rlm_jax import metrics as metrics_lib
from rlm_jax import sharding
from rlm_jax import tasks as tasks_lib
from rlm_jax.experiment import config as config_lib
from rlm_jax.experiment import data as data_lib
from rlm_jax.experiment import loop
from rlm_jax.experiment import models as models_lib
from rlm_jax.experiment import value_phase
from rlm_jax.sampling.sampler import SamplingConfig
from rlm_jax.training import evaluate as eval_lib
from rlm_jax.training import grpo as grpo_lib
from rlm_jax.training.phase import PhaseContext
from rlm_jax.training.sft import sft_step_jit
from rlm_jax.training.state import create_train_state

ConfigError = config_lib.ConfigError


class Experiment:
  """Holds the static pieces of a run (models builder, data, mesh); state stays a pytree."""

  def __init__(self, cfg: config_lib.ExperimentConfig, workdir: str):
    self.cfg = cfg
    self.workdir = workdir
    self.tok = models_lib.load_run_tokenizer(cfg)
    self.models = models_lib.ModelBuilder(cfg, self.tok)
    if config_lib.has_value_model(cfg):
      self.models.value_config()  # a value.arch the run cannot build fails here, before any phase
    self.mesh, self.rules = self.models.mesh, self.models.rules
    # The rollout's own placement, when it differs from the training mesh.
    self.rollout_at = None
    rm = cfg.rl.rollout_mesh
    if rm is not None:
      rollout_mesh = sharding.make_mesh(rm)
      if dict(rollout_mesh.shape) != dict(self.mesh.shape) or rm.rules != self.rules:
        self.rollout_at = grpo_lib.Placement(rollout_mesh, rm.rules)
    self.prompt_format = cfg.tokenizer.prompt_format()
    self.train, self.held = data_lib.build_data(self.tok, cfg.task, cfg.eval.size, self.prompt_format,
                                                traces=cfg.sft.steps > 0)
    if cfg.task.rl_size or cfg.task.rl_file:
      self.rl_pool = data_lib.build_rl_pool(self.tok, cfg.task, (self.train, self.held), self.prompt_format)
    else:
      self.rl_pool = self.train
    if cfg.rl.algo != 'none' and cfg.rl.iterations > 0 and cfg.rl.prompts_per_iteration > len(self.rl_pool.tasks):
      raise ConfigError(f'rl.prompts_per_iteration={cfg.rl.prompts_per_iteration}: more than the '
                        f'{len(self.rl_pool.tasks)} problems of the phase-2 pool (task.rl_size={cfg.task.rl_size})')
    self._check_answer_matching()
    self._check_label_sources()
    self.metrics = None
    self.results = loop.Results(workdir)

  def _check_label_sources(self):
    """'checked' labels need a domain that judges steps; 'policy' labels the solver's steps."""
    cfg = self.cfg
    if not (cfg.value.enabled and cfg.value.steps > 0):
      return
    sources = cfg.value.label_sources
    if 'checked' in sources:
      bad = next((t for t in self.train.tasks if not tasks_lib.has_step_checker(t)), None)
      if bad is not None:
        raise ConfigError(f"value.labels='{cfg.value.labels}': {bad.get('type')} problems have no step checker "
                          f"(tasks.check_steps); use 'policy' or 'mc'")
    bad = next((i for i, t in enumerate(self.train.tasks) if not t.get('steps')), None) if 'policy' in sources else None
    if bad is not None:
      problem = str(self.train.tasks[bad].get('problem', ''))[:40]
      raise ConfigError(f"value.labels='{cfg.value.labels}': training problem {bad} ({problem!r}) has no solver steps "
                        f"to compare samples with; use 'checked' (where the domain has a step checker) or 'mc'")

  def _check_answer_matching(self):
    """Device-side rewards compare a completion's final step with the solver's answer text;
    problems with many right answers (`unique_solution` False, e.g. Countdown) need the
    verifier, on host: every phase-2 algorithm (search-based ones included) with
    rl.reward_on='device' is refused. Monte Carlo and MCTS labels switch to the host verifier
    on such problems by themselves (`value_phase.label_verifier`)."""
    cfg = self.cfg
    many = next((t for ts in (self.train.tasks, self.rl_pool.tasks) for t in ts
                 if t.get('unique_solution') is False), None)
    if many is None:
      return
    what = f"{many.get('type', cfg.task.domain)} problems have many right answers (unique_solution False)"
    if cfg.rl.algo != 'none' and cfg.rl.iterations > 0 and cfg.rl.reward_on == 'device':
      raise ConfigError(f"rl.reward_on='device' matches the solver's answer text, but {what}: set "
                        "rl.reward_on='host'")

  # --- pieces -----------------------------------------------------------------------------

  def device_batch(self, arrays: dict[str, np.ndarray], idx: np.ndarray,
                   per_process: bool | None = None) -> dict[str, jax.Array]:
    """Rows `idx` of host arrays as one global batch.

    With several processes each one reads only the rows its devices hold
    (`distributed.batch_slice`) and the global arrays are assembled from those slices
    (`distributed.host_local_to_global`), laid out along the 'batch' rules; `idx` is a function
    of (seed, step), so every process computes the same one. A single process hands plain
    arrays to the jitted step, which places them.

    Args:
      arrays: host arrays with tasks (or traces) along the leading dim.
      idx: [B] global batch rows.
      per_process: force (True) or skip (False) the multi-process path; None = when
        jax.process_count() > 1.

    Returns:
      {name: jax.Array [B, ...]}.
    """
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    if per_process is None:
      per_process = jax.process_count() > 1
    if not per_process:
      return {k: jnp.asarray(v[idx]) for k, v in arrays.items()}
    rows = idx[distributed.batch_slice(len(idx), self.mesh, self.rules)]
    return distributed.host_local_to_global({k: v[rows] for k, v in arrays.items()}, self.mesh, self.rules)

  def rollout_sampling(self) -> SamplingConfig:
    rl = self.cfg.rl
    return SamplingConfig(max_new_tokens=self.cfg.task.completion_len, eos_id=self.tok.eos_id,
                          pad_id=self.tok.pad_id, step_id=self.tok.step_id, temperature=rl.temperature,
                          top_k=rl.top_k, top_p=rl.top_p)

  def run_phase(self, name, num_steps, step_offset, state, step_fn, batch_fn, stop):
    return loop.run_phase(name, num_steps, step_offset, state, step_fn, batch_fn, stop, workdir=self.workdir,
                          checkpoint=self.cfg.checkpoint, metrics=self.metrics)

  def evaluate(self, graphdef, params, tag: str, step: int, value=None) -> dict:
    """Held-out accuracy of the (plain) policy; `value`: (graphdef, params) of the value model
    for the value-guided strategies."""
    graphdef, params = self.models.plain_policy(graphdef, params)
    res = eval_lib.evaluate(graphdef, params, self.tok, self.held.tasks, self.held.prompt,
                            self.held.prompt_mask, self.cfg.task.completion_len, self.cfg.eval,
                            jax.random.key(self.cfg.seed + 7), value=value)
    if value is not None:  # how good the value model is, step by step
      res.update(value_phase.prm_quality(self, value))
    self.metrics.write(step, {f'eval/{k}': v for k, v in res.items()})
    self.results.put(tag, res)
    return res

  def phase1_end(self) -> int:
    """Metrics step of the phase-1 evaluation: after SFT and, when enabled, the value phase
    (which logs at sft.steps + 1 ...). Phase 2 logs from here + 1."""
    v = self.cfg.value
    return self.cfg.sft.steps + (v.steps + 1 if v.enabled else 0)

  def host_scorer(self):
    """(tasks, group_size) -> the host scorer of `rl.reward_on='host'`: the verifier's scores,
    or (scores, rewards, metrics) of `rl.reward_fns` (`data.host_rewards`)."""
    rl = self.cfg.rl
    if not rl.reward_fns:
      return lambda ts, g: data_lib.host_scorer(self.tok, ts, g)
    from rlm_jax.tasks import reward_fns  # pylint: disable=g-import-not-at-top
    fns = reward_fns.load_reward_fns(rl.reward_fns)
    return lambda ts, g: data_lib.host_rewards(self.tok, ts, g, fns, rl.reward_weights, self.prompt_format)

  def phase_context(self, policy, value) -> PhaseContext:
    cfg, pool = self.cfg, self.rl_pool
    rl = cfg.rl
    prompts = lambda i: np.random.default_rng((cfg.seed, 2, i)).choice(len(pool.tasks), rl.prompts_per_iteration,
                                                                       replace=False)
    return PhaseContext(rl=rl, seed=cfg.seed, tok=self.tok, task=cfg.task, value_mode=cfg.value.mode,
                        mesh=self.mesh, rules=self.rules, policy=policy, value=value, models=self.models,
                        pool=pool, device_batch=self.device_batch, prompts=prompts,
                        sampling=self.rollout_sampling(), host_scorer=self.host_scorer(),
                        rollout_at=self.rollout_at, sft_data=self.train.sft)

  # --- phases -----------------------------------------------------------------------------

  def run_sft(self, stop):
    """Phase 1. Returns ((graphdef, params), finished)."""
    cfg = self.cfg
    graphdef, params = self.models.init_policy()
    tx = self.models.optimizer(cfg.sft.optim, params)
    state = create_train_state(params, tx, self.mesh, self.rules)
    n_train = len(self.train.tasks)

    def batch(step):
      idx = np.random.default_rng((cfg.seed, 1, step)).choice(n_train, cfg.sft.batch_size, replace=False)
      return self.device_batch(self.train.sft, idx)

    step_fn = lambda st, b, step: sft_step_jit(graphdef, tx, st, b, microbatches=cfg.sft.microbatches)
    state, done = self.run_phase('sft', cfg.sft.steps, 0, state, step_fn, batch, stop)
    return (graphdef, state.params), done

  def run_rl(self, policy, value, stop):
    """Phase 2 with the registry's algorithm. Returns (policy, value, finished)."""
    algo = self.cfg.rl.algorithm
    phase = algo.build(self.phase_context(policy, value), self.cfg.rl.section)
    state, done = self.run_phase(algo.name, self.cfg.rl.iterations, self.phase1_end() + 1, phase.state, phase.step,
                                 phase.batch, stop)
    return phase.policy(state), phase.value(state) or value, done

  def run(self) -> dict:
    cfg = self.cfg
    stop = ckpt_lib.install_preemption_handler()
    self.metrics = metrics_lib.MetricWriter(self.workdir)
    try:
      with sharding.use_mesh_rules(self.mesh, self.rules):
        policy, done = self.run_sft(stop)
        if not done:
          return {'preempted': True}
        value = None
        if cfg.value.enabled:
          value, done = value_phase.run_value(self, *self.models.plain_policy(*policy), stop)
          if not done:
            return {'preempted': True}
        if 'sft' not in self.results.load():
          self.evaluate(*policy, 'sft', self.phase1_end(), value)
        if cfg.rl.algo != 'none' and cfg.rl.iterations > 0:
          policy, value, done = self.run_rl(policy, value, stop)
          if not done:
            return {'preempted': True}
          if 'rl' not in self.results.load():
            self.evaluate(*policy, 'rl', self.phase1_end() + cfg.rl.iterations + 1, value)
        return self.results.load()
    finally:
      self.metrics.close()
      stop.uninstall()
