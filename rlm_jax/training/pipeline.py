"""The experiment driver: phase 1 SFT on solver traces, phase 2 GRPO, evaluation, checkpoints.

The host loop only dispatches compiled steps and logs. Each phase checkpoints into its own
directory (`<workdir>/ckpt/<phase>`) and resumes from the latest complete step, so a killed
run restarted with the same command continues where it stopped; batches and rollout keys are
functions of (seed, step), which makes a resumed run follow the same trajectory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from rlm_jax import checkpoint as ckpt_lib
from rlm_jax import distributed
from rlm_jax import metrics as metrics_lib
from rlm_jax import sharding
from rlm_jax import tasks as tasks_lib
from rlm_jax.data import encoding
from rlm_jax.data.tokenizer import Tokenizer, load_tokenizer
from rlm_jax.models import hf as hf_lib
from rlm_jax.models import lora as lora_lib
from rlm_jax.models.transformer import ModelConfig, Transformer
from rlm_jax.sampling.sampler import SamplingConfig, sample
from rlm_jax.search import lm as search_lm
from rlm_jax.training import alphazero as az_lib
from rlm_jax.training import evaluate as eval_lib
from rlm_jax.training import em as em_lib
from rlm_jax.training import grpo as grpo_lib
from rlm_jax.training import labels as labels_lib
from rlm_jax.training import losses
from rlm_jax.training import ppo as ppo_lib
from rlm_jax.training.rewards import RewardConfig
from rlm_jax.training import value as value_lib
from rlm_jax.training.sft import sft_step_jit
from rlm_jax.training.state import OptimConfig, TrainState, create_train_state, make_optimizer


class TrainingDiverged(RuntimeError):
  """A non-finite loss or gradient; the message names the phase and step."""


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  kind: Literal['char', 'hf'] = 'char'
  path: str = ''
  step_delimiter: str = '\n\n'


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  domain: str = 'arithmetic'
  levels: tuple[int, ...] = (1, 2, 3)
  train_size: int = 3000
  seed: int = 0  # held-out tasks use seed + 1 and exclude training problems
  # Phase-2 problems (prompts and answers only: RL needs no traces). 0: the SFT problems again.
  # Otherwise about this many problems drawn with seed + 2, minus duplicates and any SFT or
  # held-out problem, so RL sees problems whose solutions the policy has not memorised.
  rl_size: int = 0
  prompt_len: int = 32
  completion_len: int = 48
  answer_len: int = 16


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  steps: int = 300
  batch_size: int = 64
  optim: OptimConfig = OptimConfig()
  # Gradient accumulation: each step runs batch_size / microbatches rows at a time (same
  # update as one full batch; `training.sft`).
  microbatches: int = 1

  def __post_init__(self):
    if self.microbatches < 1 or self.batch_size % self.microbatches:
      raise ValueError(f'sft.microbatches={self.microbatches}: must be >= 1 and divide '
                       f'sft.batch_size={self.batch_size}')


@dataclasses.dataclass(frozen=True)
class ValueConfig:
  """Phase-1 value / PRM training (its own checkpointed phase `value`, after policy SFT).

  The value model is the policy's architecture with the value head of `mode` ('mse': a
  'sigmoid' head, targets 2p − 1; 'bce': a 'logit' head, targets p), started from the SFT
  policy's weights (`init='policy'`) or at random. rl.algo='alphazero' keeps training the same
  model (built from this section even when `enabled` is False).

  Step labels (`training.labels`), for `num_traces` training problems:
    solver  solver traces (all steps correct) and `negatives_per_task` corrupted ones;
    mc      one trace per problem sampled from the SFT policy, each step labelled by the
            fraction of `mc_rollouts` completions from it that end correct (O-PRM);
    mcts    MCTS with the SFT policy and the verifier (the search knobs of rl.alphazero), the
            best path's per-step q-values.
  The label set is rebuilt deterministically from (seed, SFT checkpoint) when the phase
  (re)starts; `label_batch` problems go through one compiled labelling call.
  """

  enabled: bool = False
  labels: Literal['solver', 'mc', 'mcts'] = 'solver'
  mode: Literal['mse', 'bce'] = 'mse'
  init: Literal['policy', 'random'] = 'policy'
  value_hidden: int = 0  # value-head MLP width (0: d_model)
  steps: int = 200
  batch_size: int = 32
  num_traces: int = 512
  label_batch: int = 64
  negatives_per_task: int = 1
  max_steps: int = 8  # steps labelled per trace
  mc_rollouts: int = 4
  temperature: float = 1.0  # sampling of mc traces and rollouts
  optim: OptimConfig = OptimConfig()

  def __post_init__(self):
    for name in ('batch_size', 'num_traces', 'label_batch', 'max_steps', 'mc_rollouts'):
      if getattr(self, name) < 1:
        raise ValueError(f'value.{name}={getattr(self, name)}: must be >= 1')
    if self.steps < 0 or self.negatives_per_task < 0:
      raise ValueError('value.steps and value.negatives_per_task must be >= 0')


@dataclasses.dataclass(frozen=True)
class PPOExtras:
  """PPO knobs beyond `losses.PPOConfig` (the actor-critic gets value_head='sigmoid')."""

  num_minibatches: int = 1
  whiten_advantages: bool = True


@dataclasses.dataclass(frozen=True)
class EMConfig:
  weights: Literal['raw', 'centered', 'normalized'] = 'raw'
  normalize: Literal['sequence_sum', 'token_mean'] = 'sequence_sum'
  num_m_steps: int = 1


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """Phase 2. `group_size` is G for GRPO and EM (and completions per prompt for PPO). For
  'alphazero', `iterations` are rounds and `prompts_per_iteration` problems searched per round."""

  algo: Literal['grpo', 'ppo', 'em', 'alphazero', 'none'] = 'grpo'
  iterations: int = 100
  prompts_per_iteration: int = 32
  group_size: int = 8
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  optim: OptimConfig = OptimConfig()
  grpo: losses.GRPOConfig = losses.GRPOConfig()
  ppo: losses.PPOConfig = losses.PPOConfig()
  ppo_extras: PPOExtras = PPOExtras()
  em: EMConfig = EMConfig()
  alphazero: az_lib.AlphaZeroConfig = az_lib.AlphaZeroConfig()
  reward: RewardConfig = RewardConfig()
  # GRPO only. Gradient accumulation over the prompts_per_iteration * group_size rollout rows
  # (`GRPOSetup.microbatches`), and an optional mesh for the rollout (None: the training
  # mesh, one compiled program per iteration; else params are resharded to it for sampling).
  microbatches: int = 1
  rollout_mesh: sharding.MeshConfig | None = None
  # GRPO only. 'device': the jittable final-step match (synthetic tasks; one compiled program
  # per iteration). 'host': decode the completions and score them with `rlm_jax.tasks.verify`
  # (text answers such as GSM8K or LaTeX; token ids pulled to host once per iteration).
  reward_on: Literal['device', 'host'] = 'device'

  def __post_init__(self):
    rows = self.prompts_per_iteration * self.group_size
    if self.microbatches < 1 or rows % self.microbatches:
      raise ValueError(f'rl.microbatches={self.microbatches}: must be >= 1 and divide '
                       f'prompts_per_iteration * group_size = {rows}')
    if self.algo != 'grpo' and (self.microbatches > 1 or self.rollout_mesh is not None):
      raise ValueError(f"rl.microbatches / rl.rollout_mesh: only rl.algo='grpo' supports them, "
                       f"got rl.algo='{self.algo}'")
    if self.reward_on == 'host' and (self.algo != 'grpo' or self.rollout_mesh is not None):
      raise ValueError(f"rl.reward_on='host': only rl.algo='grpo' on the training mesh supports it, "
                       f"got rl.algo='{self.algo}', rl.rollout_mesh={self.rollout_mesh}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  save_every: int = 100
  keep: int = 2


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  seed: int
  tokenizer: TokenizerConfig
  model: ModelConfig  # vocab_size 0 = take it from the tokenizer
  mesh: sharding.MeshConfig
  task: TaskConfig
  sft: SFTConfig
  rl: RLConfig
  eval: eval_lib.EvalConfig
  checkpoint: CheckpointConfig
  value: ValueConfig = ValueConfig()
  lora: lora_lib.LoraSection = lora_lib.LoraSection()  # rank 0: full fine-tuning
  distributed: distributed.DistributedConfig = distributed.DistributedConfig()  # read by main
  # A local HF Llama/Qwen2 folder (config.json + safetensors) to start the policy from instead
  # of a random init; '' = from scratch. Pair it with tokenizer.kind='hf' on the same folder.
  hf_checkpoint: str = ''


@dataclasses.dataclass
class Data:
  """Tokenised tasks of one split (host numpy)."""

  tasks: list
  prompt: np.ndarray
  prompt_mask: np.ndarray
  answer: np.ndarray
  answer_len: np.ndarray
  sft: dict

  def prompt_batch(self) -> dict[str, np.ndarray]:
    """The arrays an RL batch is cut from (rows = tasks)."""
    return {'prompt': self.prompt, 'prompt_mask': self.prompt_mask, 'answer': self.answer,
            'answer_len': self.answer_len}


def _per_level(n: int, cfg: TaskConfig) -> int:
  """`n` rounded up to a multiple of the number of levels (generate_dataset needs it)."""
  return -(-n // len(cfg.levels)) * len(cfg.levels)


def encode_split(tok: Tokenizer, ts: Sequence[dict], cfg: TaskConfig, traces: bool = True) -> Data:
  """Prompts, canonical final steps and (with `traces`) SFT sequences of a list of tasks."""
  prompt, mask = encoding.encode_prompts(tok, ts, cfg.prompt_len)
  answer, answer_len = encoding.encode_answers(tok, ['Answer: ' + tasks_lib.answer_text(t) for t in ts],
                                               cfg.answer_len)
  sft = encoding.encode_sft(tok, ts, cfg.prompt_len + cfg.completion_len) if traces else {}
  return Data(list(ts), prompt, mask, answer, answer_len, sft)


def build_data(tok: Tokenizer, cfg: TaskConfig, eval_size: int) -> tuple[Data, Data]:
  train = tasks_lib.generate_dataset(cfg.domain, _per_level(cfg.train_size, cfg), cfg.seed, levels=cfg.levels)
  seen = {t['problem'] for t in train}
  held = [t for t in tasks_lib.generate_dataset(cfg.domain, _per_level(4 * eval_size, cfg), cfg.seed + 1,
                                                levels=cfg.levels) if t['problem'] not in seen]
  rng = np.random.default_rng(cfg.seed)
  held = [held[i] for i in sorted(rng.choice(len(held), min(eval_size, len(held)), replace=False))]
  return encode_split(tok, train, cfg), encode_split(tok, held, cfg)


def build_rl_pool(tok: Tokenizer, cfg: TaskConfig, exclude: Sequence[Data]) -> Data:
  """The phase-2 problem pool (`TaskConfig.rl_size`), disjoint from the splits in `exclude`."""
  seen = {t['problem'] for d in exclude for t in d.tasks}
  pool, fresh = [], set()
  for t in tasks_lib.generate_dataset(cfg.domain, _per_level(cfg.rl_size, cfg), cfg.seed + 2, levels=cfg.levels):
    if t['problem'] not in seen and t['problem'] not in fresh:
      fresh.add(t['problem'])
      pool.append(t)
  if not pool:
    raise ValueError(f'task.rl_size={cfg.rl_size}: no problem left after removing SFT and held-out ones')
  return encode_split(tok, pool, cfg, traces=False)


def host_scorer(tok: Tokenizer, tasks: Sequence[dict], group_size: int):
  """Scores rollout rows (prompt-major, `group_size` per task) with the task verifiers.

  A row that did not end in EOS (cut at the length limit) scores -1, as on device.
  """

  def score(tokens_BxT: np.ndarray, lengths_B: np.ndarray) -> np.ndarray:
    out = np.empty(len(lengths_B), np.int32)
    for r, n in enumerate(lengths_B):
      if n == 0 or tokens_BxT[r, n - 1] != tok.eos_id:
        out[r] = -1
      else:
        out[r] = tasks_lib.verify(tasks[r // group_size], tok.decode(tokens_BxT[r, :n]))
    return out

  return score


class Experiment:
  """Holds the static pieces of a run (model graph, data, optimizers); state stays a pytree."""

  def __init__(self, cfg: ExperimentConfig, workdir: str):
    self.cfg = cfg
    self.workdir = workdir
    self.tok = load_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path, cfg.tokenizer.step_delimiter)
    model_cfg = cfg.model
    if cfg.hf_checkpoint:  # architecture from the checkpoint; precision and remat from cfg.model
      model_cfg = hf_lib.config_from_hf(cfg.hf_checkpoint, dtype=cfg.model.dtype,
                                        param_dtype=cfg.model.param_dtype, remat=cfg.model.remat)
    if model_cfg.vocab_size == 0:
      model_cfg = dataclasses.replace(model_cfg, vocab_size=self.tok.vocab_size)
    elif model_cfg.vocab_size < self.tok.vocab_size:
      raise ValueError(f'model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer '
                       f'vocabulary ({self.tok.vocab_size})')
    self.model_cfg = model_cfg
    needs_value = [s for s in cfg.eval.strategies if s in eval_lib.VALUE_STRATEGIES]
    if needs_value and not cfg.value.enabled and cfg.rl.algo != 'alphazero':
      raise ValueError(f'eval.strategies {needs_value} need a value model: set value.enabled=True '
                       "(phase-1 value training) or rl.algo='alphazero'")
    self.lora = cfg.lora.lora_config()  # None: LoRA off
    if self.lora is not None:
      if cfg.rl.algo in ('ppo', 'alphazero'):
        raise ValueError(f"lora.rank={cfg.lora.rank} with rl.algo='{cfg.rl.algo}': LoRA adapters are "
                         "trained in SFT, GRPO and EM only; set lora.rank=0 or another rl.algo")
      nnx.eval_shape(lambda: lora_lib.init_lora(model_cfg, self.lora))  # bad targets fail here
    self.mesh = sharding.make_mesh(cfg.mesh)
    self.rules = cfg.mesh.rules
    # The rollout's own placement, when it differs from the training mesh (GRPO only).
    self.rollout_at = None
    rm = cfg.rl.rollout_mesh
    if rm is not None:
      rollout_mesh = sharding.make_mesh(rm)
      if dict(rollout_mesh.shape) != dict(self.mesh.shape) or rm.rules != self.rules:
        self.rollout_at = grpo_lib.Placement(rollout_mesh, rm.rules)
    self.train, self.held = build_data(self.tok, cfg.task, cfg.eval.size)
    self.rl_pool = (build_rl_pool(self.tok, cfg.task, (self.train, self.held)) if cfg.task.rl_size
                    else self.train)
    self.metrics = None
    self.results_path = epath.Path(workdir) / 'results.json'  # workdir may be gs://...

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
    if per_process is None:
      per_process = jax.process_count() > 1
    if not per_process:
      return {k: jnp.asarray(v[idx]) for k, v in arrays.items()}
    rows = idx[distributed.batch_slice(len(idx), self.mesh, self.rules)]
    return distributed.host_local_to_global({k: v[rows] for k, v in arrays.items()}, self.mesh, self.rules)

  def init_params(self) -> tuple[nnx.GraphDef, nnx.State]:
    """The policy; with LoRA a `LoraTransformer` (the same base weights plus adapters)."""
    seed = self.cfg.seed
    if self.cfg.hf_checkpoint:  # each tensor read once and placed on its shard
      m = self.model_cfg
      graphdef, params = hf_lib.load_hf(self.cfg.hf_checkpoint, dtype=m.dtype, param_dtype=m.param_dtype,
                                        mesh=self.mesh, rules=self.rules, remat=m.remat)
      if self.lora is not None:
        return lora_lib.add_lora(graphdef, params, self.lora, seed=seed, mesh=self.mesh, rules=self.rules)
      return graphdef, params
    if self.lora is not None:
      return sharding.init_sharded(lambda: lora_lib.init_lora(self.model_cfg, self.lora, seed),
                                   self.mesh, self.rules)
    return sharding.init_sharded(lambda: Transformer(self.model_cfg, rngs=nnx.Rngs(params=seed)),
                                 self.mesh, self.rules)

  def optimizer(self, optim: OptimConfig, params):
    """make_optimizer(optim); with LoRA it updates only the adapters of `params`."""
    tx = make_optimizer(optim)
    return tx if self.lora is None else lora_lib.lora_optimizer(tx, params)

  def plain_policy(self, graphdef, params) -> tuple[nnx.GraphDef, nnx.State]:
    """The policy as a plain Transformer (LoRA adapters merged into the weights)."""
    return (graphdef, params) if self.lora is None else lora_lib.merge_lora(graphdef, params)

  def _rollout_sampling(self) -> SamplingConfig:
    rl = self.cfg.rl
    return SamplingConfig(max_new_tokens=self.cfg.task.completion_len, eos_id=self.tok.eos_id,
                          pad_id=self.tok.pad_id, step_id=self.tok.step_id, temperature=rl.temperature,
                          top_k=rl.top_k, top_p=rl.top_p)

  def evaluate(self, graphdef, params, tag: str, step: int, value=None) -> dict:
    """`value`: (graphdef, params) of the value model for the value-guided strategies."""
    graphdef, params = self.plain_policy(graphdef, params)
    res = eval_lib.evaluate(graphdef, params, self.tok, self.held.tasks, self.held.prompt,
                            self.held.prompt_mask, self.cfg.task.completion_len, self.cfg.eval,
                            jax.random.key(self.cfg.seed + 7), value=value)
    self.metrics.write(step, {f'eval/{k}': v for k, v in res.items()})
    results = self.load_results()
    results[tag] = res
    if jax.process_index() == 0:
      tmp = self.results_path.with_name(self.results_path.name + '.tmp')
      tmp.write_text(json.dumps(results, indent=1))
      tmp.replace(self.results_path)  # a kill leaves the old or the new file
    return res

  def load_results(self) -> dict:
    if self.results_path.exists():
      return json.loads(self.results_path.read_text())
    return {}

  def _run_phase(self, name: str, num_steps: int, step_offset: int, state: TrainState, step_fn, batch_fn,
                 stop) -> tuple[TrainState, bool]:
    """Generic resumable loop. Returns (state, finished) — finished False on preemption."""
    ck = ckpt_lib.Checkpointer(os.path.join(self.workdir, 'ckpt', name), save_every=self.cfg.checkpoint.save_every,
                               keep=self.cfg.checkpoint.keep)
    start = 0
    if ck.latest_step() is not None:
      abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
      state, extra = ck.restore(abstract)
      start = extra['step'] + 1
    if start < num_steps:  # drop metrics logged after the checkpoint we resume from
      self.metrics.truncate_after(step_offset + start - 1)
    pending = None  # metrics of the previous step, pulled after the next step is dispatched

    def flush(item):
      step, m = item
      m = jax.device_get(m)
      if not bool(m.pop('finite', True)):
        raise TrainingDiverged(f'{name}: non-finite loss or gradient at step {step}; '
                               f'the last good checkpoint in {ck.directory} is kept')
      self.metrics.write(step_offset + step, {f'{name}/{k}': v for k, v in m.items()})

    finished = True
    bar = metrics_lib.progress(range(start, num_steps), total=num_steps, initial=start, desc=name)
    try:
      for step in bar:
        state, m = step_fn(state, batch_fn(step), step)
        if pending is not None:
          flush(pending)
        pending = (step, m)
        stopping = stop()
        ck.save(step, state, {'step': step}, force=stopping or step == num_steps - 1)
        if stopping:
          finished = False
          break
      if pending is not None:
        flush(pending)
    finally:
      bar.close()
      ck.close()
    return state, finished

  # --- phases -----------------------------------------------------------------------------

  def _run_rl(self, graphdef, sft_params, stop):
    """Phase 2 with the configured algorithm. Returns (state, graphdef, finished)."""
    cfg, rl = self.cfg, self.cfg.rl
    tx = self.optimizer(rl.optim, sft_params)  # ppo builds new params: LoRA is refused for it
    sampling = self._rollout_sampling()
    ref = None
    if rl.algo == 'grpo':
      setup = grpo_lib.GRPOSetup(group_size=rl.group_size, loss=rl.grpo, sampling=sampling, reward=rl.reward,
                                 step_id=self.tok.step_id, microbatches=rl.microbatches)
      params = sft_params
      ref = sft_params if rl.grpo.beta > 0 else None
      if self.rollout_at is None:  # one compiled program per iteration
        step = lambda st, b, key: grpo_lib.grpo_iteration_jit(graphdef, tx, setup, st, ref, b, key)
      else:
        train_at = grpo_lib.Placement(self.mesh, self.rules)
        step = lambda st, b, key: grpo_lib.grpo_iteration_on_meshes(graphdef, tx, setup, st, ref, b, key,
                                                                    self.rollout_at, train_at)
    elif rl.algo == 'ppo':
      ac_cfg = dataclasses.replace(self.model_cfg, value_head='sigmoid')
      graphdef, ac_init = sharding.init_sharded(
          lambda: Transformer(ac_cfg, rngs=nnx.Rngs(params=cfg.seed + 11)), self.mesh, self.rules)
      params = ppo_lib.actor_critic_params(ac_init, sft_params)
      ref = params if rl.ppo.kl_coef > 0 else None
      setup = ppo_lib.PPOSetup(loss=rl.ppo, sampling=sampling, reward=rl.reward, step_id=self.tok.step_id,
                               group_size=rl.group_size, num_minibatches=rl.ppo_extras.num_minibatches,
                               whiten_advantages=rl.ppo_extras.whiten_advantages)
      step = lambda st, b, key: ppo_lib.ppo_iteration_jit(graphdef, tx, setup, st, ref, b, key)
    elif rl.algo == 'em':
      setup = em_lib.EMSetup(group_size=rl.group_size, sampling=sampling, reward=rl.reward,
                             step_id=self.tok.step_id, weights=rl.em.weights, normalize=rl.em.normalize,
                             num_m_steps=rl.em.num_m_steps)
      params = sft_params
      step = lambda st, b, key: em_lib.em_iteration_jit(graphdef, tx, setup, st, b, key)
    else:
      raise ValueError(f"rl.algo='{rl.algo}': must be one of 'grpo', 'ppo', 'em', 'alphazero', 'none'")
    if ref is not None:
      ref = jax.tree.map(jnp.copy, ref)  # the policy state is donated; keep the reference alive
    state = create_train_state(params, tx, self.mesh, self.rules)
    train = self.rl_pool
    key = jax.random.key(cfg.seed + 3)

    indices = lambda i: np.random.default_rng((cfg.seed, 2, i)).choice(
        len(train.tasks), rl.prompts_per_iteration, replace=False)
    batch_fn = lambda i: self.device_batch(train.prompt_batch(), indices(i))
    if rl.algo == 'grpo' and rl.reward_on == 'host':
      def step_fn(st, b, i):
        scorer = host_scorer(self.tok, [train.tasks[j] for j in indices(i)], rl.group_size)
        return grpo_lib.grpo_iteration_host_scored(graphdef, tx, setup, st, ref, b, jax.random.fold_in(key, i),
                                                   scorer)
    else:
      step_fn = lambda st, b, i: step(st, b, jax.random.fold_in(key, i))
    state, done = self._run_phase(rl.algo, rl.iterations, self._phase1_end() + 1, state, step_fn, batch_fn, stop)
    return state, graphdef, done

  def _phase1_end(self) -> int:
    """Metrics step of the phase-1 evaluation: after SFT and, when enabled, the value phase
    (which logs at sft.steps + 1 ...). Phase 2 logs from here + 1."""
    v = self.cfg.value
    return self.cfg.sft.steps + (v.steps + 1 if v.enabled else 0)

  # --- value model (phase 1) and the AlphaZero loop (phase 2) -----------------------------

  def value_model(self, policy_params) -> tuple[nnx.GraphDef, nnx.State]:
    """A new value model: the policy's architecture with the value head of `value.mode`; with
    `value.init='policy'` every weight but the value head is copied from `policy_params`."""
    v = self.cfg.value
    vcfg = dataclasses.replace(self.model_cfg, value_head=value_lib.HEAD_OF_MODE[v.mode],
                               value_hidden=v.value_hidden)
    make = lambda: Transformer(vcfg, rngs=nnx.Rngs(params=self.cfg.seed + 13))
    graphdef, params = sharding.init_sharded(make, self.mesh, self.rules)
    if v.init == 'policy':
      params = ppo_lib.actor_critic_params(params, policy_params)
    return graphdef, jax.tree.map(jnp.copy, params)  # own buffers: the value state is donated

  def _label_chunks(self, idx: np.ndarray):
    """Fixed-shape device batches of training problems `idx` (the last chunk padded with its
    first row): yields (chunk index, number of real rows, batch)."""
    n, size, arrays = len(idx), self.cfg.value.label_batch, self.train.prompt_batch()
    for c, lo in enumerate(range(0, n, size)):
      rows = idx[lo:lo + size]
      full = np.concatenate([rows, np.repeat(rows[:1], size - len(rows))])
      yield c, len(rows), self.device_batch(arrays, full)

  def value_data(self, graphdef, policy_params) -> dict[str, np.ndarray]:
    """Step-labelled rows for phase-1 value training (host numpy, `value.value_step` layout).

    Deterministic in (seed, policy): the label source of `value.labels` over `value.num_traces`
    training problems (see `ValueConfig`).
    """
    cfg, v, tok = self.cfg, self.cfg.value, self.tok
    n = min(v.num_traces, len(self.train.tasks))
    idx = np.sort(np.random.default_rng((cfg.seed, 6)).choice(len(self.train.tasks), n, replace=False))
    keys = ('tokens', 'mask', 'targets', 'target_mask')
    if v.labels == 'solver':
      records = labels_lib.solver_labels([self.train.tasks[i] for i in idx], cfg.seed, v.negatives_per_task)
      enc = labels_lib.encode_step_labels(tok, records, cfg.task.prompt_len + cfg.task.completion_len, v.max_steps)
      rows = value_lib.prm_batch(enc['tokens'], enc['mask'], enc['completion_start'], enc['step_labels'],
                                 enc['step_valid'], tok.step_id, tok.eos_id)
      return {k: np.asarray(jax.device_get(rows[k])) for k in keys}
    key = jax.random.key(cfg.seed + 17)
    parts = []
    if v.labels == 'mc':
      scfg = SamplingConfig(max_new_tokens=cfg.task.completion_len, eos_id=tok.eos_id, pad_id=tok.pad_id,
                            step_id=tok.step_id, temperature=v.temperature)
      setup = labels_lib.MCLabelSetup(num_rollouts=v.mc_rollouts, max_steps=v.max_steps, sampling=scfg,
                                      step_id=tok.step_id)
      for c, real, batch in self._label_chunks(idx):
        k_trace, k_roll = jax.random.split(jax.random.fold_in(key, c))
        out = sample(graphdef, policy_params, batch['prompt'], batch['prompt_mask'], k_trace, scfg)
        t = out.tokens_BxT.shape[1]
        batch = dict(batch, completion=out.tokens_BxT,
                     completion_mask=jnp.arange(t)[None] < out.lengths_B[:, None])
        lab = labels_lib.mc_rollout_labels_jit(graphdef, policy_params, setup, batch, k_roll)
        rows = labels_lib.trace_prm_batch(batch, lab['labels'], lab['valid'], tok.step_id, tok.eos_id)
        parts.append({k: np.asarray(jax.device_get(rows[k]))[:real] for k in keys})
    else:  # mcts: the search of the AlphaZero loop, without a value model (none exists yet)
      rl = cfg.rl
      setup = az_lib.make_setup(dataclasses.replace(rl.alphazero, use_value_model=False),
                                search_lm.TokenIds.of(tok), cfg.task.prompt_len, cfg.task.completion_len, v.mode,
                                rl.temperature, rl.top_k, rl.top_p)
      for c, real, batch in self._label_chunks(idx):
        rows = az_lib.search_rows_jit(graphdef, None, setup, policy_params, None, batch,
                                      jax.random.fold_in(key, c))
        parts.append({k: np.asarray(jax.device_get(rows[k]))[:real] for k in keys})
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}

  def _run_value(self, graphdef, sft_params, stop):
    """Phase-1 value / PRM training. Returns ((value graphdef, params), finished)."""
    cfg, v = self.cfg, self.cfg.value
    vgd, vparams = self.value_model(sft_params)
    tx = make_optimizer(v.optim)
    state = create_train_state(vparams, tx, self.mesh, self.rules)
    offset = cfg.sft.steps + 1
    data = {}

    def batch_fn(step):
      if not data:  # built only when the phase has steps left to run
        data.update(self.value_data(graphdef, sft_params))
        m = data['target_mask'] > 0
        mean = float(data['targets'][m].mean()) if m.any() else 0.0
        self.metrics.write(offset + step, {'value/label_rows': len(m), 'value/labels': int(m.sum()),
                                           'value/label_mean': mean})
      n = len(data['tokens'])
      idx = np.random.default_rng((cfg.seed, 4, step)).choice(n, v.batch_size, replace=n < v.batch_size)
      return {k: jnp.asarray(x[idx]) for k, x in data.items()}

    step_fn = lambda st, b, i: value_lib.value_step_jit(vgd, tx, st, b, v.mode)
    state, done = self._run_phase('value', v.steps, offset, state, step_fn, batch_fn, stop)
    return (vgd, state.params), done

  def _run_alphazero(self, graphdef, sft_params, value_model, stop):
    """Phase 2, AlphaZero-style (`training.alphazero`). Returns (AZState, value graphdef, finished).

    The value model is phase 1's when there is one, else a new one (`value_model`). The replay
    buffer is part of the checkpointed state.
    """
    cfg, rl, tok = self.cfg, self.cfg.rl, self.tok
    ptx, vtx = make_optimizer(rl.optim), make_optimizer(rl.alphazero.value_optim)
    vgd, vparams = value_model if value_model is not None else self.value_model(sft_params)
    setup = az_lib.make_setup(rl.alphazero, search_lm.TokenIds.of(tok), cfg.task.prompt_len,
                              cfg.task.completion_len, cfg.value.mode, rl.temperature, rl.top_k, rl.top_p)
    buffer = az_lib.empty_buffer(rl.alphazero.buffer_size, setup.row_len(), tok.pad_id)
    buffer = jax.device_put(buffer, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
    copy = lambda t: jax.tree.map(jnp.copy, t)  # the round donates its state
    state = az_lib.AZState(policy=create_train_state(copy(sft_params), ptx, self.mesh, self.rules),
                           value=create_train_state(copy(vparams), vtx, self.mesh, self.rules), buffer=buffer)
    pool, key = self.rl_pool, jax.random.key(cfg.seed + 5)

    def batch_fn(i):  # the problems GRPO would get in iteration i
      idx = np.random.default_rng((cfg.seed, 2, i)).choice(len(pool.tasks), rl.prompts_per_iteration,
                                                            replace=False)
      return self.device_batch(pool.prompt_batch(), idx)

    step_fn = lambda st, b, i: az_lib.alphazero_round_jit(graphdef, vgd, ptx, vtx, setup, st, b,
                                                          jax.random.fold_in(key, i))
    state, done = self._run_phase('alphazero', rl.iterations, self._phase1_end() + 1, state, step_fn, batch_fn,
                                  stop)
    return state, vgd, done

  def run(self) -> dict:
    cfg = self.cfg
    stop = ckpt_lib.install_preemption_handler()
    self.metrics = metrics_lib.MetricWriter(self.workdir)
    try:
      with sharding.use_mesh_rules(self.mesh, self.rules):
        graphdef, params = self.init_params()
        # Phase 1: SFT.
        tx = self.optimizer(cfg.sft.optim, params)
        state = create_train_state(params, tx, self.mesh, self.rules)
        train = self.train
        n_train = len(train.tasks)

        def sft_batch(step):
          idx = np.random.default_rng((cfg.seed, 1, step)).choice(n_train, cfg.sft.batch_size, replace=False)
          return self.device_batch(train.sft, idx)

        sft_fn = lambda st, b, step: sft_step_jit(graphdef, tx, st, b, microbatches=cfg.sft.microbatches)
        state, done = self._run_phase('sft', cfg.sft.steps, 0, state, sft_fn, sft_batch, stop)
        if not done:
          return {'preempted': True}
        sft_params = state.params
        # Phase 1b: value / PRM model.
        value_model = None
        if cfg.value.enabled:
          value_model, done = self._run_value(*self.plain_policy(graphdef, sft_params), stop)
          if not done:
            return {'preempted': True}
        results = self.load_results()
        if 'sft' not in results:
          self.evaluate(graphdef, sft_params, 'sft', self._phase1_end(), value_model)

        # Phase 2: RL.
        rl = cfg.rl
        rl_end = self._phase1_end() + rl.iterations + 1
        if rl.algo == 'alphazero' and rl.iterations > 0:
          state, vgd, done = self._run_alphazero(graphdef, sft_params, value_model, stop)
          if not done:
            return {'preempted': True}
          if 'rl' not in self.load_results():
            self.evaluate(graphdef, state.policy.params, 'rl', rl_end, (vgd, state.value.params))
        elif rl.algo != 'none' and rl.iterations > 0:
          state, rl_graphdef, done = self._run_rl(graphdef, sft_params, stop)
          if not done:
            return {'preempted': True}
          if 'rl' not in self.load_results():
            self.evaluate(rl_graphdef, state.params, 'rl', rl_end, value_model)
        return self.load_results()
    finally:
      self.metrics.close()
      stop.uninstall()


def format_results(results: dict, strategies, rl_name: str = 'rl') -> str:
  """Markdown table: one row per phase, one column per strategy (held-out accuracy)."""
  head = '| after | ' + ' | '.join(strategies) + ' |'
  lines = [head, '|' + '---|' * (len(strategies) + 1)]
  for phase, name in (('sft', 'SFT'), ('rl', rl_name.upper())):
    if phase in results:
      cells = [f"{results[phase].get(f'{s}/accuracy', float('nan')):.3f}" for s in strategies]
      lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)
