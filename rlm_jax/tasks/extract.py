"""Final-answer extraction from free model text: booleans, numbers, boxed LaTeX, answer markers.

All scanning is linear in the input: inputs are cut to their tail (`common.MAX_SCAN_CHARS`),
regexes have no nested or overlapping quantifiers, and `\\boxed{...}` is matched by counting
braces rather than by regex. Functions return None when nothing usable is found; they never
raise on any `str` input.

The *final* answer wins everywhere: the last answer marker, the last `\\boxed{}`, the last
number.
"""
from __future__ import annotations

import re
from fractions import Fraction

from rlm_jax.tasks.common import tail

# Where a final answer is announced. "A:" is case-sensitive (PrOntoQA/GSM8K-style "A: 18") so
# that a lone "a:" inside prose does not count.
_MARKER_RE = re.compile(
    r"####|\banswer\s{0,3}(?:is|=|:)|\banswer\b|\\boxed\s{0,2}\{|\\fbox\s{0,2}\{"
    r"|(?-i:(?<![A-Za-z])A:)",
    re.IGNORECASE)

# A number as written in answers: optional sign and currency, digits with or without thousands
# separators, optional decimals (a trailing `%` or unit is simply not part of the match).
# Alternation branches do not overlap past the sign, so there is no catastrophic backtracking.
_NUMBER_RE = re.compile(
    r"(?<![\w.])(?P<sign>[-+]?)(?:\$\s?)?"
    r"(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?P<frac>\.\d+)?(?![\d])"
    r"|(?<![\w.])(?P<sign2>[-+]?)\$?(?P<lead>\.\d+)(?![\d])")
_PLAIN_NUMBER_RE = re.compile(r"[-+]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?%?")
_FRAC_RE = re.compile(
    r"\\d?frac\s{0,2}\{\s{0,2}(-?\d{1,30})\s{0,2}\}\s{0,2}\{\s{0,2}(\d{1,30})\s{0,2}\}")
_SLASH_FRAC_RE = re.compile(r"(?<![\w./])(-?\d{1,30})\s{0,2}/\s{0,2}(\d{1,30})(?![\w/]|\.\d)")
_BOOL_RE = re.compile(r"\b(true|false|yes|no)\b", re.IGNORECASE)
_TF_RE = re.compile(r"\b(true|false)\b", re.IGNORECASE)
_TRUE_OR_FALSE_RE = re.compile(
    r"\btrue\s{0,3}(?:or|/)\s{0,3}false\b|\bfalse\s{0,3}(?:or|/)\s{0,3}true\b", re.IGNORECASE)
_BRACE_RE = re.compile(r"[{}]")

# Digits beyond this are not a plausible answer and would hit Python's int-conversion limit.
_MAX_DIGITS = 60
# How far after an answer marker the answer itself may start.
_MARKER_WINDOW = 80
# A boxed answer longer than this is not an answer; the cap bounds the brace scan.
_MAX_BOXED = 1000
# Only the last few markers are examined, so a text made of markers costs O(len), not O(len^2).
MAX_MARKERS = 32


def last_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{...}` (or `\\fbox{...}`) with balanced braces, else None."""
  text = tail(text)
  start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
  for _ in range(MAX_MARKERS):
    if start < 0:
      break
    content = braced_after(text, start)
    if content is not None:
      return content
    start = max(text.rfind("\\boxed", 0, start), text.rfind("\\fbox", 0, start))
  return None


def braced_after(text: str, start: int) -> str | None:
  """Content of the `{...}` group of the `\\boxed`/`\\fbox` at `start` (balanced), else None."""
  i = text.find("{", start, start + 12)
  if i < 0 or text[start:i].strip("\\boxedfbx ") != "":
    return None
  depth = 0
  for m in _BRACE_RE.finditer(text, i, i + _MAX_BOXED):
    depth += 1 if m.group(0) == "{" else -1
    if depth == 0:
      return text[i + 1:m.start()]
  return None


def marker_positions(text: str) -> list[tuple[int, int]]:
  """(start, end) of every answer marker in `text`, in order."""
  return [(m.start(), m.end()) for m in _MARKER_RE.finditer(text)]


def answer_segment(text: str) -> str | None:
  """Text after the last answer marker (up to the end of its line or a 300-char cap)."""
  text = tail(text)
  marks = marker_positions(text)
  if not marks:
    return None
  start, end = marks[-1]
  if text[start:end].startswith("\\"):
    boxed = braced_after(text, start)
    if boxed is not None:
      return boxed
  seg = text[end:end + 300]
  nl = seg.find("\n")
  if nl > 0 and seg[:nl].strip():
    seg = seg[:nl]
  return seg


# ---------------------------------------------------------------------------------------------
# Numbers


def parse_number(text: str) -> Fraction | None:
  """Exact value of a single number as written in an answer, else None.

  Accepts `18`, `18.0`, `-3`, `$1,234.50`, `1,018`, `50%` (as 50), `.5`, `3/4`,
  `\\frac{3}{4}`, a trailing unit or punctuation (`18 dollars.`), and surrounding markup
  (`**18**`, `\\text{18}`).
  """
  if not isinstance(text, str):
    return None
  text = text.strip()
  if len(text) > 400:
    return None
  m = _FRAC_RE.search(text)
  if m:
    return _fraction(m.group(1), m.group(2))
  m = _SLASH_FRAC_RE.search(text)
  if m and _NUMBER_RE.search(text, 0, m.start()) is None:
    return _fraction(m.group(1), m.group(2))
  m = _NUMBER_RE.search(text)
  return _number_of(m) if m else None


def is_plain_number(text: str) -> bool:
  """True for text that is just a number (`18`, `-3.5`, `$1,080`, `50%`), not LaTeX."""
  t = text.replace(" ", "")
  return bool(t) and any(c.isdigit() for c in t) and _PLAIN_NUMBER_RE.fullmatch(t) is not None


def _fraction(num: str, den: str) -> Fraction | None:
  if int(den) == 0:
    return None
  return Fraction(int(num), int(den))


def _number_of(m: re.Match) -> Fraction | None:
  if m.group("int") is not None:
    sign, digits, frac = m.group("sign"), m.group("int").replace(",", ""), m.group("frac") or ""
  else:
    sign, digits, frac = m.group("sign2"), "0", m.group("lead")
  if len(digits) + len(frac) > _MAX_DIGITS:
    return None
  value = Fraction(digits + frac)
  return -value if sign == "-" else value


def last_number(text: str) -> Fraction | None:
  """The last number in `text`, else None."""
  text = tail(text)
  last = None
  for m in _NUMBER_RE.finditer(text):
    last = m
  if last is None:
    return None
  # "3/4" at the very end reads as one value.
  m = _SLASH_FRAC_RE.search(text, max(0, last.start() - 40))
  frac_last = None
  while m:
    frac_last = m
    m = _SLASH_FRAC_RE.search(text, m.end())
  if frac_last is not None and frac_last.end() >= last.end():
    return _fraction(frac_last.group(1), frac_last.group(2))
  return _number_of(last)


def final_number(text: str) -> Fraction | None:
  """The final numeric answer in free text, else None.

  Order: the last answer marker (`#### N`, `The answer is N`, `\\boxed{N}`, `A: N`,
  `Answer: $1,234.50`) that is followed by a number, then the last number in the text.
  """
  if not isinstance(text, str):
    return None
  text = tail(text).replace("\u2212", "-")
  marks = marker_positions(text)
  for start, end in reversed(marks[-MAX_MARKERS:]):
    if text[start:end].startswith("\\"):
      content = braced_after(text, start)
      if content is not None:
        value = parse_number(content)
        if value is not None:
          return value
        continue
    value = _first_number(text[end:end + _MARKER_WINDOW])
    if value is not None:
      return value
  return last_number(text)


def _first_number(seg: str) -> Fraction | None:
  m = _FRAC_RE.search(seg)
  n = _NUMBER_RE.search(seg)
  s = _SLASH_FRAC_RE.search(seg)
  if m and (n is None or m.start() <= n.start()):
    return _fraction(m.group(1), m.group(2))
  if s and n and s.start() <= n.start():
    return _fraction(s.group(1), s.group(2))
  return _number_of(n) if n else None


def format_number(value: Fraction) -> str:
  """Canonical text of a number: `18`, `-3`, `2.5`, or `a/b` when not a finite decimal."""
  if value.denominator == 1:
    return str(value.numerator)
  den = value.denominator
  while den % 2 == 0:
    den //= 2
  while den % 5 == 0:
    den //= 5
  if den != 1:
    return f"{value.numerator}/{value.denominator}"
  # A finite decimal: scale to an integer and place the point.
  k = 0
  while (value * 10**k).denominator != 1:
    k += 1
  digits = str(abs((value * 10**k).numerator)).rjust(k + 1, "0")
  sign = "-" if value < 0 else ""
  return f"{sign}{digits[:-k]}.{digits[-k:]}".rstrip("0").rstrip(".")


# ---------------------------------------------------------------------------------------------
# Booleans


def final_bool(text: str) -> bool | None:
  """The final True/False answer in free text, else None.

  Reads "The answer is False.", "**True**", "\\boxed{True}", "A: yes"; echoes of the question
  ("True or false: ...") are ignored. After the last answer marker, the first of
  true/false/yes/no wins; without a marker, the last true/false in the text.
  """
  if not isinstance(text, str):
    return None
  text = _TRUE_OR_FALSE_RE.sub(" ", tail(text))
  for start, end in reversed(marker_positions(text)[-MAX_MARKERS:]):
    seg = text[end:end + _MARKER_WINDOW]
    if text[start:end].startswith("\\"):
      seg = braced_after(text, start) or ""
    m = _BOOL_RE.search(seg)
    if m:
      return m.group(1).lower() in ("true", "yes")
  last = None
  for m in _TF_RE.finditer(text):
    last = m
  if last is None:
    return None
  return last.group(1).lower() == "true"


def as_bool(value) -> bool | None:
  """A task's boolean label from x1's bool or "True"/"False" string, else None."""
  if isinstance(value, bool):
    return value
  if isinstance(value, str) and value.strip().lower() in ("true", "false"):
    return value.strip().lower() == "true"
  return None
