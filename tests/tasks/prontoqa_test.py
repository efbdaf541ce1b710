import re

import pytest

from rlm_jax.tasks import prontoqa
from rlm_jax.tasks.common import difficulty_of


def _deduce(problem: str) -> bool:
  """Reference answer by forward chaining over the problem's sentences."""
  body, question = problem.split(" True or false: ")
  isa, props = {}, {}
  entity = concept = None
  for sent in body.split(". "):
    sent = sent.rstrip(".")
    m = re.fullmatch(r"Every (\w+) is an? (\w+)", sent)
    if m:
      isa.setdefault(m.group(1), []).append(m.group(2))
      continue
    m = re.fullmatch(r"Every (\w+) is (not )?(\w+)", sent)
    if m:
      props.setdefault(m.group(1), []).append((m.group(3), m.group(2) is None))
      continue
    m = re.fullmatch(r"(\w+) is an? (\w+)", sent)
    assert m, sent
    entity, concept = m.groups()
  known, frontier = set(), [concept]
  while frontier:
    c = frontier.pop()
    if c not in known:
      known.add(c)
      frontier += isa.get(c, [])
  facts = {(p, pos) for c in known for p, pos in props.get(c, [])}
  m = re.fullmatch(rf"{entity} is (not )?(\w+)\.", question)
  prop, positive = m.group(2), m.group(1) is None
  assert (prop, positive) in facts or (prop, not positive) in facts  # provable either way
  assert not ((prop, True) in facts and (prop, False) in facts)      # consistent
  return (prop, positive) in facts


@pytest.mark.parametrize("level", range(1, 11))
def test_label_is_the_deduced_answer(level):
  for j in range(10):
    task = prontoqa.generate((0, level, j), difficulty_of(level))
    assert task["solution"] == str(_deduce(task["problem"]))
    assert len(task["steps"]) == prontoqa.num_hops(level) + 1
    assert prontoqa.verify(task, " ".join(task["steps"])) == 2


def test_hops_schedule_and_balance():
  assert [prontoqa.num_hops(l) for l in range(1, 11)] == [2, 2, 3, 3, 4, 4, 5, 5, 6, 7]
  tasks = [prontoqa.generate((1, 5, j), difficulty_of(5)) for j in range(200)]
  assert 0.4 < sum(t["solution"] == "True" for t in tasks) / 200 < 0.6


@pytest.mark.parametrize("output,score", [
    ("The answer is False.", 2),
    ("**False**", 2),
    ("Sally is a wumpus. Every wumpus is not bitter. So Sally is not bitter. False", 2),
    ("True or false: Sally is bitter. True", 0),
    ("A: True", 0),
    ("", -1),
])
def test_verify_phrasings(output, score):
  assert prontoqa.verify({"type": "ProntoQA", "solution": "False"}, output) == score
