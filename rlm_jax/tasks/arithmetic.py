"""Multi-step integer arithmetic: `Compute 3+4*2-5.` solved one operation per step.

Problems are short at low levels (level 1: one or two of + and - on single digits, about 15
characters) and grow with the level: up to 8 operations, 2-digit numbers, `*` from level 2,
exact `/` from level 4, parenthesised pairs from level 5. Every intermediate value is bounded
(|v| < 100 up to level 3) and level 1-2 never go negative.

Steps apply precedence: parentheses first, then `*`/`/` left to right inside each term, then
`+`/`-` left to right, one operation per step (`4*2=8`, `3+8=11`, `11-5=6`), then
`Answer: 6`. A negative right operand is parenthesised (`3*(-5)=-15`).
"""
from __future__ import annotations

from fractions import Fraction

from rlm_jax.tasks import extract
from rlm_jax.tasks.common import apply_op, check_task, level_of, make_rng

NAME = "Arithmetic"

# Per level 1..10.
_MAX_NUM = (9, 9, 9, 12, 15, 20, 30, 50, 75, 99)
_BOUND = (100, 100, 100, 1000, 1000, 1000, 10000, 10000, 10000, 10000)


def _num_ops(level: int, rng) -> int:
  lo = 1 + round((level - 1) * 6 / 9)
  return min(8, lo + rng.randint(0, 1))


def _sample_expr(level: int, rng) -> list:
  """A random token list: ints, operators, and ("(", a, op, b, ")") groups as tuples."""
  n_ops = _num_ops(level, rng)
  max_num = _MAX_NUM[level - 1]
  add_ops = "+-"
  mul_ops = "" if level < 2 else ("*" if level < 4 else "*/")
  tokens = []
  ops_left = n_ops
  # Build term by term: a term is factor ((*|/) factor)*; terms joined by + or -. A divisor is
  # drawn from the divisors of the running term value so that division is always exact.
  while True:
    f = _factor(level, rng, max_num, ops_left)
    term, acc = [f], _value(f)
    ops_left -= _group_ops(f)
    while ops_left > 0 and mul_ops and rng.random() < 0.45:
      op = rng.choice(mul_ops)
      divisors = [d for d in range(2, max_num + 1) if acc % d == 0 and d != abs(acc)]
      if op == "/" and divisors:
        f = rng.choice(divisors)
      else:
        op, f = "*", _factor(level, rng, max_num, ops_left - 1)
      term += [op, f]
      acc = acc * _value(f) if op == "*" else acc // f
      ops_left -= 1 + _group_ops(f)
    tokens += term
    if ops_left <= 0:
      return tokens
    tokens.append(rng.choice(add_ops))
    ops_left -= 1


def _value(f) -> int:
  return apply_op(f[1], f[2], f[3]) if isinstance(f, tuple) else f


def _factor(level, rng, max_num, ops_left):
  if level >= 5 and ops_left >= 2 and rng.random() < 0.3:
    return ("(", rng.randint(1, max_num), rng.choice("+-"), rng.randint(1, max_num), ")")
  return rng.randint(1, max_num)


def _group_ops(f) -> int:
  return 1 if isinstance(f, tuple) else 0


def _text(tokens) -> str:
  out = []
  for t in tokens:
    if isinstance(t, tuple):
      out.append(f"({t[1]}{t[2]}{t[3]})")
    else:
      out.append(str(t))
  return "".join(out)


def _step(a: int, op: str, b: int, c: int) -> str:
  rhs = f"({b})" if b < 0 else str(b)
  return f"{a}{op}{rhs}={c}"


def solve(tokens) -> tuple[int, list[str]] | None:
  """Evaluates `tokens` with precedence; returns (value, steps) or None if a division is inexact."""
  steps = []
  flat = []
  for t in tokens:  # parentheses first, left to right
    if isinstance(t, tuple):
      v = apply_op(t[1], t[2], t[3])
      steps.append(_step(t[1], t[2], t[3], v))
      flat.append(v)
    else:
      flat.append(t)
  terms, ops = [], []
  i = 0
  while i < len(flat):  # then * and / inside each term
    acc = flat[i]
    i += 1
    while i < len(flat) and flat[i] in ("*", "/"):
      v = apply_op(acc, flat[i], flat[i + 1])
      if v is None:
        return None
      steps.append(_step(acc, flat[i], flat[i + 1], v))
      acc = v
      i += 2
    terms.append(acc)
    if i < len(flat):
      ops.append(flat[i])
      i += 1
  acc = terms[0]
  for op, b in zip(ops, terms[1:]):  # then + and - left to right
    v = apply_op(acc, op, b)
    steps.append(_step(acc, op, b, v))
    acc = v
  return acc, steps


def _values(steps) -> list[int]:
  return [int(s.rsplit("=", 1)[1]) for s in steps]


def generate(seed, difficulty: float) -> dict:
  """One arithmetic task; see the module docstring for the level schedule.

  Args:
    seed: anything `common.make_rng` accepts (int, (seed, index), PRNG key).
    difficulty: in [0, 1]; level = int(10 d) + 1 (capped at 10).

  Returns:
    x1-schema dict with `solution` the integer answer as a string, plus `steps`.
  """
  level = level_of(difficulty)
  rng = make_rng(seed)
  bound = _BOUND[level - 1]
  while True:
    tokens = _sample_expr(level, rng)
    out = solve(tokens)
    if out is None:
      continue
    value, steps = out
    vals = _values(steps)
    if any(abs(v) >= bound for v in vals):
      continue
    if level <= 2 and any(v < 0 for v in vals):
      continue
    break
  answer = str(value)
  return {
      "type": NAME,
      "level": level,
      "problem": f"Compute {_text(tokens)}.",
      "unique_solution": True,
      "solution": answer,
      "steps": steps + [f"Answer: {answer}"],
  }


def answer_text(task: dict) -> str:
  check_task(task, "solution")
  return str(task["solution"]).strip()


def parse_task(task: dict) -> Fraction:
  check_task(task, "solution")
  gold = extract.parse_number(str(task["solution"]))
  if gold is None:
    raise ValueError(f"arithmetic task solution is not a number: {task['solution']!r}")
  return gold


def score(gold: Fraction, output: str) -> int:
  """2 if the final number in `output` equals `gold`, 0 if another number, -1 if none."""
  got = extract.final_number(output)
  if got is None:
    return -1
  return 2 if got == gold else 0


def verify(task: dict, output: str) -> int:
  return score(parse_task(task), output)
