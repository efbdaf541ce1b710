import collections
import json
import os
import sys
import types

import pytest

from rlm_jax.tasks import common, gsm8k

DEV_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "gsm8k")
RECORD = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half "
                      "as many clips in May. How many clips did Natalia sell altogether?",
          "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = "
                    "<<48+24=72>>72 clips altogether in April and May.\n#### 72"}


def _records(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def test_record_to_task():
  task = gsm8k.record_to_task(RECORD)
  assert task["type"] == "gsm8k" and task["solution"] == "72" and task["unique_solution"]
  assert task["steps"] == ["Natalia sold 48/2 = 24 clips in May.",
                           "Natalia sold 48+24 = 72 clips altogether in April and May.",
                           "Answer: 72"]
  kept = gsm8k.record_to_task(RECORD, keep_calculator=True)
  assert kept["steps"][0] == "Natalia sold 48/2 = <<48/2=24>>24 clips in May."


def test_canonical_solution_and_ascii():
  rec = {"question": "Janet\u2019s ducks\u2026", "answer": "a\nb\n#### 1,080"}
  task = gsm8k.record_to_task(rec)
  assert task["solution"] == "1080" and task["problem"] == "Janet's ducks..."
  with pytest.raises(ValueError, match="####"):
    gsm8k.record_to_task({"question": "q", "answer": "no final line"})
  with pytest.raises(ValueError, match="not a number"):
    gsm8k.record_to_task({"question": "q", "answer": "x\n#### many"})


def test_shipped_sample_levels_and_reference_answers():
  tasks = gsm8k.load_jsonl(gsm8k.SAMPLE_PATH)
  records = _records(gsm8k.SAMPLE_PATH)
  assert len(tasks) == 50
  assert collections.Counter(t["level"] for t in tasks) == {l: 5 for l in range(1, 11)}
  # Levels follow solution length: every level-10 task has at least as many lines as level 1.
  lines = lambda lvl: [len(t["steps"]) for t in tasks if t["level"] == lvl]
  assert min(lines(10)) >= max(lines(1))
  for task, rec in zip(tasks, records):
    assert gsm8k.verify(task, rec["answer"]) == 2
    assert gsm8k.verify(task, "\n".join(task["steps"])) == 2
    assert common.is_printable_ascii(task["problem"])
    assert all(common.is_printable_ascii(s) for s in task["steps"])


@pytest.mark.skipif(not os.path.isdir(DEV_DIR), reason="development copy of GSM8K not present")
@pytest.mark.parametrize("split", ["test", "train"])
def test_every_reference_answer_of_the_dev_copy_verifies(split):
  path = os.path.join(DEV_DIR, f"{split}.jsonl")
  tasks = gsm8k.load_jsonl(path)
  records = _records(path)
  assert len(tasks) == {"test": 1319, "train": 7473}[split]
  bad = [i for i, (t, r) in enumerate(zip(tasks, records)) if gsm8k.verify(t, r["answer"]) != 2]
  assert not bad


def test_malformed_line_names_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps(RECORD) + "\n{not json\n")
  with pytest.raises(ValueError, match=r"bad\.jsonl:2: "):
    gsm8k.load_jsonl(str(path))


@pytest.mark.parametrize("output,score", [
    ("#### 72", 2), ("The answer is 72.", 2), ("\\boxed{72}", 2), ("A: 72", 2),
    ("Answer: $72.00", 2), ("She sold 72 clips.", 2), ("Answer: 72 clips!", 2),
    ("The answer is 71.", 0), ("I don't know", -1),
])
def test_answer_formats(output, score):
  assert gsm8k.verify(gsm8k.record_to_task(RECORD), output) == score


def test_dollar_and_thousands_answer():
  task = gsm8k.record_to_task({"question": "q", "answer": "x\n#### 1234.5"})
  assert gsm8k.verify(task, "Answer: $1,234.50") == 2
  assert gsm8k.verify({"type": "gsm8k", "solution": "1018"}, "that is 1,018") == 2


def test_latex_solution_goes_through_math_verify():
  task = {"type": "gsm8k", "solution": "\\frac{1}{3}"}
  assert gsm8k.verify(task, "\\boxed{\\frac{2}{6}}") == 2
  assert gsm8k.verify(task, "\\boxed{0.5}") == 0


def test_hf_datasets_from_local_files(tmp_path):
  datasets = pytest.importorskip("datasets")
  records = _records(gsm8k.SAMPLE_PATH)[:10]
  want = gsm8k.records_to_tasks(records)
  ds = datasets.Dataset.from_list(records)
  assert gsm8k.from_hf(ds) == want
  ds.save_to_disk(str(tmp_path / "saved"))
  assert gsm8k.from_hf(str(tmp_path / "saved")) == want
  datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "dict"))
  assert gsm8k.from_hf(str(tmp_path / "dict"), split="test") == want
  jsonl = tmp_path / "g.jsonl"
  jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
  assert gsm8k.from_hf(str(jsonl)) == want
  with pytest.raises(ValueError, match="no such local"):
    gsm8k.from_hf(str(tmp_path / "missing"))


def test_tfds_loader_converts_examples(monkeypatch):
  """TFDS is not installed here; a stand-in module checks the conversion (bytes features)."""
  calls = {}

  class FakeTfds(types.ModuleType):
    def load(self, name, split, data_dir, download):
      calls.update(name=name, split=split, download=download)
      return [{"question": RECORD["question"].encode(), "answer": RECORD["answer"].encode()}]

    def as_numpy(self, ds):
      return ds

  monkeypatch.setitem(sys.modules, "tensorflow_datasets", FakeTfds("tensorflow_datasets"))
  tasks = gsm8k.from_tfds(split="train")
  assert calls == {"name": "gsm8k", "split": "train", "download": False}
  assert tasks == [gsm8k.record_to_task(RECORD)]


def test_tfds_missing_raises_clearly(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
  with pytest.raises(ImportError, match="tensorflow_datasets"):
    gsm8k.from_tfds()


def test_generate_draws_from_the_pool_by_level():
  for level in range(1, 11):
    task = gsm8k.generate((0, level, 0), common.difficulty_of(level))
    assert task["level"] == level
  a = gsm8k.generate(3, 0.55)
  assert a == gsm8k.generate(3, 0.55)
  a["steps"].append("x")  # a copy: the pool is not modified
  assert gsm8k.generate(3, 0.55)["steps"][-1].startswith("Answer:")
  with pytest.raises(ValueError, match="no task at level"):
    gsm8k.generate(0, 0.95, pool=[gsm8k.record_to_task(RECORD)])
