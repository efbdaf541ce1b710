"""A hand-built search tree in the TREE format of `rlm_jax.analysis.files`, shared by the tests."""
import json

import pytest


def _node(i, parent, depth, visits, q, terminal=False, reward=None, text=''):
  return {'id': i, 'parent': parent, 'depth': depth, 'text': text, 'visits': visits, 'q': q, 'prior': 0.5,
          'terminal': terminal, 'reward': reward}


#        0
#      /   \
#     1     2 (terminal, q -1)
#    / \
#   3   4 (terminal, q .9)
_HAND = {'nodes': [_node(0, -1, 0, 5, 0.1), _node(1, 0, 1, 3, 0.4, text='a=1\n\n'),
                   _node(2, 0, 1, 1, -1.0, True, -1.0), _node(3, 1, 2, 1, 0.2),
                   _node(4, 1, 2, 1, 0.9, True, 1.0, text='Answer: 1')]}


@pytest.fixture
def node():
  """node(id, parent, depth, visits, q, terminal=False, reward=None, text='') -> a node dict."""
  return _node


@pytest.fixture
def hand():
  """The tree drawn above (a fresh copy per test)."""
  return json.loads(json.dumps(_HAND))
