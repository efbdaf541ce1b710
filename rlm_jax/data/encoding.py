"""Task dicts -> fixed-shape token arrays for SFT, RL prompts and on-device rewards.

Layout of one reasoning trace (the step delimiter is a token, `tok.step_id`):

  prompt     = BOS problem STEP
  completion = step_1 STEP step_2 STEP ... "Answer: X" EOS

All arrays are numpy (host side); the training loop moves whole batches to device at once.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rlm_jax.data.tokenizer import Tokenizer, pad_batch


def prompt_ids(tok: Tokenizer, task: dict) -> list[int]:
  return tok.encode(task['problem'], bos=True) + [tok.step_id]


def completion_ids(tok: Tokenizer, steps: Sequence[str]) -> list[int]:
  ids: list[int] = []
  for i, step in enumerate(steps):
    ids += tok.encode(step) + [tok.eos_id if i == len(steps) - 1 else tok.step_id]
  return ids


def encode_prompts(tok: Tokenizer, tasks: Sequence[dict], length: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded prompts `[B, length]` and their mask (sampler input)."""
  return pad_batch([prompt_ids(tok, t) for t in tasks], length, tok.pad_id, side='left', what='prompt')


def encode_sft(tok: Tokenizer, tasks: Sequence[dict], length: int) -> dict[str, np.ndarray]:
  """Right-padded prompt+completion sequences for completion-only cross-entropy.

  Returns dict with `tokens` [B, length], `mask` (real tokens), `loss_mask` (1 where the
  *next* token is a completion token, i.e. aligned with logits[:, :-1] predicting tokens[:, 1:]).
  """
  rows, starts = [], []
  for t in tasks:
    p = prompt_ids(tok, t)
    rows.append(p + completion_ids(tok, t['steps']))
    starts.append(len(p))
  tokens, mask = pad_batch(rows, length, tok.pad_id, side='right', what='SFT sequence')
  pos = np.arange(length)[None, :]
  target_is_completion = (pos + 1 >= np.asarray(starts)[:, None]) & np.roll(mask, -1, axis=1)
  target_is_completion[:, -1] = False
  return {'tokens': tokens, 'mask': mask, 'loss_mask': target_is_completion}


def encode_answers(tok: Tokenizer, answers: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
  """Token ids of each canonical final step ("Answer: X"), right-padded, and their lengths."""
  rows = [tok.encode(a) for a in answers]
  tokens, _ = pad_batch(rows, length, tok.pad_id, side='right', what='answer')
  return tokens, np.asarray([len(r) for r in rows], np.int32)
