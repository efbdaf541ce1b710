"""Tokenizers: the built-in CharTokenizer (hand-computed ids) and a tiny HF tokenizer made here."""
import numpy as np
import pytest

from rlm_jax.data import tokenizer as tk

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = ['step one: 2 + 3 = 5\n\nstep two: 5 * 4 = 20\n\nanswer 20', 'the cat sat on the mat', 'hello world'] * 10


def make_hf_tokenizer(path, *, eos=True):
  """Trains a byte-level BPE on a few strings and saves it (with a chat template) to `path`."""
  tokenizers = pytest.importorskip('tokenizers')
  transformers = pytest.importorskip('transformers')
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  specials = ['<pad>', '<s>', '</s>', '<|im_start|>', '<|im_end|>']
  trainer = trainers.BpeTrainer(
      vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator(TEXTS, trainer)
  tok.add_tokens([tokenizers.AddedToken('\n\n', normalized=False)])  # one token, as in Qwen's vocab
  kw = dict(pad_token='<pad>', bos_token='<s>', eos_token='</s>') if eos else dict(pad_token='<pad>')
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
  fast.chat_template = CHAT_TEMPLATE
  fast.save_pretrained(str(path))
  return str(path)


# ----------------------------------------------------------------------------- CharTokenizer


def test_char_ids_by_hand():
  t = tk.CharTokenizer()
  assert (t.pad_id, t.bos_id, t.eos_id, t.step_id) == (0, 1, 2, 3)
  assert t.vocab_size == 104  # 4 specials + 95 printable + '\n' = 100, rounded up to 8
  assert t.encode(' ') == [4]
  assert t.encode('a~') == [4 + ord('a') - 32, 4 + ord('~') - 32]
  assert t.encode('\n') == [99]
  assert t.encode('ab', bos=True) == [1, 69, 70]


def test_char_round_trip_and_specials():
  t = tk.CharTokenizer()
  text = 'x_1 = (3 + 4) * 2\nanswer: {14}!'
  assert t.decode(t.encode(text)) == text
  ids = [t.bos_id] + t.encode('h') + [t.step_id] + t.encode('i') + [t.eos_id, t.pad_id]
  assert t.decode(ids) == 'h\ni'
  assert t.decode(ids, strip_special=False) == '<bos>h<step>i<eos><pad>'
  assert t.decode([101], strip_special=False) == '<unk>'  # a spare id past the table


def test_char_unknown_character_named():
  with pytest.raises(ValueError, match=r"character 'é' at position 3"):
    tk.CharTokenizer().encode('caféx')


def test_encode_steps_char():
  t = tk.CharTokenizer()
  ids = t.encode_steps(['1+1', '=2'])
  assert ids == t.encode('1+1') + [3] + t.encode('=2') + [2]
  assert t.encode_steps(['1+1', '=2'], final=False)[-1] == 3
  assert t.encode_steps([]) == []


def test_pad_batch_left_right_and_errors():
  tokens, mask = tk.pad_batch([[5, 6, 7], [8]], 4, 0)
  np.testing.assert_array_equal(tokens, [[0, 5, 6, 7], [0, 0, 0, 8]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
  tokens, mask = tk.pad_batch([[5, 6, 7], []], 3, 9, side='right')
  np.testing.assert_array_equal(tokens, [[5, 6, 7], [9, 9, 9]])
  np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 0]])
  assert tokens.dtype == np.int32 and mask.dtype == bool
  with pytest.raises(ValueError, match='prompt 1 has 5 tokens, more than the padded length 4'):
    tk.pad_batch([[1], [1, 2, 3, 4, 5]], 4, 0, what='prompt')
  with pytest.raises(ValueError, match="side='middle'"):
    tk.pad_batch([[1]], 2, 0, side='middle')


def test_load_tokenizer_kinds():
  assert isinstance(tk.load_tokenizer('char'), tk.CharTokenizer)
  with pytest.raises(ValueError, match="tokenizer.kind='spm'"):
    tk.load_tokenizer('spm')


# ----------------------------------------------------------------------------- HFTokenizer


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  return make_hf_tokenizer(tmp_path_factory.mktemp('tok'))


def test_hf_tokenizer_ids_and_round_trip(hf_dir):
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top

  ref = PreTrainedTokenizerFast.from_pretrained(hf_dir)
  t = tk.load_tokenizer('hf', hf_dir)
  assert isinstance(t, tk.HFTokenizer)
  assert (t.pad_id, t.bos_id, t.eos_id) == (0, 1, 2)  # order of the special tokens above
  assert t.vocab_size == len(ref) > 261  # 256 bytes + 5 specials + merges + '\n\n'
  assert t.step_id == ref.convert_tokens_to_ids('\n\n') == len(ref) - 1
  text = 'step two: 5 * 4 = 20\n\nanswer 20'
  ids = t.encode(text)
  assert ids == ref.encode(text, add_special_tokens=False)
  assert len(ids) < len(text)  # merges happened: not one id per character
  assert t.decode(ids) == text
  assert t.encode('hello', bos=True)[0] == 1
  assert t.decode([1] + t.encode('hello') + [2]) == 'hello'
  assert t.decode([1] + t.encode('hello') + [2], strip_special=False) == '<s>hello</s>'


def test_hf_encode_steps_and_chat_template(hf_dir):
  t = tk.HFTokenizer(hf_dir)
  ids = t.encode_steps(['2 + 3 = 5', 'answer 5'])
  assert ids == t.encode('2 + 3 = 5') + [t.step_id] + t.encode('answer 5') + [t.eos_id]
  assert t.decode(ids) == '2 + 3 = 5\n\nanswer 5'
  messages = [{'role': 'system', 'content': 'be brief'}, {'role': 'user', 'content': 'hello'}]
  assert t.apply_chat_template(messages, add_generation_prompt=True) == (
      '<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n'
  )


def test_hf_tokenizer_errors(hf_dir, tmp_path):
  with pytest.raises(ValueError, match=r"step delimiter 'hello world' is 2 tokens"):
    tk.HFTokenizer(hf_dir, step_delimiter='hello world')
  with pytest.raises(FileNotFoundError, match='tokenizer folder not found'):
    tk.HFTokenizer(str(tmp_path / 'nope'))
  with pytest.raises(ValueError, match='has no eos token'):
    tk.HFTokenizer(make_hf_tokenizer(tmp_path / 'no_eos', eos=False))
