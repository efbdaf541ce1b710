"""The phase-2 algorithms an experiment can run: `config.rl.algo` -> its module's ALGORITHM.

To add one: write `training/<name>.py` ending with `ALGORITHM = phase.Algorithm(...)` (its
config section, how it builds its state, its compiled step; see `training/phase.py` and
`training/rloo.py` for a short example) and add one line here.
"""

from rlm_jax.training import alphazero, em, grpo, ppo, process_grpo, rloo

ALGORITHMS = {a.name: a for a in (
    grpo.ALGORITHM,
    rloo.ALGORITHM,
    process_grpo.ALGORITHM,
    ppo.ALGORITHM,
    em.ALGORITHM,
    alphazero.ALGORITHM,
)}
