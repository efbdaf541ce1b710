"""The experiment config schema: one frozen dataclass per section of `configs/*.py`.

The config file is the one source of an experiment's values: `parse` reads it strictly, so
every key of every section must be spelled there (a missing key is an error, never a silent
dataclass default). The library dataclasses keep their defaults for direct use (tests,
notebooks); an experiment does not see them.

`config.rl` holds the knobs every phase-2 algorithm shares; each algorithm's own knobs sit in
`config.rl.<algo>`, typed by the algorithm's registry entry (`training.algorithms`). All the
sections present are checked (a typo in another algorithm's section fails too); the chosen
one must be present and ends up in `cfg.rl.section`.

Cross-section rules (the ones no single section can check) are in `check`; data-dependent
ones (pool sizes, lengths) run when the data is built, before any training step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

import ml_collections

from rlm_jax import configlib
from rlm_jax import distributed
from rlm_jax import sharding
from rlm_jax.models import lora as lora_lib
from rlm_jax.models.transformer import ModelConfig
from rlm_jax.training import algorithms
from rlm_jax.training import evaluate as eval_lib
from rlm_jax.training.rewards import RewardConfig
from rlm_jax.training.state import OptimConfig

ConfigError = configlib.ConfigError


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """The tokenizer and how a problem becomes a prompt (`data.encoding.PromptFormat`), the same
  for SFT, RL, evaluation, solve and search.

  chat_template: apply the HF tokenizer's chat template to [system?, user] (instruct models).
  system_prompt: a system message ('' = none).
  instruction: text after the problem in the user turn (e.g. the answer format to use).
  """

  kind: Literal['char', 'hf']
  path: str  # the HF tokenizer folder (kind='hf'); '' with hf_checkpoint = that folder
  step_delimiter: str
  chat_template: bool
  system_prompt: str
  instruction: str

  def prompt_format(self):
    from rlm_jax.data import encoding  # pylint: disable=g-import-not-at-top
    return encoding.PromptFormat(chat_template=self.chat_template, system_prompt=self.system_prompt,
                                 instruction=self.instruction)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """Problems: a built-in generator (`domain`, `levels`) or files (`*_file`).

  train_file / eval_file / rl_file: a dataset per split ('' = the generator): JSONL of task
    dicts or GSM8K / prompt-answer records, x1 .json/.json.bz2, parquet/csv, a `datasets`
    folder, `tfds:NAME[:SPLIT]` or `builtin:FILE` (`data.datasets.load_split`). Evaluation and
    RL problems that also occur in the training split are removed. `task.domain='gsm8k'`
    without files trains on the shipped train sample and evaluates on the test sample.
  train_size: SFT problems (generator: about this many; file: at most this many, drawn with
    `seed`; 0 = all of the file).
  rl_size: phase-2 problems (prompts and answers only: RL needs no traces). 0: the SFT
    problems again. Otherwise about this many generated with seed + 2 (or at most this many
    of rl_file), minus duplicates and any SFT or held-out problem, so RL sees problems whose
    solutions the policy has not memorised.
  length_policy: a file's problem that does not fit prompt_len / completion_len / answer_len
    is 'drop'ped (the count is printed) or an 'error' naming the key.
  question_key / answer_key: the prompt and answer columns of plain records.
  """

  domain: str
  levels: tuple[int, ...]
  train_size: int
  seed: int
  rl_size: int
  prompt_len: int
  completion_len: int
  answer_len: int
  train_file: str
  eval_file: str
  rl_file: str
  length_policy: Literal['drop', 'error']
  question_key: str
  answer_key: str


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  steps: int
  batch_size: int
  optim: OptimConfig
  # Gradient accumulation: each step runs batch_size / microbatches rows at a time (same
  # update as one full batch; `training.sft`).
  microbatches: int

  def __post_init__(self):
    if self.microbatches < 1 or self.batch_size % self.microbatches:
      raise ValueError(f'sft.microbatches={self.microbatches}: must be >= 1 and divide '
                       f'sft.batch_size={self.batch_size}')


LabelSource = Literal['solver', 'mc', 'mcts', 'policy', 'checked']
LABEL_SOURCES: tuple[str, ...] = get_args(LabelSource)


@dataclasses.dataclass(frozen=True)
class ValueArch:
  """The value model's own shape; 0 keeps the policy's. With `value.init='policy'` only
  `n_layers` may differ, and only upwards: the policy's layers are copied and each extra layer
  (after them) starts as the identity (zero attention-output and MLP-down projections), so the
  deeper model computes exactly the policy's features at the start of value training."""

  n_layers: int = 0
  d_model: int = 0
  n_heads: int = 0
  n_kv_heads: int = 0
  head_dim: int = 0
  d_ff: int = 0

  def __post_init__(self):
    for f in dataclasses.fields(self):
      if getattr(self, f.name) < 0:
        raise ValueError(f'value.arch.{f.name}={getattr(self, f.name)}: must be >= 0 (0: the policy\'s)')

  def overrides(self) -> dict[str, int]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name)}


@dataclasses.dataclass(frozen=True)
class ValueConfig:
  """Phase-1 value / PRM training (its own checkpointed phase `value`, after policy SFT).

  The value model is the policy's architecture (or the shape of `arch`) with the value head of
  `mode` ('mse': a 'sigmoid' head, targets 2p − 1; 'bce': a 'logit' head, targets p), started
  from the SFT policy's weights (`init='policy'`) or at random. An algorithm that trains a value model
  (rl.algo='alphazero') keeps training the same model (built from this section even when
  `enabled` is False).

  Step labels (`training.labels`), for `num_traces` training problems:
    solver  solver traces (all steps correct) and `negatives_per_task` corrupted ones;
    mc      one trace per problem sampled from the SFT policy, each step labelled by the
            fraction of `mc_rollouts` completions from it that end correct (O-PRM);
    mcts    MCTS with the SFT policy and the verifier (the search knobs of rl.alphazero), the
            best path's per-step q-values;
    policy  `samples_per_task` traces per problem sampled from the SFT policy, a step right
            while the trace follows the solver's (or when the task's verifier accepts the
            answer): the policy's own mistakes as negatives (`labels.follow_labels`);
    checked the same samples, each step judged by the task's step checker
            (`tasks.check_steps`): exact process labels where the domain has one (Countdown:
            right arithmetic on available numbers that can still make the target), so a
            route other than the solver's is not labelled wrong.
  Sources joined by '+' (e.g. 'solver+policy') pool their rows: the corruptions teach the
  step checks, the policy's samples the mistakes it actually makes (a PRM trained on
  corruptions alone can learn a cue the policy never shows, e.g. a final result that is not
  Countdown's target).
  mc and mcts judge finished solutions with the task verifier on host where the training
  problems have many right answers or rl.reward_on='host' (`value_phase.label_verifier`),
  else by the final-step match on device.
  The label set is rebuilt deterministically from (seed, SFT checkpoint) when the phase
  (re)starts; `label_batch` problems go through one compiled labelling call.
  """

  enabled: bool
  labels: str  # a LABEL_SOURCES name, or several joined by '+'
  mode: Literal['mse', 'bce']
  init: Literal['policy', 'random']
  value_hidden: int  # value-head MLP width (0: d_model)
  steps: int
  batch_size: int
  num_traces: int
  label_batch: int
  negatives_per_task: int
  max_steps: int  # steps labelled per trace
  mc_rollouts: int
  temperature: float  # sampling of mc / policy traces and rollouts
  optim: OptimConfig
  samples_per_task: int = 4  # policy labels: traces sampled per problem (default: older runs)
  arch: ValueArch = ValueArch()  # the value model's own shape (default: the policy's; older runs)

  @property
  def label_sources(self) -> tuple[str, ...]:
    return tuple(self.labels.split('+'))

  def __post_init__(self):
    bad = [s for s in self.label_sources if s not in LABEL_SOURCES] or (
        len(set(self.label_sources)) < len(self.label_sources) and [self.labels])
    if bad:
      raise ValueError(f"value.labels='{self.labels}': '{bad[0]}' is not a label source (allowed: "
                       f"{', '.join(LABEL_SOURCES)}, or several joined by '+', each once)")
    for name in ('batch_size', 'num_traces', 'label_batch', 'max_steps', 'mc_rollouts', 'samples_per_task'):
      if getattr(self, name) < 1:
        raise ValueError(f'value.{name}={getattr(self, name)}: must be >= 1')
    if self.steps < 0 or self.negatives_per_task < 0:
      raise ValueError('value.steps and value.negatives_per_task must be >= 0')


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """Phase 2: the knobs every algorithm shares (its own are in `rl.<algo>`, see `section`).

  `group_size` is G (completions per prompt). `iterations` are rounds and
  `prompts_per_iteration` problems searched per round for search-based algorithms.
  `microbatches` (gradient accumulation over the prompts_per_iteration * group_size rows),
  `rollout_mesh` (sample on another mesh; None: the training mesh) and `reward_on='host'`
  (decode the completions and score them with the task verifiers, for text answers such as
  GSM8K; 'device': the jittable final-step match, one compiled program per iteration) are
  capabilities: an algorithm that does not declare one refuses the setting at start-up.
  """

  algo: str  # a name of training.algorithms.ALGORITHMS, or 'none' (SFT only)
  iterations: int
  prompts_per_iteration: int
  group_size: int
  temperature: float
  top_k: int
  top_p: float
  optim: OptimConfig
  reward: RewardConfig
  microbatches: int
  rollout_mesh: sharding.MeshConfig | None
  reward_on: Literal['device', 'host']
  # Host reward functions (TRL-style `module:function` or built-ins, `tasks.reward_fns`) and
  # their weights (() = all 1) when reward_on='host'; () = the verifier score through `reward`.
  reward_fns: tuple[str, ...]
  reward_weights: tuple[float, ...]
  # Positions per LM-head chunk in the updates' log-prob passes (GRPO, RLOO, process GRPO, PPO,
  # EM; `losses.lm_head_logprobs`): bounds the [rows, chunk, V] logits; 0 = the whole completion.
  logprob_chunk_tokens: int = 1024
  # GRPO, RLOO, process GRPO with num_iterations > 1, and PPO (π_old and V_old): from a forward
  # pass over the rollout instead of the sampler's own log-probs and values (for a rollout whose
  # numerics differ from the update's).
  recompute_old_logp: bool = False
  # GRPO, RLOO, process GRPO, EM, PPO: the update's log-prob passes run each prompt once for its G
  # completions (keys and values broadcast; `rollout.completion_logprobs`); False: every row whole.
  shared_prompt: bool = True
  # The typed `rl.<name>` sections present in the config, as (name, section) pairs (filled by
  # `parse`; a tuple so the config stays hashable).
  sections: tuple[tuple[str, Any], ...] = dataclasses.field(default=(), metadata={'derived': True})

  def __post_init__(self):
    names = ('none',) + tuple(algorithms.ALGORITHMS)
    if self.algo not in names:
      raise ValueError(f"rl.algo='{self.algo}': must be one of {', '.join(repr(n) for n in names)}")
    rows = self.prompts_per_iteration * self.group_size
    if self.microbatches < 1 or rows % self.microbatches:
      raise ValueError(f'rl.microbatches={self.microbatches}: must be >= 1 and divide '
                       f'prompts_per_iteration * group_size = {rows}')
    if self.reward_fns and self.reward_on != 'host':
      raise ValueError(f"rl.reward_fns={self.reward_fns}: reward functions run on host; set rl.reward_on='host'")
    if self.reward_weights and len(self.reward_weights) != len(self.reward_fns):
      raise ValueError(f'rl.reward_weights has {len(self.reward_weights)} entries for '
                       f'{len(self.reward_fns)} rl.reward_fns')
    for name in ('iterations', 'logprob_chunk_tokens'):
      if getattr(self, name) < 0:
        raise ValueError(f'rl.{name}={getattr(self, name)}: must be >= 0')
    for name in ('prompts_per_iteration', 'group_size'):
      if getattr(self, name) < 1:
        raise ValueError(f'rl.{name}={getattr(self, name)}: must be >= 1')

  @property
  def section(self):
    """The typed `rl.<algo>` section of the chosen algorithm (None for 'none')."""
    return dict(self.sections).get(self.algo)

  @property
  def algorithm(self):
    """The registry entry of `algo` (None for 'none')."""
    return algorithms.ALGORITHMS.get(self.algo)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  save_every: int
  keep: int


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  seed: int
  tokenizer: TokenizerConfig
  model: ModelConfig  # vocab_size 0 = take it from the tokenizer
  mesh: sharding.MeshConfig
  task: TaskConfig
  sft: SFTConfig
  value: ValueConfig
  rl: RLConfig
  eval: eval_lib.EvalConfig
  checkpoint: CheckpointConfig
  lora: lora_lib.LoraSection  # rank 0: full fine-tuning
  distributed: distributed.DistributedConfig  # read by main
  # A local HF Llama/Qwen2 folder (config.json + safetensors) to start the policy from instead
  # of a random init; '' = from scratch. Use tokenizer.kind='hf' with it (path '' = this folder).
  hf_checkpoint: str


# Values the code derives from another section; a config that sets them differently is refused.
_DERIVED = {('grpo', 'max_completion_length'): ('task', 'completion_len')}


def parse(config: ml_collections.ConfigDict | dict, strict: bool = True) -> ExperimentConfig:
  """The typed experiment config of a config file's ConfigDict (strict: every key spelled).

  `strict=False` fills keys the config lacks with the library defaults: for reading the
  `config.json` of a run made before a knob existed (`experiment.models.load_run`), never for
  starting a run.

  Raises:
    ConfigError: one line naming the key (unknown, missing, bad value, cross-section rule).
  """
  d = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  if not isinstance(d.get('rl'), dict):
    raise ConfigError('config.rl: missing required key')
  rl = dict(d['rl'])
  raw_sections = {name: rl.pop(name) for name in list(rl) if name in algorithms.ALGORITHMS}
  d['rl'] = rl
  cfg = configlib.from_config(ExperimentConfig, d, '', strict=strict)
  sections = {}
  for name, raw in raw_sections.items():
    raw = dict(raw) if isinstance(raw, dict) else raw
    for (algo, key), (src, src_key) in _DERIVED.items():
      if algo == name and isinstance(raw, dict):
        derived = getattr(getattr(cfg, src), src_key)
        if key in raw and raw[key] != derived:
          raise ConfigError(f'config.rl.{name}.{key}={raw[key]}: it is {src}.{src_key} ({derived}); '
                            'remove the key')
        raw[key] = derived
    sections[name] = configlib.from_config(algorithms.ALGORITHMS[name].config, raw, f'rl.{name}', strict=strict)
  if cfg.rl.algo != 'none' and cfg.rl.algo not in sections:
    raise ConfigError(f"config.rl.{cfg.rl.algo}: missing required key (the section of rl.algo='{cfg.rl.algo}')")
  cfg = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, sections=tuple(sections.items())))
  check(cfg)
  return cfg


def check(cfg: ExperimentConfig) -> None:
  """Rules across sections. Raises ConfigError naming the keys."""
  algo = cfg.rl.algorithm
  if algo is not None:
    wants = {'lora': cfg.lora.rank > 0, 'microbatches': cfg.rl.microbatches > 1,
             'rollout_mesh': cfg.rl.rollout_mesh is not None, 'host_reward': cfg.rl.reward_on == 'host'}
    keys = {'lora': f'lora.rank={cfg.lora.rank}', 'microbatches': f'rl.microbatches={cfg.rl.microbatches}',
            'rollout_mesh': 'rl.rollout_mesh', 'host_reward': "rl.reward_on='host'"}
    for cap, wanted in wants.items():
      if wanted and cap not in algo.capabilities:
        able = [n for n, a in algorithms.ALGORITHMS.items() if cap in a.capabilities]
        raise ConfigError(f"{keys[cap]}: rl.algo='{algo.name}' does not support it "
                          f"(algorithms that do: {', '.join(able) or 'none'})")
    if algo.requires_value and not cfg.value.enabled:
      raise ConfigError(f"rl.algo='{algo.name}' reads the phase-1 value model / PRM: set value.enabled=True")
    if cfg.rl.reward_on == 'host' and cfg.rl.rollout_mesh is not None:
      raise ConfigError("rl.reward_on='host' needs the rollout on the training mesh: set rl.rollout_mesh=None")
  az = dict(cfg.rl.sections).get('alphazero')
  if cfg.rl.algo == 'alphazero' and cfg.rl.reward_fns:
    raise ConfigError(f"rl.reward_fns={cfg.rl.reward_fns}: rl.algo='alphazero' rewards terminals with the verifier "
                      "(+1 solved, -1 otherwise); remove rl.reward_fns")
  if cfg.rl.algo == 'alphazero' and az is not None and az.sft_mix > 0 and cfg.sft.steps == 0:
    raise ConfigError(f'rl.alphazero.sft_mix={az.sft_mix} mixes in the SFT split\'s solver traces, which a run '
                      'with sft.steps=0 does not encode: set sft.steps > 0 or sft_mix=0')
  needs_value = [s for s in cfg.eval.strategies if s in eval_lib.VALUE_STRATEGIES]
  if needs_value and not has_value_model(cfg):
    trainers = [n for n, a in algorithms.ALGORITHMS.items() if a.trains_value]
    raise ConfigError(f'eval.strategies {needs_value} need a value model: set value.enabled=True '
                      f'(phase-1 value training) or rl.algo to one of {trainers}')
  if cfg.value.enabled and 'mcts' in cfg.value.label_sources and 'alphazero' not in dict(cfg.rl.sections):
    raise ConfigError("value.labels='mcts': the search knobs come from config.rl.alphazero, which is missing")
  if cfg.tokenizer.kind == 'hf' and not (cfg.tokenizer.path or cfg.hf_checkpoint):
    raise ConfigError("tokenizer.kind='hf': set tokenizer.path (or hf_checkpoint, whose folder it then uses)")
  if cfg.rl.reward_fns:
    from rlm_jax.tasks import reward_fns  # pylint: disable=g-import-not-at-top
    try:
      reward_fns.load_reward_fns(cfg.rl.reward_fns)
    except (ValueError, ImportError) as e:
      raise ConfigError(f'rl.reward_fns: {e}') from e
  if cfg.tokenizer.chat_template and cfg.tokenizer.kind != 'hf':
    raise ConfigError("tokenizer.chat_template=True needs tokenizer.kind='hf' (the character tokenizer has no template)")
  if cfg.sft.steps > 0 and cfg.task.train_size and cfg.sft.batch_size > cfg.task.train_size:
    raise ConfigError(f'sft.batch_size={cfg.sft.batch_size}: more than task.train_size={cfg.task.train_size} '
                      'problems (each batch draws distinct problems)')


def has_value_model(cfg: ExperimentConfig) -> bool:
  """Whether the run ends with a value model / PRM (phase 1, or a phase-2 algorithm's own)."""
  algo = cfg.rl.algorithm
  return cfg.value.enabled or (algo is not None and algo.trains_value and cfg.rl.iterations > 0)


def tokenizer_path(cfg: ExperimentConfig) -> str:
  return cfg.tokenizer.path or cfg.hf_checkpoint
