"""The BPE tokenizers of tests/data/conftest.py ('\n\n' splits or merges in text), here too."""
import importlib.util
import pathlib

import pytest


def _make_bpe():
  path = pathlib.Path(__file__).resolve().parents[1] / 'data' / 'conftest.py'
  spec = importlib.util.spec_from_file_location('_bpe_tokenizers', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.make_bpe


@pytest.fixture(scope='session')
def split_bpe(tmp_path_factory):
  return _make_bpe()(tmp_path_factory.mktemp('split_bpe'), merge=False)


@pytest.fixture(scope='session')
def merge_bpe(tmp_path_factory):
  return _make_bpe()(tmp_path_factory.mktemp('merge_bpe'), merge=True)
