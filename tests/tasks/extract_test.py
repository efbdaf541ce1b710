from fractions import Fraction

import pytest

from rlm_jax.tasks import extract


@pytest.mark.parametrize("text,value", [
    ("#### 18", 18),
    ("so she makes 9 * 2 = 18 dollars.\n#### 18", 18),
    ("The answer is 42.", 42),
    ("The final answer is \\boxed{7}", 7),
    ("A: 12", 12),
    ("Answer: $1,234.50", Fraction(246900, 200)),
    ("It costs $18.", 18),
    ("The answer is 18 dollars per day.", 18),
    ("The answer is 1,018 apples", 1018),
    ("18.00", 18),
    ("The answer is -3.", -3),
    ("about 50%", 50),
    ("\\boxed{\\frac{3}{4}}", Fraction(3, 4)),
    ("The answer is 3/4.", Fraction(3, 4)),
    ("The answer is .5", Fraction(1, 2)),
    ("3 + 4 = 7, then 7 * 2 = 14", 14),  # last-number fallback
    ("The answer is 5. Wait, no: the answer is 6.", 6),  # the final marker wins
    ("\\boxed{5} then \\boxed{6}", 6),
    ("#### 5\nThe answer is **9**", 9),
])
def test_final_number(text, value):
  assert extract.final_number(text) == value


@pytest.mark.parametrize("text", ["", "no numbers here", "The answer is unknown.", "x1 y2"])
def test_final_number_none(text):
  assert extract.final_number(text) is None


def test_numeric_equality_is_sensible():
  eighteen = [extract.final_number(t) for t in ("18", "18.0", "18.00", "$18", "Answer: 18.")]
  assert all(v == 18 for v in eighteen)
  assert extract.final_number("1,018") == 1018 != extract.final_number("1.018")


@pytest.mark.parametrize("text,value", [
    ("The answer is False.", False),
    ("**True**", True),
    ("\\boxed{True}", True),
    ("A: yes", True),
    ("true, then on reflection false", False),
    ("Answer: False. (True or false questions are tricky; true.)", False),
    ("True or false: Max is shy. Max is not shy, so True", True),
])
def test_final_bool(text, value):
  assert extract.final_bool(text) is value


@pytest.mark.parametrize("text", ["", "maybe", "True or false: x?", "yes it is"])
def test_final_bool_none(text):
  assert extract.final_bool(text) is None


def test_last_boxed_balances_braces():
  assert extract.last_boxed("\\boxed{a} x \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
  assert extract.last_boxed("\\boxed{1} \\boxed{unclosed") == "1"
  assert extract.last_boxed("nothing") is None


@pytest.mark.parametrize("value,text", [(Fraction(18), "18"), (Fraction(-5, 2), "-2.5"),
                                        (Fraction(1, 3), "1/3"), (Fraction(1, 8), "0.125")])
def test_format_number(value, text):
  assert extract.format_number(value) == text
