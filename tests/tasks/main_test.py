import bz2
import json
import os
import subprocess
import sys

from rlm_jax.tasks import __main__ as cli
from rlm_jax.tasks import load_tasks

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_generate_writes_x1_format(tmp_path, capsys):
  out = tmp_path / "ks.json.bz2"
  assert cli.main(["generate", "--domain", "Knapsack", "--n", "20", "--seed", "3", "--out",
                   str(out)]) == 0
  blob = json.loads(bz2.decompress(out.read_bytes()))
  assert blob["version"] == 1 and len(blob["data"]) == 20
  assert [t["level"] for t in blob["data"]] == [l for l in range(1, 11) for _ in range(2)]
  assert "wrote 20 Knapsack tasks (2 per level)" in capsys.readouterr().out


def test_verify_prints_accuracy_per_level_and_writes_scores(tmp_path, capsys):
  tasks_path = tmp_path / "sat.json"
  assert cli.main(["generate", "--domain", "sat", "--n", "4", "--seed", "0", "--levels", "1,3",
                   "--out", str(tasks_path)]) == 0
  tasks = load_tasks(str(tasks_path))
  outputs = ["\n".join(tasks[0]["steps"]), "garbage", "Answer: " + tasks[2]["steps"][-1][8:],
             "x1=F"]
  out_path = tmp_path / "outputs.jsonl"
  out_path.write_text("".join(json.dumps({"output": o}) + "\n" for o in outputs))
  scores_path = tmp_path / "scores.jsonl"
  capsys.readouterr()
  assert cli.main(["verify", "--tasks", str(tasks_path), "--outputs", str(out_path),
                   "--scores-out", str(scores_path)]) == 0
  printed = capsys.readouterr().out
  assert "accuracy 0.5000 (2/4)" in printed
  assert "level 1: accuracy 0.5000 (1/2)" in printed
  assert "level 3: accuracy 0.5000 (1/2)" in printed
  rows = [json.loads(line) for line in scores_path.read_text().splitlines()]
  assert [r["score"] for r in rows][:3] == [2, -1, 2]
  assert rows[0] == {"index": 0, "type": "SAT", "level": 1, "score": 2, "reward": 1.0}


def test_verify_x1_fixture_via_subprocess(tmp_path):
  """`python -m rlm_jax.tasks` end to end on x1-format records."""
  outputs = ["x_1 = True, x_2 = True, x_3 = False, x_4 = True", "The answer is False.",
             "\\boxed{2}", "A: False"]
  out_path = tmp_path / "o.jsonl"
  out_path.write_text("".join(json.dumps({"output": o}) + "\n" for o in outputs))
  res = subprocess.run([sys.executable, "-m", "rlm_jax.tasks", "verify", "--tasks",
                        os.path.join(FIXTURES, "x1_tasks.json"), "--outputs", str(out_path)],
                       capture_output=True, text=True, cwd=REPO, check=True)
  assert "accuracy 0.7500 (3/4)" in res.stdout  # the knapsack label is True
  assert "scores -1:0 0:1 1:0 2:3" in res.stdout


def test_errors_are_one_line(tmp_path, capsys):
  out_path = tmp_path / "o.jsonl"
  out_path.write_text('{"output": "1"}\n')
  assert cli.main(["verify", "--tasks", os.path.join(FIXTURES, "x1_tasks.json"), "--outputs",
                   str(out_path)]) == 2
  err = capsys.readouterr().err
  assert "has 4 tasks but" in err and "has 1 outputs" in err and err.count("\n") == 1
  out_path.write_text('{"output": "1"}\n{"text": "2"}\n')
  assert cli.main(["verify", "--tasks", os.path.join(FIXTURES, "x1_tasks.json"), "--outputs",
                   str(out_path)]) == 2
  assert "o.jsonl:2: expected" in capsys.readouterr().err
  assert cli.main(["generate", "--domain", "sat", "--n", "5", "--out", str(tmp_path / "x.json")]) == 2
  assert "multiple of the 10 levels" in capsys.readouterr().err
  assert cli.main(["generate", "--domain", "sat", "--n", "10", "--out", str(tmp_path / "x.txt")]) == 2
  assert ".json or .json.bz2" in capsys.readouterr().err
