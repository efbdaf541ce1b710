"""Tokenizers behind one interface: a built-in character tokenizer and local HF tokenizers.

Both expose the same attributes (`vocab_size`, `pad_id`, `bos_id`, `eos_id`, `step_id`) and
methods (`encode`, `decode`, `encode_steps`), so data, sampling and search code never asks
which one it has. A reasoning *step* ends with the step-delimiter token `step_id`; the final
step ends with EOS.

With a BPE tokenizer the delimiter text ('\n\n') is one token alone but merges or splits
inside text (`'x\n\nThe'` can be `x`, `\n`, `\n`, `The`). `encode_trace` therefore encodes a
trace as one text and finds each step's end by character offsets: the end of a step is the
token holding the last character of its delimiter (`rlm_jax.data.steps` finds the same ends in
generated tokens).
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence

import numpy as np


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  step_id: int

  def encode(self, text: str, *, bos: bool = False) -> list[int]: ...

  def decode(self, ids: Sequence[int], *, strip_special: bool = True) -> str: ...

  def encode_trace(self, steps: Sequence[str], *, final: bool = True) -> tuple[list[int], list[int]]: ...


class CharTokenizer:
  """Printable-ASCII characters plus PAD, BOS, EOS and a step delimiter.

  Ids: 0 PAD, 1 BOS, 2 EOS, 3 STEP, then the 95 printable ASCII characters (space..'~'), then
  '\\n'. `vocab_size` is rounded up to a multiple of 8 (spare ids are never produced). Characters
  outside the table raise an error naming the character.
  """

  PAD, BOS, EOS, STEP = 0, 1, 2, 3
  _SPECIAL_TEXT = {PAD: '', BOS: '', EOS: '', STEP: '\n'}

  def __init__(self):
    chars = [chr(c) for c in range(32, 127)] + ['\n']
    self._char_to_id = {c: i + 4 for i, c in enumerate(chars)}
    self._id_to_char = {i: c for c, i in self._char_to_id.items()}
    self.vocab_size = -(-(len(chars) + 4) // 8) * 8
    self.pad_id, self.bos_id, self.eos_id, self.step_id = self.PAD, self.BOS, self.EOS, self.STEP

  def encode(self, text: str, *, bos: bool = False) -> list[int]:
    ids = [self.bos_id] if bos else []
    for pos, ch in enumerate(text):
      i = self._char_to_id.get(ch)
      if i is None:
        raise ValueError(f'CharTokenizer: character {ch!r} at position {pos} is not in the vocabulary')
      ids.append(i)
    return ids

  def decode(self, ids: Sequence[int], *, strip_special: bool = True) -> str:
    out = []
    for i in ids:
      i = int(i)
      if i in self._id_to_char:
        out.append(self._id_to_char[i])
      elif not strip_special:
        out.append({self.PAD: '<pad>', self.BOS: '<bos>', self.EOS: '<eos>', self.STEP: '<step>'}.get(i, '<unk>'))
      elif i == self.STEP:
        out.append('\n')
    return ''.join(out)

  def encode_steps(self, steps: Sequence[str], *, final: bool = True) -> list[int]:
    return encode_steps(self, steps, final=final)

  def encode_trace(self, steps: Sequence[str], *, final: bool = True) -> tuple[list[int], list[int]]:
    """Steps each closed by the STEP token (the last by EOS with `final`), and those positions."""
    ids = encode_steps(self, steps, final=final)
    return ids, [i for i, t in enumerate(ids) if t in (self.step_id, self.eos_id)]


class HFTokenizer:
  """A Hugging Face tokenizer loaded from a local folder (never from the hub).

  Args:
    path: folder with tokenizer.json / tokenizer_config.json (e.g. next to a checkpoint).
    step_delimiter: text whose single token ends a reasoning step (default '\\n\\n'). It must
      encode to exactly one token; otherwise pass a token that does.
  """

  def __init__(self, path: str, step_delimiter: str = '\n\n'):
    if not os.path.isdir(path):
      raise FileNotFoundError(f'tokenizer folder not found: {path}')
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

    self.hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
    self.vocab_size = len(self.hf)
    self.eos_id = self.hf.eos_token_id
    if self.eos_id is None:
      raise ValueError(f'tokenizer in {path} has no eos token')
    self.bos_id = self.hf.bos_token_id if self.hf.bos_token_id is not None else self.eos_id
    self.pad_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_id
    step = self.hf.encode(step_delimiter, add_special_tokens=False)
    if len(step) != 1:
      raise ValueError(f'step delimiter {step_delimiter!r} is {len(step)} tokens in {path}; it must be one')
    self.step_id = step[0]
    self.step_delimiter = step_delimiter
    self.path = path

  def encode(self, text: str, *, bos: bool = False) -> list[int]:
    ids = self.hf.encode(text, add_special_tokens=False)
    return ([self.bos_id] if bos else []) + ids

  def decode(self, ids: Sequence[int], *, strip_special: bool = True) -> str:
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=strip_special)

  def encode_steps(self, steps: Sequence[str], *, final: bool = True) -> list[int]:
    return encode_steps(self, steps, final=final)

  def encode_trace(self, steps: Sequence[str], *, final: bool = True) -> tuple[list[int], list[int]]:
    """A trace encoded as one text (steps joined by the delimiter), and where each step ends.

    Args:
      steps: step texts (without delimiters).
      final: close the last step with EOS (else with a delimiter, as a partial trace).

    Returns:
      (ids, ends): token ids of `step_1 DELIM step_2 ... step_n` (+ EOS with `final`, + DELIM
      without), and for each step the index in `ids` of its end token: the token holding the
      last character of its delimiter, or the EOS. Merges across a delimiter (`'.\n\n'`) and
      splits of it (`'\n'`, `'\n'`) are both handled; a delimiter inside a step's own text
      is not a step end.
    """
    if not steps:
      return [], []
    d = self.step_delimiter
    text = d.join(steps) + ('' if final else d)
    # Character index of the last character of each step's delimiter.
    last_chars, pos = [], 0
    for i, step in enumerate(steps):
      pos += len(step)
      if i < len(steps) - 1 or not final:
        last_chars.append(pos + len(d) - 1)
        pos += len(d)
    if not getattr(self.hf, 'is_fast', False):
      raise ValueError(f'tokenizer in {self.path} is not a fast tokenizer; step offsets need tokenizer.json')
    enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc['input_ids']), enc['offset_mapping']
    ends, t = [], 0
    for c in last_chars:
      # First token whose span reaches past c. Trimmed offsets (whitespace-only tokens with an
      # empty span) cannot hold c, so the scan moves on to the next token that does.
      while t < len(ids) and offsets[t][1] <= c:
        t += 1
      if t == len(ids):
        raise ValueError(f'tokenizer in {self.path}: no token covers character {c} of a trace')
      ends.append(t)
    if final:
      ids.append(self.eos_id)
      ends.append(len(ids) - 1)
    return ids, ends

  def apply_chat_template(self, messages, **kwargs):
    if not getattr(self.hf, 'chat_template', None):
      raise ValueError(f'tokenizer.chat_template=True: the tokenizer in {self.path} has no chat template')
    return self.hf.apply_chat_template(messages, tokenize=False, **kwargs)


def encode_steps(tok: Tokenizer, steps: Sequence[str], *, final: bool = True) -> list[int]:
  """Encodes steps, each followed by the step delimiter; with `final` the last ends with EOS."""
  ids: list[int] = []
  for i, step in enumerate(steps):
    ids += tok.encode(step)
    ids.append(tok.eos_id if final and i == len(steps) - 1 else tok.step_id)
  return ids


def pad_batch(
    rows: Sequence[Sequence[int]], length: int, pad_id: int, *, side: str = 'left', what: str = 'row'
) -> tuple[np.ndarray, np.ndarray]:
  """Pads token lists to `[B, length]`; returns (tokens, mask). Too long a row is an error."""
  if side not in ('left', 'right'):
    raise ValueError(f"side='{side}': must be 'left' or 'right'")
  tokens = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), bool)
  for i, row in enumerate(rows):
    n = len(row)
    if n > length:
      raise ValueError(f'{what} {i} has {n} tokens, more than the padded length {length}')
    sl = slice(length - n, length) if side == 'left' else slice(0, n)
    tokens[i, sl] = row
    mask[i, sl] = True
  return tokens, mask


def load_tokenizer(kind: str, path: str = '', step_delimiter: str = '\n\n') -> Tokenizer:
  """`kind` 'char' -> CharTokenizer; 'hf' -> HFTokenizer(path)."""
  if kind == 'char':
    return CharTokenizer()
  if kind == 'hf':
    return HFTokenizer(path, step_delimiter)
  raise ValueError(f"tokenizer.kind='{kind}': must be one of 'char', 'hf'")
