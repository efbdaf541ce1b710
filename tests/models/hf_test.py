"""HF Llama / Qwen2 interop against transformers itself (PyTorch CPU, fp32) as the reference.

Each test builds a tiny random HF model in-process, saves it with `save_pretrained`, and checks
our loader, forward pass, greedy sampler and exporter against HF's own numbers.
"""
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from rlm_jax import sharding  # noqa: E402
from rlm_jax.models import hf  # noqa: E402
from rlm_jax.models.transformer import positions_from_mask  # noqa: E402
from rlm_jax.sampling.sampler import SamplingConfig, sample  # noqa: E402

V, PAD, BOS, EOS = 64, 0, 1, 2
CASES = {
    # GQA everywhere (4 query heads, 2 kv heads); head_dim 16 != hidden / heads on purpose.
    'llama': ('llama', False),
    'llama_tied': ('llama', True),
    'qwen2': ('qwen2', False),
    'qwen2_tied': ('qwen2', True),
}


def _hf_model(kind: str, tie: bool, seed: int = 0, vocab: int = V):
  torch.manual_seed(seed)
  kw = dict(
      hidden_size=32, head_dim=16, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tie, rope_theta=500.0,
      rms_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
  )
  if kind == 'llama':
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
  else:
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
  # Random values everywhere (HF inits biases to 0 and norms to 1, which would hide mix-ups).
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('norm.weight'):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      else:
        p.copy_(0.3 * torch.randn_like(p))
  return model.eval()


def _save(model, path, sharded=False):
  model.save_pretrained(str(path), max_shard_size='20KB' if sharded else '1GB')
  return str(path)


def _left_padded_batch():
  rng = np.random.RandomState(1)
  lengths = [7, 3, 5]
  tokens = np.full((3, 7), PAD, np.int64)
  mask = np.zeros((3, 7), bool)
  for i, n in enumerate(lengths):
    tokens[i, 7 - n:] = rng.randint(3, V, n)
    mask[i, 7 - n:] = True
  return tokens, mask


def _hf_logits(model, tokens, mask):
  positions = np.asarray(positions_from_mask(jnp.asarray(mask)))
  with torch.no_grad():
    out = model(
        input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
        position_ids=torch.tensor(positions, dtype=torch.int64),
    )
  return out.logits.numpy()


def _our_logits(graphdef, state, tokens, mask):
  model = nnx.merge(graphdef, state)
  return np.asarray(model(jnp.asarray(tokens), mask_BxL=jnp.asarray(mask)).logits_BxLxV)


@pytest.mark.parametrize('case', list(CASES))
def test_logits_match_hf_on_padded_batch(case, tmp_path):
  kind, tie = CASES[case]
  model = _hf_model(kind, tie)
  # The untied cases also go through a sharded save (several files + index.json).
  path = _save(model, tmp_path, sharded=not tie)
  assert os.path.isfile(os.path.join(path, 'model.safetensors.index.json')) == (not tie)
  graphdef, state = hf.load_hf(path)
  cfg = nnx.merge(graphdef, state).cfg
  assert (cfg.qkv_bias, cfg.tie_embeddings, cfg.head_dim, cfg.rope_theta) == (kind == 'qwen2', tie, 16, 500.0)

  tokens, mask = _left_padded_batch()
  ref = _hf_logits(model, tokens, mask)
  got = _our_logits(graphdef, state, tokens, mask)
  np.testing.assert_allclose(got[mask], ref[mask], atol=1e-4, rtol=1e-4)
  assert np.abs(ref[mask]).max() > 1.0  # the comparison is not between near-zero logits


@pytest.mark.parametrize('case', ['llama', 'qwen2_tied'])
def test_greedy_generation_matches_hf_generate(case, tmp_path):
  kind, tie = CASES[case]
  model = _hf_model(kind, tie, seed=3)
  graphdef, state = hf.load_hf(_save(model, tmp_path))
  tokens, mask = _left_padded_batch()
  new = 12
  with torch.no_grad():
    ref = model.generate(
        input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
        max_new_tokens=new, do_sample=False, eos_token_id=EOS, pad_token_id=PAD,
    ).numpy()[:, tokens.shape[1]:]
  cfg = SamplingConfig(max_new_tokens=new, eos_id=EOS, pad_id=PAD, greedy=True)
  out = sample(graphdef, state, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask), jax.random.key(0), cfg)
  got = np.asarray(out.tokens_BxT)
  # HF stops generating once every row hit EOS; the rest of our rows are PAD then.
  np.testing.assert_array_equal(got[:, : ref.shape[1]], ref)
  assert (got[:, ref.shape[1]:] == PAD).all()
  assert len(set(ref.ravel().tolist())) > 3  # a real sequence, not one repeated token


@pytest.mark.parametrize('case', ['llama', 'qwen2_tied'])
def test_export_roundtrip_through_transformers(case, tmp_path):
  kind, tie = CASES[case]
  model = _hf_model(kind, tie, seed=5)
  src = _save(model, tmp_path / 'src')
  graphdef, state = hf.load_hf(src)
  out = hf.export_hf(graphdef, state, str(tmp_path / 'out'), src, max_shard_bytes=30_000)
  files = sorted(os.listdir(out))
  assert 'model.safetensors.index.json' in files and 'model-00001-of-' in ' '.join(files)
  with open(os.path.join(out, 'config.json')) as f:
    config = json.load(f)
  assert config['eos_token_id'] == EOS  # template fields survive

  back = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
  assert type(back) is type(model)
  tokens, mask = _left_padded_batch()
  np.testing.assert_allclose(_hf_logits(back, tokens, mask)[mask], _hf_logits(model, tokens, mask)[mask],
                             atol=1e-5, rtol=1e-5)
  for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


def test_export_without_template_and_bf16_reload(tmp_path):
  model = _hf_model('qwen2', False, seed=7)
  graphdef, state = hf.load_hf(_save(model, tmp_path / 'src'))
  out = hf.export_hf(graphdef, state, str(tmp_path / 'bf16'), dtype='bfloat16')
  assert os.listdir(out) and 'model.safetensors' in os.listdir(out)
  graphdef2, state2 = hf.load_hf(out)  # a bf16 file, upcast to the fp32 default
  cfg2 = nnx.merge(graphdef2, state2).cfg
  assert cfg2.qkv_bias and cfg2.rope_theta == 500.0
  want = state['layers'][1]['attn']['bq'][...]
  got = state2['layers'][1]['attn']['bq'][...]
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, np.asarray(want).astype(ml_dtypes.bfloat16).astype(np.float32))
  assert np.abs(np.asarray(got) - np.asarray(want)).max() > 0  # bf16 rounding really happened


def test_sharded_load_places_slices_and_matches(tmp_path):
  model = _hf_model('llama', False, seed=9)
  path = _save(model, tmp_path, sharded=True)
  mesh = sharding.make_mesh(sharding.MeshConfig(shape=(1, 4, 2)))
  graphdef, state = hf.load_hf(path, mesh=mesh)
  wq = state['layers'][0]['attn']['wq'][...]  # [D=32, H=4, Dh=16]: embed->fsdp, heads->tensor
  assert wq.sharding.spec == P('fsdp', 'tensor')
  assert {s.data.shape for s in wq.addressable_shards} == {(8, 2, 16)}
  embed = state['embed'][...]  # [V, D]: vocab->tensor, embed->fsdp
  assert embed.sharding.spec == P('tensor', 'fsdp')
  assert sharding.replicated_fraction(state, mesh) < 0.02

  tokens, mask = _left_padded_batch()
  graphdef1, state1 = hf.load_hf(path)
  np.testing.assert_allclose(
      _our_logits(graphdef, state, tokens, mask), _our_logits(graphdef1, state1, tokens, mask), atol=1e-5
  )
  np.testing.assert_allclose(_our_logits(graphdef, state, tokens, mask)[mask],
                             _hf_logits(model, tokens, mask)[mask], atol=1e-4, rtol=1e-4)


def _config(**kw):
  c = dict(architectures=['LlamaForCausalLM'], model_type='llama', hidden_size=64, intermediate_size=96,
           num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, vocab_size=100)
  c.update(kw)
  return c


def test_config_fields_and_defaults():
  cfg = hf.config_from_hf(_config(rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=True))
  assert (cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (64, 96, 2, 8, 2)
  assert (cfg.head_dim, cfg.norm_eps, cfg.rope_theta, cfg.tie_embeddings, cfg.qkv_bias) == (8, 1e-5, 1e6, True, False)
  # Missing num_key_value_heads = plain multi-head attention; rope_parameters win.
  cfg = hf.config_from_hf(_config(architectures=['Qwen2ForCausalLM'], model_type='qwen2', num_key_value_heads=None,
                                  rope_parameters={'rope_type': 'default', 'rope_theta': 1234.0}))
  assert (cfg.n_kv_heads, cfg.qkv_bias, cfg.rope_theta, cfg.tie_embeddings) == (8, True, 1234.0, False)


@pytest.mark.parametrize('kw, culprit', [
    (dict(architectures=['MistralForCausalLM'], model_type='mistral'), 'architectures'),
    (dict(architectures=None, model_type='gemma'), "model_type='gemma'"),
    (dict(rope_scaling={'rope_type': 'llama3', 'factor': 8.0}), 'rope_scaling'),
    (dict(rope_parameters={'rope_type': 'yarn', 'rope_theta': 1.0}), 'rope_parameters'),
    (dict(hidden_act='gelu'), 'hidden_act'),
    (dict(attention_bias=True), 'attention_bias'),
    (dict(use_sliding_window=True), 'use_sliding_window'),
    (dict(vocab_size=None), None),
])
def test_unsupported_config_names_the_field(kw, culprit):
  c = _config(**kw)
  if culprit is None:
    del c['vocab_size']
    culprit = 'vocab_size'
  with pytest.raises(hf.HFFormatError, match=culprit) as e:
    hf.config_from_hf(c)
  assert '\n' not in str(e.value)


def _write_checkpoint(path, model, mutate):
  """Saves `model` through safetensors after `mutate(tensors)` edits its name -> array dict."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  os.makedirs(path, exist_ok=True)
  model.config.save_pretrained(path)
  tensors = {k: v.numpy() for k, v in model.state_dict().items() if k != 'lm_head.weight' or not
             model.config.tie_word_embeddings}
  mutate(tensors)
  save_file(tensors, os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})
  return str(path)


def test_bad_tensors_name_tensor_and_file(tmp_path):
  model = _hf_model('llama', False)
  name = 'model.layers.1.mlp.up_proj.weight'

  path = _write_checkpoint(tmp_path / 'missing', model, lambda t: t.pop(name))
  with pytest.raises(hf.HFFormatError, match=f'missing tensor {name}'):
    hf.load_hf(path)

  path = _write_checkpoint(tmp_path / 'extra', model, lambda t: t.update({'model.layers.2.mlp.up_proj.weight': t[name]}))
  with pytest.raises(hf.HFFormatError, match=r'unexpected tensor model\.layers\.2\.mlp\.up_proj\.weight in .*model\.safetensors'):
    hf.load_hf(path)

  path = _write_checkpoint(tmp_path / 'shape', model, lambda t: t.update({name: t[name][:, :5]}))
  with pytest.raises(hf.HFFormatError, match=rf'tensor {name} in .*model\.safetensors has shape \(48, 5\)'):
    hf.load_hf(path)

  with pytest.raises(FileNotFoundError, match='no model.safetensors'):
    model.config.save_pretrained(str(tmp_path / 'empty'))
    hf.load_hf(str(tmp_path / 'empty'))


def _bpe_tokenizer(path):
  """A byte-level BPE trained on a few strings, saved with a chat template; returns its size.

  Byte-level, because transformers rebuilds a qwen2 folder's tokenizer with Qwen2's own
  byte-level pre-tokenizer (from config.json's model_type), whose unk token is <|endoftext|>.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<pad>', '<s>', '</s>', '<|im_start|>', '<|im_end|>', '<|endoftext|>'],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
  )
  tok.train_from_iterator(['user: what is two plus three?\nassistant: five'] * 20, trainer)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token='<pad>', bos_token='<s>', eos_token='</s>', unk_token='<|endoftext|>',
      additional_special_tokens=['<|im_start|>', '<|im_end|>'],
  )
  fast.chat_template = (
      "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
  )
  fast.save_pretrained(path)
  return len(fast)


def test_checkpoint_folder_with_tokenizer_and_chat_template(tmp_path):
  """Model, tokenizer and chat template from one folder: a chat prompt decodes like HF."""
  from rlm_jax.data.tokenizer import HFTokenizer, pad_batch  # pylint: disable=g-import-not-at-top

  path = str(tmp_path)
  vocab = _bpe_tokenizer(path)
  model = _hf_model('qwen2', True, seed=11, vocab=vocab)
  _save(model, path)
  tok = HFTokenizer(path, step_delimiter='\n')
  ref_tok = transformers.AutoTokenizer.from_pretrained(path)
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (PAD, BOS, EOS, vocab)
  assert tok.step_id == ref_tok.convert_tokens_to_ids('\u010a')  # byte-level '\n'
  chats = [[{'role': 'user', 'content': 'what is two plus three?'}], [{'role': 'user', 'content': 'two?'}]]
  texts = [tok.apply_chat_template(c, add_generation_prompt=True) for c in chats]
  assert texts[1] == '<|im_start|>user\ntwo?<|im_end|>\n<|im_start|>assistant\n'
  rows = [tok.encode(t) for t in texts]
  assert rows[1][0] == ref_tok.convert_tokens_to_ids('<|im_start|>') == 3
  assert rows == [ref_tok.encode(t, add_special_tokens=False) for t in texts]
  assert tok.decode(rows[1], strip_special=False) == texts[1]
  tokens, mask = pad_batch(rows, 24, tok.pad_id)

  graphdef, state = hf.load_hf(path)
  cfg = SamplingConfig(max_new_tokens=8, eos_id=tok.eos_id, pad_id=tok.pad_id, greedy=True)
  got = np.asarray(sample(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0), cfg).tokens_BxT)
  with torch.no_grad():
    ref = model.generate(input_ids=torch.tensor(tokens, dtype=torch.int64),
                         attention_mask=torch.tensor(mask.astype(np.int64)), max_new_tokens=8,
                         do_sample=False, eos_token_id=EOS, pad_token_id=PAD).numpy()[:, 24:]
  np.testing.assert_array_equal(got[:, : ref.shape[1]], ref)
  assert tok.decode(got[0]) == ref_tok.decode(ref[0], skip_special_tokens=True)
