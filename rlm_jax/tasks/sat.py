"""3-SAT: find a satisfying assignment. Variables and clauses both grow with the level.

Level l has n = l + 2 variables (3..12) and round(n * (1 + 3.3 d)) clauses of three distinct
variables (clause/variable ratio ~1.2 at level 1 up to ~4.3, the hard region, at level 10).
Every formula is checked satisfiable by a DPLL solver and mentions every variable.

Formula text: generated tasks use `(x1|~x2|x3) & (~x1|x2|x4)`; x1's published form
`(NOT x_2 OR x_1 OR NOT x_5) AND (...)` is read as well. As in x1, `solution` is the formula
itself; the verifier checks a proposed assignment against it.

Scores: 2 every clause satisfied; 1 no clause falsified but some undecided (partial
assignment); 0 some clause has all its literals false; -1 no assignment found, or one names a
variable that is not in the formula.

Assignments are read from natural phrasings: `x1=T x2=F`, `x_1 = True`, `x1: true`,
`set x_1 to true and x_2 to false`, `x1 is false`, `x_3 = 1`, and, after an answer marker, a
literal list `x1, ~x2, NOT x3`. Each variable takes the value bound to it last; a value binds
to the nearest variable before it on the same line.

Reference steps are the DPLL trace: `try x1=T`, `x2=F from (~x1|~x2|x3)`,
`(x1|x2|x3) fails, backtrack`, then `Answer: x1=T x2=F x3=T`.
"""
from __future__ import annotations

import functools
import re

from rlm_jax.tasks import extract
from rlm_jax.tasks.common import check_task, level_of, make_rng, tail

NAME = "SAT"

Clause = tuple[int, ...]

# ---------------------------------------------------------------------------------------------
# Formula text

_CLAUSE_RE = re.compile(r"\(([^()]{0,2000})\)")
_LITERAL_RE = re.compile(r"(NOT\s+|not\s+|~|!|\u00ac|-)?\s*x_?(\d{1,6})\b")


@functools.lru_cache(maxsize=4096)
def parse_formula(text: str) -> tuple[Clause, ...]:
  """Clauses (tuples of signed variable indices, DIMACS-style) of a CNF formula text.

  Raises:
    ValueError: when the text holds no clause or a clause without literals.
  """
  clauses = []
  for body in _CLAUSE_RE.findall(text):
    lits = tuple(-int(v) if neg else int(v) for neg, v in _LITERAL_RE.findall(body))
    if not lits or any(lit == 0 for lit in lits):
      raise ValueError(f"SAT clause without valid literals: ({body[:60]})")
    clauses.append(lits)
  if not clauses:
    raise ValueError(f"SAT formula has no clauses: {text[:80]!r}")
  return tuple(clauses)


def format_clause(clause: Clause) -> str:
  return "(" + "|".join(f"~x{-l}" if l < 0 else f"x{l}" for l in clause) + ")"


def format_formula(clauses) -> str:
  return " & ".join(format_clause(c) for c in clauses)


def num_vars(clauses) -> int:
  return max(abs(l) for c in clauses for l in c)


# ---------------------------------------------------------------------------------------------
# DPLL solver with a readable trace


def solve(clauses, trace: list[str] | None = None) -> dict[int, bool] | None:
  """A satisfying assignment of all variables 1..n, or None if unsatisfiable.

  Deterministic DPLL: unit propagation, then branch on the variable occurring most often in
  open clauses (lowest index on ties), trying first the polarity that satisfies more of them.
  Unconstrained variables end as True. When `trace` is given, steps are appended to it.
  """
  n = num_vars(clauses)
  texts = [format_clause(c) for c in clauses]

  def propagate(assign):
    changed = True
    while changed:
      changed = False
      for ci, clause in enumerate(clauses):
        open_lits = []
        satisfied = False
        for lit in clause:
          val = assign.get(abs(lit))
          if val is None:
            open_lits.append(lit)
          elif val == (lit > 0):
            satisfied = True
            break
        if satisfied:
          continue
        if not open_lits:
          return ci
        if len(open_lits) == 1:
          lit = open_lits[0]
          assign[abs(lit)] = lit > 0
          if trace is not None:
            trace.append(f"x{abs(lit)}={'T' if lit > 0 else 'F'} from {texts[ci]}")
          changed = True
    return None

  def rec(assign):
    conflict = propagate(assign)
    if conflict is not None:
      if trace is not None:
        trace.append(f"{texts[conflict]} fails, backtrack")
      return None
    counts: dict[int, list[int]] = {}
    for clause in clauses:
      if any(assign.get(abs(l)) == (l > 0) for l in clause):
        continue
      for l in clause:
        if abs(l) not in assign:
          pos_neg = counts.setdefault(abs(l), [0, 0])
          pos_neg[0 if l > 0 else 1] += 1
    if not counts:
      return assign
    var = min(counts, key=lambda v: (-sum(counts[v]), v))
    first = counts[var][0] >= counts[var][1]
    for val in (first, not first):
      if trace is not None:
        trace.append(f"try x{var}={'T' if val else 'F'}")
      result = rec({**assign, var: val})
      if result is not None:
        return result
    return None

  result = rec({})
  if result is None:
    return None
  return {v: result.get(v, True) for v in range(1, n + 1)}


def format_assignment(assign: dict[int, bool]) -> str:
  return " ".join(f"x{v}={'T' if assign[v] else 'F'}" for v in sorted(assign))


# ---------------------------------------------------------------------------------------------
# Generation


def generate(seed, difficulty: float) -> dict:
  """One satisfiable 3-SAT task; see the module docstring for the level schedule.

  Args:
    seed: anything `common.make_rng` accepts.
    difficulty: in [0, 1].

  Returns:
    x1-schema dict (`solution` = the formula text, `unique_solution` False) plus `steps`.
  """
  level = level_of(difficulty)
  rng = make_rng(seed)
  n = level + 2
  m = max(2, round(n * (1 + 3.3 * float(difficulty))))
  tries = 0
  while True:
    tries += 1
    if tries % 20 == 0:
      m -= 1  # extremely unlucky streak of unsatisfiable draws: relax slightly
    clauses = []
    for _ in range(m):
      vs = rng.sample(range(1, n + 1), 3)
      clauses.append(tuple(v if rng.random() < 0.5 else -v for v in vs))
    if len({abs(l) for c in clauses for l in c}) < n:
      continue
    trace: list[str] = []
    assign = solve(clauses, trace)
    if assign is not None:
      break
  formula = format_formula(clauses)
  return {
      "type": NAME,
      "level": level,
      "problem": f"Set x1..x{n} to T or F so that {formula} is true.",
      "unique_solution": False,
      "solution": formula,
      "steps": trace + [f"Answer: {format_assignment(assign)}"],
  }


def answer_text(task: dict) -> str:
  """A satisfying assignment (`x1=T x2=F ...`) found by the deterministic solver."""
  check_task(task, "solution")
  assign = solve(parse_formula(str(task["solution"])))
  if assign is None:
    raise ValueError("SAT task formula is unsatisfiable")
  return format_assignment(assign)


# ---------------------------------------------------------------------------------------------
# Verification

# Tokens of an assignment text. The value alternatives are whole words; `[=:]\s{0,3}[01]`
# catches `x_3 = 1`. No quantified group can overlap another, so matching is linear.
_TOKEN_RE = re.compile(
    r"(?P<var>\bx_?(?P<idx>\d{1,9})\b)"
    r"|(?P<val>\b(?:true|false|(?-i:T|F))\b)"
    r"|(?P<bit>[=:]\s{0,3}[01]\b)"
    r"|(?P<neg>\bnot\b|~|!|\u00ac)"
    r"|(?P<brk>[\n;])",
    re.IGNORECASE)
# A value binds to a variable at most this many characters after it.
_MAX_GAP = 48


def parse_assignment(text: str, literal_fallback: bool = False) -> dict[int, bool]:
  """Variable -> value from free text; the last binding of each variable wins.

  Args:
    text: free text.
    literal_fallback: when no value word occurs at all, read a literal list
      (`x1, ~x2, NOT x3`: negated -> False, plain -> True).
  """
  assign: dict[int, bool] = {}
  pending: tuple[int, int] | None = None  # (var, end position)
  negated = False  # a negation seen since the last variable or value
  literals: list[tuple[int, bool]] = []
  saw_value = False
  for m in _TOKEN_RE.finditer(text):
    if m.group("var") is not None:
      pending = (int(m.group("idx")), m.end())
      literals.append((pending[0], not negated))
      negated = False
    elif m.group("val") is not None or m.group("bit") is not None:
      saw_value = True
      if pending is not None and m.start() - pending[1] <= _MAX_GAP:
        word = (m.group("val") or m.group("bit")[-1]).lower()
        # "x1 is not true" reads as False.
        assign[pending[0]] = (word in ("true", "t", "1")) != negated
      pending = None
      negated = False
    elif m.group("neg") is not None:
      negated = True
    else:
      pending = None
      negated = False
  if literal_fallback and not saw_value:
    for var, value in literals:
      assign[var] = value
  return assign


# A bracketed group without nested brackets (linear to match: one bounded negated class).
_GROUP_RE = re.compile(r"[\[(]([^\[\]()]{1,400})[\])]")
_VECTOR_VALUES = {"1": True, "0": False, "t": True, "f": False, "true": True, "false": False}


def parse_vector(text: str, n: int) -> dict[int, bool]:
  """x1..xk from a value vector: `[1, 0, 1]`, `(T, F, T)`, `True False True` (1 <= k <= n).

  The whole `text` (brackets optional) must be the vector; anything else gives {}.
  """
  body = text.strip().rstrip(".").strip()
  if len(body) >= 2 and body[0] in "[(" and body[-1] in "])":
    body = body[1:-1]
  parts = [p for p in re.split(r"[,;\s]+", body.lower()) if p]
  if not 1 <= len(parts) <= n or any(p not in _VECTOR_VALUES for p in parts):
    return {}
  return {i + 1: _VECTOR_VALUES[p] for i, p in enumerate(parts)}


def _last_vector(text: str, n: int) -> dict[int, bool]:
  groups = _GROUP_RE.findall(text)
  for body in reversed(groups[-extract.MAX_MARKERS:]):
    found = parse_vector(body, n)
    if found:
      return found
  return {}


def _assignment_of(output: str, n: int) -> dict[int, bool]:
  text = tail(output)
  seg = extract.answer_segment(text)
  if seg is not None:
    found = parse_assignment(seg, literal_fallback=True) or parse_vector(seg, n) or _last_vector(seg, n)
    if found:
      return found
  return parse_assignment(text) or _last_vector(text, n)


def parse_task(task: dict) -> tuple[Clause, ...]:
  check_task(task, "solution")
  return parse_formula(str(task["solution"]))


def verify(task: dict, output: str) -> int:
  return score(parse_task(task), output)


def score(clauses: tuple[Clause, ...], output: str) -> int:
  """Scores an assignment against the formula's clauses; see the module docstring."""
  n = num_vars(clauses)
  assign = _assignment_of(output, n)
  if not assign:
    return -1
  if any(v < 1 or v > n for v in assign):
    return -1
  all_sat = True
  for clause in clauses:
    vals = [assign.get(abs(l)) for l in clause]
    if any(v is not None and v == (l > 0) for v, l in zip(vals, clause)):
      continue
    if all(v is not None for v in vals):
      return 0
    all_sat = False
  return 2 if all_sat else 1
