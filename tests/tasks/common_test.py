import random

import numpy as np
import pytest

from rlm_jax.tasks import common


def test_make_rng_is_reproducible_and_ignores_global_state():
  random.seed(1)
  np.random.seed(1)
  a = [common.make_rng((7, 3, 2)).random() for _ in range(3)]
  random.seed(99)
  np.random.seed(99)
  b = [common.make_rng((7, 3, 2)).random() for _ in range(3)]
  assert a == b
  assert common.make_rng((7, 3, 2)).random() != common.make_rng((7, 3, 3)).random()
  assert common.make_rng(-1).random() != common.make_rng(1).random()


def test_make_rng_accepts_generators_and_prng_keys():
  import jax
  r1 = common.make_rng(jax.random.PRNGKey(5)).random()
  r2 = common.make_rng(jax.random.PRNGKey(5)).random()
  r3 = common.make_rng(jax.random.key(5)).random()  # typed key, same bits
  assert r1 == r2 == r3
  assert common.make_rng(np.random.default_rng(0)).random() == \
      common.make_rng(np.random.default_rng(0)).random()
  with pytest.raises(TypeError, match="seed"):
    common.make_rng(1.5)


@pytest.mark.parametrize("d,level", [(0.0, 1), (0.05, 1), (0.1, 2), (0.55, 6), (0.99, 10),
                                     (1.0, 10)])
def test_level_of_follows_x1(d, level):
  assert common.level_of(d) == level


def test_difficulty_of_round_trips_and_validates():
  for level in range(1, 11):
    assert common.level_of(common.difficulty_of(level)) == level
  with pytest.raises(ValueError, match="level"):
    common.difficulty_of(11)
  with pytest.raises(ValueError, match="difficulty"):
    common.level_of(1.5)


def test_to_ascii():
  assert common.to_ascii("Janet\u2019s \u201cducks\u201d \u2013 5\u00d73\n  caf\u00e9") == \
      "Janet's \"ducks\" - 5*3 cafe"
  assert common.is_printable_ascii("a b~")
  assert not common.is_printable_ascii("a\nb")
