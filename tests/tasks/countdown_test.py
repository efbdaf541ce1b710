import pytest

from rlm_jax.tasks import countdown
from rlm_jax.tasks.common import difficulty_of

TASK = {"type": "Countdown", "problem": "Use 3, 5, 2 to make 16.", "solution": "(3+5)*2"}


@pytest.mark.parametrize("expr,value,used", [
    ("1+2*3", 7, [1, 2, 3]), ("(1+2)*3", 9, [1, 2, 3]), ("8-3-2", 3, [8, 3, 2]),
    ("8-(3-2)", 7, [8, 3, 2]), ("12/4/3", 1, [12, 4, 3]), ("2*(3+(4-1))", 12, [2, 3, 4, 1]),
])
def test_evaluate(expr, value, used):
  assert countdown.evaluate(expr) == (value, used)


@pytest.mark.parametrize("expr,exc", [
    ("7/2", countdown._RuleBroken), ("5/0", countdown._RuleBroken), ("(1+2", countdown._Invalid),
    ("1+", countdown._Invalid), ("-3+5", countdown._Invalid), ("2**3", countdown._Invalid),
    ("__import__('os')", countdown._Invalid), ("(" * 40 + "1" + ")" * 40, countdown._Invalid),
    ("1+" * 200 + "1", countdown._Invalid),
])
def test_evaluate_rejects(expr, exc):
  with pytest.raises(exc):
    countdown.evaluate(expr)


@pytest.mark.parametrize("output,score", [
    ("Answer: (3+5)*2", 2), ("Answer: 2*(5+3) = 16", 2), ("\\boxed{(3 + 5) \\times 2}", 2),
    ("3+5=8\n8*2=16\nAnswer: (3+5)*2", 2), ("So (3 + 5) x 2 = 16.", 2),
    ("Answer: 3*5+2", 1),            # valid, but 17
    ("Answer: 3*5", 1),              # numbers may be left unused
    ("Answer: (3+5)*2*2", 0),        # 2 used twice
    ("Answer: 4*4", 0),              # 4 is not given
    ("Answer: 5/2", 0),              # inexact division
    ("Answer: sixteen", -1), ("", -1),
])
def test_verify(output, score):
  assert countdown.verify(TASK, output) == score


@pytest.mark.parametrize("level", range(1, 11))
def test_generated_solution_is_valid(level):
  for j in range(10):
    task = countdown.generate((0, level, j), difficulty_of(level))
    numbers, target = countdown.parse_problem(task["problem"])
    value, used = countdown.evaluate(task["solution"])
    assert value == target
    assert all(used.count(x) <= numbers.count(x) for x in used)
    assert countdown.verify(task, " ".join(task["steps"])) == 2
    if level <= 3:
      assert len(task["problem"]) <= 30 and target < 100


def test_bad_problem_raises():
  with pytest.raises(ValueError, match="Use a, b, c"):
    countdown.verify({"type": "Countdown", "problem": "make 16", "solution": "x"}, "1")
