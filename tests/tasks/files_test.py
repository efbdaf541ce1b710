import bz2
import json
import os

import pytest

from rlm_jax.tasks import files

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
X1_FILE = os.path.join(FIXTURES, "x1_tasks.json")


def test_load_x1_json_and_bz2(tmp_path):
  tasks = files.load_tasks(X1_FILE)
  assert [t["type"] for t in tasks] == ["SAT", "Knapsack", "Einstein", "ProntoQA"]
  compressed = tmp_path / "x1.json.bz2"
  compressed.write_bytes(bz2.compress(open(X1_FILE, "rb").read()))
  assert files.load_tasks(str(compressed)) == tasks


@pytest.mark.parametrize("name", ["t.json", "t.json.bz2", "t.jsonl", "t.jsonl.bz2"])
def test_round_trip(tmp_path, name):
  tasks = files.load_tasks(X1_FILE)
  files.save_tasks(str(tmp_path / name), tasks)
  assert files.load_tasks(str(tmp_path / name)) == tasks
  if name == "t.json":
    assert json.load(open(tmp_path / name))["version"] == 1


def test_gsm8k_jsonl_is_converted(tmp_path):
  path = tmp_path / "g.jsonl"
  path.write_text(json.dumps({"question": "q?", "answer": "1+1=2\n#### 2"}) + "\n")
  (task,) = files.load_tasks(str(path))
  assert task["type"] == "gsm8k" and task["solution"] == "2"


@pytest.mark.parametrize("content,match", [
    ('{"type": "SAT", "solution": "(x1|x2|x3)"}\n{broken\n', r"t\.jsonl:2: not valid JSON"),
    ('{"type": "SAT", "solution": "(x1|x2|x3)"}\n\n{"type": "SAT"}\n', r"t\.jsonl:3: .*'solution'"),
    ('{"question": "q", "answer": "no final"}\n', r"t\.jsonl:1: .*####"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, content, match):
  path = tmp_path / "t.jsonl"
  path.write_text(content)
  with pytest.raises(ValueError, match=match):
    files.load_tasks(str(path))


def test_bad_json_and_extension(tmp_path):
  (tmp_path / "t.json").write_text('{"version": 1, "data": [{"type": "SAT"}]}')
  with pytest.raises(ValueError, match=r"t\.json: data\[0\]: task lacks field 'solution'"):
    files.load_tasks(str(tmp_path / "t.json"))
  with pytest.raises(ValueError, match="unknown task file type"):
    files.load_tasks(str(tmp_path / "t.txt"))
