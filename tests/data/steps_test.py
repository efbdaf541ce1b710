"""Step ends on BPE tokenizers whose delimiter splits or merges: SFT traces and the stop tables."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlm_jax.data import steps as steps_lib
from rlm_jax.data import tokenizer as tk

TRACE = ['Tom has 3 apples.', 'He buys 2 more.', 'Answer: 5']  # the traces conftest's tokenizers saw


def _texts(t, ids):
  return [t.decode([i], strip_special=False) for i in ids]


def test_trace_ends_when_the_delimiter_splits(split_bpe):
  t = tk.HFTokenizer(split_bpe)
  ids, ends = t.encode_trace(TRACE)
  assert _texts(t, ids) == ['Tom', ' has', ' 3', ' apples', '.', '\n', '\n', 'He', ' buys', ' 2', ' more', '.',
                            '\n', '\n', 'Answ', 'er', ':', ' 5', '</s>']
  assert ends == [6, 13, 18]  # the second '\n' of each delimiter, then EOS
  assert t.step_id not in ids  # per-step encoding would have put the '\n\n' token there
  assert t.decode(ids) == '\n\n'.join(TRACE)
  partial, pends = t.encode_trace(TRACE[:2], final=False)
  # A trailing delimiter is the '\n\n' token itself (end of text); a partial trace has no EOS.
  assert _texts(t, partial)[-3:] == [' more', '.', '\n\n'] and pends == [6, len(partial) - 1]
  assert t.decode(partial) == TRACE[0] + '\n\n' + TRACE[1] + '\n\n'


def test_trace_ends_when_the_delimiter_merges(merge_bpe):
  t = tk.HFTokenizer(merge_bpe)
  ids, ends = t.encode_trace(TRACE)
  texts = _texts(t, ids)
  assert texts == ['To', 'm ', 'has ', '3 ap', 'ples', '.\n\nHe ', 'bu', 'ys ', '2 mo', 're.\n\n', 'An', 'sw', 'er',
                   ': ', '5', '</s>']
  assert ends == [5, 9, 15]  # the token holding each delimiter's last character


def test_step_tables(split_bpe, merge_bpe):
  split = tk.HFTokenizer(split_bpe)
  np.testing.assert_array_equal(np.flatnonzero(steps_lib.step_table(split)), [split.step_id])
  ends, starts = steps_lib.split_tables(split)
  nl = split.encode('\n')
  assert ends.shape == starts.shape == (1, split.vocab_size) and len(nl) == 1
  assert ends[0, nl[0]] and starts[0, nl[0]] and not ends[0, split.eos_id]
  merge = tk.HFTokenizer(merge_bpe)
  hits = {merge.decode([i]) for i in np.flatnonzero(steps_lib.step_table(merge))}
  assert {'\n\n', '.\n\nHe ', 're.\n\n'} <= hits and all('\n\n' in h for h in hits)
  char = tk.CharTokenizer()
  np.testing.assert_array_equal(np.flatnonzero(steps_lib.step_table(char)), [char.step_id])
  assert steps_lib.split_tables(char)[0].shape == (0, char.vocab_size)


@pytest.mark.parametrize('which', ['split', 'merge', 'char'])
def test_step_end_mask_agrees_with_trace_ends(which, split_bpe, merge_bpe):
  t = {'split': lambda: tk.HFTokenizer(split_bpe), 'merge': lambda: tk.HFTokenizer(merge_bpe),
       'char': tk.CharTokenizer}[which]()
  tables = (steps_lib.step_table(t), *steps_lib.split_tables(t))
  rows = [t.encode_trace(TRACE), t.encode_trace(TRACE[1:])]
  length = max(len(ids) for ids, _ in rows) + 2
  tokens, mask = tk.pad_batch([ids for ids, _ in rows], length, t.pad_id, side='right')
  got = jax.jit(steps_lib.step_end_mask, static_argnums=3)(tables, tokens, mask, t.pad_id)
  want = np.zeros_like(mask)
  for i, (_, ends) in enumerate(rows):
    want[i, ends[:-1]] = True  # EOS closes the last step; the tables do not cover it
  np.testing.assert_array_equal(np.asarray(got), want)


def test_a_delimiter_is_counted_once(split_bpe):
  t = tk.HFTokenizer(split_bpe)
  tables = (steps_lib.step_table(t), *steps_lib.split_tables(t))
  nl = t.encode('\n')[0]
  x = t.encode('x')[0]
  # '\n' x4 is two delimiters; '\n\n' then '\n' is one; a step's first '\n' never closes one.
  tokens = np.array([[nl, nl, nl, nl, x], [t.step_id, nl, x, nl, nl]])
  got = steps_lib.step_end_mask(tables, tokens, np.ones_like(tokens, bool), t.pad_id)
  np.testing.assert_array_equal(np.asarray(got), [[0, 1, 0, 1, 0], [1, 0, 0, 0, 1]])
  one = steps_lib.is_step_end(tables, jnp.array([t.pad_id, nl, x]), jnp.array([nl, nl, nl]))
  np.testing.assert_array_equal(np.asarray(one), [False, True, False])


@pytest.mark.parametrize('which', ['split', 'merge', 'char'])
def test_step_ends_object_matches_the_tables(which, split_bpe, merge_bpe):
  """`StepEnds.of(tok)` is built once per tokenizer and finds the trace ends, also as a jit
  argument (a pytree) and as a closed-over constant."""
  t = {'split': lambda: tk.HFTokenizer(split_bpe), 'merge': lambda: tk.HFTokenizer(merge_bpe),
       'char': tk.CharTokenizer}[which]()
  ends = steps_lib.StepEnds.of(t)
  assert steps_lib.StepEnds.of(t) is ends and ends.splits == (which != 'char')
  rows = [t.encode_trace(TRACE), t.encode_trace(TRACE[1:])]
  length = max(len(ids) for ids, _ in rows) + 2
  tokens, mask = tk.pad_batch([ids for ids, _ in rows], length, t.pad_id, side='right')
  want = np.zeros_like(mask)
  for i, (_, e) in enumerate(rows):
    want[i, e[:-1]] = True
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda s, x, m: s.mask(x, m))(ends, tokens, mask)), want)
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda x, m: ends.mask(x, m))(tokens, mask)), want)


def test_a_single_id_is_exactly_token_equality():
  """`as_step_ends(id)` (the character tokenizer, scripted vocabularies) is `tokens == id`,
  out-of-range fillers included; a negative id never ends a step."""
  tokens = jnp.array([[3, 5, -1, 3, 99, 0], [0, 3, 3, 7, 2, -1]])
  mask = jnp.array([[1, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1]], bool)
  got = steps_lib.as_step_ends(3).mask(tokens, mask)
  np.testing.assert_array_equal(np.asarray(got), np.asarray((tokens == 3) & mask))
  assert not np.asarray(steps_lib.as_step_ends(-1).mask(tokens)).any()
  assert steps_lib.as_step_ends(3) is steps_lib.as_step_ends(3)
  char = tk.CharTokenizer()
  np.testing.assert_array_equal(np.asarray(steps_lib.StepEnds.of(char).mask(tokens, mask)), np.asarray(got))
  with pytest.raises(TypeError, match='StepEnds or a token id, got str'):
    steps_lib.as_step_ends('\n\n')
