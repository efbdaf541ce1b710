"""The blueprint's claim: a trained PRM guiding search, against the policy alone.

Command (3 seeds, table and figure; README "Value-guided search"):
  python experiments/blueprint.py --seeds=0,1,2 --workdir=runs/blueprint

Per seed: SFT of the tiny policy of configs/main.py on arithmetic levels 1-3, stopped at 600
steps where held-out greedy accuracy sits mid-range (0.45-0.63 over seeds in the runs that
chose configs/main.py), then a PRM trained on solver-labelled traces (correct solutions and
corrupted copies, the label on each step's last token). The script then searches the run's
held-out problems with greedy decoding, self-consistency, PRM-ranked best-of-N, PRM beam
search and PRM-guided MCTS at several budgets, and (with --trained) trains outcome GRPO,
process-supervised GRPO and the AlphaZero-style loop from the same SFT and PRM checkpoints.

Hardware: the 2-core CPU of this project; per seed ~10 min of training and ~15 min of search
at load ~5. Measured (seeds 0, 1, 2; README "Value-guided search"): SFT greedy 0.608
[0.565-0.660]; PRM-guided MCTS at best 0.557 at 5.2x greedy's tokens, below greedy and below
self-consistency: the targets of the claim are not met with this PRM (step AUROC 0.71 on
held-out solver-labelled traces, and it does not rank the policy's own solutions).

`:countdown` runs the same experiment on Countdown levels 3-5 (host verifier: any expression
reaching the target is right), a domain whose false steps (`6*5=16`, forced onto the target)
are easier to check than the right step is to choose, with a PRM trained on the SFT policy's
own samples judged by the verifier (README "Countdown"):
  python experiments/blueprint.py --seeds=0,1,2 --workdir=runs/blueprint_countdown \
      --config=configs/blueprint.py:countdown
"""
import ml_collections

from rlm_jax import configlib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = configlib.import_config('main', __file__).get_config()
  c.task.update(levels=(1, 2, 3), train_size=3000, rl_size=21000)
  c.sft.update(steps=600)
  c.sft.optim.update(warmup_steps=30, decay_steps=570)
  c.value.update(enabled=True, labels='solver', mode='mse', init='policy', steps=300, batch_size=64,
                 num_traces=2000, negatives_per_task=2, max_steps=8)
  c.value.optim.update(learning_rate=1e-3, warmup_steps=10, decay_steps=290, b2=0.98)
  c.rl.update(algo='none', iterations=100)
  c.rl.process_grpo.update(max_steps=8, outcome_weight=1.0)
  # Expert iteration keeps a row per tree node (visit-share targets): a buffer of a few rounds.
  c.rl.alphazero.update(step_tokens=12, buffer_size=4096, distill_steps=2, distill_batch=32, value_steps=8,
                        value_batch=32)
  c.rl.alphazero.mcts.update(num_simulations=8, num_children=4, num_walkers=2, max_depth=5)
  c.eval.update(size=200, batch_size=200, strategies=('greedy', 'prm_best_of_n', 'prm_beam'), num_samples=8,
                temperature=0.7, step_tokens=12, max_depth=5)
  if arg == 'countdown':  # a domain where checking a step is easier than choosing it
    c.task.update(domain='countdown', levels=(3, 4, 5), prompt_len=32, completion_len=44, answer_len=24)
    c.rl.update(reward_on='host')
    # The policy's own samples as PRM data: its mistakes (a false step forced onto the target,
    # e.g. `6*5=16`) are not the solver corruptions' (whose wrong final results miss the target).
    c.value.update(labels='policy', samples_per_task=8, steps=600)
    c.value.optim.update(learning_rate=2e-3, decay_steps=590)
    # Expert iteration's steps hold a whole answer step (up to 18 tokens with its EOS); paths of
    # 4 steps reach level 5's answer.
    c.rl.alphazero.update(step_tokens=20)
    c.rl.alphazero.mcts.update(max_depth=4)
  elif arg == 'smoke':  # seconds: every piece runs, nothing is learnt
    c.model.update(d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32)
    c.task.update(levels=(1,), train_size=32, rl_size=64, prompt_len=20, completion_len=24, answer_len=10)
    c.sft.update(steps=3, batch_size=8)
    c.sft.optim.update(warmup_steps=1, decay_steps=2)
    c.value.update(steps=3, batch_size=8, num_traces=16, label_batch=8, max_steps=4)
    c.value.optim.update(warmup_steps=1, decay_steps=2)
    c.rl.update(iterations=2, prompts_per_iteration=4, group_size=2)
    c.rl.alphazero.mcts.update(num_simulations=2, num_children=2, num_walkers=1, max_depth=3)
    c.rl.alphazero.update(step_tokens=6, buffer_size=8, distill_steps=1, distill_batch=4, value_steps=1,
                          value_batch=4)
    c.eval.update(size=4, batch_size=4, num_samples=2, beam_width=2, beam_expansions=2, step_tokens=6,
                  max_depth=3, strategies=('greedy',))
    c.checkpoint.update(save_every=1)
  elif arg:
    raise ValueError(f"configs/blueprint.py: unknown argument '{arg}' (allowed: 'smoke', 'countdown')")
  return c
