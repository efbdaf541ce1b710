"""The search section of a config: defaults build, bad keys fail with one line, strategies bind."""
import functools

import pytest

from rlm_jax import configlib
from rlm_jax.search import completions
from rlm_jax.search import config as search_config
from rlm_jax.search import mcts


def test_defaults_build_into_typed_configs():
  setup = search_config.build(search_config.get_config())
  assert setup.strategy == 'mcts' and setup.mcts.c1 == 1.25 and setup.mcts.c2 == 19652.0
  assert setup.lm.step_tokens == 24 and setup.beam.score == 'last'


def test_bad_keys_and_values_name_the_key():
  c = search_config.get_config()
  c.mcts.num_simulation = 3  # typo
  with pytest.raises(configlib.ConfigError, match=r'config\.search\.mcts\.num_simulation: unknown key'):
    search_config.build(c)
  c = search_config.get_config()
  c.mcts.backup = 'average'
  with pytest.raises(configlib.ConfigError, match=r"config\.search\.mcts\.backup='average': must be one of"):
    search_config.build(c)
  c = search_config.get_config()
  c.mcts.gamma = 1.5
  with pytest.raises(configlib.ConfigError, match=r'mcts\.gamma=1\.5'):
    search_config.build(c)
  with pytest.raises(configlib.ConfigError, match="strategy 'dfs'"):
    search_config.build_strategy(search_config.build(search_config.get_config()), 'dfs', list)


def test_build_strategy_binds_the_right_config():
  setup = search_config.build(search_config.get_config())
  encode = lambda text: [ord(ch) for ch in text]
  sc = search_config.build_strategy(setup, 'self_consistency', encode)
  assert isinstance(sc, functools.partial) and sc.func is completions.self_consistency
  assert sc.keywords['config'].answer_marker_ids == tuple(encode('Answer: '))
  m = search_config.build_strategy(setup, 'mcts', encode)
  assert m.func is mcts.mcts_search and m.keywords['config'] == setup.mcts
