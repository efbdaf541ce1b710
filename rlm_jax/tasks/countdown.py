"""Countdown: reach a target from given numbers with + - * / (each number at most once).

Problem: `Use 3, 5, 2 to make 16.` Answer: an expression such as `(3+5)*2`. Rules: integers
only, division must be exact, each given number used at most once (not all must be used).
The expression is checked by a small recursive-descent parser, never by eval.

Scores: 2 the expression obeys the rules and equals the target; 1 it obeys the rules but gives
another value; 0 it breaks a rule (a number not given or used too often, inexact division or
division by zero); -1 no parseable expression.

Steps (`check_steps`): a step `a op b = c` is right when a and b are still available, c is
a op b, and the numbers left can still make the target; the answer step when it verifies.

Levels: 2 numbers (1-9, target < 100) at level 1 up to 6 numbers (some 2-digit, target <
1000) at level 10; from level 5 one given number may be a distractor. Reference steps combine
two numbers per step (`3+5=8`, `8*2=16`), then `Answer: (3+5)*2`.
"""
from __future__ import annotations

import re
from collections import Counter

from rlm_jax.tasks import extract
from rlm_jax.tasks.common import apply_op, check_task, level_of, make_rng, tail

NAME = "Countdown"

_N_NUMBERS = (2, 2, 3, 3, 3, 4, 4, 5, 5, 6)
_MAX_NUM = (9, 9, 9, 10, 12, 15, 20, 25, 25, 25)
_MAX_TARGET = (99, 99, 99, 200, 300, 500, 999, 999, 999, 999)
_MIN_TARGET = (1, 1, 1, 10, 10, 10, 20, 20, 20, 20)
_PROBLEM_RE = re.compile(r"Use ([0-9][0-9, ]{0,200}) to make (\d{1,12})\.")
# Longest expression the parser accepts, and its deepest parenthesis nesting.
MAX_EXPR_CHARS = 256
MAX_DEPTH = 32
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


# ---------------------------------------------------------------------------------------------
# Safe expression parsing and evaluation


class _Invalid(Exception):
  """The text is not an expression (score -1)."""


class _RuleBroken(Exception):
  """The expression breaks a Countdown rule (score 0)."""


_TOKEN_RE = re.compile(r"\s*(?:(\d{1,9})|([-+*/()]))")


def _tokenize(expr: str) -> list:
  tokens, pos = [], 0
  expr = expr.rstrip()
  while pos < len(expr):
    m = _TOKEN_RE.match(expr, pos)
    if not m:
      raise _Invalid(expr[pos:pos + 10])
    tokens.append(int(m.group(1)) if m.group(1) else m.group(2))
    pos = m.end()
  if not tokens:
    raise _Invalid("empty")
  return tokens


def evaluate(expr: str) -> tuple[int, list[int]]:
  """Value of an integer +-*/ expression and the numbers it uses.

  Raises:
    _Invalid: not an expression. _RuleBroken: inexact division or division by zero.
  """
  if len(expr) > MAX_EXPR_CHARS:
    raise _Invalid("too long")
  tokens = _tokenize(expr)
  used: list[int] = []
  pos = 0

  def peek():
    return tokens[pos] if pos < len(tokens) else None

  def parse_sum(depth):
    nonlocal pos
    value = parse_product(depth)
    while peek() in ("+", "-"):
      op = tokens[pos]
      pos += 1
      rhs = parse_product(depth)
      value = value + rhs if op == "+" else value - rhs
    return value

  def parse_product(depth):
    nonlocal pos
    value = parse_atom(depth)
    while peek() in ("*", "/"):
      op = tokens[pos]
      pos += 1
      rhs = parse_atom(depth)
      if op == "*":
        value *= rhs
      else:
        if rhs == 0 or value % rhs:
          raise _RuleBroken("inexact division")
        value //= rhs
    return value

  def parse_atom(depth):
    nonlocal pos
    tok = peek()
    if isinstance(tok, int):
      pos += 1
      used.append(tok)
      return tok
    if tok == "(":
      if depth >= MAX_DEPTH:
        raise _Invalid("too deep")
      pos += 1
      value = parse_sum(depth + 1)
      if peek() != ")":
        raise _Invalid("unbalanced")
      pos += 1
      return value
    raise _Invalid(f"unexpected {tok!r}")

  value = parse_sum(0)
  if pos != len(tokens):
    raise _Invalid("trailing tokens")
  return value, used


# ---------------------------------------------------------------------------------------------
# Generation


def _combine(a, b, op):
  """(value, text, prec) of a op b, with the minimal parentheses."""
  va, ta, pa = a
  vb, tb, pb = b
  p = _PREC[op]
  if pa < p:
    ta = f"({ta})"
  if pb < p or (pb == p and op in "-/"):
    tb = f"({tb})"
  if op == "+":
    v = va + vb
  elif op == "-":
    v = va - vb
  elif op == "*":
    v = va * vb
  else:
    v = va // vb
  return v, f"{ta}{op}{tb}", p


def _ops_for(va, vb):
  ops = ["+", "*"]
  if va > vb:
    ops.append("-")
  if vb > 1 and va % vb == 0:
    ops.append("/")
  return ops


def generate(seed, difficulty: float) -> dict:
  """One Countdown task; see the module docstring for the level schedule.

  Args:
    seed: anything `common.make_rng` accepts.
    difficulty: in [0, 1].

  Returns:
    x1-schema dict: `problem` "Use a, b, c to make T.", `solution` a reference expression,
    `unique_solution` False, plus `steps`.
  """
  level = level_of(difficulty)
  rng = make_rng(seed)
  n = _N_NUMBERS[level - 1]
  max_num, max_target = _MAX_NUM[level - 1], _MAX_TARGET[level - 1]
  min_target = _MIN_TARGET[level - 1]
  while True:
    numbers = [rng.randint(1, max_num) for _ in range(n)]
    if level >= 8 and rng.random() < 0.5:
      numbers[rng.randrange(n)] = rng.choice((25, 50, 75, 100))
    n_use = n if level < 5 else rng.choice((n - 1, n))
    pool = [(v, str(v), 3) for v in rng.sample(numbers, n_use)]
    steps = []
    while len(pool) > 1:
      i, j = rng.sample(range(len(pool)), 2)
      a, b = pool[i], pool[j]
      if a[0] < b[0]:  # keep subtraction and division non-negative and exact
        a, b = b, a
      ops = _ops_for(a[0], b[0])
      op = rng.choice(ops)
      c = _combine(a, b, op)
      steps.append(f"{a[0]}{op}{b[0]}={c[0]}")
      pool = [p for k, p in enumerate(pool) if k not in (i, j)] + [c]
    target, expr, _ = pool[0]
    if min_target <= target <= max_target and target not in numbers:
      break
  shown = list(numbers)
  rng.shuffle(shown)
  return {
      "type": NAME,
      "level": level,
      "problem": f"Use {', '.join(map(str, shown))} to make {target}.",
      "unique_solution": False,
      "solution": expr,
      "steps": steps + [f"Answer: {expr}"],
  }


# ---------------------------------------------------------------------------------------------
# Verification


def parse_problem(problem: str) -> tuple[list[int], int]:
  """(numbers, target) from a problem text `Use a, b, c to make T.`"""
  m = _PROBLEM_RE.search(problem)
  if not m:
    raise ValueError(f"countdown problem not in the form 'Use a, b, c to make T.': {problem[:80]!r}")
  numbers = [int(x) for x in re.findall(r"\d+", m.group(1))]
  return numbers, int(m.group(2))


_EXPR_CHARS_RE = re.compile(r"[0-9+\-*/() ]+")
_TIMES_X_RE = re.compile(r"(?<=[\d)\s])[xX](?=[\s\d(])")


def _candidate(output: str) -> str | None:
  """The expression the output proposes: after the last answer marker, else its last line."""
  text = tail(output).replace("\u00d7", "*").replace("\u00f7", "/").replace("\u2212", "-")
  seg = extract.answer_segment(text)
  if seg is None:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
      return None
    seg = lines[-1]
  seg = seg.replace("\\times", "*").replace("\\cdot", "*").replace("\\div", "/").replace("$", "")
  seg = _TIMES_X_RE.sub("*", seg)
  # "(3+5)*2 = 16" or "16 = (3+5)*2": keep the side that has an operator.
  sides = seg.split("=")
  for side in sides[:4]:
    if any(op in side for op in "+-*/"):
      seg = side
      break
  else:
    seg = sides[0]
  runs = _EXPR_CHARS_RE.findall(seg[:MAX_EXPR_CHARS + 50])
  runs = [r.strip() for r in runs if any(ch.isdigit() for ch in r)]
  if not runs:
    return None
  return max(runs, key=len)


def parse_task(task: dict) -> tuple[list[int], int]:
  check_task(task, "problem")
  return parse_problem(task["problem"])


def verify(task: dict, output: str) -> int:
  return score(parse_task(task), output)


def score(gold: tuple[list[int], int], output: str) -> int:
  """Scores a Countdown output; see the module docstring for the score meanings."""
  numbers, target = gold
  expr = _candidate(output)
  if expr is None:
    return -1
  try:
    value, used = evaluate(expr)
  except _Invalid:
    return -1
  except _RuleBroken:
    return 0
  if Counter(used) - Counter(numbers):
    return 0
  return 2 if value == target else 1


def answer_text(task: dict) -> str:
  check_task(task, "solution")
  return str(task["solution"])


# ---------------------------------------------------------------------------------------------
# Step checking (process labels of sampled traces)

_STEP_RE = re.compile(r"^\s*(\d{1,9})\s*([-+*/xX\u00d7])\s*(\d{1,9})\s*=\s*(-?\d{1,12})\s*\.?\s*$")
# Pools searched by `reachable` before giving up (bounded time on any input).
MAX_REACH_NODES = 20_000
MAX_POOL = 8


def _results(a: int, b: int) -> set[int]:
  out = {a + b, a * b, a - b, b - a}
  if b and a % b == 0:
    out.add(a // b)
  if a and b % a == 0:
    out.add(b // a)
  return out


def reachable(pool, target: int, max_nodes: int = MAX_REACH_NODES) -> bool | None:
  """Whether some expression over a sub-multiset of `pool` equals `target` (None: undecided
  within `max_nodes` pools, or a pool over `MAX_POOL` numbers)."""
  start = tuple(sorted(pool))
  if target in start:
    return True
  if len(start) > MAX_POOL:
    return None
  dead: set[tuple] = set()
  budget = [max_nodes]

  def go(p: tuple) -> bool:
    if target in p:
      return True
    if len(p) < 2 or p in dead:
      return False
    budget[0] -= 1
    if budget[0] < 0:
      raise _OutOfBudget
    for i in range(len(p)):
      for j in range(i + 1, len(p)):
        rest = p[:i] + p[i + 1:j] + p[j + 1:]
        for r in _results(p[i], p[j]):
          if go(tuple(sorted(rest + (r,)))):
            return True
    dead.add(p)
    return False

  try:
    return go(start)
  except _OutOfBudget:
    return None


class _OutOfBudget(Exception):
  """`reachable` searched its `max_nodes` pools without deciding."""


def check_steps(task: dict, steps: list[str]) -> list[int]:
  """Process labels of a sampled trace: 1 for a right step, 0 from the first wrong one on.

  Step k < last is right when it reads `a op b = c` with a and b among the numbers still
  available (given, or results of earlier steps; each used once), c = a op b exactly, and
  the numbers then left can still make the target (`reachable`; undecided counts as
  reachable). The last step is right when the verifier accepts it as the answer. Never raises
  on any step text; time is bounded by `MAX_REACH_NODES` per step.
  """
  numbers, target = parse_task(task)
  gold = (numbers, target)
  pool, ok, out = Counter(numbers), reachable(numbers, target) is not False, []
  for k, step in enumerate(steps):
    text = step if isinstance(step, str) else ""
    if ok and k == len(steps) - 1:
      ok = score(gold, text) == 2
    elif ok:
      m = _STEP_RE.match(tail(text, 200))
      if m is None:
        ok = False
      else:
        a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        op = "*" if op in "xX\u00d7" else op
        need = Counter([a, b])
        ok = not (need - pool) and c == apply_op(a, op, b)
        if ok:
          pool = pool - need + Counter([c])
          ok = reachable(list(pool.elements()), target) is not False
    out.append(int(ok))
  return out
