"""The one model builder: training, `solve`, `analysis` and the experiments build models here.

`ModelBuilder(cfg)` resolves the architecture once (an HF folder's config when
`hf_checkpoint` is set, the vocabulary from the tokenizer) and builds every model of a run
from it: the policy (random init, HF weights, with LoRA adapters or not), the value model /
PRM (the policy's architecture with a value head), PPO's actor-critic, and their abstract
(shape-only) forms for restoring checkpoints. `load_run(workdir)` rebuilds exactly a finished
run's models from its `config.json` and `ckpt/<phase>` folders, so one run folder is all that
inference needs.

Checkpoint layout: `<workdir>/ckpt/<phase>/<step>/`, phase in 'sft', 'value' and the
algorithm names of `training.algorithms`; where each phase keeps its models in its state is
declared by its registry entry (`policy_path`, `value_path`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from rlm_jax import configlib
from rlm_jax import sharding
from rlm_jax.data.tokenizer import Tokenizer, load_tokenizer
from rlm_jax.experiment import config as config_lib
from rlm_jax.models import hf as hf_lib
from rlm_jax.models import lora as lora_lib
from rlm_jax.models.transformer import ModelConfig, Transformer
from rlm_jax.training import algorithms
from rlm_jax.training import value as value_lib
from rlm_jax.training.state import OptimConfig, make_optimizer

ConfigError = configlib.ConfigError

# Seed offsets of the models a run initialises (kept: runs resume with the same weights).
_SEED_ACTOR_CRITIC = 11
_SEED_VALUE = 13


def load_run_tokenizer(cfg: config_lib.ExperimentConfig) -> Tokenizer:
  t = cfg.tokenizer
  return load_tokenizer(t.kind, config_lib.tokenizer_path(cfg), t.step_delimiter)


class ModelBuilder:
  """Builds the models of one experiment config (see the module docstring)."""

  def __init__(self, cfg: config_lib.ExperimentConfig, tok: Tokenizer, mesh=None):
    self.cfg = cfg
    self.tok = tok
    model_cfg = cfg.model
    if cfg.hf_checkpoint:  # architecture from the checkpoint; precision, remat, attention from cfg.model
      try:
        model_cfg = hf_lib.config_from_hf(cfg.hf_checkpoint, dtype=cfg.model.dtype,
                                          param_dtype=cfg.model.param_dtype, remat=cfg.model.remat,
                                          attention=cfg.model.attention)
      except (OSError, ValueError) as e:
        raise ConfigError(f'hf_checkpoint={cfg.hf_checkpoint}: {e}') from e
    if cfg.hf_checkpoint and cfg.tokenizer.kind != 'hf' and model_cfg.vocab_size != tok.vocab_size:
      raise ConfigError(f"hf_checkpoint={cfg.hf_checkpoint}: a {model_cfg.vocab_size}-token vocabulary with "
                        f"tokenizer.kind='{cfg.tokenizer.kind}' ({tok.vocab_size} ids); set tokenizer.kind='hf'")
    if model_cfg.vocab_size == 0:
      model_cfg = dataclasses.replace(model_cfg, vocab_size=tok.vocab_size)
    elif model_cfg.vocab_size < tok.vocab_size:
      what = f'hf_checkpoint={cfg.hf_checkpoint}' if cfg.hf_checkpoint else f'model.vocab_size={model_cfg.vocab_size}'
      raise ConfigError(f'{what}: vocabulary {model_cfg.vocab_size} is smaller than the tokenizer\'s '
                        f'({tok.vocab_size})')
    self.model_cfg = model_cfg
    self.lora = cfg.lora.lora_config()  # None: LoRA off
    if self.lora is not None:
      nnx.eval_shape(lambda: lora_lib.init_lora(model_cfg, self.lora))  # bad targets fail here
    self.mesh = mesh if mesh is not None else sharding.make_mesh(cfg.mesh)
    self.rules = cfg.mesh.rules

  # --- configs of each model ---------------------------------------------------------------

  def with_head(self, head: str) -> ModelConfig:
    """The policy's architecture with value head `head` ('none': the policy itself)."""
    if head == 'none':
      return self.model_cfg
    return dataclasses.replace(self.model_cfg, value_head=head)

  def value_config(self) -> ModelConfig:
    """The value model's architecture: the policy's, reshaped by `value.arch`, with the value
    head of `value.mode`. A shape `value.init='policy'` cannot start from is a ConfigError."""
    v = self.cfg.value
    shape = v.arch.overrides()
    if v.init == 'policy':
      other = {k: x for k, x in shape.items() if k != 'n_layers' and x != getattr(self.model_cfg, k)}
      if other or shape.get('n_layers', self.model_cfg.n_layers) < self.model_cfg.n_layers:
        key, x = next(iter(other.items())) if other else ('n_layers', shape['n_layers'])
        raise ConfigError(f"value.arch.{key}={x}: value.init='policy' copies the policy's weights "
                          f"({key}={getattr(self.model_cfg, key)}); only more layers can start from them "
                          f"(or set value.init='random')")
    try:
      return dataclasses.replace(self.model_cfg, value_head=value_lib.HEAD_OF_MODE[v.mode],
                                 value_hidden=v.value_hidden, **shape)
    except ValueError as e:
      raise ConfigError(f'value.arch: {e}') from e

  # --- concrete models ---------------------------------------------------------------------

  def init_policy(self) -> tuple[nnx.GraphDef, nnx.State]:
    """The policy to train; with LoRA a `LoraTransformer` (the same base weights plus adapters).

    The parameters are checked to be sharded as `mesh.max_replicated_fraction` allows.
    """
    seed = self.cfg.seed
    if self.cfg.hf_checkpoint:  # each tensor read once and placed on its shard
      m = self.model_cfg
      graphdef, params = hf_lib.load_hf(self.cfg.hf_checkpoint, dtype=m.dtype, param_dtype=m.param_dtype,
                                        mesh=self.mesh, rules=self.rules, remat=m.remat)
      if self.lora is not None:
        graphdef, params = lora_lib.add_lora(graphdef, params, self.lora, seed=seed, mesh=self.mesh,
                                             rules=self.rules)
    elif self.lora is not None:
      graphdef, params = sharding.init_sharded(lambda: lora_lib.init_lora(self.model_cfg, self.lora, seed),
                                               self.mesh, self.rules)
    else:
      graphdef, params = sharding.init_sharded(lambda: Transformer(self.model_cfg, rngs=nnx.Rngs(params=seed)),
                                               self.mesh, self.rules)
    try:
      sharding.check_sharded(params, self.mesh, self.cfg.mesh.max_replicated_fraction)
    except sharding.ShardingError as e:
      raise ConfigError(f'mesh.max_replicated_fraction={self.cfg.mesh.max_replicated_fraction}: {e}') from e
    return graphdef, params

  def optimizer(self, optim: OptimConfig, params):
    """make_optimizer(optim); with LoRA it updates only the adapters of `params`."""
    tx = make_optimizer(optim)
    return tx if self.lora is None else lora_lib.lora_optimizer(tx, params)

  def plain_policy(self, graphdef, params) -> tuple[nnx.GraphDef, nnx.State]:
    """The policy as a plain Transformer (LoRA adapters merged into the weights)."""
    if self.lora is None or not isinstance(nnx.merge(graphdef, params), lora_lib.LoraTransformer):
      return graphdef, params
    return lora_lib.merge_lora(graphdef, params)

  def value_model(self, policy_params=None) -> tuple[nnx.GraphDef, nnx.State]:
    """A new value model: `value_config()`; with `value.init='policy'` every weight but the
    value head is copied from `policy_params` (a plain policy: merge LoRA first), and the
    layers a deeper value model has beyond the policy's start as the identity."""
    from rlm_jax.training import ppo as ppo_lib  # pylint: disable=g-import-not-at-top
    vcfg = self.value_config()
    make = lambda: Transformer(vcfg, rngs=nnx.Rngs(params=self.cfg.seed + _SEED_VALUE))
    graphdef, params = sharding.init_sharded(make, self.mesh, self.rules)
    if self.cfg.value.init == 'policy' and policy_params is not None:
      params = ppo_lib.actor_critic_params(params, policy_params)
      params = identity_layers(params, range(self.model_cfg.n_layers, vcfg.n_layers))
    return graphdef, jax.tree.map(jnp.copy, params)  # own buffers: the value state is donated

  def actor_critic(self, policy_params, head: str = 'sigmoid') -> tuple[nnx.GraphDef, nnx.State]:
    """The policy plus a fresh value head on its trunk (PPO); LM weights from `policy_params`."""
    from rlm_jax.training import ppo as ppo_lib  # pylint: disable=g-import-not-at-top
    ac_cfg = self.with_head(head)
    graphdef, ac_init = sharding.init_sharded(
        lambda: Transformer(ac_cfg, rngs=nnx.Rngs(params=self.cfg.seed + _SEED_ACTOR_CRITIC)), self.mesh,
        self.rules)
    return graphdef, ppo_lib.actor_critic_params(ac_init, policy_params)

  # --- abstract models (restore targets) ---------------------------------------------------

  def abstract_policy(self, head: str = 'none', with_lora: bool = True):
    """(graphdef, abstract params) of the policy as a phase checkpoints it."""
    mcfg = self.with_head(head)
    if self.lora is not None and with_lora and head == 'none':
      return sharding.abstract_sharded(lambda: lora_lib.init_lora(mcfg, self.lora), self.mesh, self.rules)
    return sharding.abstract_sharded(lambda: Transformer(mcfg, rngs=nnx.Rngs(params=0)), self.mesh, self.rules)

  def abstract_value(self):
    vcfg = self.value_config()
    return sharding.abstract_sharded(lambda: Transformer(vcfg, rngs=nnx.Rngs(params=0)), self.mesh, self.rules)


def identity_layers(params: nnx.State, layers) -> nnx.State:
  """`params` with the attention-output and MLP-down projections of `layers` zeroed: those
  residual blocks add nothing, so each is the identity until training moves them."""
  out = jax.tree.map(lambda x: x, params)
  d = out.to_pure_dict()
  for i in layers:
    block = d['layers'][i]
    block['attn']['wo'] = jnp.zeros_like(block['attn']['wo'])
    block['mlp']['w_down'] = jnp.zeros_like(block['mlp']['w_down'])
  nnx.replace_by_pure_dict(out, d)
  return out


# ------------------------------------------------------------------------------------------
# A finished (or running) run folder.


class Run(NamedTuple):
  """The models of one phase of a run folder (plain: LoRA merged).

  policy, value: (graphdef, params); value is None when the run has no value model.
  phase, step: where the policy was read from.
  """

  cfg: config_lib.ExperimentConfig
  config: ml_collections.ConfigDict
  tok: Tokenizer
  builder: ModelBuilder
  policy: tuple[Any, Any]
  value: tuple[Any, Any] | None
  phase: str
  step: int


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The ConfigDict a run was started with (`<workdir>/config.json`)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise ConfigError(f'--workdir={workdir}: no config.json there (not a run folder)')
  try:
    return ml_collections.ConfigDict(json.loads(open(path).read()))
  except ValueError as e:
    raise ConfigError(f'{path}: not a JSON config ({e})') from e


def phases_of(cfg: config_lib.ExperimentConfig) -> tuple[str, ...]:
  """The checkpoint phases a run of `cfg` writes, in order."""
  out = ['sft'] + (['value'] if cfg.value.enabled else [])
  if cfg.rl.algo != 'none' and cfg.rl.iterations > 0:
    out.append(cfg.rl.algo)
  return tuple(out)


def phase_steps(workdir: str, phase: str) -> list[int]:
  """Complete checkpoint steps of `<workdir>/ckpt/<phase>`, ascending (read-only)."""
  from rlm_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  d = os.path.join(workdir, 'ckpt', phase)
  if not os.path.isdir(d):
    return []
  return sorted(int(s) for s in os.listdir(d)
                if s.isdigit() and os.path.exists(os.path.join(d, s, ckpt_lib.COMMIT_FILE)))


def _raw_state(directory: str, step: int) -> dict:
  """A checkpointed state as saved (nested dicts of arrays), without a target tree."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  # Read-only: a plain manager (no tmp-directory cleanup) so a run still writing here is safe.
  # orbax wants an absolute path; a run folder is usually given relative (`--workdir=runs/x`).
  with ocp.CheckpointManager(os.path.abspath(directory), item_names=('state', 'extra')) as mngr:
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return out.state


def _subtree(raw: Any, path: tuple[str, ...], where: str) -> Any:
  for key in path:
    if not isinstance(raw, dict) or key not in raw:
      raise ConfigError(f'{where}: no {"/".join(path)} in the checkpointed state')
    raw = raw[key]
  return raw


def fill_params(abstract: nnx.State, raw: dict, where: str) -> nnx.State:
  """`abstract` (a model's State of ShapeDtypeStructs) filled with the arrays of `raw` (a
  checkpointed params tree as orbax returns it without a target), placed as `abstract` says.

  Raises:
    ConfigError: a parameter is missing or has another shape (the checkpoint is not of this
      config's model), naming the parameter and `where`.
  """
  pure = abstract.to_pure_dict()

  def fill(a, r, path):
    if isinstance(a, dict):
      if not isinstance(r, dict):
        raise ConfigError(f'{where}: {path or "/"} is a leaf in the checkpoint, a subtree in the model')
      out = {}
      for k, sub in a.items():
        rk = k if k in r else str(k)
        if rk not in r:
          raise ConfigError(f'{where}: parameter {path}/{k} of the model is not in the checkpoint '
                            '(a run of another model config?)')
        out[k] = fill(sub, r[rk], f'{path}/{k}')
      return out
    if isinstance(r, dict) and 'value' in r and len(r) == 1:  # an nnx Variable's field
      r = r['value']
    if tuple(r.shape) != tuple(a.shape):
      raise ConfigError(f'{where}: parameter {path} has shape {tuple(r.shape)} in the checkpoint, '
                        f'{tuple(a.shape)} in the model of config.json')
    return jax.device_put(jnp.asarray(r, a.dtype), a.sharding)

  state = jax.tree.map(lambda x: x, abstract)
  nnx.replace_by_pure_dict(state, fill(pure, raw, ''))
  return state


def load_phase_models(builder: ModelBuilder, workdir: str, phase: str, step: int | None = None):
  """((policy graphdef, params) or None, (value graphdef, params) or None, step) of one phase.

  The policy comes back plain (LoRA merged); the 'value' phase has only a value model.
  """
  steps = phase_steps(workdir, phase)
  if not steps:
    raise ConfigError(f'--workdir={workdir}: no complete checkpoint in ckpt/{phase}')
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ConfigError(f'--workdir={workdir}: ckpt/{phase} has no step {step} (steps: {steps})')
  where = os.path.join(workdir, 'ckpt', phase, str(step))
  raw = _raw_state(os.path.join(workdir, 'ckpt', phase), step)
  if phase == 'value':
    gd, abstract = builder.abstract_value()
    return None, (gd, fill_params(abstract, _subtree(raw, ('params',), where), where)), step
  algo = algorithms.ALGORITHMS.get(phase)
  head = algo.policy_head if algo is not None else 'none'
  lora_on = builder.lora is not None and (algo is None or 'lora' in algo.capabilities)
  gd, abstract = builder.abstract_policy(head, with_lora=lora_on)
  path = algo.policy_path if algo is not None else ('params',)
  policy = builder.plain_policy(gd, fill_params(abstract, _subtree(raw, path, where), where))
  value = None
  if algo is not None and algo.value_path is not None:
    vgd, vabstract = builder.abstract_value()
    value = (vgd, fill_params(vabstract, _subtree(raw, algo.value_path, where), where))
  return policy, value, step


def load_run(workdir: str, phase: str | None = None, *, mesh=None, verbose: bool = True) -> Run:
  """Rebuilds a run's models from its folder: `config.json` and `ckpt/<phase>/`.

  Args:
    workdir: the run folder (`--workdir` of `rlm_jax.main`).
    phase: which phase's policy ('sft', 'value' is not a policy, or an algorithm name);
      None = the last phase of the run that has a checkpoint.
    mesh: where to place the models (default: the run's mesh config).

  Returns:
    A `Run`. Its value model is the phase's own (alphazero), else the phase-1 value model
    when the run trained one, else None.
  """
  config = read_run_config(workdir)
  cfg = config_lib.parse(config, strict=False)  # a run may predate a knob: library defaults
  tok = load_run_tokenizer(cfg)
  builder = ModelBuilder(cfg, tok, mesh=mesh)
  phases = [p for p in phases_of(cfg) if p != 'value']
  if phase is None:
    present = [p for p in phases if phase_steps(workdir, p)]
    if not present:
      raise ConfigError(f'--workdir={workdir}: no complete checkpoint in ckpt/<{"|".join(phases)}>')
    phase = present[-1]
  elif phase not in phases:
    raise ConfigError(f'--phase={phase}: the run in {workdir} has the policy phases {", ".join(phases)}')
  policy, value, step = load_phase_models(builder, workdir, phase)
  if value is None and cfg.value.enabled and phase_steps(workdir, 'value'):
    _, value, _ = load_phase_models(builder, workdir, 'value')
  if verbose:
    print(f'loaded {phase} step {step} from {workdir}' + (' with its value model' if value else ''),
          file=sys.stderr)
  return Run(cfg, config, tok, builder, policy, value, phase, step)


# Tokenizer files of an HF folder, copied next to the exported weights.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model',
                   'vocab.json', 'merges.txt', 'chat_template.jinja', 'generation_config.json')


def export_run(workdir: str, out: str, phase: str | None = None, dtype: str | None = None) -> str:
  """Writes the policy of `workdir` (phase `phase`) to the HF folder `out`; returns `out`."""
  run = load_run(workdir, phase)
  graphdef, params = run.policy  # export_hf writes the LM weights only (PPO's value head stays behind)
  template = run.cfg.hf_checkpoint or None
  hf_lib.export_hf(graphdef, params, out, template, dtype=dtype)
  tok_dir = run.cfg.tokenizer.path or run.cfg.hf_checkpoint
  if run.cfg.tokenizer.kind == 'hf' and tok_dir:
    for name in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(tok_dir, name)):
        shutil.copy(os.path.join(tok_dir, name), os.path.join(out, name))
  return out
