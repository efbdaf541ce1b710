"""The `search` section of a config file, and its conversion to the typed strategy configs.

An experiment config gets a search section with `config.search = search_config.get_config()`
(every default lives here, next to the knobs' meaning in the dataclass docstrings), overridden
on the command line as `--config.search.mcts.num_simulations=64`. `build` turns it, once, into
frozen dataclasses; unknown keys and bad values fail with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Literal

import ml_collections

from rlm_jax import configlib
from rlm_jax.search.beam import BeamConfig, beam_search
from rlm_jax.search.completions import (BestOfNConfig, ChainConfig, SelfConsistencyConfig, best_of_n,
                                      chain, self_consistency)
from rlm_jax.search.lm import LMOptions
from rlm_jax.search.mcts import MCTSConfig, mcts_search

STRATEGY_NAMES = ('chain', 'best_of_n', 'self_consistency', 'beam', 'mcts')


def get_config() -> ml_collections.ConfigDict:
  """Defaults of every search knob (sizes fit the tiny char-level models of configs/main.py)."""
  c = ml_collections.ConfigDict()
  c.strategy = 'mcts'
  c.batch_size = 32  # problems per compiled call (the last batch is padded)
  c.seed = 0
  c.reward = 'none'  # 'answer': verifier reward (canonical final step) at terminal nodes
  c.lm = dict(step_tokens=24, completion_tokens=48, temperature=1.0, top_k=0, top_p=1.0,
              value_from_policy=False)
  c.chain = dict(greedy=True, score='none')
  c.best_of_n = dict(num_samples=8, scorer='orm')
  c.self_consistency = dict(num_samples=8, answer_marker='Answer: ', answer_len=16,
                            only_finished=True, weighting='none')
  c.beam = dict(beam_width=4, expansions=4, max_depth=6, score='last', merge_duplicates=True,
                state_width='halving')
  c.mcts = dict(num_simulations=16, num_children=4, num_walkers=2, max_depth=6, selection='puct',
                c1=1.25, c2=19652.0, uct_c=1.0, prior='empirical', prior_temperature=1.0,
                q_bounds='fixed', backup='td', gamma=0.96, td_lambda=1.0, virtual_loss=1.0,
                merge_duplicates=True, num_rollouts=0, rollout_weight=0.5, answer='best_terminal',
                root_selection='puct', gumbel_scale=1.0, state_width='halving')
  return c


@dataclasses.dataclass(frozen=True)
class SelfConsistencyText:
  """Self-consistency as configured in text; the marker is tokenised by `build_strategy`."""

  num_samples: int = 8
  answer_marker: str = 'Answer: '
  answer_len: int = 16
  only_finished: bool = True
  weighting: Literal['none', 'orm'] = 'none'


@dataclasses.dataclass(frozen=True)
class SearchSetup:
  strategy: Literal['chain', 'best_of_n', 'self_consistency', 'beam', 'mcts']
  batch_size: int
  seed: int
  reward: Literal['none', 'answer']
  lm: LMOptions
  chain: ChainConfig
  best_of_n: BestOfNConfig
  self_consistency: SelfConsistencyText
  beam: BeamConfig
  mcts: MCTSConfig

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f'batch_size={self.batch_size}: must be >= 1')


def build(cfg: ml_collections.ConfigDict, where: str = 'search') -> SearchSetup:
  """ConfigDict -> SearchSetup; raises configlib.ConfigError naming a bad key."""
  return configlib.from_config(SearchSetup, cfg, where)


def build_strategy(setup: SearchSetup, name: str, encode: Callable[[str], list[int]]):
  """The strategy function `name` with its config bound: f(params, key, prompt, mask, *, model,
  problem_B=None) -> SearchResult. `encode` tokenises the self-consistency answer marker."""
  if name not in STRATEGY_NAMES:
    raise configlib.ConfigError(f"strategy '{name}': must be one of {', '.join(STRATEGY_NAMES)}")
  if name == 'chain':
    return functools.partial(chain, config=setup.chain)
  if name == 'best_of_n':
    return functools.partial(best_of_n, config=setup.best_of_n)
  if name == 'self_consistency':
    sc = setup.self_consistency
    cfg = SelfConsistencyConfig(num_samples=sc.num_samples,
                                answer_marker_ids=tuple(encode(sc.answer_marker)),
                                answer_len=sc.answer_len, only_finished=sc.only_finished,
                                weighting=sc.weighting)
    return functools.partial(self_consistency, config=cfg)
  if name == 'beam':
    return functools.partial(beam_search, config=setup.beam)
  return functools.partial(mcts_search, config=setup.mcts)
