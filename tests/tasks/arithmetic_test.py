import ast
import re

import pytest

from rlm_jax.tasks import arithmetic
from rlm_jax.tasks.common import difficulty_of


def _reference(expr: str) -> int:
  """Exact integer value of +-*/ text via a walk over Python's AST (no eval)."""
  def walk(node):
    if isinstance(node, ast.Constant):
      return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
      return -walk(node.operand)
    a, b = walk(node.left), walk(node.right)
    if isinstance(node.op, ast.Div):
      assert a % b == 0, "division must be exact"
      return a // b
    return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}[type(node.op)]
  return walk(ast.parse(expr, mode="eval").body)


@pytest.mark.parametrize("level", range(1, 11))
def test_steps_are_single_correct_operations(level):
  for j in range(20):
    task = arithmetic.generate((0, level, j), difficulty_of(level))
    expr = re.fullmatch(r"Compute ([-+*/()0-9]+)\.", task["problem"]).group(1)
    assert int(task["solution"]) == _reference(expr)
    ops = sum(expr.count(c) for c in "+-*/")
    assert ops == len(task["steps"]) - 1
    for step in task["steps"][:-1]:
      lhs, rhs = step.rsplit("=", 1)
      assert _reference(lhs) == int(rhs)
    assert task["steps"][-1] == f"Answer: {task['solution']}"
    nums = [int(x) for x in re.findall(r"\d+", expr)]
    if level == 1:
      assert 1 <= ops <= 2 and max(nums) <= 9
    if level <= 3:
      assert len(task["problem"]) <= 30
      assert all(abs(int(s.rsplit("=", 1)[1])) < 100 for s in task["steps"][:-1])
    if level == 10:
      assert 7 <= ops <= 8


def test_precedence_order_of_steps():
  tokens = [3, "+", 4, "*", 2, "-", 5]
  assert arithmetic.solve(tokens) == (6, ["4*2=8", "3+8=11", "11-5=6"])
  assert arithmetic.solve([("(", 2, "-", 7, ")"), "*", 3])[1] == ["2-7=-5", "-5*3=-15"]
  assert arithmetic.solve([3, "*", ("(", 2, "-", 7, ")")])[1] == ["2-7=-5", "3*(-5)=-15"]
  assert arithmetic.solve([7, "/", 2]) is None


@pytest.mark.parametrize("output,score", [("Answer: 6", 2), ("3+8=11, 11-5=6", 2),
                                          ("\\boxed{6}", 2), ("Answer: 7", 0), ("six", -1)])
def test_verify(output, score):
  assert arithmetic.verify({"type": "Arithmetic", "solution": "6"}, output) == score
