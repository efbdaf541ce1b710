"""benchmarks/grpo.py: the reward every peer uses, host advantages, argument checks, the table."""

import importlib.util
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from rlm_jax.sampling.sampler import SampleOutput, StopReason
from rlm_jax.training import advantages

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks', 'grpo.py')
_spec = importlib.util.spec_from_file_location('benchmarks_grpo', _PATH)
bench = importlib.util.module_from_spec(_spec)
_saved_path = list(sys.path)
_spec.loader.exec_module(bench)  # puts benchmarks/ on sys.path to import its sampler.py
sys.path[:] = _saved_path

# Even-id counts 2, 3, 0 of 4 tokens, and 2 of the first 2 tokens (the rest is padding).
TOKENS = np.array([[2, 4, 5, 7], [2, 4, 6, 7], [1, 3, 5, 7], [2, 4, 1, 1]], np.int32)
LENGTHS = np.array([4, 4, 4, 2], np.int32)


def test_host_reward_is_one_when_more_than_half_the_tokens_are_even():
  np.testing.assert_array_equal(bench.even_majority_reward_np(TOKENS, LENGTHS), [0.0, 1.0, 0.0, 1.0])


def test_jittable_score_agrees_with_the_host_reward():
  out = SampleOutput(jnp.asarray(TOKENS), jnp.zeros(TOKENS.shape), jnp.asarray(LENGTHS),
                     jnp.full((4,), StopReason.LENGTH))
  np.testing.assert_array_equal(np.asarray(bench.even_majority_score(out, {})), [0, 2, 0, 2])


def test_host_advantages_match_the_library_and_a_hand_value():
  r = np.array([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], np.float32)
  adv = bench.group_advantages_np(r)
  # Group 1: mean 0.25, unbiased std sqrt(0.75 / 3) = 0.5; group 2: all equal -> 0.
  np.testing.assert_allclose(adv[0], np.array([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4), rtol=1e-6)
  np.testing.assert_allclose(adv[1], 0.0)
  rand = np.random.RandomState(0).rand(3, 5).astype(np.float32)
  np.testing.assert_allclose(bench.group_advantages_np(rand), np.asarray(advantages.group_advantages(rand)),
                             rtol=1e-5, atol=1e-6)


def test_prompts_start_with_bos_and_avoid_special_ids():
  args = bench.parse_args(['--prompts=3', '--prompt-len=5', '--vocab=16'])
  p = bench.make_prompts(args)
  assert p.shape == (3, 5) and (p[:, 0] == bench.BOS).all() and (p[:, 1:] >= 3).all() and (p < 16).all()


@pytest.mark.parametrize('argv, culprit', [
    (['--peers=ours,verl'], '--peers'),
    (['--group=1'], '--group'),
    (['--warmup=0'], '--warmup'),
    (['--beta=-1'], '--beta'),
])
def test_bad_arguments_fail_naming_the_flag(argv, culprit, capsys):
  with pytest.raises(SystemExit):
    bench.parse_args(argv)
  assert culprit in capsys.readouterr().err


def test_summary_rates_and_table_ratio():
  args = bench.parse_args(['--prompts=2', '--group=4', '--completion-len=8', '--mu=2'])
  iters = [dict(wall=w, cpu=w, rollout=0.1 * w, update=0.9 * w) for w in (1.0, 3.0, 2.0)]
  s = bench.summarize(5.0, iters, args)
  assert s['iter_s'] == 2.0 and s['first_s'] == 5.0
  assert s['rollout_tok_s'] == pytest.approx(2 * 4 * 8 / 0.2)
  assert s['update_tok_s'] == pytest.approx(2 * 2 * 4 * 8 / 1.8)
  slower = dict(s, iter_s=4.0, cpu_s=8.0)
  table = bench.format_table({'ours': s, 'tunix': slower}, args).splitlines()
  assert [c.strip() for c in table[1].split('|')[-2:]] == ['-', '-']
  assert [c.strip() for c in table[2].split('|')[-2:]] == ['0.50', '0.25']
