"""Config boundary: ml_collections ConfigDicts in, frozen dataclasses out.

Config files in `configs/` return a `ConfigDict` from `get_config()`. At start-up each
sub-config is converted once into a frozen dataclass with `from_config`; modules and pure
functions only ever see the dataclasses. Every mistake a user can make in a config (unknown
key, missing key, wrong type, value outside a `Literal`) raises `ConfigError`, whose message
is one line naming the key, e.g.::

  config.model.act='gelu': must be one of 'silu', 'relu'
  config.model.nlayers: unknown key (allowed: d_model, n_heads, n_layers)

Command line (absl)::

  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file('config', lock_config=True)
  def main(argv): ...
  if __name__ == '__main__':
    configlib.run_main(main)

`run_main` is `absl.app.run` with flag errors and `ConfigError`s raised by `main` printed as
one line `error: ...` on stderr, exit status 2. Plain absl + ml_collections 1.1 would print:
an unknown `--config.model.foo=1`: a 30-line traceback ending in `AttributeError: "'foo'"`;
`--config.model.d=abc` on an int field: `FATAL Flags parsing error: flag
--config.model.d=abc: invalid literal for int() ...` plus a usage hint; a missing config
file: nothing at parse time, then an IOError traceback on first access. `run_main` names
the key (with the allowed keys) or the file instead. A value of the right type but outside
a `Literal` is caught by `from_config` inside `main`. Mark the config flag required with
`flags.mark_flags_as_required(['config'])` to get a one-line error when it is absent.

This module imports neither jax nor flax, so the CLI fails fast.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import ml_collections

from rlm_jax import errors

T = TypeVar("T")


class ConfigError(errors.Error):
  """A bad config key or value. `str(err)` is one line."""


def _join(where: str, key: str) -> str:
  return f"{where}.{key}" if where else key


def _short(value: Any, limit: int = 80) -> str:
  text = " ".join(repr(value).split())
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _quote_all(values: Sequence[Any]) -> str:
  return ", ".join(repr(v) for v in values)


def _type_name(tp: Any) -> str:
  if tp is type(None):
    return "None"
  if isinstance(tp, type):
    return {"int": "an int", "float": "a float", "bool": "a bool", "str": "a str",
            "tuple": "a tuple"}.get(tp.__name__, tp.__name__)
  return str(tp).replace("typing.", "")


def _bad(path: str, value: Any, what: str) -> ConfigError:
  return ConfigError(f"config.{path}={_short(value)}: {what}")


def _convert(tp: Any, value: Any, path: str, strict: bool = False) -> Any:
  """Checks `value` against annotation `tp`; returns it converted (lists -> tuples, ...)."""
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)

  if tp is Any or tp is object:
    return value
  if origin is typing.Literal:
    for allowed in args:
      # `True == 1` in Python; a Literal of ints must not accept a bool and vice versa.
      if value == allowed and type(value) is type(allowed):
        return allowed
    raise _bad(path, value, f"must be one of {_quote_all(args)}")
  if origin in (typing.Union, types.UnionType):
    if value is None:
      if type(None) in args:
        return None
      raise _bad(path, value, f"must be {_type_name(tp)}")
    errors = []
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _convert(arg, value, path, strict)
      except ConfigError as e:
        errors.append(e)
    if len(errors) == 1:
      raise errors[0]
    raise _bad(path, value, f"must be {_type_name(tp)}")
  if tp is type(None):
    if value is None:
      return None
    raise _bad(path, value, "must be None")
  if tp is bool:
    if isinstance(value, bool):
      return value
    raise _bad(path, value, "must be a bool (True or False)")
  if tp is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return int(value)
    raise _bad(path, value, "must be an int")
  if tp is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    raise _bad(path, value, "must be a float")
  if tp is str:
    if isinstance(value, str):
      return value
    raise _bad(path, value, "must be a str")
  if tp is tuple or origin is tuple:
    if not isinstance(value, (tuple, list)):
      raise _bad(path, value, "must be a tuple")
    if not args:
      return tuple(value)
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
      raise _bad(path, tuple(value), f"must have {len(args)} entries")
    return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
  if tp is dict or origin in (dict, Mapping):
    if not isinstance(value, (Mapping, ml_collections.ConfigDict)):
      raise _bad(path, value, "must be a dict")
    items = value.items()
    if not args:
      return dict(items)
    return {_convert(args[0], k, path): _convert(args[1], v, _join(path, str(k)))
            for k, v in items}
  if dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    if not isinstance(value, (Mapping, ml_collections.ConfigDict)):
      raise _bad(path, value, f"must be a sub-config for {tp.__name__}")
    return from_config(tp, value, path, strict=strict)
  if isinstance(tp, type):
    if isinstance(value, tp):
      return value
    raise _bad(path, value, f"must be {_type_name(tp)}")
  raise TypeError(f"config.{path}: unsupported annotation {tp!r}")


def check_literals(obj: Any, where: str = "") -> None:
  """Checks every `Literal[...]` field of the dataclass instance `obj` (call it from
  `__post_init__`, so that direct construction validates like a config does: the allowed
  values are written once, in the annotation).

  Raises:
    ValueError: naming the first bad field and its allowed values.
  """
  where = where or type(obj).__name__
  for name, tp in typing.get_type_hints(type(obj)).items():
    if typing.get_origin(tp) is typing.Literal:
      value = getattr(obj, name)
      if not any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
        raise ValueError(f"{where}.{name}={value!r}: must be one of {_quote_all(typing.get_args(tp))}")


def from_config(cls: type[T], cfg: ml_collections.ConfigDict | Mapping[str, Any],
                where: str, *, strict: bool = False) -> T:
  """Builds the (frozen) dataclass `cls` from the sub-config `cfg`.

  Fields annotated `Literal[...]`, `int`, `float` (an int is accepted), `bool`, `str`,
  `tuple[...]`, unions/`Optional`, `dict[...]` and nested dataclasses are checked; nested
  dataclasses recurse into the matching sub-config. A field with a dataclass default may be
  left out of the config unless `strict`; every other field is required. Fields whose metadata
  has `derived=True` are never read from the config (the code fills them in, e.g. from
  another section); a config key of that name is an error. Errors raised by `cls.__post_init__`
  (ValueError) are re-raised as ConfigError prefixed with `config.<where>`.

  Args:
    cls: a dataclass type.
    cfg: the sub-config (a ConfigDict or a plain mapping).
    where: dotted path of `cfg` inside the root config, used in messages ('' for the root).
    strict: every field must be in the config, defaults or not (experiment configs: the
      config file is the one source of their values).

  Returns:
    An instance of `cls`.

  Raises:
    ConfigError: unknown key, missing required key or bad value; one line naming the key.
  """
  if not dataclasses.is_dataclass(cls):
    raise TypeError(f"from_config needs a dataclass type, got {cls!r}")
  where_text = f"config.{where}" if where else "config"
  if not isinstance(cfg, (Mapping, ml_collections.ConfigDict)):
    raise ConfigError(f"{where_text}={_short(cfg)}: must be a sub-config for {cls.__name__}")
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)
            if f.init and not f.metadata.get("derived", False)}
  allowed = ", ".join(sorted(fields))
  for key in cfg.keys():
    if key not in fields:
      raise ConfigError(f"config.{_join(where, key)}: unknown key (allowed: {allowed})")
  kwargs = {}
  for name, field in fields.items():
    if name not in cfg:
      if strict or (field.default is dataclasses.MISSING
                    and field.default_factory is dataclasses.MISSING):
        raise ConfigError(f"config.{_join(where, name)}: missing required key")
      continue
    kwargs[name] = _convert(hints[name], cfg[name], _join(where, name), strict)
  try:
    return cls(**kwargs)
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    raise ConfigError(f"{where_text}: {e}") from e


# ----------------------------------------------------------------------------------------
# Loading config files without absl (notebooks, tests).


def _load_module(path: str, name: str = "config"):
  file_path = path.split(":", 1)[0]
  if not file_path:
    raise ConfigError(f"--{name}: empty path to config file")
  if not os.path.isfile(file_path):
    raise ConfigError(f"--{name}={path}: config file not found")
  spec = importlib.util.spec_from_file_location(f"_rlm_jax_config_{abs(hash(file_path))}",
                                                file_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"--{name}={path}: file has no get_config() function")
  return module


def _call_get_config(module, path: str, name: str = "config") -> ml_collections.ConfigDict:
  parts = path.split(":", 1)
  cfg = module.get_config(*parts[1:])
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f"--{name}={path}: get_config() returned {type(cfg).__name__}, "
                      "expected an ml_collections.ConfigDict")
  return cfg


def _resolve(cfg: ml_collections.ConfigDict, dotted: str, root: str = "config"):
  """Returns (parent ConfigDict, leaf key) for `dotted`, or raises ConfigError naming it."""
  keys = dotted.split(".")
  node, walked = cfg, root
  for i, key in enumerate(keys):
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"{walked}.{key}: {walked} is a value, not a sub-config")
    if key not in node:
      allowed = ", ".join(sorted(node.keys()))
      raise ConfigError(f"{walked}.{key}: unknown key (allowed: {allowed})")
    if i == len(keys) - 1:
      return node, key
    node, walked = node[key], f"{walked}.{key}"
  raise AssertionError("unreachable")


_TRUE = ("true", "1", "yes", "t", "y")
_FALSE = ("false", "0", "no", "f", "n")


def _parse_value(text: str, field_type: Any, path: str) -> Any:
  """Parses command-line `text` for a field of type `field_type`."""
  def bad(what):
    return ConfigError(f"config.{path}={text!r}: {what}")

  if field_type is bool:
    if text.lower() in _TRUE:
      return True
    if text.lower() in _FALSE:
      return False
    raise bad("must be a bool (true or false)")
  if field_type is int:
    try:
      return int(text)
    except ValueError:
      raise bad("must be an int") from None
  if field_type is float:
    try:
      return float(text)
    except ValueError:
      raise bad("must be a float") from None
  if field_type is str:
    return text
  if isinstance(field_type, type) and issubclass(field_type, ml_collections.ConfigDict):
    raise bad("is a sub-config; override its keys one by one")
  # tuples, lists, None placeholders: Python literal syntax (never code execution).
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if field_type in (tuple, list):
      raise bad(f"must be a {field_type.__name__} literal like (1, 2)") from None
    return text
  if field_type in (tuple, list):
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return field_type(value)
  return value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Applies `a.b=value` overrides to `cfg` in place, keeping each field's type.

  Args:
    cfg: the root config (typically locked).
    overrides: strings `a.b=value`; a leading `--config.` or `config.` is accepted.

  Raises:
    ConfigError: unknown key or a value that does not parse as the field's type.
  """
  for item in overrides:
    text = item
    for prefix in ("--config.", "config."):
      if text.startswith(prefix):
        text = text[len(prefix):]
    if "=" not in text:
      raise ConfigError(f"override {item!r}: expected key=value")
    dotted, raw = text.split("=", 1)
    parent, key = _resolve(cfg, dotted)
    value = _parse_value(raw, parent.get_type(key), dotted)
    try:
      parent[key] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config.{dotted}={raw!r}: {e}") from e


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads a config file like `--config=path` does, for notebooks and tests.

  Imports the file, calls `get_config()` (text after a `:` in `path` is passed as its
  argument, as absl does), locks the result and applies `overrides`.

  Args:
    path: 'configs/x.py' or 'configs/x.py:arg'.
    overrides: strings 'a.b=value' (see `apply_overrides`).

  Returns:
    The locked ConfigDict.

  Raises:
    ConfigError: missing file, no get_config, unknown key or unparsable value.
  """
  module = _load_module(path)
  cfg = _call_get_config(module, path)
  cfg.lock()
  apply_overrides(cfg, overrides)
  return cfg


def import_config(name: str, near: str):
  """The config module `name` (e.g. 'main') from the folder of the file `near`.

  Config files share code this way: `configs/tiny.py` starts from
  `configlib.import_config('main', __file__).get_config()`. It works whatever the working
  directory and however the file itself was loaded (absl's --config or `load_config`).
  """
  return _load_module(os.path.join(os.path.dirname(os.path.abspath(near)), f"{name}.py"))


# ----------------------------------------------------------------------------------------
# absl entry point.


def _die(message: str) -> typing.NoReturn:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _config_flag_args(argv: Sequence[str], name: str) -> tuple[str | None, list[str]]:
  """Finds `--name=PATH` (or `--name PATH`) and the override keys `--name.a.b` in argv."""
  path, keys = None, []
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg == "--":
      break
    stripped = arg.lstrip("-")
    if not arg.startswith("-"):
      continue
    if stripped.startswith(name + "="):
      path = stripped.split("=", 1)[1]
    elif stripped == name and i + 1 < len(args):
      path = args[i + 1]
    elif stripped.startswith(name + "."):
      keys.append(stripped[len(name) + 1:].split("=", 1)[0])
  return path, keys


def _diagnose(argv: Sequence[str], name: str) -> str | None:
  """Names the culprit when absl/ml_collections failed on config flag `name`."""
  path, keys = _config_flag_args(argv, name)
  if path is None:
    return None
  try:
    module = _load_module(path, name)
    cfg = _call_get_config(module, path, name)
    for key in keys:
      _resolve(cfg, key, root=name)
  except ConfigError as e:
    return str(e)
  return None


def _config_flag_names() -> list[str]:
  from absl import flags
  from ml_collections.config_flags import config_flags as cf
  return [n for n in flags.FLAGS if cf.is_config_flag(flags.FLAGS[n])]


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flags parser that reports config-flag errors as one line and exits(2)."""
  from absl import flags
  names = _config_flag_names()
  try:
    rest = flags.FLAGS(list(argv))
  except flags.Error as e:
    msg = None
    for name in names:
      msg = msg or _diagnose(argv, name)
    _die(msg or str(e))
  except Exception:  # unknown override keys surface as bare AttributeError/KeyError.
    msg = None
    for name in names:
      msg = msg or _diagnose(argv, name)
    if msg is None:
      raise
    _die(msg)
  for name in names:
    value = flags.FLAGS[name].value
    if value is not None and not isinstance(value, ml_collections.ConfigDict):
      # A missing config file is only reported on first access; report it now.
      _die(_diagnose(argv, name) or f"--{name}: could not load config ({type(value).__name__})")
  return rest


def run_main(main_fn: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> None:
  """`absl.app.run(main_fn)` with one-line errors for bad configs.

  Flag errors (unknown `--config.a.b`, unparsable value, missing config file) and
  `ConfigError` raised inside `main_fn` print `error: <one line>` on stderr and exit with
  status 2.

  Args:
    main_fn: `main(argv)` as for absl.
    argv: defaults to sys.argv.
  """
  from absl import app

  def wrapped(args):
    try:
      return main_fn(args)
    except ConfigError as e:
      _die(str(e))

  app.run(wrapped, argv=argv, flags_parser=parse_flags)
