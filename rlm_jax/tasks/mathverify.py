"""MATH-style LaTeX answer equivalence through math-verify, with a hard time limit.

math-verify's own timeout uses `signal.alarm`, which only works in the main thread and cannot
interrupt long-running C code. So the comparison runs in a persistent worker process
(`_mathverify_worker.py`, started with `sys.executable`, fed JSON lines): inside it math-verify's
timeout is active, and the caller waits at most `timeout_s` for the reply; a late worker is
killed and restarted on the next call. A call therefore returns within `timeout_s` (plus the
one-time worker start-up, about a second) whatever the input. Start-up is not counted in the
limit; it has its own (`_STARTUP_S`).

Cheap cases never reach the worker: plain numbers are compared exactly, identical strings are
equal.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading

from rlm_jax.tasks import extract
from rlm_jax.tasks.common import check_task, tail

NAME = "math"
DEFAULT_TIMEOUT_S = 5.0
# Only this much of the model output (its tail) is sent to math-verify.
MAX_PRED_CHARS = 2000
_STARTUP_S = 60.0
_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_mathverify_worker.py")


class _Worker:
  """A math-verify process fed JSON lines; killed and restarted when it overruns."""

  def __init__(self, script: str = _WORKER):
    self._script = script
    self._proc: subprocess.Popen | None = None
    self._lock = threading.Lock()

  def _start(self) -> None:
    self._proc = subprocess.Popen(
        [sys.executable, self._script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, bufsize=1)
    reply = self._read(_STARTUP_S)
    if reply is None or not reply.get("ready"):
      self.stop()
      raise RuntimeError(f"math-verify worker did not start ({self._script}); "
                         "is math-verify installed?")

  def _read(self, timeout_s: float) -> dict | None:
    ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
    if not ready:
      return None
    line = self._proc.stdout.readline()
    return json.loads(line) if line else None

  def stop(self) -> None:
    if self._proc is not None:
      self._proc.kill()
      self._proc.wait()
      self._proc = None

  def equal(self, gold: str, pred: str, timeout_s: float) -> bool | None:
    with self._lock:
      if self._proc is None or self._proc.poll() is not None:
        self._start()
      req = {"gold": gold, "pred": pred, "timeout": max(1, int(timeout_s))}
      try:
        self._proc.stdin.write(json.dumps(req) + "\n")
        self._proc.stdin.flush()
        reply = self._read(timeout_s)
      except (BrokenPipeError, OSError, ValueError):
        reply = None
      if reply is None:
        # Overran (or died): kill so the next call starts clean; the answer counts as unequal.
        self.stop()
        return False
      return reply["equal"]


_worker = _Worker()
atexit.register(_worker.stop)


def math_equal(gold: str, pred: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool | None:
  """Whether model text `pred` states the same mathematical answer as `gold`.

  Args:
    gold: the reference answer, LaTeX or plain (`\\frac{1}{2}`, `x^2+1`, `18`).
    pred: model output; its tail (`MAX_PRED_CHARS`) is searched, the last boxed/LaTeX answer
      wins (math-verify's extraction).
    timeout_s: hard wall-clock limit for the comparison.

  Returns:
    True / False, or None when no answer could be parsed from `pred`. A timeout is False.
  """
  gold = gold.strip()
  pred = tail(pred, MAX_PRED_CHARS)
  if extract.is_plain_number(gold):
    # Plain numeric gold: exact comparison, no worker needed.
    g, p = extract.parse_number(gold), extract.final_number(pred)
    if g is not None and p is not None:
      return g == p
  boxed = extract.last_boxed(pred)
  if boxed is not None and boxed.strip() == gold:
    return True
  if "$" not in gold and "boxed" not in gold:
    gold = f"${gold}$"
  return _worker.equal(gold, pred, timeout_s)


def parse_task(task: dict) -> str:
  check_task(task, "solution")
  gold = str(task["solution"]).strip()
  if not gold:
    raise ValueError("math task has an empty solution")
  return gold


def verify(task: dict, output: str) -> int:
  return score(parse_task(task), output)


def score(gold: str, output: str) -> int:
  """Scores a MATH-style answer (`gold`: LaTeX): 2 equal, 0 not, -1 unparseable."""
  equal = math_equal(gold, output)
  if equal is None:
    return -1
  return 2 if equal else 0


def answer_text(task: dict) -> str:
  check_task(task, "solution")
  return f"\\boxed{{{task['solution']}}}"
