"""Task dicts -> fixed-shape token arrays for SFT, RL prompts and on-device rewards.

Layout of one reasoning trace with the default `PromptFormat` (the step delimiter is a token,
`tok.step_id`):

  prompt     = BOS problem STEP
  completion = step_1 STEP step_2 STEP ... "Answer: X" EOS

With `PromptFormat(chat_template=True, ...)` the prompt is the HF tokenizer's own chat
template applied to [system?, user] messages with `add_generation_prompt=True` (it ends with
the assistant turn's header, no STEP). An HF tokenizer's completion is the steps joined by the
delimiter text and encoded as one text (`HFTokenizer.encode_trace`), so its tokens are those a
pretrained model reads and writes; the character tokenizer keeps one STEP token per step.

`prompt_ids` / `prompt_text` are the one place a problem becomes a prompt: SFT, RL, evaluation,
solve and search all call them (directly or through `encode_prompts` / `encode_sft`) with the
run's `PromptFormat`, so every phase sees the same prompts.

All arrays are numpy (host side); the training loop moves whole batches to device at once.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from rlm_jax.data.tokenizer import Tokenizer, pad_batch


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """How a task's problem becomes a prompt. The default reproduces `BOS problem STEP`.

  chat_template: apply the HF tokenizer's chat template (`tokenizer.chat_template`); the
    character tokenizer has none, which is an error.
  system_prompt: a system message ('' = none; the template may add its own default).
    Without the chat template it is a line before the problem.
  instruction: text after the problem on its own line, in the user message (e.g. "Solve step
    by step. End with 'Answer: <number>'.").
  """

  chat_template: bool = False
  system_prompt: str = ''
  instruction: str = ''


DEFAULT_FORMAT = PromptFormat()


def _user_text(task: dict, fmt: PromptFormat) -> str:
  return task['problem'] + ('\n' + fmt.instruction if fmt.instruction else '')


def chat_messages(task: dict, fmt: PromptFormat) -> list[dict]:
  """The [system?, user] messages of `task` (conversational prompts, e.g. for reward functions)."""
  system = [{'role': 'system', 'content': fmt.system_prompt}] if fmt.system_prompt else []
  return system + [{'role': 'user', 'content': _user_text(task, fmt)}]


def prompt_text(tok: Tokenizer, task: dict, fmt: PromptFormat = DEFAULT_FORMAT) -> str:
  """The prompt as text (special tokens of the chat template included, BOS/STEP not)."""
  if fmt.chat_template:
    apply = getattr(tok, 'apply_chat_template', None)
    if apply is None:
      raise ValueError(f"tokenizer.chat_template=True needs tokenizer.kind='hf': "
                       f'{type(tok).__name__} has no chat template')
    return apply(chat_messages(task, fmt), add_generation_prompt=True)
  user = _user_text(task, fmt)
  return fmt.system_prompt + '\n' + user if fmt.system_prompt else user


def prompt_ids(tok: Tokenizer, task: dict, fmt: PromptFormat = DEFAULT_FORMAT) -> list[int]:
  """Token ids of `task`'s prompt: `BOS text STEP`, or the chat template's tokens."""
  text = prompt_text(tok, task, fmt)
  if fmt.chat_template:  # the template writes its own BOS / turn markers
    return tok.encode(text)
  return tok.encode(text, bos=True) + [tok.step_id]


def completion_ids(tok: Tokenizer, steps: Sequence[str]) -> list[int]:
  """Token ids of a full trace: steps with their delimiters, the last closed by EOS."""
  return tok.encode_trace(steps, final=True)[0]


def encode_prompts(tok: Tokenizer, tasks: Sequence[dict], length: int,
                   fmt: PromptFormat = DEFAULT_FORMAT) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded prompts `[B, length]` and their mask (sampler input)."""
  return pad_batch([prompt_ids(tok, t, fmt) for t in tasks], length, tok.pad_id, side='left', what='prompt')


def encode_sft(tok: Tokenizer, tasks: Sequence[dict], length: int, fmt: PromptFormat = DEFAULT_FORMAT,
               *, step_ends: bool = False) -> dict[str, np.ndarray]:
  """Right-padded prompt+completion sequences for completion-only cross-entropy.

  Args:
    tok: the tokenizer.
    tasks: task dicts with `steps`.
    length: padded length L (prompt + completion).
    fmt: the prompt format.
    step_ends: also return `step_end` (see below).

  Returns:
    dict with `tokens` [B, L] int32, `mask` [B, L] (real tokens), `loss_mask` [B, L] (1 where
    the *next* token is a completion token, i.e. aligned with logits[:, :-1] predicting
    tokens[:, 1:]); with `step_ends`, `step_end` [B, L] bool: True on the token that closes
    each step (its delimiter's last token, or the EOS), where a PRM label sits.
  """
  rows, starts, ends = [], [], []
  for t in tasks:
    p = prompt_ids(tok, t, fmt)
    ids, e = tok.encode_trace(t['steps'], final=True)
    rows.append(p + ids)
    starts.append(len(p))
    ends.append([len(p) + i for i in e])
  tokens, mask = pad_batch(rows, length, tok.pad_id, side='right', what='SFT sequence')
  pos = np.arange(length)[None, :]
  target_is_completion = (pos + 1 >= np.asarray(starts)[:, None]) & np.roll(mask, -1, axis=1)
  target_is_completion[:, -1] = False
  out = {'tokens': tokens, 'mask': mask, 'loss_mask': target_is_completion}
  if step_ends:
    end = np.zeros((len(rows), length), bool)
    for i, e in enumerate(ends):
      end[i, e] = True
    out['step_end'] = end
  return out


def encode_answers(tok: Tokenizer, answers: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
  """Token ids of each canonical final step ("Answer: X"), right-padded, and their lengths."""
  rows = [tok.encode(a) for a in answers]
  tokens, _ = pad_batch(rows, length, tok.pad_id, side='right', what='answer')
  return tokens, np.asarray([len(r) for r in rows], np.int32)
