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


@pytest.mark.parametrize("steps,labels", [
    (["3+5=8", "8*2=16", "Answer: (3+5)*2"], [1, 1, 1]),
    (["5+3=8", "2*8=16", "Answer: 2*(5+3)"], [1, 1, 1]),  # another order of the same route
    (["3+5=8", "8*2=16", "Answer: 16"], [1, 1, 0]),  # the answer is not an expression of the numbers
    (["3+5=8", "8*2=15", "Answer: (3+5)*2"], [1, 0, 0]),  # wrong arithmetic: wrong from there on
    (["3*5=15", "15+2=17", "Answer: 3*5+2"], [0, 0, 0]),  # right arithmetic, but 15 and 2 cannot make 16
    (["3+3=6", "6+5=11", "Answer: 3+3+5"], [0, 0, 0]),  # 3 is given once
    (["8*2=16", "Answer: (3+5)*2"], [0, 0]),  # 8 is not available yet
    (["Let me think.", "3+5=8", "Answer: (3+5)*2"], [0, 0, 0]),  # not a step
    (["5 - 3 = 2", "2 * 2 = 4", "Answer: (5-3)*2"], [0, 0, 0]),  # 5-3 leaves 2, 2: at most 4
    (["3 + 5 = 8", "8 x 2 = 16.", "Answer: (3+5)*2"], [1, 1, 1]),  # spaces, 'x', a full stop
    (["Answer: (3+5)*2"], [1]),
    ([], []),
])
def test_check_steps_labels_each_step(steps, labels):
  assert countdown.check_steps(TASK, steps) == labels


def test_check_steps_accepts_a_route_only_the_search_finds():
  # 16 from 2, 3, 4, 6: 6-2=4 keeps {3, 4, 4} (4*4, 3 unused); 6*2=12 keeps {3, 4, 12} (12+4)
  task = {"type": "Countdown", "problem": "Use 2, 3, 4, 6 to make 16.", "solution": "6*2+4"}
  assert countdown.check_steps(task, ["6-2=4", "4*4=16", "Answer: (6-2)*4"]) == [1, 1, 1]
  assert countdown.check_steps(task, ["6*2=12", "12+4=16", "Answer: 6*2+4"]) == [1, 1, 1]
  assert countdown.reachable([3, 4, 4], 16) and not countdown.reachable([2, 3], 16)
  assert countdown.reachable([1, 1, 1, 1, 1], 16) is False


def test_reachable_is_bounded():
  assert countdown.reachable([7, 11, 13, 17, 19], 997, max_nodes=3) is None  # undecided
  assert countdown.reachable(list(range(1, 12)), 5000) is None  # too many numbers to search
  # an undecided pool counts as reachable: only the arithmetic decides
  assert countdown.check_steps({"type": "Countdown", "problem": "Use 1, 2, 3, 4, 5, 6, 7, 8, 9 to make 999."},
                               ["9*8=72", "Answer: 9*8"]) == [1, 0]


@pytest.mark.parametrize("junk", ["", "=", "1+1=", "99999999999*9=1", "\x00\n" * 500, "1/0=0", "x" * 10_000])
def test_check_steps_never_raises(junk):
  assert countdown.check_steps(TASK, [junk, junk, junk]) == [0, 0, 0]
