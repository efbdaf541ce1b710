"""One GRPO iteration: `grpo_iteration_jit` vs tunix's GRPOLearner and TRL's GRPOTrainer (CPU).

Every peer trains the same Llama-shaped model from the same weights (initialised once and
written with `rlm_jax.models.hf.export_hf`, as in benchmarks/sampler.py) on the same B prompts
of --prompt-len tokens, G samples each, --completion-len tokens per sample (the EOS id is -1,
which no model samples, so every row generates exactly that many), temperature 1, μ updates
per rollout, k3 KL to a reference model with coefficient --beta, per-sequence token-mean loss,
clip ε = 0.2, AdamW (lr 1e-5, b 0.9/0.95) after global-norm clipping at 1. The reward is cheap:
1 if more than half of a completion's tokens have even ids, else 0.

Peers (--peers, comma-separated):
  ours      `grpo_iteration_jit`: rollout, reward, group advantages and the μ updates in one
            compiled program (the headline). Split timing: its two halves, `rollout_jit` and
            `grpo_update_jit` (advantages and μ updates on a given rollout), called in turn.
  hostloop  our pieces in a host loop: jitted `sample`, then rewards and advantages in NumPy
            on host (device_get in between), old/ref log-probs jitted, then μ calls of a jitted
            update step. The structure of a typical host-driven learner, with our kernels.
  tunix     `tunix.rl.grpo.grpo_learner.GRPOLearner` + `GRPOConfig` on an `RLCluster`
            (`ClusterConfig`, `RLTrainingConfig`, `base_rollout.RolloutConfig`, vanilla rollout
            engine, actor/reference/rollout on one 1-device mesh, so the rollout shares the
            actor's weights), driven by `GRPOLearner.train`, with tunix's own `Llama3` loaded
            from the same export by `tunix.models.llama3.params.create_model_from_safe_tensors`.
            It pins its own jax/flax, so it runs in its own virtualenv (--tunix-python) as a
            subprocess, before ours, so the two never share the cores.
  trl       `trl.GRPOTrainer` + `trl.GRPOConfig` (1.16.0) on torch CPU with HF transformers'
            `LlamaForCausalLM` loaded from the same export, per_device_train_batch_size = B·G,
            steps_per_generation = 1, num_iterations = μ (one generation, then μ optimizer steps),
            generation_kwargs min_new_tokens = T; a word-level tokenizer maps "17" <-> id 17.
            Subprocess with --trl-path on PYTHONPATH (trl is not in the project's environment).

Timing runs in lock-step rounds: each round runs one iteration of every peer, one peer at a
time, in an order that rotates every round (the subprocess peers block on stdin between their
iterations), so all peers see the same machine load and never share the cores. The first
round compiles (its wall time is printed apart); then the median over --repeats rounds after
--warmup, each iteration ended by waiting for the updated parameters:
  iter s     wall seconds per iteration (CPU s: CPU seconds of the process, all threads);
  rollout    the sampling part; rollout tok/s = B·G·completion_len / rollout seconds;
  update     everything after sampling (rewards, advantages, old/ref log-probs, μ updates);
             update tok/s = μ·B·G·completion_len / update seconds.
Ours is split with separately jitted pieces (their sum is not the fused time); tunix's
rollout is the time inside `RLCluster.generate` (its sampler plus string (de)tokenisation),
trl's the time inside `GRPOTrainer._generate_single_turn` (HF `generate`), and their update is
the iteration minus that. The ratio column is our fused iteration over the
peer's iteration (ours/peer CPU: the same with CPU seconds, steadier on a shared machine);
the target is <= 0.7.

  python benchmarks/grpo.py                                  # all four peers
  python benchmarks/grpo.py --peers=ours,hostloop            # without tunix and trl
  python benchmarks/grpo.py --layers=1 --d-model=64 --heads=2 --kv-heads=1 --head-dim=32 \
      --d-ff=128 --vocab=128 --prompts=2 --group=4 --prompt-len=8 --completion-len=8  # tiny

Peers: `bash benchmarks/setup_peers.sh` creates .peers/tunix (a virtualenv with
google-tunix==0.1.7, which installs jax 0.10.2 / flax 0.12.8 there) and .peers/trl-site
(trl==1.16.0 + accelerate==1.15.0, next to the project's torch/transformers/datasets) in the
repository root; RLM_PEERS_DIR moves both, --tunix-python / --trl-path override each. A peer
that cannot run is reported with its error line and skipped. TRL runs in float32 (bf16=False:
trl's GRPOConfig defaults to bf16, and bf16 autocast on an AVX2 CPU is ~11x slower).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

# benchmarks/sampler.py: model export and tunix tokenizer shared with the sampler benchmark.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers as peer_setup  # pylint: disable=g-import-not-at-top,wrong-import-position
import sampler as sampler_bench  # pylint: disable=g-import-not-at-top,wrong-import-position

PAD, BOS = 0, 1
NO_EOS = -1  # an id no model samples: every row generates --completion-len tokens
PEERS = ('ours', 'hostloop', 'tunix', 'trl')
LEARNING_RATE = 1e-5
EPSILON = 0.2


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--layers', type=int, default=4)
  p.add_argument('--d-model', type=int, default=256)
  p.add_argument('--heads', type=int, default=4)
  p.add_argument('--kv-heads', type=int, default=2)
  p.add_argument('--head-dim', type=int, default=64)
  p.add_argument('--d-ff', type=int, default=704)
  p.add_argument('--vocab', type=int, default=1024)
  p.add_argument('--prompt-len', type=int, default=32)
  p.add_argument('--completion-len', type=int, default=64)
  p.add_argument('--prompts', type=int, default=4, help='B: prompts per iteration')
  p.add_argument('--group', type=int, default=8, help='G: samples per prompt')
  p.add_argument('--mu', type=int, default=1, help='μ: updates per rollout (num_iterations)')
  p.add_argument('--beta', type=float, default=0.04, help='KL coefficient (0: no reference model)')
  p.add_argument('--shared-prompt', type=int, default=1,
                 help="ours: 1 = the update's log-prob passes run each prompt once for its G samples, 0 = whole rows")
  p.add_argument('--warmup', type=int, default=1, help='untimed iterations (the first compiles)')
  p.add_argument('--repeats', type=int, default=5, help='timed iterations (median)')
  p.add_argument('--peers', default='ours,hostloop,tunix,trl', help=f'comma-separated subset of {PEERS}')
  p.add_argument('--tunix-python', default=peer_setup.tunix_python(),
                 help=f'python of a virtualenv with google-tunix==0.1.7 (`{peer_setup.SETUP} tunix`)')
  p.add_argument('--trl-path', default=peer_setup.trl_path(),
                 help='folder with trl==1.16.0 and accelerate==1.15.0 (pip install --target DIR --no-deps ...), '
                      'put on PYTHONPATH of the trl worker; empty if trl is importable as is')
  p.add_argument('--torch-threads', type=int, default=1,
                 help='torch threads for the trl peer (on a busy 2-core machine 2 OpenMP threads spin-wait)')
  p.add_argument('--worker', default='', help=argparse.SUPPRESS)  # internal: 'tunix' or 'trl'
  p.add_argument('--workdir', default='', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  peers = [x for x in args.peers.split(',') if x]
  bad = [x for x in peers if x not in PEERS]
  if bad or not peers:
    p.error(f'--peers={args.peers!r}: each must be one of {PEERS}')
  for name in ('layers', 'prompt_len', 'completion_len', 'prompts', 'mu', 'repeats'):
    if getattr(args, name) < 1:
      p.error(f'--{name.replace("_", "-")}={getattr(args, name)}: must be >= 1')
  if args.group < 2:
    p.error(f'--group={args.group}: must be >= 2 (group advantages need two samples)')
  if args.warmup < 1:
    p.error(f'--warmup={args.warmup}: must be >= 1 (the first iteration compiles)')
  if args.beta < 0:
    p.error(f'--beta={args.beta}: must be >= 0')
  args.peer_list = peers
  return args


def make_prompts(args) -> np.ndarray:
  """[B, Lp] int32 prompts: BOS, then ids in [3, vocab) (never PAD, BOS or the tokenizer's EOS)."""
  rng = np.random.RandomState(0)
  body = rng.randint(3, args.vocab, (args.prompts, args.prompt_len - 1))
  return np.concatenate([np.full((args.prompts, 1), BOS), body], axis=1).astype(np.int32)


def probe_completions(args) -> np.ndarray:
  """Fixed [B, T] completions for the same-model check (ids in [3, vocab), as the prompts)."""
  return np.random.RandomState(1).randint(3, args.vocab, (args.prompts, args.completion_len)).astype(np.int32)


# ----------------------------------------------------------------------------- reward


def even_majority_reward_np(tokens_NxT: np.ndarray, lengths_N: np.ndarray) -> np.ndarray:
  """Host reward: 1.0 where more than half of the generated tokens have even ids, else 0.0."""
  valid_NxT = np.arange(tokens_NxT.shape[1])[None] < lengths_N[:, None]
  even_N = np.sum(valid_NxT & (tokens_NxT % 2 == 0), axis=1)
  return (2 * even_N > lengths_N).astype(np.float32)


def even_majority_score(out, batch):
  """The same rule, jittable, on the verifier scale of `GRPOSetup.score_fn`: 2 solved, 0 wrong."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  del batch
  t = out.tokens_BxT.shape[1]
  valid_BxT = jnp.arange(t)[None] < out.lengths_B[:, None]
  even_B = jnp.sum(valid_BxT & (out.tokens_BxT % 2 == 0), axis=1)
  return jnp.where(2 * even_B > out.lengths_B, 2, 0).astype(jnp.int32)


def group_advantages_np(reward_BxG: np.ndarray, eps: float = 1e-4) -> np.ndarray:
  """(r - group mean) / (group std + eps), unbiased std (as rlm_jax.training.advantages, TRL)."""
  mean = reward_BxG.mean(axis=1, keepdims=True)
  std = reward_BxG.std(axis=1, ddof=1, keepdims=True)
  return ((reward_BxG - mean) / (std + eps)).astype(np.float32)


# ----------------------------------------------------------------------------- timing


def _timed(fn):
  """(result, wall s, CPU s) of `fn()`; fn must wait for its results."""
  w0, c0 = time.perf_counter(), time.process_time()
  out = fn()
  return out, time.perf_counter() - w0, time.process_time() - c0


def summarize(first_s, iters, args) -> dict:
  """iters: list of dicts with wall, cpu, rollout, update seconds (update may be None)."""
  med = lambda k: statistics.median(x[k] for x in iters)
  n_roll = args.prompts * args.group * args.completion_len
  res = dict(first_s=first_s, iter_s=med('wall'), cpu_s=med('cpu'), rollout_s=med('rollout'),
             update_s=med('update'))
  res['rollout_tok_s'] = n_roll / res['rollout_s']
  res['update_tok_s'] = args.mu * n_roll / res['update_s']
  return res


# ----------------------------------------------------------------------------- lock-step rounds
#
# The parent runs one iteration of one peer at a time, round-robin over the peers (the order
# rotates every round), so every peer is timed under the same machine load and no two peers
# ever share the cores. Workers in other virtualenvs block on stdin between iterations.


class PeerFailed(RuntimeError):
  pass


class Gate:
  """Worker side: before each iteration say WAIT and block until the parent says go."""

  def __init__(self):
    self.waited_s = 0.0

  def wait(self):
    print('WAIT', flush=True)
    t0 = time.perf_counter()
    line = sys.stdin.readline()
    self.waited_s += time.perf_counter() - t0
    if line.strip() != 'go':
      raise SystemExit('benchmarks/grpo.py worker: the parent closed stdin')

  @staticmethod
  def send(tag: str, obj):
    print(f'{tag} ' + json.dumps(obj), flush=True)


def _worker_argv(args) -> list[str]:
  names = ('layers', 'd_model', 'heads', 'kv_heads', 'head_dim', 'd_ff', 'vocab', 'prompt_len', 'completion_len',
           'prompts', 'group', 'mu', 'beta', 'warmup', 'repeats', 'torch_threads')
  return [f'--{n.replace("_", "-")}={getattr(args, n)}' for n in names]


class WorkerPeer:
  """Parent side of a worker subprocess (`--worker=kind`), stepped one iteration at a time."""

  def __init__(self, kind: str, python: str, workdir: str, args, pythonpath: str = ''):
    self.kind, self.result = kind, None
    cmd = [python, os.path.abspath(__file__), f'--worker={kind}', f'--workdir={workdir}'] + _worker_argv(args)
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'XLA_FLAGS')}
    if pythonpath:
      env['PYTHONPATH'] = pythonpath
    self._err = tempfile.TemporaryFile('w+')  # a file, not a pipe: a chatty worker cannot block
    self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True,
                                  env=env)
    self._read('WAIT')  # set up, and blocked before its first iteration

  def _read(self, tag: str) -> str:
    while True:
      line = self._proc.stdout.readline()
      if not line:
        rc = self._proc.wait()
        self._err.seek(0)
        tail = (self._err.read().strip().splitlines() or ['no output'])[-1]
        raise PeerFailed(f'{self.kind} worker failed (exit {rc}): {tail}')
      if line.startswith(tag):
        return line[len(tag):].strip()

  def step(self, i: int, last: bool) -> dict:
    del i
    self._proc.stdin.write('go\n')
    self._proc.stdin.flush()
    it = json.loads(self._read('ITER '))
    if last:
      self.result = json.loads(self._read('RESULT '))
    else:
      self._read('WAIT')  # its work between iterations ends before the next peer starts
    return it

  def close(self):
    if self._proc.poll() is None:
      self._proc.stdin.close()  # its Gate exits
      try:
        self._proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait()
    self._err.close()


# ----------------------------------------------------------------------------- ours


def _setup(args):
  from rlm_jax.sampling.sampler import SamplingConfig  # pylint: disable=g-import-not-at-top
  from rlm_jax.training.grpo import GRPOSetup  # pylint: disable=g-import-not-at-top
  from rlm_jax.training.losses import GRPOConfig  # pylint: disable=g-import-not-at-top
  from rlm_jax.training.rewards import RewardConfig  # pylint: disable=g-import-not-at-top

  # loss_type 'grpo' = per-sequence token mean, tunix's default loss_agg_mode.
  loss = GRPOConfig(loss_type='grpo', scale_rewards='group', epsilon=EPSILON, beta=args.beta,
                    num_iterations=args.mu, max_completion_length=args.completion_len)
  sampling = SamplingConfig(max_new_tokens=args.completion_len, eos_id=NO_EOS, pad_id=PAD, temperature=1.0)
  return GRPOSetup(group_size=args.group, loss=loss, sampling=sampling, reward=RewardConfig(correct=1.0),
                   step_id=-1, score_fn=even_majority_score, shared_prompt=bool(args.shared_prompt))


def _optimizer():
  from rlm_jax.training.state import OptimConfig, make_optimizer  # pylint: disable=g-import-not-at-top

  return make_optimizer(OptimConfig(learning_rate=LEARNING_RATE, b1=0.9, b2=0.95, grad_clip=1.0))


def _param_delta(a, b) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  sq = jax.tree.map(lambda x, y: jnp.sum(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32))), a, b)
  return float(jnp.sqrt(sum(jax.tree.leaves(sq))))


class _Ours:
  """Shared set-up of the in-process peers: model, optimizer, prompts, reference copy, key."""

  def __init__(self, graphdef, params, args):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from rlm_jax.training.state import create_train_state  # pylint: disable=g-import-not-at-top

    self.graphdef, self.params0, self.args = graphdef, params, args
    self.setup, self.tx = _setup(args), _optimizer()
    prompt = jnp.asarray(make_prompts(args))
    self.batch = {'prompt': prompt, 'prompt_mask': jnp.ones(prompt.shape, bool)}
    # The policy state is donated; the reference keeps its own copy of the initial weights.
    self.ref = jax.tree.map(jnp.copy, params) if args.beta > 0 else None
    self.key = jax.random.key(0)
    self.state = create_train_state(params, self.tx)


class OursFused(_Ours):
  """`grpo_iteration_jit`: the whole iteration as one compiled program (the headline)."""

  def step(self, i: int, last: bool) -> dict:
    import jax  # pylint: disable=g-import-not-at-top

    from rlm_jax.training import grpo as grpo_lib  # pylint: disable=g-import-not-at-top

    (self.state, metrics), wall, cpu = _timed(lambda: jax.block_until_ready(grpo_lib.grpo_iteration_jit(
        self.graphdef, self.tx, self.setup, self.state, self.ref, self.batch, jax.random.fold_in(self.key, i))))
    if last:
      metrics = jax.device_get(metrics)
      self.result = dict(loss=float(metrics['loss']), reward=float(metrics['reward']),
                         finite=bool(metrics['finite']), param_delta=_param_delta(self.state.params, self.params0))
    return dict(wall=wall, cpu=cpu)


class OursSplit(_Ours):
  """The fused iteration's two halves jitted apart: `rollout_jit`, then `grpo_update_jit` on its output."""

  def step(self, i: int, last: bool) -> dict:
    import jax  # pylint: disable=g-import-not-at-top

    from rlm_jax.training import grpo as grpo_lib  # pylint: disable=g-import-not-at-top

    del last
    ro, t_roll, _ = _timed(lambda: jax.block_until_ready(grpo_lib.rollout_jit(
        self.graphdef, self.state.params, self.batch, jax.random.fold_in(self.key, i), self.setup)))
    (self.state, _), t_upd, _ = _timed(lambda: jax.block_until_ready(grpo_lib.grpo_update_jit(
        self.graphdef, self.tx, self.setup, self.state, self.ref, ro)))
    return dict(rollout=t_roll, update=t_upd)


# ----------------------------------------------------------------------------- hostloop


class HostLoop(_Ours):
  """Jitted sampling -> host rewards/advantages (NumPy) -> jitted log-probs and μ update steps."""

  def __init__(self, graphdef, params, args):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top

    from rlm_jax.training import grpo as grpo_lib  # pylint: disable=g-import-not-at-top
    from rlm_jax.training import losses  # pylint: disable=g-import-not-at-top
    from rlm_jax.training.state import apply_gradients  # pylint: disable=g-import-not-at-top

    super().__init__(graphdef, params, args)
    cfg, lp, tx = self.setup.loss, args.prompt_len, self.tx
    self.prompt_N = jnp.repeat(self.batch['prompt'], args.group, axis=0)

    @jax.jit
    def logps(p, seq, seq_mask):
      return grpo_lib.completion_logprobs(graphdef, p, seq, seq_mask, lp)[0]

    @jax.jit
    def update_step(state, seq, seq_mask, adv_N, old, ref_logp):
      mask = seq_mask[:, lp:]

      def loss_fn(p):
        logp = grpo_lib.completion_logprobs(graphdef, p, seq, seq_mask, lp)[0]
        return losses.grpo_loss(logp, old, ref_logp, adv_N, mask, jnp.zeros(adv_N.shape, bool), cfg)

      (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      return apply_gradients(state, grads, tx), dict(loss=loss, grad_norm=optax.global_norm(grads))

    self.logps, self.update_step = logps, update_step

  def _iteration(self, key):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from rlm_jax.sampling.sampler import sample  # pylint: disable=g-import-not-at-top

    cfg, g = self.setup.loss, self.args.group
    w0 = time.perf_counter()
    mask_N = jnp.ones(self.prompt_N.shape, bool)
    out = sample(self.graphdef, self.state.params, self.prompt_N, mask_N, key, self.setup.sampling)
    tokens, lengths = jax.device_get((out.tokens_BxT, out.lengths_B))
    t_roll = time.perf_counter() - w0
    reward = even_majority_reward_np(tokens, lengths)
    adv_N = jnp.asarray(group_advantages_np(reward.reshape(-1, g)).reshape(-1))
    completion_mask = np.arange(tokens.shape[1])[None] < lengths[:, None]
    seq = jnp.concatenate([self.prompt_N, jnp.asarray(tokens)], axis=1)
    seq_mask = jnp.concatenate([mask_N, jnp.asarray(completion_mask)], axis=1)
    old = self.logps(self.state.params, seq, seq_mask) if cfg.num_iterations > 1 else None
    ref_logp = self.logps(self.ref, seq, seq_mask) if cfg.beta > 0 else None
    for _ in range(cfg.num_iterations):
      self.state, aux = self.update_step(self.state, seq, seq_mask, adv_N, old, ref_logp)
    jax.block_until_ready(self.state)
    return aux, float(reward.mean()), t_roll

  def step(self, i: int, last: bool) -> dict:
    import jax  # pylint: disable=g-import-not-at-top

    (aux, reward, t_roll), wall, cpu = _timed(lambda: self._iteration(jax.random.fold_in(self.key, i)))
    if last:
      loss = float(aux['loss'])
      self.result = dict(loss=loss, reward=reward, finite=bool(np.isfinite(loss)),
                         param_delta=_param_delta(self.state.params, self.params0))
    return dict(wall=wall, cpu=cpu, rollout=t_roll, update=wall - t_roll)


# ----------------------------------------------------------------------------- tunix


def tunix_worker(args):
  """Runs inside the tunix virtualenv, one iteration per `go` from the parent (see Gate)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  from tunix.models.llama3 import model as tmodel  # pylint: disable=g-import-not-at-top
  from tunix.models.llama3 import params as tparams  # pylint: disable=g-import-not-at-top
  from tunix.rl import common as tcommon  # pylint: disable=g-import-not-at-top
  from tunix.rl import rl_cluster as rlc  # pylint: disable=g-import-not-at-top
  from tunix.rl.grpo import grpo_learner  # pylint: disable=g-import-not-at-top
  from tunix.rl.rollout import base_rollout  # pylint: disable=g-import-not-at-top

  g, lp, t, mu = args.group, args.prompt_len, args.completion_len, args.mu
  n_iters = args.warmup + args.repeats
  mcfg = tmodel.ModelConfig(
      num_layers=args.layers, vocab_size=args.vocab, embed_dim=args.d_model, hidden_dim=args.d_ff,
      num_heads=args.heads, head_dim=args.head_dim, num_kv_heads=args.kv_heads, rope_theta=1_000_000,
      norm_eps=1e-5, shd_config=tmodel.ShardingConfig.get_default_sharding(),
  )
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('fsdp', 'tp'))
  with jax.set_mesh(mesh):
    actor = tparams.create_model_from_safe_tensors(args.workdir, mcfg, mesh)
    reference = tparams.create_model_from_safe_tensors(args.workdir, mcfg, mesh) if args.beta > 0 else None
  params0 = jax.tree.map(jnp.copy, nnx.state(actor, nnx.Param))

  # Same-model check: log-probs of fixed completions under the initial weights.
  gdef, st = nnx.split(actor)
  probe_logp = tcommon.compute_per_token_logps(
      gdef, st, prompt_tokens=jnp.asarray(make_prompts(args)), completion_tokens=jnp.asarray(probe_completions(args)),
      pad_id=PAD, eos_id=2, stop_gradient=True, return_logits=False)

  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LEARNING_RATE, b1=0.9, b2=0.95, weight_decay=0.0))
  cluster = rlc.RLCluster(
      actor=actor, reference=reference, tokenizer=sampler_bench._IdTokenizer(),  # pylint: disable=protected-access
      cluster_config=rlc.ClusterConfig(
          role_to_mesh={rlc.Role.ACTOR: mesh, rlc.Role.REFERENCE: mesh, rlc.Role.ROLLOUT: mesh},
          rollout_engine='vanilla', offload_to_cpu=False,
          training_config=rlc.RLTrainingConfig(actor_optimizer=tx, eval_every_n_steps=10**9,
                                               max_steps=n_iters * mu),
          rollout_config=base_rollout.RolloutConfig(
              max_tokens_to_generate=t, max_prompt_length=lp, kv_cache_size=lp + t, temperature=1.0,
              top_p=1.0, eos_tokens=[NO_EOS]),
      ),
  )

  def reward_fn(prompts, completions, **kw):
    del prompts, kw
    toks = [np.array([int(x) for x in c.split()], np.int64) for c in completions]
    return [float(even_majority_reward_np(x[None], np.array([len(x)]))[0]) for x in toks]

  learner = grpo_learner.GRPOLearner(
      rl_cluster=cluster, reward_fns=reward_fn,
      algo_config=grpo_learner.GRPOConfig(num_generations=g, num_iterations=mu, beta=args.beta,
                                          epsilon=EPSILON, kl_loss_mode='low_var_kl',
                                          loss_agg_mode='sequence-mean-token-mean'))

  # Timing hooks on the learner's own call path (instance attributes; the methods are unchanged).
  gate, rollouts, gen_lengths = Gate(), [], []
  run_global_step, generate = learner._run_global_step, cluster.generate  # pylint: disable=protected-access

  def timed_generate(*a, **k):
    out, wall, _ = _timed(lambda: generate(*a, **k))
    rollouts.append(wall)
    gen_lengths.extend(len(x) for x in out.tokens)
    return out

  def timed_global_step(*a, **k):
    def step():
      run_global_step(*a, **k)
      jax.block_until_ready(nnx.state(cluster.actor_trainer.model))

    waited = gate.waited_s
    _, wall, cpu = _timed(step)
    wall -= gate.waited_s - waited  # the batch is fetched inside the step: minus the wait for `go`
    Gate.send('ITER', dict(wall=wall, cpu=cpu, rollout=rollouts[-1], update=wall - rollouts[-1]))

  cluster.generate = timed_generate
  learner._run_global_step = timed_global_step  # pylint: disable=protected-access

  # Prompts travel as text; the sampler adds BOS itself, so send the ids after it.
  text = np.array([' '.join(map(str, row[1:])) for row in make_prompts(args)])

  def batches():
    for _ in range(n_iters):
      gate.wait()
      yield {'prompts': text}

  learner.train(batches())
  if len(rollouts) != n_iters:
    raise RuntimeError(f'tunix ran {len(rollouts)} rollouts, expected {n_iters}')
  if set(gen_lengths) != {t}:
    raise RuntimeError(f'tunix completions have lengths {sorted(set(gen_lengths))}, expected all {t}')
  Gate.send('RESULT', dict(
      info=f'google-tunix {metadata.version("google-tunix")}, jax {jax.__version__}',
      param_delta=_param_delta(nnx.state(cluster.actor_trainer.model, nnx.Param), params0),
      train_steps=int(cluster.actor_trainer.train_steps), probe_logp=np.asarray(probe_logp).tolist()))


# ----------------------------------------------------------------------------- trl


def trl_worker(args):
  """Runs with trl importable (torch CPU), one iteration per `go` from the parent (see Gate)."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  import datasets  # pylint: disable=g-import-not-at-top
  import tokenizers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  import trl  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.torch_threads)
  b, g, t, mu = args.prompts, args.group, args.completion_len, args.mu
  n_iters = args.warmup + args.repeats
  # Token ids written as decimal words: a word-level tokenizer maps "17" <-> 17.
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({str(i): i for i in range(args.vocab)}, unk_token='3'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  ptok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=str(PAD), bos_token=str(BOS),
                                              eos_token='2', unk_token='3')
  model = transformers.AutoModelForCausalLM.from_pretrained(args.workdir, dtype=torch.float32, local_files_only=True)

  # Same-model check: log-probs of fixed completions under the initial weights.
  seq = torch.tensor(np.concatenate([make_prompts(args), probe_completions(args)], axis=1), dtype=torch.int64)
  with torch.no_grad():
    logp = torch.log_softmax(model(input_ids=seq).logits[:, args.prompt_len - 1:-1].float(), dim=-1)
    probe_logp = torch.gather(logp, 2, seq[:, args.prompt_len:, None])[..., 0].numpy()
  params0 = {k: v.detach().clone() for k, v in model.named_parameters()}

  prompts = [' '.join(map(str, row)) for row in make_prompts(args)]

  def reward_fn(completions, completion_ids, **kw):
    del completions, kw
    return [float(even_majority_reward_np(np.array([c]), np.array([len(c)]))[0]) for c in completion_ids]

  # One GRPO iteration = one generation of B·G completions, then μ optimizer steps on all of
  # them (per_device_train_batch_size = B·G, steps_per_generation = 1, num_iterations = μ);
  # min_new_tokens = T keeps EOS out, so every completion has T tokens.
  cfg = trl.GRPOConfig(
      output_dir=os.path.join(args.workdir, 'trl'), per_device_train_batch_size=b * g, gradient_accumulation_steps=1,
      steps_per_generation=1, num_generations=g, num_iterations=mu, max_completion_length=t, temperature=1.0,
      top_p=1.0, bf16=False, fp16=False, beta=args.beta, epsilon=EPSILON, loss_type='grpo', scale_rewards='group',
      learning_rate=LEARNING_RATE, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
      lr_scheduler_type='constant', warmup_steps=0, max_steps=n_iters * mu, use_cpu=True, report_to='none',
      save_strategy='no', logging_steps=10**6, disable_tqdm=True, generation_kwargs={'min_new_tokens': t}, seed=0)
  trainer = trl.GRPOTrainer(model=model, reward_funcs=reward_fn, args=cfg, processing_class=ptok,
                            train_dataset=datasets.Dataset.from_dict({'prompt': prompts * n_iters}))

  gate, rollouts, gen_lengths = Gate(), [], []
  generate = trainer._generate_single_turn  # pylint: disable=protected-access

  def timed_generate(*a, **k):
    out, wall, _ = _timed(lambda: generate(*a, **k))
    rollouts.append(wall)
    gen_lengths.extend(len(c) for c in out[0])
    return out

  class IterationClock(transformers.TrainerCallback):
    """An iteration is μ optimizer steps; its rollout happens in the first."""

    steps, start = 0, None

    def on_step_begin(self, *a, **k):
      if self.steps % mu == 0:
        gate.wait()
        self.start = (time.perf_counter(), time.process_time())

    def on_step_end(self, *a, **k):
      self.steps += 1
      if self.steps % mu == 0:
        wall, cpu = time.perf_counter() - self.start[0], time.process_time() - self.start[1]
        Gate.send('ITER', dict(wall=wall, cpu=cpu, rollout=rollouts[-1], update=wall - rollouts[-1]))

  trainer._generate_single_turn = timed_generate  # pylint: disable=protected-access
  trainer.add_callback(IterationClock())
  trainer.train()
  if len(rollouts) != n_iters:
    raise RuntimeError(f'trl ran {len(rollouts)} rollouts, expected {n_iters}')
  if set(gen_lengths) != {t}:
    raise RuntimeError(f'trl completions have lengths {sorted(set(gen_lengths))}, expected all {t}')
  sq = sum(float(torch.sum((p.detach() - params0[k]) ** 2)) for k, p in model.named_parameters())
  Gate.send('RESULT', dict(
      info=(f'trl {metadata.version("trl")}, torch {torch.__version__} ({torch.get_num_threads()} threads), '
            f'transformers {transformers.__version__}'),
      param_delta=sq ** 0.5, train_steps=int(trainer.state.global_step), probe_logp=probe_logp.tolist()))


# ----------------------------------------------------------------------------- main


def format_table(results: dict, args) -> str:
  """One row per peer; ours/peer = our fused iteration / the peer's (wall; CPU seconds), target <= 0.7."""
  del args
  head = ('peer', 'iter s', 'iter CPU s', 'rollout s', 'rollout tok/s', 'update s', 'update tok/s', 'first iter s',
          'ours/peer', 'ours/peer CPU')
  ours = results.get('ours')
  rows = [head]
  for name, r in results.items():
    vs = ours is not None and name != 'ours'
    rows.append((name, f"{r['iter_s']:.4g}", f"{r['cpu_s']:.4g}", f"{r['rollout_s']:.4g}", f"{r['rollout_tok_s']:.0f}",
                 f"{r['update_s']:.4g}", f"{r['update_tok_s']:.0f}", f"{r['first_s']:.1f}",
                 f"{ours['iter_s'] / r['iter_s']:.2f}" if vs else '-', f"{ours['cpu_s'] / r['cpu_s']:.2f}" if vs else '-'))
  widths = [max(len(row[j]) for row in rows) for j in range(len(head))]
  return '\n'.join(' | '.join([row[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(row[1:], widths[1:])])
                   for row in rows)


def start_workers(workdir: str, args) -> tuple[dict, list[str]]:
  """The subprocess peers, each set up and blocked before its first iteration."""
  peers, lines = {}, []
  if 'tunix' in args.peer_list:
    if not os.path.exists(args.tunix_python):
      lines.append(peer_setup.missing('tunix', args.tunix_python))
    else:
      try:
        peers['tunix'] = WorkerPeer('tunix', args.tunix_python, workdir, args)
      except PeerFailed as e:
        lines.append(f'tunix: not run: {e}')
  if 'trl' in args.peer_list:
    if args.trl_path and not os.path.isdir(os.path.join(args.trl_path, 'trl')):
      lines.append(peer_setup.missing('trl', args.trl_path))
    else:
      try:
        peers['trl'] = WorkerPeer('trl', sys.executable, workdir, args, args.trl_path)
      except PeerFailed as e:
        lines.append(f'trl: not run: {e}')
  return peers, lines


def run_rounds(peers: dict, args) -> tuple[dict, list[str]]:
  """warmup + repeats rounds; each runs one iteration of every peer, in a rotating order."""
  n = args.warmup + args.repeats
  iters, lines = {name: [] for name in peers}, []
  names = list(peers)
  for i in range(n if names else 0):
    for name in names[i % len(names):] + names[:i % len(names)]:
      if name not in peers:
        continue
      try:
        iters[name].append(peers[name].step(i, last=i == n - 1))
      except PeerFailed as e:
        lines.append(f'{name}: dropped in round {i}: {e}')
        peers.pop(name).close()
  return {name: iters[name] for name in peers}, lines


def main(argv=None):
  args = parse_args(argv)
  if args.worker == 'tunix':
    return tunix_worker(args)
  if args.worker == 'trl':
    return trl_worker(args)
  # Run from a checkout without installing: the repository root holds the package.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from rlm_jax.training import grpo as grpo_lib  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    cfg, graphdef, params = sampler_bench.build_and_export(args, tmp)
    print(f'model: {cfg.n_layers} layers, d={cfg.d_model}, heads {cfg.n_heads}/{cfg.n_kv_heads}, head_dim '
          f'{cfg.head_dim}, d_ff {cfg.d_ff}, vocab {cfg.vocab_size}, fp32; B={args.prompts} prompts x G={args.group}, '
          f'prompt {args.prompt_len}, completion {args.completion_len} (no EOS), mu={args.mu}, beta={args.beta}; '
          f'median of {args.repeats} lock-step rounds after {args.warmup} warm-up')
    print(f'ours: jax {jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} device), '
          f'{os.cpu_count()} cpus; load average {os.getloadavg()[0]:.1f}')
    peers, notes = start_workers(tmp, args)
    try:
      if 'ours' in args.peer_list:
        peers['ours'] = OursFused(graphdef, params, args)
        peers['ours-split'] = OursSplit(graphdef, params, args)
      if 'hostloop' in args.peer_list:
        peers['hostloop'] = HostLoop(graphdef, params, args)
      iters, dropped = run_rounds(peers, args)
      notes += dropped
    finally:
      for p in peers.values():
        if isinstance(p, WorkerPeer):
          p.close()

  results = {}
  if 'ours' in iters and 'ours-split' in iters:
    merged = [dict(f, **s) for f, s in zip(iters.pop('ours'), iters.pop('ours-split'))]
    results['ours'] = dict(summarize(merged[0]['wall'], merged[args.warmup:], args), **peers['ours'].result)
  for name in PEERS:
    if name in iters:
      its = iters[name]
      results[name] = dict(summarize(its[0]['wall'], its[args.warmup:], args), **peers[name].result)
  notes = [f"{name}: {r['info']}" for name, r in results.items() if 'info' in r] + notes
  ours_logp = np.asarray(grpo_lib.completion_logprobs(
      graphdef, params, jnp.concatenate([make_prompts(args), probe_completions(args)], axis=1),
      jnp.ones((args.prompts, args.prompt_len + args.completion_len), bool), args.prompt_len)[0])
  for name, r in results.items():
    if 'probe_logp' in r:
      notes.append(f"same model: max |log p ours - log p {name}| on fixed completions = "
                   f"{float(np.max(np.abs(ours_logp - np.asarray(r['probe_logp'])))):.2e}")
  for name, r in results.items():
    extra = f", loss {r['loss']:.4f}, mean reward {r['reward']:.3f}" if 'loss' in r else ''
    extra += f", {r['train_steps']} update steps" if 'train_steps' in r else ''
    notes.append(f"{name}: |params after - before| = {r['param_delta']:.3e}{extra}")
  if 'ours' in results:
    o = results['ours']
    notes.append(f"ours split pieces: rollout {o['rollout_s']:.4g} s + update {o['update_s']:.4g} s = "
                 f"{o['rollout_s'] + o['update_s']:.4g} s vs fused {o['iter_s']:.4g} s")
  print()
  print(format_table(results, args))
  print('\n'.join(notes))
  print(f'target: ours/peer <= 0.7; load average after: {os.getloadavg()[0]:.1f}')
  return results


if __name__ == '__main__':
  main()
