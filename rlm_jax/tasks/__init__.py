"""Reasoning tasks and verifiers, compatible with the x1 benchmark format.

Domains: "sat", "knapsack", "einstein", "prontoqa", "countdown", "arithmetic", "gsm8k"
(lookups ignore case, so x1's "SAT", "Knapsack", "Einstein", "ProntoQA" work). A task is
`{"type", "level" 1..10, "problem", "unique_solution", "solution"}` plus, when generated,
`"steps"`: a solver's step-by-step solution ending with `"Answer: " + answer_text(task)`.
Problems and steps are printable ASCII on one line.

  task = generate("sat", seed=0, difficulty=0.3)
  verify(task, "x1=T x2=F x3=T")  # -> -1 invalid, 0 wrong, 1 constraints met, 2 solved
  reward(verify(task, output))    # -> float, mapping configurable

CLI: `python -m rlm_jax.tasks generate|verify --help`.
"""
from rlm_jax.tasks.common import difficulty_of, level_of, make_rng
from rlm_jax.tasks.files import load_tasks, save_tasks
from rlm_jax.tasks.registry import (DOMAINS, answer_text, check_steps, domain_of, generate,
                                    generate_dataset, has_step_checker, verify)
from rlm_jax.tasks.rewards import DEFAULT_REWARDS, reward, reward_array

__all__ = [
    "DEFAULT_REWARDS", "DOMAINS", "answer_text", "check_steps", "difficulty_of", "domain_of", "generate",
    "generate_dataset", "has_step_checker", "level_of", "load_tasks", "make_rng", "reward", "reward_array", "save_tasks",
    "verify",
]
