"""AlphaZero-style loop on arithmetic: SFT, a PRM from solver labels, then search -> distill rounds.

Command:
  python -m rlm_jax.main --config=configs/alphazero.py --workdir=runs/alphazero
  (`:rft` is rejection-sampling fine-tuning on each tree's best path, the loop as it was
  first measured; `:mix` adds 32 solver traces to every distillation step against
  forgetting; `:countdown` runs the loop on Countdown, see below; `:smoke` is a
  seconds-scale version for tests)

`:countdown`: the task of configs/blueprint.py:countdown (levels 3-5, any expression reaching
the target is right) with rl.reward_on='host': the search's terminal steps are judged by the
Countdown verifier on host (`search.host_reward`), not by matching the solver's expression, and
the PRM learns from the SFT policy's own samples (value.labels='policy'). Steps are up to 20
tokens (the longest answer step of levels 3-5 is 18 with its EOS) and paths 4 steps deep.
Not yet measured beyond a few-round smoke run.

Phases: policy SFT (ckpt/sft) -> value / PRM training on solver-labelled traces (ckpt/value)
-> rl.iterations AlphaZero rounds (ckpt/alphazero: policy, value model and replay buffer):
each round runs MCTS over 64 problems of the phase-2 pool (value model for open steps,
verifier reward at final steps). Expert iteration (the default here): every node of every
solved tree becomes a replay row weighted by its visit share among its siblings (several
solved paths per problem; steps into failed subtrees get the small share their visits give
them), every node with 2+ visits and a verified terminal below gets its Monte Carlo value as
value target, and distillation carries a KL anchor (beta 0.05) to the SFT policy.
Metrics per round in metrics.jsonl: alphazero/solve_rate, policy_rows, value_labels,
buffer_size, sft_loss, kl, value_loss.
Held-out evaluation after phase 1 and after the loop, including two value-guided strategies
(best-of-8 ranked by the PRM, step-level beam search on the value model).

Measured (seed 0, 2-core AMD EPYC, this config and `:rft` side by side, ~11 min each; README
"Value-guided search"): greedy 0.195 after SFT -> 0.145 with expert iteration, 0.165 with
`:rft`; neither beats SFT. With `:mix` (same checkpoints, seed 0): 0.215, the data mix
keeps what SFT taught while the search's rows are distilled. Earlier, with `:rft` (the loop before it had node targets). Hardware: 2-core CPU shared with other jobs (load ~6): 8 min wall. Printed
(seed 0):
  | after | greedy | self_consistency | prm_best_of_n | prm_beam |
  | SFT | 0.185 | 0.160 | 0.135 | 0.160 |
  | ALPHAZERO | 0.170 | 0.145 | 0.180 | 0.115 |
Search solves 30-47% of each round's problems (with the verifier); 12 rounds of distillation
leave held-out accuracy within the noise of 200 tasks (±0.03): a working loop, not yet a gain.
"""
import ml_collections

from rlm_jax import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = configlib.import_config('main', __file__).get_config()  # the model of configs/main.py; every other value set here
  c.task.update(domain='arithmetic', levels=(1, 2, 3), train_size=3000, rl_size=3000, seed=0,
                prompt_len=24, completion_len=40, answer_len=12)
  c.sft.update(steps=300, batch_size=64, microbatches=1)
  c.sft.optim.update(learning_rate=3e-3, warmup_steps=30, decay_steps=270, end_lr_factor=0.1)
  c.value = dict(
      enabled=True, labels='solver', mode='mse', init='policy', value_hidden=0,
      steps=150, batch_size=64, num_traces=1500, label_batch=64, negatives_per_task=1, max_steps=8,
      mc_rollouts=4, samples_per_task=4, temperature=1.0,
      # The value model's own shape (0: the policy's; a deeper one starts from the policy's layers).
      arch=dict(n_layers=0, d_model=0, n_heads=0, n_kv_heads=0, head_dim=0, d_ff=0),
      optim=dict(learning_rate=1e-3, warmup_steps=10, decay_steps=140, end_lr_factor=0.1,
                 weight_decay=0.0, b1=0.9, b2=0.98, grad_clip=1.0))
  # Rounds search problems of the phase-2 pool (task.rl_size, disjoint from the SFT traces).
  c.rl.update(algo='alphazero', iterations=12, prompts_per_iteration=64, temperature=1.0)
  # Few, small distillation steps per round: the solved paths are few and are revisited every
  # round while they stay in the buffer (3e-4 and 8 steps per round memorised them, sft_loss
  # ~0.02, and halved held-out accuracy).
  c.rl.optim.update(learning_rate=1e-4, warmup_steps=0, decay_steps=0)
  c.rl.alphazero = dict(
      mcts=dict(num_simulations=8, num_children=4, num_walkers=2, max_depth=5, selection='puct',
                c1=1.25, c2=19652.0, uct_c=1.0, prior='empirical', prior_temperature=1.0, q_bounds='fixed', root_selection='puct', gumbel_scale=1.0, backup='td',
                gamma=0.96, td_lambda=1.0, virtual_loss=1.0, merge_duplicates=True, num_rollouts=0,
                rollout_weight=0.5, answer='best_terminal', state_width='halving'),
      # A round yields up to 64 trees x 64 nodes = 4096 rows: the buffer holds two rounds.
      step_tokens=12, use_value_model=True, buffer_size=8192,
      distill_steps=8, distill_batch=64, value_steps=8, value_batch=64,
      value_optim=dict(learning_rate=3e-4, warmup_steps=0, decay_steps=0, end_lr_factor=1.0,
                       weight_decay=0.0, b1=0.9, b2=0.98, grad_clip=1.0),
      # Parents need one re-entry after their expansion (1 + K + 1 visits): the shares of a node
      # expanded once are uniform over its unique samples, no search signal.
      policy_target='visits', q_temperature=0.5, adv_clip=0.2, policy_min_visits=6, solved_trees_only=True,
      value_target='mc', min_visits=2, kl_beta=0.05,
      # sft_mix > 0: the cross-entropy of sft_mix_batch solver traces joins each distillation
      # step (a data mix against forgetting; `:mix` turns it on).
      sft_mix=0.0, sft_mix_batch=16)
  c.eval.update(size=200, batch_size=200, num_samples=8, temperature=0.7,
                strategies=('greedy', 'self_consistency', 'prm_best_of_n', 'prm_beam'))
  c.eval.prm_scorer = 'prm_min'
  c.eval.beam_width = 4
  c.eval.beam_expansions = 4
  c.eval.step_tokens = 12
  c.eval.max_depth = 5
  c.checkpoint.update(save_every=50, keep=2)
  if arg == 'rft':  # rejection-sampling fine-tuning: best path of each solved tree, q targets
    c.rl.optim.update(learning_rate=5e-5)
    c.rl.alphazero.update(policy_target='best_path', value_target='q', buffer_size=512, distill_steps=2,
                          distill_batch=32, value_batch=32, kl_beta=0.0)
  elif arg == 'mix':  # expert iteration with solver traces mixed into every distillation step
    c.rl.alphazero.update(sft_mix=1.0, sft_mix_batch=32)
  elif arg == 'countdown':  # many right answers: the verifier judges terminals on host
    c.task.update(domain='countdown', levels=(3, 4, 5), prompt_len=32, completion_len=44, answer_len=24)
    c.rl.update(reward_on='host')
    c.value.update(labels='policy', samples_per_task=8)
    c.rl.alphazero.mcts.update(max_depth=4)
    c.rl.alphazero.update(step_tokens=20)
    c.eval.update(step_tokens=20, max_depth=4)
  elif arg == 'smoke':  # seconds: every phase runs, nothing is learnt
    c.model.update(d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32)
    c.task.update(levels=(1,), train_size=32, rl_size=0, prompt_len=20, completion_len=24, answer_len=10)
    c.sft.update(steps=3, batch_size=8)
    c.sft.optim.update(warmup_steps=1, decay_steps=2)
    c.value.update(steps=4, batch_size=8, num_traces=16, label_batch=8, max_steps=4)
    c.value.optim.update(warmup_steps=1, decay_steps=3)
    c.rl.update(iterations=2, prompts_per_iteration=4)
    c.rl.alphazero.mcts.update(num_simulations=2, num_children=2, num_walkers=1, max_depth=3)
    c.rl.alphazero.update(step_tokens=6, buffer_size=8, distill_steps=1, distill_batch=4, value_steps=1,
                          value_batch=4, policy_target='best_path')  # one row per tree: the buffer test counts them
    c.eval.update(size=4, batch_size=8, num_samples=2, beam_width=2, beam_expansions=2, step_tokens=6,
                  max_depth=3)
    c.checkpoint.update(save_every=1, keep=2)
  elif arg:
    raise ValueError(f"configs/alphazero.py: unknown argument '{arg}' (allowed: 'rft', 'mix', 'countdown', 'smoke')")
  return c
