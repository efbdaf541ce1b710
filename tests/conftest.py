"""Test-wide setup: 8 fake CPU devices so sharding code runs on one machine, and tiny BPE
tokenizers (`split_bpe`, `merge_bpe`) for the step-delimiter tests."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

# BPE tokenizers trained here (no hub) whose step delimiter '\n\n' merges or splits in text;
# the fixtures split_bpe / merge_bpe serve every test directory.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TEXTS = ['Tom has 3 apples.\n\nHe buys 2 more.\n\nAnswer: 5', 'done\n\n', 'The end.\n\nThe cat.\n'] * 20
_TEXTS += ['\n\n'] * 200  # so that '\n\n' alone is one token, as in real vocabularies


def make_bpe(path, *, merge: bool, chat_template: str | None = None) -> str:
  """Byte-level BPE saved to `path`.

  merge=False: the GPT-2 pre-tokenizer regex, as SmolLM2: '\\n\\n' alone is one token, inside
    text it is two '\\n' tokens ('x\\n\\nThe' -> x, \\n, \\n, The).
  merge=True: no pre-tokenizer regex, so merges cross the delimiter ('.\\n\\nHe ' is a token).
  """
  tokenizers = pytest.importorskip('tokenizers')
  transformers = pytest.importorskip('transformers')
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not merge)
  tok.decoder = decoders.ByteLevel()
  specials = ['<pad>', '<s>', '</s>', '<|im_start|>', '<|im_end|>']
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(_TEXTS, trainer)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token='<pad>', bos_token='<s>',
                                              eos_token='</s>')
  if chat_template:
    fast.chat_template = chat_template
  fast.save_pretrained(str(path))
  return str(path)


@pytest.fixture(scope='session')
def split_bpe(tmp_path_factory):
  return make_bpe(tmp_path_factory.mktemp('split_bpe'), merge=False, chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope='session')
def merge_bpe(tmp_path_factory):
  return make_bpe(tmp_path_factory.mktemp('merge_bpe'), merge=True)
