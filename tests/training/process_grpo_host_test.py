"""Process-supervised GRPO with the verifier on host (`rl.reward_on='host'`)."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlm_jax.models import transformer as tfm
from rlm_jax.sampling.sampler import SamplingConfig
from rlm_jax.training import grpo, losses, process_grpo
from rlm_jax.training.rewards import RewardConfig

CFG = tfm.ModelConfig(vocab_size=8, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32)
VALUE_CFG = dataclasses.replace(CFG, value_head='sigmoid')
GOOD, STEP, EOS = 5, 3, 2
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _device_score(out, batch):
  del batch
  return jnp.where(out.tokens_BxT[:, 0] == GOOD, 2, 0)


def _setup(score_fn):
  sampling = SamplingConfig(max_new_tokens=6, eos_id=EOS, pad_id=0, temperature=1.0)
  return grpo.GRPOSetup(group_size=4, loss=losses.GRPOConfig(max_completion_length=6), sampling=sampling,
                        reward=RewardConfig(), step_id=STEP, score_fn=score_fn)


def test_host_scores_give_the_same_step_rewards_as_device_scores():
  """Same key: the host path (token ids to host, the scorer's scores back) hands the PRM step
  scoring the same rollout and rewards as the device path, so the outcome added to the last
  step (outcome_weight) and the advantages agree."""
  gdef, params = nnx.split(tfm.init_model(CFG, seed=3))
  vgd, vparams = nnx.split(tfm.init_model(VALUE_CFG, seed=4))
  batch = {'prompt': jnp.ones((4, 2), jnp.int32), 'prompt_mask': jnp.ones((4, 2), bool),
           'answer': jnp.zeros((4, 1), jnp.int32), 'answer_len': jnp.ones((4,), jnp.int32)}
  key = jax.random.key(7)
  dev = grpo.rollout_jit(gdef, params, batch, key, _setup(_device_score))
  host_setup = _setup(grpo.no_device_score)
  raw = grpo.rollout_jit(gdef, params, batch, key, host_setup)
  assert not np.any(raw['score'])  # nothing scored on device
  host, _ = grpo.score_on_host(raw, host_setup, lambda t, n: np.where(t[:, 0] == GOOD, 2, 0))
  np.testing.assert_array_equal(host['tokens'], dev['tokens'])
  np.testing.assert_array_equal(host['reward'], dev['reward'])
  assert 0 < float(jnp.mean(dev['score'] == 2)) < 1  # mixed outcomes: the comparison can fail
  got = [process_grpo._score_steps_jit(vgd, vparams, ro, STEP, EOS, 4, 1.0) for ro in (dev, host)]
  np.testing.assert_allclose(got[0]['step_reward'], got[1]['step_reward'], atol=1e-6)
  adv_fn = jax.jit(lambda ro: process_grpo.process_advantage_fn(ro['reward'].reshape(4, 4), ro))
  adv = [adv_fn(ro) for ro in got]
  np.testing.assert_allclose(adv[0], adv[1], atol=1e-6)


@pytest.mark.slow  # SFT, value and two RL iterations compile (~1-2 min)
def test_process_grpo_runs_on_countdown_with_the_host_verifier(tmp_path):
  from rlm_jax import configlib
  from rlm_jax import metrics as metrics_lib
  from rlm_jax.experiment import config as config_lib
  from rlm_jax.experiment import runner
  cfg = config_lib.parse(configlib.load_config(
      os.path.join(REPO, 'configs', 'blueprint.py') + ':smoke',
      ['task.domain=countdown', 'task.levels=(3,)', 'task.prompt_len=32', 'task.completion_len=44',
       'task.answer_len=24', 'rl.reward_on=host', 'rl.algo=process_grpo', 'rl.iterations=2',
       'value.labels=checked', 'value.samples_per_task=2']))
  results = runner.Experiment(cfg, str(tmp_path)).run()
  assert set(results) == {'sft', 'rl'}
  rows = [r for r in metrics_lib.read_metrics(tmp_path) if 'process_grpo/loss' in r]
  assert len(rows) == 2 and all(np.isfinite(r['process_grpo/loss']) and r['process_grpo/steps'] >= 1 for r in rows)
