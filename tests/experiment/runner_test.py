"""The experiment runner and its data splits: SFT problems, held-out problems, the phase-2 pool."""

import pytest

from rlm_jax.data.tokenizer import CharTokenizer
from rlm_jax.experiment import config as config_lib
from rlm_jax.experiment import data as data_lib
from rlm_jax.experiment import runner


def _task(**kw):
  base = dict(domain='arithmetic', levels=(1, 2, 3), train_size=300, rl_size=0, seed=0, prompt_len=24,
              completion_len=40, answer_len=12, train_file='', eval_file='', rl_file='', length_policy='drop',
              question_key='question', answer_key='answer')
  return config_lib.TaskConfig(**dict(base, **kw))


def _splits(rl_size):
  cfg = _task(rl_size=rl_size)
  tok = CharTokenizer()
  train, held = data_lib.build_data(tok, cfg, eval_size=60)
  return tok, cfg, train, held


def test_rl_pool_is_disjoint_deduplicated_and_reproducible():
  tok, cfg, train, held = _splits(rl_size=900)
  pool = data_lib.build_rl_pool(tok, cfg, (train, held))
  problems = [t['problem'] for t in pool.tasks]
  assert len(set(problems)) == len(problems)
  assert not set(problems) & {t['problem'] for t in train.tasks + held.tasks}
  # Level 1 has few distinct problems, so dropping duplicates and SFT/held-out ones shrinks the
  # pool below rl_size, but the harder levels are almost all fresh.
  assert 300 < len(problems) < 900
  assert sum(t['level'] == 3 for t in pool.tasks) > 250
  assert pool.prompt.shape == (len(problems), cfg.prompt_len) and pool.answer.shape[0] == len(problems)
  # The encoded answer is the canonical final step of each problem.
  first = tok.decode(pool.answer[0, : pool.answer_len[0]])
  assert first == 'Answer: ' + pool.tasks[0]['solution']
  again = data_lib.build_rl_pool(tok, cfg, (train, held))
  assert [t['problem'] for t in again.tasks] == problems


def test_rl_pool_that_is_all_duplicates_is_a_one_line_error():
  tok, cfg, train, held = _splits(rl_size=3)
  with pytest.raises(ValueError, match='task.rl_size=3') as e:
    data_lib.build_rl_pool(tok, cfg, (train, held, data_lib.build_rl_pool(tok, cfg, (train, held))))
  assert '\n' not in str(e.value)


def test_gsm8k_trains_on_train_and_evaluates_on_test_by_default():
  tok = CharTokenizer()
  cfg = _task(domain="gsm8k", train_size=0, prompt_len=800, completion_len=800, answer_len=16)
  train, held = data_lib.build_data(tok, cfg, eval_size=20)
  from rlm_jax.data import datasets
  want_train = {t['problem'] for t in datasets.load_split('builtin:gsm8k_train_sample.jsonl')}
  want_test = {t['problem'] for t in datasets.load_split('builtin:gsm8k_sample.jsonl')}
  got_train, got_held = {t['problem'] for t in train.tasks}, {t['problem'] for t in held.tasks}
  assert len(got_train) == 50 and got_train <= want_train  # every train record fits 800 chars
  assert len(got_held) == 20 and got_held <= want_test and not got_held & want_train


def test_file_splits_drop_what_does_not_fit_or_name_the_key(tmp_path, capsys):
  import json
  from rlm_jax import configlib
  rows = [{'question': 'What is 2+3?', 'answer': 'Add them: 2+3=5.\n#### 5'},
          {'question': 'x' * 80 + '?', 'answer': 'Long.\n#### 1'},
          {'question': 'What is 4+4?', 'answer': 'Add: 4+4=8.\n#### 8'}]
  path = tmp_path / 'train.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  held = tmp_path / 'test.jsonl'
  held.write_text(json.dumps(rows[2]) + '\n' + json.dumps({'question': 'What is 1+1?', 'answer': '#### 2'}) + '\n')
  tok = CharTokenizer()
  cfg = _task(train_file=str(path), eval_file=str(held), train_size=0, prompt_len=40, completion_len=60)
  train, test = data_lib.build_data(tok, cfg, eval_size=10)
  assert [t['problem'] for t in train.tasks] == ['What is 2+3?', 'What is 4+4?']
  assert [t['problem'] for t in test.tasks] == ['What is 1+1?']  # the training problem is removed
  assert f'task.train_file={path}: 2 problems (1 dropped by task.length_policy' in capsys.readouterr().err
  with pytest.raises(configlib.ConfigError) as e:
    data_lib.build_data(tok, _task(train_file=str(path), eval_file=str(held), train_size=0, prompt_len=40,
                                   completion_len=60, length_policy='error'), eval_size=10)
  assert str(e.value) == f'task.prompt_len=40: problem 2 of {path} needs 83 tokens'
  with pytest.raises(configlib.ConfigError, match=r'task.train_file=.*nothing.jsonl: .*no such file'):
    data_lib.build_data(tok, _task(train_file=str(tmp_path / 'nothing.jsonl')), eval_size=10)


def test_device_batch_per_process_path_equals_plain_rows(tmp_path):
  """The multi-process path (each process reads its rows, arrays assembled on the mesh) gives
  the same global batch as plain arrays, laid out along the batch axes."""
  import jax
  import numpy as np

  from rlm_jax import configlib

  cfg = config_lib.parse(configlib.load_config('configs/tiny.py'))
  exp = runner.Experiment(cfg, str(tmp_path))
  assert 0 < len(exp.rl_pool.tasks) <= 120 and exp.rl_pool is not exp.train
  idx = np.array([5, 0, 63, 7, 12, 40, 33, 2])
  for arrays in (exp.train.sft, exp.rl_pool.prompt_batch()):
    plain = exp.device_batch(arrays, idx, per_process=False)
    sharded = exp.device_batch(arrays, idx, per_process=True)
    assert plain.keys() == sharded.keys() == arrays.keys()
    for k in arrays:
      np.testing.assert_array_equal(np.asarray(sharded[k]), arrays[k][idx])
      np.testing.assert_array_equal(np.asarray(plain[k]), arrays[k][idx])
      # mesh (1, 8, 1): rows split over the 8 'fsdp' devices, one row each.
      assert sharded[k].sharding.shard_shape(sharded[k].shape)[0] == 1
  assert jax.device_count() == 8


def test_host_scorer_uses_the_task_verifier_and_marks_cut_rows_invalid():
  import numpy as np

  tok = CharTokenizer()
  tasks = [{'type': 'Arithmetic', 'level': 1, 'problem': 'Compute 5+1.', 'solution': '6',
            'unique_solution': True, 'steps': ['5+1=6', 'Answer: 6']}]
  rows = ['5+1=6\n\nAnswer: 6', '5+1=7\n\nAnswer: 7', 'Answer: 6', '5+1=6']
  ids = [tok.encode_steps(r.split('\n\n')) for r in rows]
  ids[3] = ids[3][:-1]  # no EOS: cut at the length limit
  width = max(map(len, ids)) + 2
  tokens = np.zeros((4, width), np.int32)
  for r, x in enumerate(ids):
    tokens[r, : len(x)] = x
  lengths = np.array([len(x) for x in ids])
  scores = data_lib.host_scorer(tok, tasks, group_size=4)(tokens, lengths)
  np.testing.assert_array_equal(scores, [2, 0, 2, -1])
  from rlm_jax import configlib
  with pytest.raises(configlib.ConfigError, match="rl.reward_on='host': rl.algo='em' does not support it"):
    config_lib.parse(configlib.load_config('configs/tiny.py', ['rl.algo=em', 'rl.reward_on=host']))


@pytest.mark.parametrize('rank', [0, 2])
def test_policy_starts_from_an_hf_checkpoint(tmp_path, rank):
  """hf_checkpoint: the architecture and weights come from the folder (written here by our
  numpy exporter), sharded over the mesh; with LoRA the adapters start as a no-op."""
  import dataclasses

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from rlm_jax import configlib
  from rlm_jax.models import hf
  from rlm_jax.models import transformer as tfm

  tok = CharTokenizer()
  src_cfg = tfm.ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            head_dim=8, d_ff=48, tie_embeddings=False)
  gdef, state = nnx.split(tfm.init_model(src_cfg, seed=11))
  hf.export_hf(gdef, state, str(tmp_path / 'ckpt'))
  base = configlib.load_config('configs/tiny.py', [f'hf_checkpoint={tmp_path / "ckpt"}', f'lora.rank={rank}'])
  cfg = config_lib.parse(base)
  exp = runner.Experiment(cfg, str(tmp_path / 'run'))
  assert dataclasses.replace(exp.models.model_cfg, init_std=src_cfg.init_std) == src_cfg  # not configs/tiny.py's model
  graphdef, params = exp.models.init_policy()
  graphdef, params = exp.models.plain_policy(graphdef, params)
  tokens = jnp.asarray(np.random.default_rng(0).integers(4, 90, (2, 7)))
  got = nnx.merge(graphdef, params)(tokens).logits_BxLxV
  want = nnx.merge(gdef, state)(tokens).logits_BxLxV
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  w = [x for x in jax.tree.leaves(params) if x.ndim == 2][0]
  assert len(w.sharding.device_set) == 8  # placed on the (1, 8, 1) mesh


def test_host_rewards_weight_the_reward_functions_and_report_each():
  """rl.reward_fns on host: correctness (the verifier) + 0.5 * format, per row, plus each
  function's batch mean; the verifier scores come along for the accuracy metrics."""
  import numpy as np
  from rlm_jax.tasks import reward_fns

  tok = CharTokenizer()
  tasks = [{'type': 'Arithmetic', 'level': 1, 'problem': 'Compute 5+1.', 'solution': '6',
            'unique_solution': True, 'steps': ['5+1=6', 'Answer: 6']}]
  rows = ['5+1=6\n\nAnswer: 6', '5+1=7\n\nAnswer: 7', '5+1=6', '6']
  ids = [tok.encode_steps(r.split('\n\n')) for r in rows]
  tokens = np.zeros((4, max(map(len, ids))), np.int32)
  for r, x in enumerate(ids):
    tokens[r, : len(x)] = x
  lengths = np.array([len(x) for x in ids])
  fns = reward_fns.load_reward_fns(['correctness', 'format'])
  score, reward, metrics = data_lib.host_rewards(tok, tasks, 4, fns, (1.0, 0.5))(tokens, lengths)
  np.testing.assert_array_equal(score, [2, 0, 2, 2])
  np.testing.assert_allclose(reward, [1.5, 0.5, 1.0, 1.0])  # rows 3-4 solve it without an 'Answer:' line
  assert metrics == {'reward_fn/correctness': 0.75, 'reward_fn/format': 0.5}


def test_logprob_and_old_logp_knobs_reach_the_compiled_setups(tmp_path, monkeypatch):
  """rl.logprob_chunk_tokens, rl.recompute_old_logp, rl.shared_prompt and rl.em.neg_logp_floor set
  away from their defaults arrive in the static setups the GRPO / RLOO / process-GRPO / PPO / EM steps compile,
  together with the tokenizer's step-end tables."""
  import dataclasses

  import jax
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec

  from rlm_jax import configlib
  from rlm_jax.data.steps import StepEnds
  from rlm_jax.models import transformer as tfm
  from rlm_jax.training import em, grpo, ppo, process_grpo, rloo

  base = configlib.load_config('configs/tiny.py', ['rl.logprob_chunk_tokens=7', 'rl.recompute_old_logp=True',
                                                   'rl.shared_prompt=False', 'rl.em.neg_logp_floor=-2.5',
                                                   'sft.steps=0'])
  cfg = config_lib.parse(base)
  assert (cfg.rl.logprob_chunk_tokens, cfg.rl.recompute_old_logp) == (7, True)
  exp = runner.Experiment(cfg, str(tmp_path))
  # Small replicated models stand in for the run's (whose sharded inits take most of the time).
  mcfg = exp.models.model_cfg
  on_mesh = lambda m: (m[0], jax.device_put(m[1], NamedSharding(exp.mesh, PartitionSpec())))
  policy = on_mesh(nnx.split(tfm.init_model(mcfg, seed=0)))
  seen = {}

  def capture(pos):
    def fn(*args, **kw):
      seen['last'] = args[pos]
      raise StopIteration  # the setup is all this test needs
    return fn

  monkeypatch.setattr(grpo, 'grpo_iteration_jit', capture(2))
  monkeypatch.setattr(ppo, 'ppo_iteration_jit', capture(2))
  monkeypatch.setattr(em, 'em_iteration_jit', capture(2))
  monkeypatch.setattr(grpo, 'rollout_jit', capture(4))
  sections = dict(cfg.rl.sections)
  value = on_mesh(nnx.split(tfm.init_model(dataclasses.replace(mcfg, value_head='sigmoid'), seed=1)))  # a PRM
  # PPO's actor-critic (a fresh value head on the policy) is not what this test is about.
  monkeypatch.setattr(exp.models, 'actor_critic', lambda params, head: policy)
  for name, module in [('grpo', grpo), ('rloo', rloo), ('ppo', ppo), ('em', em), ('process_grpo', process_grpo)]:
    ctx = exp.phase_context(policy, value if name == 'process_grpo' else None)
    phase = module.ALGORITHM.build(ctx, sections[name])
    with pytest.raises(StopIteration):
      phase.step(phase.state, None, 0)
    seen[name] = seen.pop('last')
  assert {k: s.logprob_chunk_tokens for k, s in seen.items()} == dict.fromkeys(seen, 7)
  assert set(seen) == {'grpo', 'rloo', 'ppo', 'em', 'process_grpo'}
  assert all(seen[k].recompute_old_logp for k in ('grpo', 'rloo', 'process_grpo'))
  assert seen['em'].neg_logp_floor == -2.5
  assert not any(s.shared_prompt for s in seen.values())
  assert all(s.step_ends is StepEnds.of(exp.tok) for s in seen.values())
  with pytest.raises(configlib.ConfigError, match='rl.em.neg_logp_floor=0.5'):
    config_lib.parse(configlib.load_config('configs/tiny.py', ['rl.em.neg_logp_floor=0.5']))
