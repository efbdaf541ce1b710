"""Search strategies over reasoning steps: MCTS, beam search, best-of-N, self-consistency, chain.

Every strategy has the signature

    strategy(params, key, prompt_BxLp, prompt_mask_BxLp, *, model: SearchModel, config,
             problem_B=None) -> SearchResult

is traceable (the caller jits it, with `model` and `config` static) and reports the policy
tokens and model calls it spent. The models come in as callables (`SearchModel`): build them
from Flax models with `search.lm.make_search_model`, or script them (`search.toy`).
"""

from rlm_jax.search.base import NodeBatch, SearchModel, SearchResult, Steps
from rlm_jax.search.beam import BeamConfig, beam_search
from rlm_jax.search.completions import (BestOfNConfig, ChainConfig, SelfConsistencyConfig, best_of_n,
                                      chain, self_consistency)
from rlm_jax.search.export import StepTargets, path_targets, tree_to_json
from rlm_jax.search.mcts import MCTSConfig, mcts_search
from rlm_jax.search.tree import Tree

STRATEGIES = {
    'chain': chain,
    'best_of_n': best_of_n,
    'self_consistency': self_consistency,
    'beam': beam_search,
    'mcts': mcts_search,
}

__all__ = [
    'BeamConfig', 'BestOfNConfig', 'ChainConfig', 'MCTSConfig', 'NodeBatch', 'STRATEGIES',
    'SearchModel', 'SearchResult', 'SelfConsistencyConfig', 'StepTargets', 'Steps', 'Tree',
    'beam_search', 'best_of_n', 'chain', 'mcts_search', 'path_targets', 'self_consistency', 'tree_to_json',
]
