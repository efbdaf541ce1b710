"""Prompt formats (plain and chat template) and SFT encoding with step ends, on hand-known ids."""
import numpy as np
import pytest

from rlm_jax.data import encoding
from rlm_jax.data import tokenizer as tk

CHAR = tk.CharTokenizer()
TASK = {'problem': 'What is 2+3?', 'steps': ['2+3=5', 'Answer: 5']}
FMT = encoding.PromptFormat(chat_template=True, system_prompt='Be brief.', instruction="End with 'Answer: N'.")


def test_default_format_is_bos_problem_step():
  ids = encoding.prompt_ids(CHAR, TASK)
  assert ids == [CHAR.bos_id] + CHAR.encode('What is 2+3?') + [CHAR.step_id]
  assert ids == encoding.prompt_ids(CHAR, TASK, encoding.PromptFormat())
  tokens, mask = encoding.encode_prompts(CHAR, [TASK], 16)
  np.testing.assert_array_equal(tokens[0, -len(ids):], ids)
  assert mask.sum() == len(ids) == 14


def test_plain_format_with_system_and_instruction():
  fmt = encoding.PromptFormat(system_prompt='Be brief.', instruction='Show steps.')
  assert encoding.prompt_text(CHAR, TASK, fmt) == 'Be brief.\nWhat is 2+3?\nShow steps.'
  assert encoding.prompt_ids(CHAR, TASK, fmt) == [1] + CHAR.encode('Be brief.\nWhat is 2+3?\nShow steps.') + [3]


def test_chat_template_prompt(split_bpe):
  t = tk.HFTokenizer(split_bpe)
  text = encoding.prompt_text(t, TASK, FMT)
  assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?\nEnd with 'Answer: N'."
                  '<|im_end|>\n<|im_start|>assistant\n')
  ids = encoding.prompt_ids(t, TASK, FMT)
  start, end = t.hf.convert_tokens_to_ids(['<|im_start|>', '<|im_end|>'])
  assert ids[0] == start and ids.count(start) == 3 and ids.count(end) == 2  # specials parsed, no BOS added
  assert t.decode(ids, strip_special=False) == text
  no_system = encoding.PromptFormat(chat_template=True)
  assert encoding.prompt_text(t, TASK, no_system).startswith('<|im_start|>user\nWhat is 2+3?<|im_end|>')
  assert encoding.chat_messages(TASK, FMT)[0] == {'role': 'system', 'content': 'Be brief.'}


def test_chat_template_errors(merge_bpe):
  with pytest.raises(ValueError, match=r"tokenizer.chat_template=True needs tokenizer.kind='hf'"):
    encoding.prompt_ids(CHAR, TASK, FMT)
  with pytest.raises(ValueError, match=r'tokenizer.chat_template=True: the tokenizer in .* has no chat template'):
    encoding.prompt_ids(tk.HFTokenizer(merge_bpe), TASK, FMT)


def test_sft_char_step_ends_and_loss_mask():
  enc = encoding.encode_sft(CHAR, [TASK], 32, step_ends=True)
  p = len(encoding.prompt_ids(CHAR, TASK))  # 14
  # completion: '2+3=5' STEP 'Answer: 5' EOS -> STEP at p + 5, EOS at p + 15
  np.testing.assert_array_equal(np.flatnonzero(enc['step_end'][0]), [p + 5, p + 15])
  assert enc['tokens'][0, p + 5] == CHAR.step_id and enc['tokens'][0, p + 15] == CHAR.eos_id
  np.testing.assert_array_equal(np.flatnonzero(enc['loss_mask'][0]), np.arange(p - 1, p + 15))
  assert 'step_end' not in encoding.encode_sft(CHAR, [TASK], 32)


def test_sft_bpe_trace_is_one_text(split_bpe):
  t = tk.HFTokenizer(split_bpe)
  task = {'problem': 'Tom?', 'steps': ['Tom has 3 apples.', 'He buys 2 more.', 'Answer: 5']}
  enc = encoding.encode_sft(t, [task], 96, FMT, step_ends=True)
  p = len(encoding.prompt_ids(t, task, FMT))
  comp, ends = t.encode_trace(task['steps'])
  np.testing.assert_array_equal(enc['tokens'][0, p:p + len(comp)], comp)
  np.testing.assert_array_equal(np.flatnonzero(enc['step_end'][0]), [p + 6, p + 13, p + 18])
  assert t.decode(enc['tokens'][0, p:p + 14]) == 'Tom has 3 apples.\n\nHe buys 2 more.\n\n'
  assert encoding.completion_ids(t, task['steps']) == comp
