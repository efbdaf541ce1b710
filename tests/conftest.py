"""Test-wide setup: 8 fake CPU devices so sharding code runs on one machine, unoptimised (fast)
XLA compiles, one XLA compilation cache per test session, and tiny BPE tokenizers (`split_bpe`,
`merge_bpe`) for the step-delimiter tests."""
import os
import shutil
import tempfile

# Compiling, not running, is what the tiny test programs spend their time on: XLA's LLVM
# optimisation passes take most of each CPU compile (the one-round AlphaZero test: 55 s -> 38 s,
# a d=32 model init: 9 s -> 2.5 s), and the programs run in milliseconds either way. The
# tests' tolerances hold at level 0 and runs stay bit-for-bit deterministic. The subprocesses
# of main_test, notebooks_test and distributed_test set the same flag.
XLA_OPT_FLAG = '--xla_backend_optimization_level=0'
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {XLA_OPT_FLAG}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Compiling dominates the suite's time, and the same programs are compiled again by the other
# xdist worker and by every `python -m rlm_jax.main` subprocess (a tiny run takes ~65 s cold,
# ~16 s from the cache). This module is imported by the controller before the workers start,
# so workers and subprocesses inherit one fresh directory; it is removed when the session ends
# (a cache kept across sessions would hide the cold-start time CI pays). No size limit: with
# one, every write scans the whole directory (quadratic over the suite's thousands of entries);
# an entry read while another process still writes it fails to decode and is compiled again.
_OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
if _OWN_CACHE:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='rlm_jax_test_xla_cache_')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import pytest  # noqa: E402


# The two xdist workers take whole files (`--dist=loadfile`) in collection order
# (`--no-loadscope-reorder`); the slowest files (`--durations`, 2-core CPU) go first so that the
# workers end together instead of one finishing a long file alone. Others keep their order.
SLOW_FILES_FIRST = (
    'search/lm_test.py', 'training/grpo_test.py', 'search/mcts_test.py', 'main_test.py',
    'training/shared_prompt_test.py', 'models/smollm2_test.py', 'sampling/sampler_test.py',
    'models/transformer_test.py', 'training/ppo_test.py', 'training/alphazero_advantage_test.py',
    'training/alphazero_test.py', 'notebooks_test.py', 'experiment/value_phase_test.py', 'models/lora_test.py',
    'training/alphazero_mix_test.py', 'experiment/models_test.py', 'training/em_test.py', 'search/beam_test.py',
    'distributed_test.py', 'training/alphazero_host_test.py',
)


def pytest_collection_modifyitems(config, items):
  missing = [n for n in SLOW_FILES_FIRST if not os.path.exists(os.path.join(os.path.dirname(__file__), n))]
  if missing:
    raise pytest.UsageError(f'tests/conftest.py SLOW_FILES_FIRST names files that do not exist: {missing}')
  del config
  rank = {f'tests/{name}': i for i, name in enumerate(SLOW_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid.split('::')[0], len(rank)))  # stable: others in order


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, 'workerinput'):  # the controller (or a run without xdist)
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)

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


# A fixed search tree for target / export tests (search/export and training/alphazero).
_PAD = 0


@pytest.fixture
def hand_tree():
  """Two trees of 7 slots: root 0 -> {1, 2}; 2 -> {3, 4 (terminal)}; 3 -> {5 (terminal)}.
  Visits 6, 1, 4, 2, 1, 1 (visits = 1 + children's). Tree 0 solves at node 5 (+1) and fails at
  node 4 (-1); in tree 1 both terminals fail."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from rlm_jax.search import tree as tree_lib  # pylint: disable=g-import-not-at-top
  prompt = jnp.array([[_PAD, 7, 8], [_PAD, 7, 9]])
  t = tree_lib.empty(prompt, prompt != _PAD, jnp.array([0, 1]), num_nodes=7, step_len=3, pad_id=_PAD,
                     root_value_B=jnp.array([0.5, -0.5]))
  steps = np.zeros((2, 7, 3), np.int32)
  lens = np.zeros((2, 7), np.int32)
  for node, toks in {1: [11, 3], 2: [21, 22, 3], 3: [31, 3], 4: [41, 2], 5: [51, 2]}.items():
    steps[:, node, 3 - len(toks):] = toks
    lens[:, node] = len(toks)
  two = lambda x, y=None: jnp.asarray(np.array([x, x if y is None else y]))
  nan = np.nan
  return t.replace(
      parent_BxN=two([-1, 0, 0, 2, 2, 3, -1]), depth_BxN=two([0, 1, 1, 2, 2, 3, 0]),
      visits_BxN=two([6, 1, 4, 2, 1, 1, 0]), first_child_BxN=two([1, -1, 3, 5, -1, -1, -1]),
      num_children_BxN=two([2, 0, 2, 1, 0, 0, 0]),
      terminal_BxN=two([False, False, False, False, True, True, False]),
      q_BxN=two([0.5, -0.2, 0.6, 0.8, -1.0, 1.0, 0.0], [-0.5, -0.2, -0.9, -0.96, -1.0, -1.0, 0.0]
                ).astype(jnp.float32),
      reward_BxN=two([nan, nan, nan, nan, -1.0, 1.0, nan], [nan, nan, nan, nan, -1.0, -1.0, nan]
                     ).astype(jnp.float32),
      step_tokens_BxNxL=jnp.asarray(steps), step_len_BxN=jnp.asarray(lens), num_nodes_B=jnp.array([6, 6]))
