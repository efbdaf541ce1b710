"""Pipeline with the value phase and the AlphaZero loop: config errors, resume after an
interruption to the uninterrupted result, label sources (`configs/alphazero.py:smoke`)."""
import json
import os

import numpy as np
import pytest

from rlm_jax import configlib
from rlm_jax import metrics as metrics_lib
from rlm_jax.experiment import config as config_lib
from rlm_jax.experiment import runner
from rlm_jax.experiment import value_phase

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, 'configs', 'alphazero.py') + ':smoke'


def _cfg(*overrides):
  return config_lib.parse(configlib.load_config(CONFIG, overrides))


class _StopAfter:
  """Stands in for the SIGTERM flag: asks the loop to stop at its n-th poll (one poll per step)."""

  def __init__(self, n):
    self.n, self.calls = n, 0

  def __call__(self):
    self.calls += 1
    return self.calls >= self.n

  def uninstall(self):
    pass


def _run(workdir, cfg, monkeypatch=None, stop_at=None):
  if stop_at is not None:
    monkeypatch.setattr(runner.ckpt_lib, 'install_preemption_handler', lambda: _StopAfter(stop_at))
  out = runner.Experiment(cfg, str(workdir)).run()
  if monkeypatch is not None:
    monkeypatch.undo()
  return out


def _rows(workdir, key):
  return [(r['step'], r[key]) for r in metrics_lib.read_metrics(workdir) if key in r]


@pytest.mark.parametrize('override, culprit', [
    ("eval.strategies=('greedy', 'prm_bem')", 'prm_bem'),
    ("value.labels=rollouts", 'value.labels'),
    ("rl.algo=alphazer", 'rl.algo'),
    ('rl.alphazero.mcts.num_simulations=0', 'num_simulations'),
])
def test_bad_value_and_alphazero_config_is_one_line_naming_the_key(override, culprit):
  with pytest.raises(configlib.ConfigError) as e:
    _cfg(override)
  assert culprit in str(e.value) and '\n' not in str(e.value)


def test_value_guided_eval_needs_a_value_model():
  with pytest.raises(configlib.ConfigError, match=r"prm_best_of_n.*value.enabled=True"):
    _cfg('value.enabled=False', 'rl.algo=grpo')


@pytest.mark.slow  # three in-process runs: ~40 s of CPU, mostly compiling
def test_value_phase_resumes_after_interruption_to_the_same_result(tmp_path, monkeypatch):
  cfg = _cfg('rl.algo=none', "eval.strategies=('greedy', 'prm_best_of_n')")
  ref = _run(tmp_path / 'ref', cfg)
  assert set(ref) == {'sft'} and 'prm_best_of_n/accuracy' in ref['sft']
  ref_loss = _rows(tmp_path / 'ref', 'value/loss')
  assert [s for s, _ in ref_loss] == [4, 5, 6, 7]  # after SFT's steps 0..2 and its eval slot 3

  work = tmp_path / 'run'
  # Polls 1-3 are the SFT steps; the 5th is value step 1: save it and stop.
  assert _run(work, cfg, monkeypatch, stop_at=5) == {'preempted': True}
  assert sorted(os.listdir(work / 'ckpt' / 'value')) == ['0', '1']  # keep=2, the last is step 1
  assert not os.path.exists(work / 'results.json')
  res = _run(work, cfg)
  assert res == ref
  assert _rows(work, 'value/loss') == ref_loss  # same trajectory, no duplicated rows
  with open(work / 'results.json') as f:
    assert json.load(f) == ref


@pytest.mark.slow
def test_alphazero_rounds_resume_with_the_checkpointed_buffer(tmp_path, monkeypatch):
  cfg = _cfg('rl.iterations=3', "eval.strategies=('greedy', 'prm_beam')")
  ref = _run(tmp_path / 'ref', cfg)
  assert set(ref) == {'sft', 'rl'} and 'prm_beam/accuracy' in ref['rl']
  sizes = _rows(tmp_path / 'ref', 'alphazero/buffer_size')
  assert [v for _, v in sizes] == [4, 8, 8]  # 4 problems per round, 8 slots
  work = tmp_path / 'run'
  # 3 SFT + 4 value steps, then round 0 and round 1 (stop there).
  assert _run(work, cfg, monkeypatch, stop_at=9) == {'preempted': True}
  assert sorted(os.listdir(work / 'ckpt' / 'alphazero')) == ['0', '1']
  assert _run(work, cfg) == ref
  for key in ('alphazero/value_loss', 'alphazero/buffer_solved', 'alphazero/sft_loss'):
    assert _rows(work, key) == _rows(tmp_path / 'ref', key)


@pytest.mark.slow
@pytest.mark.parametrize('source', ['solver', 'mc', 'mcts', 'policy'])
def test_label_sources_give_step_labels_in_unit_range(tmp_path, source):
  cfg = _cfg(f'value.labels={source}', 'value.num_traces=6', 'value.label_batch=4')
  exp = runner.Experiment(cfg, str(tmp_path))
  graphdef, params = exp.models.init_policy()
  data = value_phase.value_data(exp, graphdef, params)
  # solver: a positive and a corrupted trace per task; policy: value.samples_per_task per task
  rows = {'solver': 12, 'policy': 6 * cfg.value.samples_per_task}.get(source, 6)
  assert data['tokens'].shape[0] == rows
  m = data['target_mask'] > 0
  assert np.all((data['targets'][m] >= 0) & (data['targets'][m] <= 1)) and np.all(data['targets'][~m] == 0)
  assert np.all(data['mask'][m])
  if source != 'solver':  # [left-padded prompt | completion]: labels only in the completion
    assert not m[:, :cfg.task.prompt_len].any()
  tok = exp.tok
  closing = np.isin(data['tokens'], [tok.step_id, tok.eos_id]) & data['mask']
  if source == 'mcts':  # one label per path step; a step cut at step_tokens has it on its last token
    assert np.all((m.sum(1) >= 1) & (m.sum(1) <= dict(cfg.rl.sections)['alphazero'].mcts.max_depth))
  else:  # on the tokens that close steps; a random policy's trace may close none
    assert np.all(closing[m]) and (source in ('mc', 'policy') or m.any(axis=1).all())
  if source == 'solver':  # the positive traces are right at every step
    assert np.all(data['targets'][0][m[0]] == 1.0)


def test_prm_quality_counts_held_out_steps_and_flips_with_a_negated_head(tmp_path):
  """Step-level PRM quality on solver-labelled held-out traces: every held-out problem gives a
  right trace and a corrupted one; negating the value head's last layer turns P(correct) into
  1 - P(correct), so the AUROC becomes exactly 1 - AUROC."""
  import jax
  from rlm_jax.training import labels as labels_lib
  cfg = _cfg('rl.algo=none')
  exp = runner.Experiment(cfg, str(tmp_path))
  vgd, vparams = exp.models.value_model(exp.models.init_policy()[1])
  got = value_phase.prm_quality(exp, (vgd, vparams))
  records = labels_lib.solver_labels(exp.held.tasks, cfg.seed + 1, 1)
  steps = sum(min(len(r['steps']), cfg.value.max_steps) for r in records)
  assert got['prm/num_steps'] == steps and 0 < got['prm/num_positive'] < steps
  assert 0.0 <= got['prm/auroc'] <= 1.0 and 0.0 <= got['prm/accuracy'] <= 1.0
  neg = jax.tree.map(lambda x: x, vparams)
  head = neg['value_head']
  head['w2'].value = -head['w2'].value
  head['b2'].value = -head['b2'].value
  flipped = value_phase.prm_quality(exp, (vgd, neg))
  assert abs(flipped['prm/auroc'] - (1.0 - got['prm/auroc'])) < 1e-6
  assert abs(flipped['prm/auroc_within'] - (1.0 - got['prm/auroc_within'])) < 1e-6


def _countdown_cfg(*overrides):
  return config_lib.parse(configlib.load_config(
      os.path.join(REPO, 'configs', 'blueprint.py') + ':smoke',
      ['task.domain=countdown', 'task.levels=(3,)', 'task.prompt_len=32', 'task.completion_len=44',
       'task.answer_len=24', 'value.num_traces=4', 'value.label_batch=4', 'value.samples_per_task=2',
       *overrides]))


def _scripted_sampler(exp, rewrite):
  """Stands in for the SFT policy's sampler: every sample of a prompt is the solver's trace of
  its problem with `rewrite(steps)` applied (found by decoding the prompt)."""
  import jax.numpy as jnp
  from rlm_jax.data import encoding
  from rlm_jax.sampling.sampler import SampleOutput
  tok = exp.tok
  by_prompt = {tuple(encoding.prompt_ids(tok, t)): t for t in exp.train.tasks}

  def sample(graphdef, params, prompt, prompt_mask, key, scfg, num_samples=1):
    del graphdef, params, key
    rows = []
    for p, m in zip(np.asarray(prompt), np.asarray(prompt_mask)):
      ids = encoding.completion_ids(tok, rewrite(by_prompt[tuple(p[m.astype(bool)].tolist())]['steps']))
      rows += [ids] * num_samples
    t = scfg.max_new_tokens
    tokens = np.full((len(rows), t), tok.pad_id, np.int32)
    for r, ids in enumerate(rows):
      tokens[r, :len(ids)] = ids
    lengths = jnp.asarray([len(ids) for ids in rows], jnp.int32)
    return SampleOutput(jnp.asarray(tokens), jnp.zeros(tokens.shape, jnp.float32), lengths, jnp.zeros_like(lengths))

  return sample


def test_policy_labels_trust_the_verifier_over_the_solvers_answer_text(tmp_path, monkeypatch):
  """Countdown admits many answers: a sample whose answer is the solver's expression in
  parentheses leaves the solver's text at its last step, yet the verifier accepts it, so every
  step is right; a wrong expression there is labelled wrong from that step on."""
  cfg = _countdown_cfg('value.labels=policy')
  exp = runner.Experiment(cfg, str(tmp_path))

  def labels(rewrite):
    monkeypatch.setattr(value_phase, 'sample', _scripted_sampler(exp, rewrite))
    data = value_phase.value_data(exp, None, None)
    m = data['target_mask'] > 0
    return [data['targets'][r][m[r]].tolist() for r in range(len(m))]

  wrapped = labels(lambda steps: steps[:-1] + ['Answer: (' + steps[-1].removeprefix('Answer: ') + ')'])
  assert len(wrapped) == 8 and all(len(r) >= 2 and all(x == 1.0 for x in r) for r in wrapped)
  broken = labels(lambda steps: steps[:-1] + ['Answer: 0*0'])  # 0: never given, never a target
  assert all(r == [1.0] * (len(r) - 1) + [0.0] for r in broken)


def test_label_sources_joined_by_plus_pool_their_rows_in_order(tmp_path, monkeypatch):
  cfg = _countdown_cfg('value.labels=solver+policy')
  exp = runner.Experiment(cfg, str(tmp_path))
  monkeypatch.setattr(value_phase, 'sample', _scripted_sampler(exp, lambda steps: steps))
  both = value_phase.value_data(exp, None, None)
  alone = {}
  for source in ('solver', 'policy'):
    exp_one = runner.Experiment(_countdown_cfg(f'value.labels={source}'), str(tmp_path / source))
    monkeypatch.setattr(value_phase, 'sample', _scripted_sampler(exp_one, lambda steps: steps))
    alone[source] = value_phase.value_data(exp_one, None, None)
  for k in value_phase.KEYS:
    np.testing.assert_array_equal(both[k], np.concatenate([alone['solver'][k], alone['policy'][k]]))
  assert len(alone['solver']['tokens']) == 4 * (1 + cfg.value.negatives_per_task) and len(alone['policy']['tokens']) == 8


def test_monte_carlo_labels_on_problems_with_many_answers_are_verified_on_host(tmp_path, monkeypatch):
  """`value.labels=mc` on Countdown: the final step of a trace whose answer is the solver's
  expression in parentheses is labelled right (the verifier's outcome), not wrong (the answer
  text match); a trace ending in an unreachable answer is wrong at its final step."""
  exp = runner.Experiment(_countdown_cfg('value.labels=mc', 'value.mc_rollouts=2'), str(tmp_path))
  graphdef, params = exp.models.init_policy()  # rollouts from an untrained policy: ~never right

  def final_labels(rewrite):
    monkeypatch.setattr(value_phase, 'sample', _scripted_sampler(exp, rewrite))
    data = value_phase.value_data(exp, graphdef, params)
    m = data['target_mask'] > 0
    return [float(data['targets'][r][m[r]][-1]) for r in range(len(m))]

  assert final_labels(lambda steps: steps[:-1] + ['Answer: (' + steps[-1].removeprefix('Answer: ') + ')']) == [1.0] * 4
  assert final_labels(lambda steps: steps[:-1] + ['Answer: 0*0']) == [0.0] * 4


@pytest.mark.parametrize('overrides, culprit', [
    (['rl.algo=grpo', 'rl.reward_on=device', 'rl.prompts_per_iteration=2'], "rl.reward_on='device'"),
    (['rl.algo=alphazero', 'rl.reward_on=device', 'rl.prompts_per_iteration=2'], "rl.reward_on='device'"),
])
def test_answer_text_matching_on_problems_with_many_answers_is_refused(tmp_path, overrides, culprit):
  with pytest.raises(configlib.ConfigError) as e:
    runner.Experiment(_countdown_cfg(*overrides), str(tmp_path))
  assert culprit in str(e.value) and 'Countdown' in str(e.value) and '\n' not in str(e.value)


def _swap_first_step(steps):
  """The solver's trace with the operands of its first `a+b=c` / `a*b=c` step swapped: the same
  route in another order (the text differs from the solver's unless a == b)."""
  import re
  m = re.fullmatch(r'(\d+)([+*])(\d+)=(\d+)', steps[0])
  return ([f'{m[3]}{m[2]}{m[1]}={m[4]}'] if m else steps[:1]) + steps[1:]


def test_checked_labels_judge_each_step_by_the_task_not_the_solvers_text(tmp_path, monkeypatch):
  """`value.labels=checked`: each sampled step is judged by Countdown's step checker. A route in
  another order that ends in a wrong answer is right up to the answer ('policy' labels it wrong
  from the first token that differs); wrong arithmetic in the first step is wrong throughout."""
  exp = runner.Experiment(_countdown_cfg('value.labels=checked'), str(tmp_path))
  exp_policy = runner.Experiment(_countdown_cfg('value.labels=policy'), str(tmp_path / 'policy'))

  def labels(e, rewrite):
    monkeypatch.setattr(value_phase, 'sample', _scripted_sampler(e, rewrite))
    data = value_phase.value_data(e, None, None)
    m = data['target_mask'] > 0
    return [data['targets'][r][m[r]].tolist() for r in range(len(m))]

  tasks = [exp.train.tasks[i] for i in sorted(np.random.default_rng((exp.cfg.seed, 6)).choice(
      len(exp.train.tasks), 4, replace=False))]
  n_steps = [len(t['steps']) for t in tasks for _ in range(2)]  # 2 samples per problem
  swapped_wrong = lambda steps: _swap_first_step(steps)[:-1] + ['Answer: 0*0']
  got = labels(exp, swapped_wrong)
  assert got == [[1.0] * (n - 1) + [0.0] for n in n_steps]
  swapped = [t['steps'][0] != _swap_first_step(t['steps'])[0] for t in tasks for _ in range(2)]
  assert any(swapped)
  assert [r == [0.0] * n for r, n, s in zip(labels(exp_policy, swapped_wrong), n_steps, swapped) if s] == \
      [True] * sum(swapped)
  wrong_first = lambda steps: [steps[0].split('=')[0] + '=' + str(int(steps[0].split('=')[1]) + 1)] + steps[1:]
  assert labels(exp, wrong_first) == [[0.0] * n for n in n_steps]
  assert labels(exp, lambda steps: steps) == [[1.0] * n for n in n_steps]


def test_checked_labels_need_a_domain_with_a_step_checker(tmp_path):
  with pytest.raises(configlib.ConfigError) as e:
    runner.Experiment(_cfg('value.labels=solver+checked'), str(tmp_path))
  msg = str(e.value)
  assert "value.labels='solver+checked'" in msg and 'Arithmetic' in msg and 'step checker' in msg and '\n' not in msg


def test_policy_labels_without_solver_steps_fail_at_start_up(tmp_path):
  """Problems from a file with answers only (no `steps`): 'policy' labels compare samples with
  the solver's steps, so the run stops before any phase, naming the key and the problem."""
  path = tmp_path / 'train.jsonl'
  path.write_text(''.join(json.dumps({'type': 'Arithmetic', 'problem': f'Compute {i}+1.', 'solution': str(i + 1)}) + '\n'
                          for i in range(40)))
  with pytest.raises(configlib.ConfigError) as e:
    runner.Experiment(_cfg('value.labels=policy', 'sft.steps=0', f'task.train_file={path}'), str(tmp_path / 'run'))
  msg = str(e.value)
  assert "value.labels='policy'" in msg and "training problem 0 ('Compute 0+1.') has no solver steps" in msg and '\n' not in msg
  assert not os.path.exists(tmp_path / 'run' / 'config.json')
