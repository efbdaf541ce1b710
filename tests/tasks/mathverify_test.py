import textwrap
import time

import pytest

from rlm_jax.tasks import mathverify


@pytest.mark.parametrize("gold,pred,equal", [
    ("\\frac{1}{2}", "The answer is \\boxed{0.5}", True),
    ("\\frac{1}{2}", "so $\\frac{2}{4}$", True),
    ("\\frac{1}{2}", "\\boxed{3}", False),
    ("x^2+1", "\\boxed{1 + x^2}", True),
    ("\\sqrt{2}", "\\boxed{\\sqrt{3}}", False),
    ("18", "#### 18.00", True),     # numeric gold: exact comparison without the worker
    ("\\frac{1}{2}", "no answer here", None),
])
def test_math_equal(gold, pred, equal):
  assert mathverify.math_equal(gold, pred) is equal


def test_verify_scores():
  task = {"type": "math", "solution": "\\frac{3}{4}"}
  assert mathverify.verify(task, "\\boxed{\\frac{6}{8}}") == 2
  assert mathverify.verify(task, "\\boxed{1}") == 0
  assert mathverify.verify(task, "nothing") == -1


def test_hard_timeout_kills_and_restarts_a_stuck_worker(tmp_path):
  script = tmp_path / "stuck.py"
  script.write_text(textwrap.dedent("""
      import sys, time
      print('{"ready": true}', flush=True)
      for line in sys.stdin:
        time.sleep(60)
  """))
  worker = mathverify._Worker(str(script))
  try:
    for _ in range(2):  # the second call starts a fresh process
      t0 = time.perf_counter()
      assert worker.equal("1", "2", timeout_s=1.0) is False
      assert time.perf_counter() - t0 < 5.0
      assert worker._proc is None
  finally:
    worker.stop()


def test_worker_that_cannot_start_raises(tmp_path):
  script = tmp_path / "broken.py"
  script.write_text("raise SystemExit(1)\n")
  worker = mathverify._Worker(str(script))
  with pytest.raises(RuntimeError, match="did not start"):
    worker.equal("1", "1", timeout_s=1.0)
