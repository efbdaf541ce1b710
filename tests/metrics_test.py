"""Tests for rlm_jax.metrics: JSONL + TensorBoard writing, torn lines, resume truncation."""
import contextlib
import glob
import json
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from rlm_jax.metrics import MetricWriter
from rlm_jax.metrics import progress
from rlm_jax.metrics import read_metrics


def _read_events(workdir):
  """All events of all TensorBoard files under <workdir>/tb, in file order (TFRecord)."""
  events = []
  for path in sorted(glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos, file_events = 0, []
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      record = data[pos + 12:pos + 12 + length]
      pos += 12 + length + 4
      ev = event_pb2.Event()
      ev.ParseFromString(record)
      file_events.append(ev)
    events.append(file_events)
  return events


def _scalars(file_events):
  return [(ev.step, v.tag, v.simple_value) for ev in file_events if ev.HasField("summary")
          for v in ev.summary.value]


def test_write_converts_scalars_and_writes_both_formats(tmp_path):
  with MetricWriter(tmp_path, enabled=True) as w:
    w.write(0, {"loss": jnp.float32(0.5), "acc": np.float64(0.25), "n": np.int64(3),
                "done": jnp.bool_(True), "lr": 1e-3, "tokens": jnp.array([7])})
    w.write(np.int32(10), {"loss": jnp.asarray(0.125, jnp.bfloat16)})
    # Flushed after each write: readable while the writer is open.
    rows = read_metrics(tmp_path)
    assert rows == [{"step": 0, "loss": 0.5, "acc": 0.25, "n": 3, "done": True,
                     "lr": 1e-3, "tokens": 7},
                    {"step": 10, "loss": 0.125}]
  assert type(rows[0]["n"]) is int and type(rows[0]["loss"]) is float
  (events,) = _read_events(tmp_path)
  assert _scalars(events) == [(0, "loss", 0.5), (0, "acc", 0.25), (0, "n", 3.0),
                              (0, "done", 1.0), (0, "lr", pytest.approx(1e-3)),
                              (0, "tokens", 7.0), (10, "loss", 0.125)]


def test_bad_values_raise(tmp_path):
  with MetricWriter(tmp_path, enabled=True, tensorboard=False) as w:
    with pytest.raises(ValueError, match=r"metric 'x': expected a scalar, got shape \(2,\)"):
      w.write(0, {"x": jnp.zeros(2)})
    with pytest.raises(ValueError, match="'step' is reserved"):
      w.write(0, {"step": 1})


def test_disabled_writer_writes_nothing(tmp_path):
  with MetricWriter(tmp_path / "run", enabled=False) as w:
    w.write(0, {"loss": 1.0})
  assert not os.path.exists(tmp_path / "run")
  assert read_metrics(tmp_path / "run") == []


def test_torn_last_line_is_skipped_and_repaired(tmp_path):
  with MetricWriter(tmp_path, enabled=True, tensorboard=False) as w:
    w.write(1, {"loss": 2.0})
    w.write(2, {"loss": 1.5})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 3, "lo')  # killed mid-write
  assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
  # Appending after the torn bytes would corrupt the next row; the writer cuts them first.
  with MetricWriter(tmp_path, enabled=True, tensorboard=False) as w:
    w.write(3, {"loss": 1.0})
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('garbage\n{"step": 4}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:4: not valid JSON: 'garbage'"):
    read_metrics(tmp_path)


def test_resume_drops_rows_after_checkpoint(tmp_path):
  # Run 1 logs steps 0..9 and is killed; the last checkpoint was at step 5.
  w = MetricWriter(tmp_path, enabled=True)
  for s in range(10):
    w.write(s, {"loss": 10.0 - s})
  w.close()
  # Run 2 resumes from step 5 and logs 6..7 again (with different values).
  with MetricWriter(tmp_path, enabled=True, resume_step=5) as w:
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4, 5]
    for s in (6, 7):
      w.write(s, {"loss": 100.0 + s})
  rows = read_metrics(tmp_path)
  assert [(r["step"], r["loss"]) for r in rows] == (
      [(s, 10.0 - s) for s in range(6)] + [(6, 106.0), (7, 107.0)])
  first, second = _read_events(tmp_path)
  assert [s for s, _, _ in _scalars(first)] == list(range(10))
  # TensorBoard hides events of earlier files from the purge step on (SessionLog START).
  purge = [ev for ev in second if ev.HasField("session_log")]
  assert len(purge) == 1 and purge[0].step == 6
  assert purge[0].session_log.status == event_pb2.SessionLog.START
  assert _scalars(second) == [(6, "loss", 106.0), (7, "loss", 107.0)]


def test_truncate_after_method(tmp_path):
  with MetricWriter(tmp_path, enabled=True) as w:
    for s in range(5):
      w.write(s, {"x": s})
    w.truncate_after(2)
    w.write(3, {"x": 30})
  assert [(r["step"], r["x"]) for r in read_metrics(tmp_path)] == [(0, 0), (1, 1), (2, 2),
                                                                   (3, 30)]
  first, second = _read_events(tmp_path)
  assert len(_scalars(first)) == 5
  assert [ev.step for ev in second if ev.HasField("session_log")] == [3]
  assert _scalars(second) == [(3, "x", 30.0)]
  assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1]) == {
      "step": 3, "x": 30}


def test_progress_counts(tmp_path):
  bar = progress(range(4), total=4, desc="steps", enabled=False)
  assert list(bar) == [0, 1, 2, 3]
  bar = progress(total=10, initial=3, enabled=True)
  bar.update(2)
  assert bar.n == 5
  bar.close()


@contextlib.contextmanager
def _fake_gcs(root):
  """gs://BUCKET/... served from root/BUCKET/... through etils.epath's test backend."""
  from etils.epath import testing as epath_testing

  def local(p):
    p = os.fspath(p)
    return os.path.join(root, p[len("gs://"):]) if p.startswith("gs://") else p

  one = lambda fn, p, *a, **k: fn(local(p), *a, **k)
  two = lambda fn, p, dst, *a, **k: fn(local(p), local(dst), *a, **k)
  with epath_testing.mock_epath(open=one, exists=one, isdir=one, listdir=one, glob=one,
                                makedirs=one, mkdir=one, remove=one, rmtree=one, stat=one,
                                walk=one, rename=two, replace=two, copy=two):
    yield


def test_url_workdir_keeps_the_url_and_rewrites_one_object(tmp_path):
  local = tmp_path / "fake-bucket" / "run" / "metrics.jsonl"
  with _fake_gcs(tmp_path):
    w = MetricWriter("gs://fake-bucket/run", enabled=True, tensorboard=False,
                     remote_flush_secs=3600)
    assert w.remote and w.path == "gs://fake-bucket/run/metrics.jsonl"
    assert (tmp_path / "fake-bucket" / "run").is_dir() and not local.exists()
    w.write(0, {"loss": 2.0})
    w.write(1, {"loss": 1.0})
    assert not local.exists()  # buffered: object stores cannot append
    w.flush()
    assert local.read_text() == '{"step": 0, "loss": 2.0}\n{"step": 1, "loss": 1.0}\n'
    w.write(2, {"loss": 0.5})
    w.truncate_after(1)  # rewritten at once
    assert [r["step"] for r in read_metrics("gs://fake-bucket/run")] == [0, 1]
    w.write(2, {"loss": 0.25})
    w.close()  # uploads the last rows
    with MetricWriter("gs://fake-bucket/run/", enabled=True, tensorboard=False,
                      resume_step=0, remote_flush_secs=0) as w:  # resume + write-through
      assert [r["step"] for r in read_metrics("gs://fake-bucket/run")] == [0]
      w.write(1, {"loss": 9.0})
      assert read_metrics("gs://fake-bucket/run")[-1] == {"step": 1, "loss": 9.0}
  assert not (tmp_path / "gs:").exists() and not os.path.exists("gs:")  # nothing mangled


def test_unknown_url_scheme_is_one_line(tmp_path):
  with pytest.raises(ValueError) as e:
    MetricWriter("hdfs://cluster/run", enabled=True, tensorboard=False)
  assert str(e.value) == ("'hdfs://cluster/run': URL scheme 'hdfs' is not supported by "
                          "etils.epath (use a local path or gs://, s3://, az://)")
