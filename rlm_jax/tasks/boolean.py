"""Verification shared by the True/False domains (Knapsack decision, ProntoQA)."""

from rlm_jax.tasks import extract
from rlm_jax.tasks.common import check_task


def parse_task(task: dict) -> bool:
  check_task(task, "solution")
  label = extract.as_bool(task["solution"])
  if label is None:
    raise ValueError(f"{task.get('type')} task solution must be a bool or 'True'/'False', "
                     f"got {task['solution']!r}")
  return label


def answer_text(task: dict) -> str:
  return str(parse_task(task))


def verify(task: dict, output: str) -> int:
  return score(parse_task(task), output)


def score(label: bool, output: str) -> int:
  """2 if the final True/False in `output` matches `label`, 0 if not, -1 if none."""
  got = extract.final_bool(output)
  if got is None:
    return -1
  return 2 if got == label else 0
