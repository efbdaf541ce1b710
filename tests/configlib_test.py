"""Tests for rlm_jax.configlib: ConfigDict -> frozen dataclass, loading, one-line CLI errors."""
import dataclasses
import os
import subprocess
import sys
from typing import Literal

import ml_collections
import pytest

from rlm_jax import configlib
from rlm_jax.configlib import ConfigError


@dataclasses.dataclass(frozen=True)
class Opt:
  lr: float
  warmup: int = 0


@dataclasses.dataclass(frozen=True)
class Model:
  d_model: int
  act: Literal["silu", "relu"]
  tied: bool
  name: str
  shape: tuple[int, int, int]
  dims: tuple[int, ...]
  dropout: float | None = None
  opt: Opt = Opt(lr=1.0)

  def __post_init__(self):
    if self.d_model % 2:
      raise ValueError(f"d_model={self.d_model} must be even")


def _model_cfg(**kw):
  cfg = ml_collections.ConfigDict(dict(
      d_model=8, act="silu", tied=True, name="tiny", shape=[1, -1, 2], dims=(3, 4),
      opt=dict(lr=3, warmup=5)))
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def test_from_config_converts_and_recurses():
  m = configlib.from_config(Model, _model_cfg(), "model")
  assert m == Model(d_model=8, act="silu", tied=True, name="tiny", shape=(1, -1, 2),
                    dims=(3, 4), dropout=None, opt=Opt(lr=3.0, warmup=5))
  assert isinstance(m.opt.lr, float)  # int accepted for float, stored as float
  assert isinstance(m.shape, tuple)  # list -> tuple, so the dataclass stays hashable
  hash(m)


def test_from_config_optional_and_defaults():
  cfg = ml_collections.ConfigDict(dict(d_model=4, act="relu", tied=False, name="x",
                                       shape=(1, 1, 1), dims=(), dropout=0.1))
  m = configlib.from_config(Model, cfg, "model")
  assert m.dropout == 0.1 and m.opt == Opt(lr=1.0) and m.dims == ()


@pytest.mark.parametrize("key,value,message", [
    ("act", "gelu", "config.model.act='gelu': must be one of 'silu', 'relu'"),
    ("d_model", 1.5, "config.model.d_model=1.5: must be an int"),
    ("tied", 1, "config.model.tied=1: must be a bool (True or False)"),
    ("name", 3, "config.model.name=3: must be a str"),
    ("shape", (1, 2), "config.model.shape=(1, 2): must have 3 entries"),
    ("shape", (1, "a", 2), "config.model.shape[1]='a': must be an int"),
    ("dims", 4, "config.model.dims=4: must be a tuple"),
    ("dropout", "x", "config.model.dropout='x': must be a float"),
    ("d_model", 7, "config.model: d_model=7 must be even"),
])
def test_from_config_bad_values_one_line(key, value, message):
  cfg = _model_cfg()
  with cfg.ignore_type():
    cfg[key] = value
  with pytest.raises(ConfigError) as e:
    configlib.from_config(Model, cfg, "model")
  assert str(e.value) == message
  assert isinstance(e.value, ValueError)


def test_from_config_unknown_and_missing_keys():
  cfg = _model_cfg()
  cfg.nlayers = 2
  with pytest.raises(ConfigError) as e:
    configlib.from_config(Model, cfg, "model")
  assert str(e.value) == ("config.model.nlayers: unknown key (allowed: act, d_model, "
                          "dims, dropout, name, opt, shape, tied)")
  cfg = _model_cfg()
  del cfg["name"]
  with pytest.raises(ConfigError, match=r"^config.model.name: missing required key$"):
    configlib.from_config(Model, cfg, "model")
  cfg = _model_cfg()
  cfg.opt.beta = 0.9
  with pytest.raises(ConfigError, match=r"^config.model.opt.beta: unknown key "
                     r"\(allowed: lr, warmup\)$"):
    configlib.from_config(Model, cfg, "model")


def test_literal_does_not_confuse_bool_and_int():
  @dataclasses.dataclass(frozen=True)
  class C:
    k: Literal[0, 1]
  assert configlib.from_config(C, {"k": 1}, "c").k == 1
  with pytest.raises(ConfigError, match=r"config.c.k=True: must be one of 0, 1"):
    configlib.from_config(C, {"k": True}, "c")


def test_config_error_is_one_line():
  assert str(ConfigError("a\n  b\nc")) == "a b c"


_CONFIG_FILE = """
import ml_collections

def get_config(arg=None):
  \"\"\"Tiny config for tests.\"\"\"
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict()
  c.model.d_model = 8
  c.model.lr = 0.5
  c.model.act = 'silu' if arg is None else arg
  c.model.tied = True
  c.model.shape = (1, -1, 1)
  c.model.seed = ml_collections.config_dict.placeholder(int)
  c.steps = 10
  return c
"""


@pytest.fixture
def config_path(tmp_path):
  path = tmp_path / "cfg.py"
  path.write_text(_CONFIG_FILE)
  return str(path)


def test_load_config_overrides_keep_types(config_path):
  cfg = configlib.load_config(config_path, [
      "model.d_model=16", "model.lr=1", "model.tied=false", "model.act=relu",
      "model.shape=(2, 2, 2)", "--config.steps=3", "model.seed=7"])
  assert cfg.model.d_model == 16 and isinstance(cfg.model.d_model, int)
  assert cfg.model.lr == 1.0 and isinstance(cfg.model.lr, float)
  assert cfg.model.tied is False
  assert cfg.model.act == "relu"
  assert cfg.model.shape == (2, 2, 2)
  assert cfg.steps == 3 and cfg.model.seed == 7
  with pytest.raises(AttributeError):  # locked: typos in code fail too
    cfg.model.new_key = 1


def test_load_config_arg_after_colon(config_path):
  assert configlib.load_config(config_path + ":relu").model.act == "relu"


@pytest.mark.parametrize("override,message", [
    ("model.foo=1", "config.model.foo: unknown key (allowed: act, d_model, lr, seed, "
                    "shape, tied)"),
    ("modl.d_model=1", "config.modl: unknown key (allowed: model, steps)"),
    ("model.d_model=abc", "config.model.d_model='abc': must be an int"),
    ("model.lr=fast", "config.model.lr='fast': must be a float"),
    ("model.tied=maybe", "config.model.tied='maybe': must be a bool (true or false)"),
    ("steps.x=1", "config.steps.x: config.steps is a value, not a sub-config"),
    ("model=1", "config.model='1': is a sub-config; override its keys one by one"),
    ("steps", "override 'steps': expected key=value"),
])
def test_load_config_bad_overrides(config_path, override, message):
  with pytest.raises(ConfigError) as e:
    configlib.load_config(config_path, [override])
  assert str(e.value) == message


def test_load_config_missing_file(tmp_path):
  missing = str(tmp_path / "nope.py")
  with pytest.raises(ConfigError, match=f"^--config={missing}: config file not found$"):
    configlib.load_config(missing)


def test_from_loaded_config(config_path):
  @dataclasses.dataclass(frozen=True)
  class M:
    d_model: int
    lr: float
    act: Literal["silu", "relu"]
    tied: bool
    shape: tuple[int, int, int]
    seed: int | None
  cfg = configlib.load_config(config_path)
  assert configlib.from_config(M, cfg.model, "model") == M(8, 0.5, "silu", True,
                                                           (1, -1, 1), None)


_MAIN = """
import dataclasses
from typing import Literal
from absl import flags
from ml_collections import config_flags
from rlm_jax import configlib

_CONFIG = config_flags.DEFINE_config_file('config', lock_config=True)
flags.mark_flags_as_required(['config'])

@dataclasses.dataclass(frozen=True)
class M:
  d_model: int
  lr: float
  act: Literal['silu', 'relu']
  tied: bool
  shape: tuple[int, int, int]
  seed: int | None

def main(argv):
  m = configlib.from_config(M, _CONFIG.value.model, 'model')
  print('OK', m.d_model, m.lr, m.act, m.shape, _CONFIG.value.steps)

if __name__ == '__main__':
  configlib.run_main(main)
"""


def _run_cli(tmp_path, *args):
  script = tmp_path / "cli.py"
  script.write_text(_MAIN)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] + sys.path))
  return subprocess.run([sys.executable, str(script), *args], capture_output=True,
                        text=True, env=env, timeout=60)


def test_cli_one_line_errors(tmp_path, config_path):
  # One subprocess per case costs ~0.5 s each (no jax import).
  ok = _run_cli(tmp_path, f"--config={config_path}", "--config.model.d_model=4",
                "--config.steps=2")
  assert ok.returncode == 0, ok.stderr
  assert ok.stdout.strip() == "OK 4 0.5 silu (1, -1, 1) 2"

  cases = [
      (["--config.model.foo=1"],
       "error: config.model.foo: unknown key (allowed: act, d_model, lr, seed, shape, tied)"),
      (["--config.modl.d_model=1"], "error: config.modl: unknown key (allowed: model, steps)"),
      (["--config.model.d_model=abc"],
       "error: flag --config.model.d_model=abc: invalid literal for int() with base 10: "
       "'abc'"),
      (["--config.model.act=gelu"],
       "error: config.model.act='gelu': must be one of 'silu', 'relu'"),
  ]
  for extra, expected in cases:
    r = _run_cli(tmp_path, f"--config={config_path}", *extra)
    assert r.returncode == 2, (extra, r.stderr)
    assert r.stderr.strip().splitlines() == [expected], extra
    assert "Traceback" not in r.stderr

  r = _run_cli(tmp_path)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [
      "error: flag --config=None: Flag --config must have a value other than None."]

  missing = str(tmp_path / "missing.py")
  r = _run_cli(tmp_path, f"--config={missing}")
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [f"error: --config={missing}: config file not found"]
