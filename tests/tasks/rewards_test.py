import numpy as np
import pytest

from rlm_jax.tasks import rewards


def test_default_mapping():
  assert [rewards.reward(s) for s in (-1, 0, 1, 2)] == [0.0, 0.0, 0.0, 1.0]
  from rlm_jax.training.rewards import RewardConfig
  r = RewardConfig()  # one source of the default table
  assert (r.invalid, r.wrong, r.correct) == (rewards.reward(-1), rewards.reward(0), rewards.reward(2))


def test_custom_mapping_and_array():
  shaped = {-1: 0.0, 0: 0.0, 1: 0.5, 2: 1.0}
  assert rewards.reward(1, shaped) == 0.5
  out = rewards.reward_array(np.array([[2, -1], [1, 0]]), shaped)
  np.testing.assert_array_equal(out, np.array([[1.0, 0.0], [0.5, 0.0]], np.float32))
  assert out.dtype == np.float32
  assert rewards.reward_array([]).shape == (0,)


def test_bad_inputs_name_the_culprit():
  with pytest.raises(ValueError, match=r"missing \[1\]"):
    rewards.reward(2, {-1: 0.0, 0: 0.0, 2: 1.0})
  with pytest.raises(ValueError, match="got 3"):
    rewards.reward(3)
  with pytest.raises(ValueError, match="got 5"):
    rewards.reward_array([0, 5])
