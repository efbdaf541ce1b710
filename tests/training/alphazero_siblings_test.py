"""Expert iteration's policy targets over siblings: visit shares, and signed advantages with the
searching policy's log-probs, raise the visited good step and lower a bad sibling the policy
preferred (`alphazero.distill` on node rows)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlm_jax.models.transformer import ModelConfig, Transformer
from rlm_jax.training import alphazero as az
from rlm_jax.training.state import OptimConfig, create_train_state, make_optimizer

V, LP, L = 12, 3, 5
PROMPT = [4, 5, 6]
GOOD, BAD = 7, 8  # the first token of two sibling steps from the same node (the prompt)
NUM_SFT = 12


def _node_row(step_token: int, weight: float, logp: float | None = None) -> dict:
  """A node row: the prompt, then one step (its token and the delimiter 3); the policy learns
  the step's first token (policy_mask at the position before it). `weight` is a visit share,
  or with `logp` (the step's log-prob under the policy that searched) a signed advantage."""
  tokens = np.zeros((1, L), np.int32)
  tokens[0, :LP] = PROMPT
  tokens[0, LP:LP + 2] = [step_token, 3]
  mask = tokens != 0
  policy = np.zeros((1, L), bool)
  policy[0, LP - 1] = True
  row = {'tokens': tokens, 'mask': mask, 'targets': np.zeros((1, L), np.float32),
         'target_mask': np.zeros((1, L), np.float32), 'policy_mask': policy, 'weight': np.array([weight], np.float32),
         'solved': np.array([weight > 0])}
  if logp is not None:
    row['logp'] = np.array([logp], np.float32)
  return row


def _buffer(*rows):
  buf = az.empty_buffer(4, L, 0)
  for r in rows:
    buf = az.buffer_add(buf, r, np.ones(1, bool))
  return buf


def _tiny_policy(learning_rate: float):
  """(graphdef, params, optimizer, logp): a 1-layer policy and log pi(GOOD), log pi(BAD) after the prompt."""
  gd, params = nnx.split(Transformer(ModelConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                                 head_dim=8, d_ff=32), rngs=nnx.Rngs(params=0)))

  @jax.jit
  def logp(p):
    logits = nnx.merge(gd, p)(jnp.asarray([PROMPT])).logits_BxLxV[0, -1]
    return jax.nn.log_softmax(logits)[jnp.array([GOOD, BAD])]

  return gd, params, make_optimizer(OptimConfig(learning_rate=learning_rate, grad_clip=0.0)), logp


def test_visit_share_targets_raise_the_good_sibling_and_lower_the_bad_one():
  gd, params, tx, logp = _tiny_policy(3e-2)
  probs = lambda p: jnp.exp(logp(p))
  fit = jax.jit(lambda st, buf, key: az.distill(gd, tx, st, buf, key, num_steps=60, batch_size=8, prompt_len=LP)[0])
  # A policy that prefers the bad step (as after SFT on a misleading trace) ...
  state = fit(create_train_state(params, tx), _buffer(_node_row(BAD, 1.0)), jax.random.key(0))
  good0, bad0 = map(float, probs(state.params))
  assert bad0 > 0.8 and good0 < 0.1
  # ... then a search whose visits went 4 : 1 to the good step: rows weighted by visit share.
  state = fit(state, _buffer(_node_row(GOOD, 0.8), _node_row(BAD, 0.2)), jax.random.key(1))
  good1, bad1 = map(float, probs(state.params))
  assert good1 > good0 + 0.4 and bad1 < bad0 - 0.4
  assert abs(good1 - 0.8) < 0.15 and abs(bad1 - 0.2) < 0.15  # the target distribution over the siblings


def test_advantage_distillation_raises_the_good_step_and_lowers_the_bad_sibling():
  gd, params, tx, logp = _tiny_policy(1e-2)
  # A policy that prefers the bad step (cross-entropy on it: p = 0.75 vs 0.02) ...
  sft = jax.jit(lambda st, buf, key: az.distill(gd, tx, st, buf, key, num_steps=NUM_SFT, batch_size=8, prompt_len=LP)[0])
  state = sft(create_train_state(params, tx), _buffer(_node_row(BAD, 1.0, 0.0)), jax.random.key(0))
  good0, bad0 = map(float, logp(state.params))
  assert np.exp(bad0) > 0.6 and np.exp(good0) < 0.05
  # ... then one round's rows: the good step won (A = +0.5), the bad sibling lost (A = -0.5),
  # each with its log-prob under the policy that searched; a new optimizer state (a new phase).
  fit = jax.jit(lambda b, key: az.distill(gd, tx, create_train_state(state.params, tx), b, key, num_steps=4,
                                          batch_size=8, prompt_len=LP, adv_clip=0.2)[0])
  state1 = fit(_buffer(_node_row(GOOD, 0.5, good0), _node_row(BAD, -0.5, bad0)), jax.random.key(1))
  good1, bad1 = map(float, logp(state1.params))
  assert good1 > good0 + 1.0 and bad1 < bad0 - 1.0 and good1 > bad1
  # The signs carry the direction: the same rows with the advantages swapped raise the bad step.
  state2 = fit(_buffer(_node_row(GOOD, -0.5, good0), _node_row(BAD, 0.5, bad0)), jax.random.key(1))
  good2, bad2 = map(float, logp(state2.params))
  assert good2 < good0 and bad2 > bad0
