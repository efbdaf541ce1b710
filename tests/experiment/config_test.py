"""experiment.config: strict parsing (the config file is the one source of values), algorithm
sections from the registry, cross-section rules, and the run-folder guards in checkpoint."""
import json
import os

import pytest

from rlm_jax import checkpoint as ckpt_lib
from rlm_jax import configlib
from rlm_jax.experiment import config as config_lib
from rlm_jax.training import algorithms, em, losses, ppo, rloo

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAIN = os.path.join(REPO, 'configs', 'main.py')


def _config(*overrides):
  return configlib.load_config(MAIN, overrides)


def test_main_config_parses_every_section_of_every_algorithm():
  cfg = config_lib.parse(_config())
  assert cfg.rl.algo == 'grpo' and isinstance(cfg.rl.section, losses.GRPOConfig)
  sections = dict(cfg.rl.sections)
  assert set(sections) == set(algorithms.ALGORITHMS)
  assert isinstance(sections['ppo'], ppo.PPOSection) and isinstance(sections['em'], em.EMConfig)
  assert isinstance(sections['rloo'], rloo.RLOOConfig)
  # Derived, not configured: GRPO's length normaliser is the completion budget.
  assert cfg.rl.section.max_completion_length == cfg.task.completion_len == 40
  hash(cfg)  # frozen all the way down (static arguments of compiled steps hash it)


@pytest.mark.parametrize('delete, key', [
    (('rl', 'grpo', 'epsilon'), 'config.rl.grpo.epsilon'),  # a library default does not leak in
    (('eval', 'beam_width'), 'config.eval.beam_width'),
    (('rl', 'alphazero', 'mcts', 'gamma'), 'config.rl.alphazero.mcts.gamma'),
    (('mesh', 'max_replicated_fraction'), 'config.mesh.max_replicated_fraction'),
])
def test_a_missing_key_is_an_error_even_when_the_dataclass_has_a_default(delete, key):
  d = _config().to_dict()
  node = d
  for k in delete[:-1]:
    node = node[k]
  del node[delete[-1]]
  with pytest.raises(configlib.ConfigError) as e:
    config_lib.parse(d)
  assert str(e.value) == f'{key}: missing required key'


def test_the_chosen_algorithm_needs_its_section_and_other_sections_are_checked_too():
  d = _config('rl.algo=rloo').to_dict()
  del d['rl']['rloo']
  with pytest.raises(configlib.ConfigError, match=r"^config.rl.rloo: missing required key \(the section of "
                     r"rl.algo='rloo'\)$"):
    config_lib.parse(d)
  d = _config().to_dict()
  d['rl']['ppo']['clip_range'] = 0.1  # a typo in a section the run does not use
  with pytest.raises(configlib.ConfigError, match=r'^config.rl.ppo.clip_range: unknown key'):
    config_lib.parse(d)
  with pytest.raises(configlib.ConfigError, match=r"^config.rl: rl.algo='reinforce': must be one of 'none', 'grpo'"):
    config_lib.parse(_config('rl.algo=reinforce'))


def test_derived_key_set_differently_is_refused():
  d = _config().to_dict()
  d['rl']['grpo']['max_completion_length'] = 512
  with pytest.raises(configlib.ConfigError) as e:
    config_lib.parse(d)
  assert str(e.value) == ('config.rl.grpo.max_completion_length=512: it is task.completion_len (40); '
                          'remove the key')
  d['rl']['grpo']['max_completion_length'] = 40  # the same value is accepted
  assert config_lib.parse(d).rl.section.max_completion_length == 40


@pytest.mark.parametrize('overrides, message', [
    (['rl.algo=ppo', 'rl.microbatches=2'],
     "rl.microbatches=2: rl.algo='ppo' does not support it (algorithms that do: grpo, rloo, process_grpo)"),
    (['rl.algo=alphazero', 'rl.microbatches=2'],
     "rl.microbatches=2: rl.algo='alphazero' does not support it (algorithms that do: grpo, rloo, process_grpo)"),
    (['rl.algo=alphazero', 'rl.reward_on=host'], None),  # the verifier on host judges the search's terminals
    (['rl.algo=alphazero', 'rl.reward_on=host', "rl.reward_fns=('correctness',)"],
     "rl.reward_fns=('correctness',): rl.algo='alphazero' rewards terminals with the verifier (+1 solved, "
     "-1 otherwise); remove rl.reward_fns"),
    (['sft.batch_size=64', 'task.train_size=10'],
     'sft.batch_size=64: more than task.train_size=10 problems (each batch draws distinct problems)'),
    (['tokenizer.kind=hf'], "tokenizer.kind='hf': set tokenizer.path (or hf_checkpoint, whose folder it then uses)"),
    (['value.enabled=True', 'value.labels=mcts', 'rl.algo=none'], None),  # fine: rl.alphazero is there
])
def test_cross_section_rules_name_the_keys(overrides, message):
  if message is None:
    config_lib.parse(_config(*overrides))
    return
  with pytest.raises(configlib.ConfigError) as e:
    config_lib.parse(_config(*overrides))
  assert str(e.value) == message


def test_resuming_a_run_folder_with_another_model_is_refused_before_anything_is_written(tmp_path):
  cfg = _config()
  ckpt_lib.write_config(str(tmp_path), cfg)
  ckpt_lib.check_resumable(str(tmp_path), _config('model.d_model=256'))  # no checkpoint yet: fine
  (tmp_path / 'ckpt' / 'sft').mkdir(parents=True)
  ckpt_lib.check_resumable(str(tmp_path), _config('sft.steps=5'))  # other keys may change
  ckpt_lib.check_resumable(str(tmp_path), _config("model.remat='full'"))  # compute only
  saved = (tmp_path / 'config.json').read_text()
  with pytest.raises(configlib.ConfigError) as e:
    ckpt_lib.check_resumable(str(tmp_path), _config('model.d_model=256'))
  assert str(e.value) == (f'config.model.d_model=256: the checkpoints in {tmp_path}/ckpt were written with 128; '
                          'use another --workdir (or the same config to resume)')
  assert (tmp_path / 'config.json').read_text() == saved
  assert json.loads(saved)['model']['d_model'] == 128


def test_unwritable_workdir_is_one_line(tmp_path):
  if os.geteuid() == 0:  # root writes anywhere: use a path under a file instead
    (tmp_path / 'file').write_text('')
    path = str(tmp_path / 'file' / 'run')
  else:
    os.chmod(tmp_path, 0o500)
    path = str(tmp_path / 'run')
  with pytest.raises(configlib.ConfigError) as e:
    ckpt_lib.prepare_workdir(path)
  assert str(e.value).startswith(f'--workdir={path}: cannot write there') and '\n' not in str(e.value)
