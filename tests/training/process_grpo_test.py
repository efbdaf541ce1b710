"""Process-supervised GRPO and RLOO: hand-computed step layouts, step rewards and advantages;
one registry-built iteration of each through the experiment runner (slow)."""
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from rlm_jax.training import process_grpo, rloo

S, E, P = 7, 2, 0  # step, eos, pad ids of these hand-made rows


def test_step_layout_marks_step_ends_and_token_steps():
  tokens = jnp.array([[5, S, 6, 6, S, 8, E, P],
                      [5, 5, S, 6, 6, 6, 6, 6]])  # the second row was cut at the length limit
  mask = tokens != P
  mask = mask.at[1].set(True)
  end, step = process_grpo.step_layout(tokens, mask, S, E, max_steps=8)
  np.testing.assert_array_equal(np.asarray(end), [[0, 1, 0, 0, 1, 0, 1, 0],
                                                  [0, 0, 1, 0, 0, 0, 0, 1]])
  np.testing.assert_array_equal(np.asarray(step), [[0, 0, 1, 1, 1, 2, 2, -1],
                                                   [0, 0, 0, 1, 1, 1, 1, 1]])
  # max_steps clips: with 2 slots the third step shares the second's index.
  _, step2 = process_grpo.step_layout(tokens, mask, S, E, max_steps=2)
  np.testing.assert_array_equal(np.asarray(step2[0]), [0, 0, 1, 1, 1, 1, 1, -1])


def test_process_advantages_of_a_hand_built_group():
  """B=1, G=2. Completion A: [x STEP y EOS pad pad], PRM 0.5 then 1.0. Completion B:
  [x STEP z STEP w EOS], PRM -0.5, 0.0, -1.0. The five step rewards have mean 0 and sample std
  sqrt(2.5 / 4) (unbiased, as torch.std in TRL): normalised A = [0.5, 1] / 0.79, B = [-0.5, 0,
  -1] / 0.79; a token's advantage is the sum from its step on."""
  tokens = jnp.array([[5, S, 6, E, P, P], [5, S, 6, S, 8, E]])
  mask = tokens != P
  values = jnp.array([[0.0, 0.5, 0.0, 1.0, 0.0, 0.0], [0.0, -0.5, 0.0, 0.0, 0.0, -1.0]])
  end, token_step = process_grpo.step_layout(tokens, mask, S, E, max_steps=4)
  r, valid = process_grpo.step_rewards(values, end, token_step, max_steps=4)
  np.testing.assert_allclose(np.asarray(r), [[0.5, 1.0, 0, 0], [-0.5, 0.0, -1.0, 0]])
  np.testing.assert_array_equal(np.asarray(valid), [[1, 1, 0, 0], [1, 1, 1, 0]])
  ro = {'step_reward': r, 'step_valid': valid, 'token_step': token_step}
  adv = np.asarray(process_grpo.process_advantage_fn(jnp.zeros((1, 2)), ro))
  a = 1 / math.sqrt(2.5 / 4)  # 1.2649: a reward of 1 in std units
  want = [[1.5 * a, 1.5 * a, a, a, 0, 0],
          [-1.5 * a, -1.5 * a, -a, -a, -a, -a]]
  np.testing.assert_allclose(adv, want, atol=1e-3)


def test_rloo_advantages_by_hand():
  # Group 1: rewards 1, 0, 0, 1 -> baselines (2-1)/3, (2-0)/3, ... -> +-2/3. Group 2: all equal -> 0.
  adv = np.asarray(rloo.rloo_advantages(jnp.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])))
  np.testing.assert_allclose(adv, [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0, 0, 0, 0]], atol=1e-7)
  # G = 3, rewards 0, 0.5, 1: baselines 0.75, 0.5, 0.25 -> -0.75, 0, 0.75 = G/(G-1) (r - mean).
  adv3 = np.asarray(rloo.rloo_advantages(jnp.array([[0.0, 0.5, 1.0]])))
  np.testing.assert_allclose(adv3, [[-0.75, 0.0, 0.75]], atol=1e-7)
  # normalize_advantages divides by the batch std of the advantages (TRL).
  norm = np.asarray(rloo.rloo_advantages(jnp.array([[0.0, 0.5, 1.0]]), normalize=True))
  np.testing.assert_allclose(norm, adv3 / (np.std(adv3) + 1e-4), rtol=1e-6)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow  # SFT, value and one RL iteration compile on the fake devices (~1 min)
@pytest.mark.parametrize('algo', ['rloo', 'process_grpo'])
def test_registry_algorithm_runs_one_iteration(tmp_path, algo):
  from rlm_jax import configlib
  from rlm_jax import metrics as metrics_lib
  from rlm_jax.experiment import config as config_lib
  from rlm_jax.experiment import runner
  cfg = config_lib.parse(configlib.load_config(
      os.path.join(REPO, 'configs', 'alphazero.py') + ':smoke',
      [f'rl.algo={algo}', 'rl.iterations=2', "eval.strategies=('greedy',)", 'rl.group_size=2']))
  results = runner.Experiment(cfg, str(tmp_path)).run()
  assert set(results) == {'sft', 'rl'}
  rows = [r for r in metrics_lib.read_metrics(tmp_path) if f'{algo}/loss' in r]
  assert len(rows) == 2 and all(np.isfinite(r[f'{algo}/loss']) for r in rows)
  if algo == 'process_grpo':
    assert all(r['process_grpo/steps'] >= 1 for r in rows)


@pytest.mark.parametrize('which', ['split', 'merge'])
def test_step_layout_on_bpe_completions_follows_the_trace_spans(which, split_bpe, merge_bpe):
  """On a BPE tokenizer ('\\n\\n' split into '\\n', '\\n' or merged into '.\\n\\nHe ') the steps
  of a completion are those `HFTokenizer.encode_trace` delimits; comparing with step_id finds none."""
  from rlm_jax.data import steps as steps_lib
  from rlm_jax.data import tokenizer as tk
  tok = tk.HFTokenizer(split_bpe if which == 'split' else merge_bpe)
  traces = [['Tom has 3 apples.', 'He buys 2 more.', 'Answer: 5'], ['done', 'The end.', 'The cat.']]
  rows = [tok.encode_trace(t) for t in traces]
  width = max(len(ids) for ids, _ in rows) + 3
  tokens, mask = (jnp.asarray(x) for x in tk.pad_batch([ids for ids, _ in rows], width, tok.pad_id, side='right'))
  end, step = process_grpo.step_layout(tokens, mask, steps_lib.StepEnds.of(tok), tok.eos_id, max_steps=8)
  for i, (ids, ends) in enumerate(rows):
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(end[i])), ends)
    want = [sum(e < j for e in ends) for j in range(len(ids))] + [-1] * (width - len(ids))
    np.testing.assert_array_equal(np.asarray(step[i]), want)
  assert [len(e) for _, e in rows] == [3, 3]
  old_end, _ = process_grpo.step_layout(tokens, mask, tok.step_id, tok.eos_id, max_steps=8)
  assert int(np.asarray(old_end).sum()) == 2  # only the two EOS
