"""Where a reasoning step ends in generated tokens, decided from decoded text.

A BPE tokenizer has a token for the delimiter text ('\\n\\n') alone, but inside text the
delimiter merges with its neighbours ('.\\n\\n' in Qwen's vocabulary) or splits (SmolLM2 writes
'x\\n\\nThe' as `x`, `\\n`, `\\n`, `The`). So a step end is a token whose text *contains* the
delimiter (`step_table`), or a token that completes a delimiter begun by the previous one
(`split_tables`: the previous token's text ends with a prefix of the delimiter, this one's
starts with the rest). The character tokenizer has a STEP token and nothing else counts.

The tables are host numpy arrays built once per tokenizer; `is_step_end` is the jittable test
(per generated token, given the token before it) and `step_end_mask` applies it along whole
sequences. Together they find the same ends as `HFTokenizer.encode_trace` does in SFT traces,
except that a delimiter spread over three or more tokens is not seen (no vocabulary we use
splits '\\n\\n' further than two '\\n').

`StepEnds` bundles the three tables (`StepEnds.of(tok)`, cached per tokenizer) and is what the
sampler, the RL step layouts, PRM targets, rewards and search take. Code that has only a
delimiter id (toy search tasks, older call sites) passes the int: `as_step_ends(step_id)` is
the table of that one id, so the test is then exactly `tokens == step_id`.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from rlm_jax.data.tokenizer import CharTokenizer, Tokenizer


def _token_texts(tok: Tokenizer) -> list[str]:
  """Decoded text of every id alone (special tokens: '')."""
  hf = tok.hf  # only HF tokenizers get here
  return hf.batch_decode([[i] for i in range(tok.vocab_size)], skip_special_tokens=True)


def step_table(tok: Tokenizer) -> np.ndarray:
  """`[V]` bool: True for the ids whose decoded text contains the step delimiter.

  Args:
    tok: a `CharTokenizer` (only its STEP token) or an `HFTokenizer` (its `step_delimiter`).

  Returns:
    bool array of length `tok.vocab_size`; special tokens (EOS, PAD, ...) are False.
  """
  table = np.zeros(tok.vocab_size, bool)
  if isinstance(tok, CharTokenizer):
    table[tok.step_id] = True
    return table
  d = tok.step_delimiter
  for i, text in enumerate(_token_texts(tok)):
    table[i] = d in text
  return table


def split_tables(tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """Tables for a delimiter split across two tokens.

  Returns:
    (ends_KxV, starts_KxV), K = len(delimiter) - 1 (0 rows for the character tokenizer):
    `ends_KxV[k, i]` is True when token i's text ends with `delimiter[:k + 1]`,
    `starts_KxV[k, i]` when it starts with `delimiter[k + 1:]`. Token t after token p closes
    a delimiter when `ends_KxV[k, p] & starts_KxV[k, t]` for some k.
  """
  if isinstance(tok, CharTokenizer):
    return np.zeros((0, tok.vocab_size), bool), np.zeros((0, tok.vocab_size), bool)
  d = tok.step_delimiter
  texts = _token_texts(tok)
  k = len(d) - 1
  ends = np.zeros((k, tok.vocab_size), bool)
  starts = np.zeros((k, tok.vocab_size), bool)
  for i, text in enumerate(texts):
    if not text:
      continue
    for j in range(k):
      ends[j, i] = text.endswith(d[:j + 1])
      starts[j, i] = text.startswith(d[j + 1:])
  return ends, starts


def is_step_end(tables, prev_B: jnp.ndarray, tok_B: jnp.ndarray) -> jnp.ndarray:
  """Whether each token `tok_B` ends a step, given the token before it (jittable).

  Args:
    tables: (table_V, ends_KxV, starts_KxV) from `step_table` and `split_tables` (numpy or
      device arrays).
    prev_B: the previous token of each row *within the current step*. Pass the PAD id (or
      any special token) for a step's first token, so that a delimiter is never completed
      by the prompt's last token or counted twice (`'\n'`, `'\n'`, `'\n'` has one end).
    tok_B: the current token of each row.

  Returns:
    bool [B].
  """
  return StepEnds(*tables, pad_id=-1).is_end(prev_B, tok_B)


def step_end_mask(tables, tokens_BxT: jnp.ndarray, mask_BxT: jnp.ndarray, pad_id: int) -> jnp.ndarray:
  """`is_step_end` along completions, each step starting fresh after the previous end.

  Args:
    tables: as in `is_step_end`.
    tokens_BxT: completion tokens (the prompt excluded).
    mask_BxT: real (non-padding) completion tokens.
    pad_id: a special token id (text '') that stands for "no previous token".

  Returns:
    bool [B, T]: True on each token that closes a step delimiter (EOS is not included).
  """
  tokens_TxB = jnp.asarray(tokens_BxT).T
  mask_TxB = jnp.asarray(mask_BxT, bool).T

  def body(prev_B, x):
    tok_B, m_B = x
    end_B = is_step_end(tables, prev_B, tok_B) & m_B
    # After an end (or at padding) the next token has no predecessor in its step.
    return jnp.where(end_B | ~m_B, pad_id, tok_B), end_B

  init_B = jnp.full(tokens_TxB.shape[1:], pad_id, tokens_TxB.dtype)
  _, end_TxB = jax.lax.scan(body, init_B, (tokens_TxB, mask_TxB))
  return end_TxB.T


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: usable in static configs
class StepEnds:
  """The step-end tables of one tokenizer (a pytree; also hashable, as a static constant).

  Attributes:
    table_V: bool [V'], ids whose text contains the delimiter (V' <= V: ids past the table
      are never ends).
    ends_KxV, starts_KxV: bool [K, V] split tables (`split_tables`); K = 0 when the
      delimiter is one token that never merges or splits (the character tokenizer).
    pad_id: a special token (text '') standing for "no previous token in this step".
  """

  table_V: np.ndarray
  ends_KxV: np.ndarray
  starts_KxV: np.ndarray
  pad_id: int

  @classmethod
  def of(cls, tok: Tokenizer) -> 'StepEnds':
    """The tables of `tok`, built once per tokenizer object (an HF vocabulary is decoded once)."""
    ends = _CACHE.get(tok)
    if ends is None:
      ends = cls(step_table(tok), *split_tables(tok), pad_id=int(tok.pad_id))
      _CACHE[tok] = ends
    return ends

  def __repr__(self):  # the tables are too long to print (V ~ 50k for real vocabularies)
    ids = f', ends={int(self.table_V.sum())} ids' if isinstance(self.table_V, np.ndarray) else ''
    return f'StepEnds(V={self.table_V.shape[0]}{ids}, K={self.ends_KxV.shape[0]}, pad_id={self.pad_id})'

  @property
  def splits(self) -> bool:
    """Whether a delimiter can span two tokens (then the test needs the previous token)."""
    return self.ends_KxV.shape[0] > 0

  def is_end(self, prev_B: jax.Array, tok_B: jax.Array) -> jax.Array:
    """`is_step_end` (jittable): bool [B]; `prev_B` is the previous token of the current step
    (`pad_id` for its first token); out-of-vocabulary ids (e.g. -1 fillers) are never ends."""
    end_B = _lookup(self.table_V, tok_B)
    if self.splits:
      ends_KxV, starts_KxV = jnp.asarray(self.ends_KxV), jnp.asarray(self.starts_KxV)
      v = ends_KxV.shape[1]
      in_vocab_B = (tok_B >= 0) & (tok_B < v) & (prev_B >= 0) & (prev_B < v)
      pair_KxB = ends_KxV[:, jnp.clip(prev_B, 0, v - 1)] & starts_KxV[:, jnp.clip(tok_B, 0, v - 1)]
      end_B = end_B | (jnp.any(pair_KxB, axis=0) & in_vocab_B)
    return end_B

  def mask(self, tokens_BxT: jax.Array, mask_BxT: jax.Array | None = None) -> jax.Array:
    """`step_end_mask` (jittable): bool [B, T], True on each token that closes a delimiter.

    Args:
      tokens_BxT: tokens of steps (no prompt: each row starts a step at column 0).
      mask_BxT: real tokens (None: all); padding never ends a step and restarts the next one.
    """
    tokens_BxT = jnp.asarray(tokens_BxT)
    m_BxT = jnp.ones(tokens_BxT.shape, bool) if mask_BxT is None else jnp.asarray(mask_BxT, bool)
    if not self.splits:  # one id per end: no scan over tokens
      return _lookup(self.table_V, tokens_BxT) & m_BxT
    return step_end_mask((self.table_V, self.ends_KxV, self.starts_KxV), tokens_BxT, m_BxT, self.pad_id)


def _lookup(table_V, ids):
  """table_V[ids], False for ids outside [0, V) (jnp.take would wrap negative ids)."""
  table_V = jnp.asarray(table_V)
  v = table_V.shape[0]
  ids = jnp.asarray(ids)
  return table_V[jnp.clip(ids, 0, v - 1)] & (ids >= 0) & (ids < v)


jax.tree_util.register_dataclass(StepEnds, data_fields=['table_V', 'ends_KxV', 'starts_KxV'],
                                 meta_fields=['pad_id'])

_CACHE: 'weakref.WeakKeyDictionary[Tokenizer, StepEnds]' = weakref.WeakKeyDictionary()


@functools.lru_cache(maxsize=64)
def _single(step_id: int) -> StepEnds:
  table = np.zeros(max(step_id + 1, 1), bool)
  if step_id >= 0:
    table[step_id] = True
  empty = np.zeros((0, table.shape[0]), bool)
  return StepEnds(table, empty, empty, pad_id=-1)


def as_step_ends(step: 'StepEnds | int') -> StepEnds:
  """`step` itself, or for a delimiter id the tables of that one id (a negative id: no ends)."""
  if isinstance(step, StepEnds):
    return step
  if isinstance(step, (int, np.integer)) and not isinstance(step, bool):
    return _single(int(step))
  raise TypeError(f'step delimiter must be a StepEnds or a token id, got {type(step).__name__}')
