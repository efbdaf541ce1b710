"""AlphaZero rounds, Monte Carlo labels and the experiment with the task verifier on host
(`rl.reward_on='host'`, `search.host_reward`): problems with many right answers (Countdown)."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlm_jax import configlib
from rlm_jax import metrics as metrics_lib
from rlm_jax import tasks as tasks_lib
from rlm_jax.data import encoding
from rlm_jax.data.tokenizer import CharTokenizer, pad_batch
from rlm_jax.experiment import config as config_lib
from rlm_jax.experiment import runner
from rlm_jax.models.transformer import ModelConfig, Transformer
from rlm_jax.sampling.sampler import SamplingConfig
from rlm_jax.search import host_reward
from rlm_jax.search import lm
from rlm_jax.search.mcts import MCTSConfig
from rlm_jax.training import alphazero as az
from rlm_jax.training import labels as labels_lib
from rlm_jax.training.state import OptimConfig, create_train_state, make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOK = CharTokenizer()
LP = 32
POOL = tasks_lib.generate_dataset('countdown', 10, seed=0, levels=(3,))


def _models(eos_only=False):
  cfg = ModelConfig(vocab_size=TOK.vocab_size, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                    d_ff=32)
  pgd, pparams = nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=0)))
  vgd, vparams = nnx.split(Transformer(dataclasses.replace(cfg, value_head='sigmoid'), rngs=nnx.Rngs(params=1)))
  if eos_only:
    # Every token embeds to the same vector, the blocks add nothing, and the LM head reads
    # that vector into the EOS logit only (16 against 0): each sampled step is EOS, a terminal.
    def edit(path, x):
      name = jax.tree_util.keystr(path)
      if 'embed' in name:
        return jnp.ones_like(x)
      if "['wo']" in name or "['w_down']" in name:
        return jnp.zeros_like(x)
      if 'lm_head' in name:
        return jnp.zeros_like(x).at[:, TOK.eos_id].set(1.0)
      return x
    pparams = jax.tree_util.tree_map_with_path(edit, pparams)
  return pgd, pparams, vgd, vparams


def _batch(idx):
  ts = [POOL[i] for i in idx]
  prompt, pmask = encoding.encode_prompts(TOK, ts, LP)
  return {'prompt': jnp.asarray(prompt), 'prompt_mask': jnp.asarray(pmask),
          'problem': jnp.asarray(idx, jnp.int32)}


def test_rounds_reward_terminals_on_host_for_the_rounds_problems_without_recompiling(monkeypatch):
  """The host callback sees the pool indices of each round's problems (the per-round table),
  its scores become the trees' terminal rewards (solve_rate), and a round of other problems
  reuses the compiled program. The verifier is replaced by one that solves pool problem 5
  only (the scripted policy ends every path at once: its solutions are a bare EOS)."""
  seen = []

  def verify_rows(tok, tasks, tokens, mask, task_B):
    seen.append(sorted(set(np.asarray(task_B).tolist())))
    finished = np.asarray(mask).any(axis=1)
    return np.where(finished & (np.asarray(task_B) == 5), 2, -1).astype(np.int32)

  monkeypatch.setattr(host_reward, 'verify_rows', verify_rows)
  pgd, pparams, vgd, vparams = _models(eos_only=True)
  azc = az.AlphaZeroConfig(mcts=MCTSConfig(num_simulations=2, num_children=2, num_walkers=1, max_depth=2),
                           step_tokens=4, buffer_size=8, distill_steps=1, distill_batch=2, value_steps=1,
                           value_batch=2, policy_target='best_path')
  reward = host_reward.HostReward(TOK, POOL)
  setup = az.make_setup(azc, lm.TokenIds.of(TOK), LP, 8, 'mse', reward=reward)
  tx = make_optimizer(OptimConfig(learning_rate=1e-3))
  state = az.AZState(policy=create_train_state(pparams, tx), value=create_train_state(vparams, tx),
                     buffer=az.empty_buffer(8, setup.row_len(), TOK.pad_id))
  traces = az.alphazero_round_jit._cache_size()
  state, m = az.alphazero_round_jit(pgd, vgd, tx, tx, setup, state, _batch([5, 9]), jax.random.key(0))
  assert float(m['solve_rate']) == 0.5 and bool(m['finite'])
  assert seen and all(s == [5, 9] for s in seen)
  np.testing.assert_array_equal(np.asarray(state.buffer.solved_C)[:2], [True, False])
  seen.clear()
  state, m = az.alphazero_round_jit(pgd, vgd, tx, tx, setup, state, _batch([9, 2]), jax.random.key(1))
  assert float(m['solve_rate']) == 0.0 and all(s == [2, 9] for s in seen)
  assert az.alphazero_round_jit._cache_size() == traces + 1
  batch = _batch([5, 9])
  with pytest.raises(ValueError, match="batch\\['problem'\\]"):
    az.search_tree(pgd, None, setup, state.policy.params, None, {k: batch[k] for k in ('prompt', 'prompt_mask')},
                   jax.random.key(0))


def test_monte_carlo_labels_verify_whole_solutions_on_host(monkeypatch):
  """With the host score_fn a trace ending in another right expression is right at its final
  step (the device match with the solver's answer says wrong), and every rollout is judged
  with the trace's steps up to its prefix in front of the sampled continuation."""
  task = {'type': 'Countdown', 'level': 3, 'problem': 'Use 3, 5, 2 to make 16.', 'unique_solution': False,
          'solution': '(3+5)*2'}
  seen = []
  real = host_reward.verify_rows

  def record(tok, tasks, tokens, mask, task_B):
    seen.append([tok.decode(t[m]) for t, m in zip(np.asarray(tokens), np.asarray(mask, bool))])
    return real(tok, tasks, tokens, mask, task_B)

  monkeypatch.setattr(host_reward, 'verify_rows', record)
  pgd, pparams, _, _ = _models()
  steps = ['5+3=8', '2*8=16', 'Answer: 2*(5+3)']
  comp, cmask = pad_batch([TOK.encode_steps(steps)], 32, TOK.pad_id, side='right')
  prompt, pmask = encoding.encode_prompts(TOK, [task], LP)
  answer, alen = encoding.encode_answers(TOK, ['Answer: (3+5)*2'], 24)
  batch = {'prompt': jnp.asarray(prompt), 'prompt_mask': jnp.asarray(pmask), 'completion': jnp.asarray(comp),
           'completion_mask': jnp.asarray(cmask), 'answer': jnp.asarray(answer), 'answer_len': jnp.asarray(alen),
           'problem': jnp.zeros((1,), jnp.int32)}
  scfg = SamplingConfig(max_new_tokens=6, eos_id=TOK.eos_id, pad_id=TOK.pad_id, step_id=TOK.step_id)
  base = labels_lib.MCLabelSetup(num_rollouts=2, max_steps=3, sampling=scfg, step_id=TOK.step_id)
  host = dataclasses.replace(base, score_fn=host_reward.HostReward(TOK, [task]).score_fn)
  lab_host = labels_lib.mc_rollout_labels_jit(pgd, pparams, host, batch, jax.random.key(0))
  lab_dev = labels_lib.mc_rollout_labels_jit(pgd, pparams, base, batch, jax.random.key(0))
  assert float(lab_host['outcome'][0]) == 1.0 and float(lab_dev['outcome'][0]) == 0.0
  assert float(lab_host['labels'][0, 2]) == 1.0 and float(lab_dev['labels'][0, 2]) == 0.0
  # Two host calls (in either order): the trace itself, and the rollouts in (step, sample) order.
  trace, rollouts = sorted(seen, key=len)
  assert len(rollouts) == 3 * 2
  assert trace == ['5+3=8\n2*8=16\nAnswer: 2*(5+3)']
  assert all(t.startswith('5+3=8\n') for t in rollouts[0:2])
  assert all(t.startswith('5+3=8\n2*8=16\n') for t in rollouts[2:4])


def _countdown_cfg(*overrides):
  return config_lib.parse(configlib.load_config(
      os.path.join(REPO, 'configs', 'blueprint.py') + ':smoke',
      ['task.domain=countdown', 'task.levels=(3,)', 'task.prompt_len=32', 'task.completion_len=44',
       'task.answer_len=24', 'value.num_traces=4', 'value.label_batch=4', 'rl.prompts_per_iteration=2',
       *overrides]))


def test_alphazero_on_many_answer_problems_needs_the_host_verifier(tmp_path):
  with pytest.raises(configlib.ConfigError) as e:
    runner.Experiment(_countdown_cfg('rl.algo=alphazero', 'rl.reward_on=device'), str(tmp_path / 'device'))
  msg = str(e.value)
  assert msg.startswith("rl.reward_on='device' matches the solver's answer text, but Countdown problems have many "
                        "right answers") and msg.endswith("set rl.reward_on='host'") and '\n' not in msg
  runner.Experiment(_countdown_cfg('rl.algo=alphazero', 'rl.reward_on=host'), str(tmp_path / 'host'))
  # Monte Carlo / MCTS labels verify on host by themselves: no longer refused.
  runner.Experiment(_countdown_cfg('value.labels=solver+mc+mcts'), str(tmp_path / 'labels'))


@pytest.mark.slow  # SFT, the value phase, two rounds and evaluation of a tiny model (~1 min)
def test_countdown_config_runs_end_to_end(tmp_path):
  cfg = config_lib.parse(configlib.load_config(os.path.join(REPO, 'configs', 'alphazero.py') + ':countdown', [
      'model.d_model=16', 'model.n_layers=1', 'model.n_heads=2', 'model.n_kv_heads=1', 'model.head_dim=8',
      'model.d_ff=32', 'task.levels=(3,)', 'task.train_size=32', 'task.rl_size=16', 'sft.steps=3', 'sft.batch_size=8',
      'sft.optim.warmup_steps=1', 'sft.optim.decay_steps=2', 'value.steps=2', 'value.batch_size=8',
      'value.num_traces=8', 'value.label_batch=8', 'value.samples_per_task=2', 'value.max_steps=4',
      'value.optim.warmup_steps=0', 'value.optim.decay_steps=0', 'rl.iterations=2', 'rl.prompts_per_iteration=4',
      'rl.alphazero.mcts.num_simulations=2', 'rl.alphazero.mcts.num_children=2', 'rl.alphazero.mcts.num_walkers=1',
      'rl.alphazero.buffer_size=32', 'rl.alphazero.distill_steps=1', 'rl.alphazero.distill_batch=4',
      'rl.alphazero.value_steps=1', 'rl.alphazero.value_batch=4', 'eval.size=4', 'eval.batch_size=4',
      'eval.num_samples=2', 'eval.beam_width=2', 'eval.beam_expansions=2', "eval.strategies=('greedy', 'prm_beam')",
      'checkpoint.save_every=1']))
  assert cfg.rl.reward_on == 'host' and cfg.task.domain == 'countdown'
  out = runner.Experiment(cfg, str(tmp_path)).run()
  assert set(out) >= {'sft', 'rl'}
  rows = [r for r in metrics_lib.read_metrics(str(tmp_path)) if 'alphazero/solve_rate' in r]
  assert len(rows) == 2 and all(0.0 <= r['alphazero/solve_rate'] <= 1.0 for r in rows)
  assert all(r['alphazero/buffer_size'] > 0 for r in rows)
