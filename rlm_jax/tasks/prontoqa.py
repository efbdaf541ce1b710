"""PrOntoQA-style deduction: a chain of "Every A is a B." rules over a fictional ontology,
a property at its end, distractor rules, and a True/False question.

Example (level 1): `Every wumpus is a yumpus. Every yumpus is bitter. Every dumpus is not
bitter. Max is a wumpus. True or false: Max is bitter.` -> True.

Hops (rule applications needed) grow with the level: 2,2,3,3,4,4,5,5,6,7 for levels 1..10.
Distractors (1 + level // 3 of them): the opposite property on a concept the entity does not
belong to (optionally with a subtype of its own), an unrelated property on a chain
concept, and a branch "Every <chain concept> is a <fresh concept>". The theory stays
consistent, the answer is provable either way, and labels are balanced. Sentences are shuffled
(the entity fact comes last, as in PrOntoQA).

Reference steps apply one rule each (`Every wumpus is a yumpus, so Max is a yumpus.`), then
`Answer: True|False`. x1 records (`solution` "True"/"False") verify the same way.
"""
from __future__ import annotations

from rlm_jax.tasks.common import level_of, make_rng
# Verification is the same for every True/False domain.
from rlm_jax.tasks.boolean import answer_text, parse_task, score, verify  # noqa: F401  (re-exported)

NAME = "ProntoQA"

_CONCEPTS = ("wumpus", "yumpus", "zumpus", "dumpus", "rompus", "numpus", "tumpus", "vumpus",
             "impus", "jompus", "gorpus", "shumpus", "lempus", "sterpus", "grimpus", "lorpus",
             "brimpus", "kumpus", "fompus", "hilpus")
_PROPERTIES = ("bitter", "bright", "cold", "dull", "fast", "happy", "large", "loud", "opaque",
               "red", "shy", "small", "sour", "spicy", "wooden", "metallic", "fruity", "floral",
               "liquid", "kind", "mean", "nervous", "angry", "sweet")
_ENTITIES = ("Max", "Alex", "Sam", "Polly", "Rex", "Fae", "Wren", "Stella", "Sally", "Jo")


def num_hops(level: int) -> int:
  return 2 + ((level - 1) * 5) // 9


def _a(noun: str) -> str:
  return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def _is(positive: bool, prop: str) -> str:
  return prop if positive else f"not {prop}"


def generate(seed, difficulty: float) -> dict:
  """One deduction task; see the module docstring for the level schedule.

  Args:
    seed: anything `common.make_rng` accepts.
    difficulty: in [0, 1].

  Returns:
    x1-schema dict with `solution` "True"/"False" (as in x1), plus `steps`.
  """
  level = level_of(difficulty)
  rng = make_rng(seed)
  hops = num_hops(level)
  n_distract = 1 + level // 3
  concepts = rng.sample(_CONCEPTS, hops + 2 * n_distract)
  chain, fresh = concepts[:hops], concepts[hops:]
  props = rng.sample(_PROPERTIES, 1 + n_distract)
  prop, other_props = props[0], props[1:]
  entity = rng.choice(_ENTITIES)
  polarity = rng.random() < 0.5
  query = rng.random() < 0.5

  rules = [f"Every {chain[i]} is {_a(chain[i + 1])}." for i in range(hops - 1)]
  rules.append(f"Every {chain[-1]} is {_is(polarity, prop)}.")
  for k in range(n_distract):
    kind = rng.randrange(3)
    if kind == 0:  # the opposite property on a concept the entity is not
      d = fresh[2 * k]
      rules.append(f"Every {d} is {_is(not polarity, prop)}.")
      if rng.random() < 0.5:
        rules.append(f"Every {fresh[2 * k + 1]} is {_a(d)}.")
    elif kind == 1:  # an unrelated property on a chain concept
      rules.append(f"Every {rng.choice(chain)} is {_is(rng.random() < 0.5, other_props[k])}.")
    else:  # a branch off the chain, with an unrelated property
      d = fresh[2 * k + 1]
      rules.append(f"Every {rng.choice(chain)} is {_a(d)}.")
      rules.append(f"Every {d} is {_is(rng.random() < 0.5, other_props[k])}.")
  rng.shuffle(rules)
  answer = query == polarity
  problem = (" ".join(rules) + f" {entity} is {_a(chain[0])}. True or false: {entity} is "
             f"{_is(query, prop)}.")
  steps = [f"Every {chain[i]} is {_a(chain[i + 1])}, so {entity} is {_a(chain[i + 1])}."
           for i in range(hops - 1)]
  steps.append(f"Every {chain[-1]} is {_is(polarity, prop)}, so {entity} is "
               f"{_is(polarity, prop)}.")
  steps.append(f"Answer: {answer}")
  return {
      "type": NAME,
      "level": level,
      "problem": problem,
      "unique_solution": True,
      "solution": str(answer),
      "steps": steps,
  }

