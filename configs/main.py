"""Main experiment: a tiny policy learns multi-step arithmetic from scratch — SFT, then GRPO.

Command (README quickstart):
  python -m rlm_jax.main --config=configs/main.py --workdir=runs/main

Hardware: 2-core CPU. Wall time: ~10 min per seed on the project's AMD EPYC (413 s on a Xeon).
Expected: held-out greedy accuracy 0.738-0.843 after SFT and 0.800-0.863 after GRPO over 3 seeds
on the AMD EPYC (mean +3.7 points; per-seed numbers move between CPU types; README "Results").
Table printed at the end and stored in <workdir>/results.json.
"""
import ml_collections

from rlm_jax import sharding
from rlm_jax.models import lora


def get_config() -> ml_collections.ConfigDict:
  """Every key of every section is spelled here: the one source of experiment values."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.tokenizer = dict(kind='char', path='', step_delimiter='\n\n', chat_template=False, system_prompt='',
                     instruction='')
  c.model = dict(
      vocab_size=0,  # 0: from the tokenizer
      d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=384,
      rope_theta=10_000.0, norm_eps=1e-6, tie_embeddings=True, qkv_bias=False,
      lm_head=True, value_head='none', value_hidden=0,
      dtype='float32', param_dtype='float32', remat='none', init_std=0.02,
      attention='einsum')  # 'cudnn': jax.nn.dot_product_attention's fused kernel on NVIDIA GPUs
  c.mesh = dict(shape=(1, -1, 1), rules=sharding.DEFAULT_RULES, max_replicated_fraction=1.0)
  # SFT on 3000 solver traces; GRPO on other problems (prompts + answers only), so the RL
  # signal is about generalising rather than about traces the policy has memorised.
  c.task = dict(domain='arithmetic', levels=(1, 2, 3), train_size=3000, rl_size=21000, seed=0,
                prompt_len=24, completion_len=40, answer_len=12,
                # Datasets instead of the generator ('' = generated; see experiment/config.py).
                train_file='', eval_file='', rl_file='', length_policy='drop', question_key='question',
                answer_key='answer')
  c.sft = dict(
      steps=1200, batch_size=64, microbatches=1,
      optim=_optim(learning_rate=3e-3, warmup_steps=30, decay_steps=1170, end_lr_factor=0.1, b2=0.98))
  # Phase-1 value model / PRM (off here; configs/alphazero.py turns it on).
  c.value = dict(
      enabled=False, labels='solver', mode='mse', init='policy', value_hidden=0,
      steps=200, batch_size=32, num_traces=512, label_batch=64, negatives_per_task=1, max_steps=8,
      mc_rollouts=4, samples_per_task=4, temperature=1.0, optim=_optim(),
      # The value model's own shape (0: the policy's; a deeper one starts from the policy's layers).
      arch=dict(n_layers=0, d_model=0, n_heads=0, n_kv_heads=0, head_dim=0, d_ff=0))
  c.rl = dict(
      algo='grpo', iterations=150, prompts_per_iteration=32, group_size=8,
      temperature=1.0, top_k=0, top_p=1.0,
      # Small steps: with a noisy policy gradient Adam moves every weight by ~lr per step, and
      # 2e-4 already undid SFT here within 20 iterations.
      optim=_optim(learning_rate=5e-5, end_lr_factor=1.0, b2=0.99),
      reward=dict(correct=1.0, wrong=0.0, invalid=0.0),
      microbatches=1, rollout_mesh=None, reward_on='device',
      reward_fns=(), reward_weights=(),  # host reward functions (reward_on='host'), e.g. ('correctness', 'format')
      # LM-head chunk of the updates' log-prob passes (0 = all at once); π_old recomputed by a
      # forward pass instead of the sampler's log-probs (grpo family, num_iterations > 1); each
      # prompt run once for its G completions in those passes (grpo family, EM, PPO).
      logprob_chunk_tokens=1024, recompute_old_logp=False, shared_prompt=True,
      # One section per algorithm (`--config.rl.algo=NAME` picks one; training/algorithms.py).
      # grpo's max_completion_length is task.completion_len.
      grpo=dict(scale_rewards='group', loss_type='dapo', epsilon=0.2, epsilon_high=0.28, beta=0.0,
                num_iterations=1, mask_truncated_completions=False,
                mask_constant_groups=False, overlong_buffer=0, overlong_penalty_factor=1.0),
      rloo=dict(loss_type='dapo', epsilon=0.2, epsilon_high=0.28, beta=0.0, num_iterations=1,
                mask_truncated_completions=False, normalize_advantages=False),
      # Needs value.enabled=True: the phase-1 PRM scores every step of every rollout.
      process_grpo=dict(loss_type='dapo', epsilon=0.2, epsilon_high=0.28, beta=0.0, num_iterations=1,
                        max_steps=8, outcome_weight=0.0),
      ppo=dict(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, entropy_coef=0.0, gamma=1.0, lam=0.95,
               kl_coef=0.05, num_ppo_epochs=4, whiten_rewards=False, num_minibatches=1,
               shuffle='rows',  # 'groups': minibatches of whole prompt groups (their passes share prompts)
               whiten_advantages=True),
      # neg_logp_floor: negatively weighted tokens stop being pushed below this log-prob (None: never).
      em=dict(weights='raw', normalize='sequence_sum', num_m_steps=1, neg_logp_floor=-5.0),
      alphazero=dict(
          mcts=dict(num_simulations=8, num_children=4, num_walkers=2, max_depth=6, selection='puct',
                    c1=1.25, c2=19652.0, uct_c=1.0, prior='empirical', prior_temperature=1.0, q_bounds='fixed', root_selection='puct', gumbel_scale=1.0, backup='td',
                    gamma=0.96, td_lambda=1.0, virtual_loss=1.0, merge_duplicates=True, num_rollouts=0,
                    rollout_weight=0.5, answer='best_terminal', state_width='halving'),
          step_tokens=16, use_value_model=True, buffer_size=256, distill_steps=4, distill_batch=32,
          value_steps=4, value_batch=32, value_optim=_optim(b2=0.98),
          # Targets: every node's step by its visit share, Monte Carlo values ('best_path' + 'q':
          # rejection-sampling fine-tuning on each tree's best path; 'advantage': every step's Monte Carlo
          # outcome against its siblings', a clipped policy gradient); kl_beta anchors to the start policy.
          policy_target='visits', q_temperature=0.5, adv_clip=0.2, policy_min_visits=1, solved_trees_only=True,
          value_target='mc', min_visits=2, kl_beta=0.0,
          # sft_mix > 0 adds the cross-entropy of sft_mix_batch solver traces to each distillation step.
          sft_mix=0.0, sft_mix_batch=16))
  c.eval = dict(size=400, batch_size=200, strategies=('greedy', 'self_consistency'),
                num_samples=8, temperature=0.7, prm_scorer='prm_min', beam_width=4, beam_expansions=4,
                step_tokens=16, max_depth=6)
  c.checkpoint = dict(save_every=50, keep=2)
  c.lora = dict(rank=0, alpha=16.0, targets=lora.DEFAULT_TARGETS, dtype='float32')  # rank 0: full fine-tuning
  # Multi-process jobs; the launcher's RLM_* environment variables win (rlm_jax/main.py).
  c.distributed = dict(coordinator_address='', num_processes=1, process_id=0, local_device_ids=(),
                       initialization_timeout=300)
  c.hf_checkpoint = ''  # a local HF Llama/Qwen2 folder to start from ('' = random init)
  return c


def _optim(**overrides) -> dict:
  """An optimizer section: AdamW with warmup and linear decay (`training.state.OptimConfig`)."""
  return dict(dict(learning_rate=1e-3, warmup_steps=0, decay_steps=0, end_lr_factor=0.1, weight_decay=0.0,
                   b1=0.9, b2=0.95, grad_clip=1.0), **overrides)
