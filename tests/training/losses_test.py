"""Losses against hand-computed numbers, explicit-loop references, padding and gradients."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rlm_jax import configlib
from rlm_jax.training import losses as L

LN2 = math.log(2.0)


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def _pad(x, n, value):
  """Append n columns (axis 1) filled with `value`."""
  x = np.asarray(x)
  fill = np.full((x.shape[0], n) + x.shape[2:], value, dtype=x.dtype)
  return np.concatenate([x, fill], axis=1)


# --- token log-probs / entropy / SFT ---------------------------------------------------------

def test_token_logprobs_and_entropy_vs_loops():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32) * 3
  tgt = rng.integers(0, 5, size=(2, 3))
  logp = np.asarray(L.token_logprobs(jnp.asarray(logits, jnp.bfloat16), tgt))
  assert logp.dtype == np.float32
  lp16 = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), np.float64)
  for b in range(2):
    for t in range(3):
      z = lp16[b, t]
      lse = math.log(sum(math.exp(v) for v in z))
      assert abs(logp[b, t] - (z[tgt[b, t]] - lse)) < 1e-5
      p = [math.exp(v - lse) for v in z]
      ent = -sum(pi * math.log(pi) for pi in p)
      assert abs(float(L.token_entropy(lp16[None, None, b, t])[0, 0]) - ent) < 1e-5
  # uniform over V = 5 -> entropy log 5
  _close(L.token_entropy(jnp.zeros((1, 1, 5))), [[math.log(5)]])


def test_sft_loss_hand_numbers_padding_and_grad():
  # V = 2, logits (0, ln 3): p = (1/4, 3/4)
  z = np.array([[[0.0, math.log(3.0)]] * 3], np.float32)
  tgt = np.array([[1, 0, 1]])
  mask = np.array([[1.0, 1.0, 0.0]])
  loss, aux = L.sft_loss(z, tgt, mask)
  _close(loss, -(math.log(0.75) + math.log(0.25)) / 2)
  _close(aux["num_tokens"], 2.0)
  _close(aux["accuracy"], 0.5)
  _close(jax.jit(L.sft_loss)(z, tgt, mask)[0], loss)
  # appending padding (big logits, mask 0) changes nothing
  zp, tp, mp = _pad(z, 2, 50.0), _pad(tgt, 2, 1), _pad(mask, 2, 0.0)
  _close(L.sft_loss(zp, tp, mp)[0], loss)
  # d loss / d logits = (softmax - onehot) / N on masked positions, 0 elsewhere
  g = np.asarray(jax.grad(lambda x: L.sft_loss(x, tp, mp)[0])(jnp.asarray(zp)))
  _close(g[0, 0], [0.25 / 2, (0.75 - 1) / 2])
  _close(g[0, 1], [(0.25 - 1) / 2, 0.75 / 2])
  assert np.all(g[0, 2:] == 0)


# --- GRPO -----------------------------------------------------------------------------------
# Hand example: B = 2, L = 3, A = (+1, -2), ρ = (1.5, 0.7, 1.0 | 1.5, 0.7, pad).
# ε = 0.2, ε_high = 0.28 -> clip range [0.8, 1.28].
#   row 0 (A=+1): -min(1.5, 1.28) = -1.28, -min(0.7, 0.8) = -0.7, -1.0   -> sum -2.98
#   row 1 (A=-2): -min(-3, -2.56) = 3.0,   -min(-1.4, -1.6) = 1.6        -> sum  4.60
# Δ = ref - logp = (0, ln2, -ln2 | ln2, 0): k3 = (0, 1-ln2, ln2-1/2 | 1-ln2, 0), sum 0.806853

def _grpo_inputs():
  logp = np.array([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]], np.float32)
  old = logp - np.log(np.array([[1.5, 0.7, 1.0], [1.5, 0.7, 1.0]], np.float32))
  ref = logp + np.array([[0.0, LN2, -LN2], [LN2, 0.0, 0.0]], np.float32)
  adv = np.array([1.0, -2.0], np.float32)
  mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
  trunc = np.array([False, False])
  return logp, old, ref, adv, mask, trunc


KL_SUM = (1 - LN2) + (LN2 - 0.5) + (1 - LN2)


@pytest.mark.parametrize("loss_type,expected", [
    ("grpo", (-2.98 / 3 + 4.6 / 2) / 2),
    ("dapo", 1.62 / 5),
    ("bnpo", 1.62 / 5),
    ("dr_grpo", 1.62 / (2 * 4)),
])
def test_grpo_loss_hand_numbers(loss_type, expected):
  logp, old, ref, adv, mask, trunc = _grpo_inputs()
  cfg = L.GRPOConfig(loss_type=loss_type, epsilon=0.2, epsilon_high=0.28,
                     max_completion_length=4)
  loss, aux = L.grpo_loss(logp, old, None, adv, mask, trunc, cfg)
  _close(loss, expected)
  _close(aux["clip_low"], 0.2)
  _close(aux["clip_high"], 0.2)
  _close(aux["clip_region"], 0.4)
  _close(aux["ratio_mean"], 5.4 / 5)
  _close(aux["kl"], 0.0)
  _close(aux["num_tokens"], 5.0)


def test_grpo_loss_k3_kl():
  logp, old, ref, adv, mask, trunc = _grpo_inputs()
  cfg = L.GRPOConfig(loss_type="dapo", epsilon_high=0.28, beta=0.1)
  loss, aux = L.grpo_loss(logp, old, ref, adv, mask, trunc, cfg)
  _close(aux["kl"], KL_SUM / 5)
  _close(loss, (1.62 + 0.1 * KL_SUM) / 5)
  # grpo: per-row token means; row 0 kl sum 0.5, row 1 kl sum 1-ln2
  cfg = L.GRPOConfig(loss_type="grpo", epsilon_high=0.28, beta=0.1)
  loss, _ = L.grpo_loss(logp, old, ref, adv, mask, trunc, cfg)
  _close(loss, ((-2.98 + 0.05) / 3 + (4.6 + 0.1 * (1 - LN2)) / 2) / 2)
  # beta = 0 with a reference: kl reported, not added
  cfg = L.GRPOConfig(loss_type="dapo", epsilon_high=0.28)
  loss, aux = L.grpo_loss(logp, old, ref, adv, mask, trunc, cfg)
  _close(loss, 1.62 / 5)
  _close(aux["kl"], KL_SUM / 5)
  with pytest.raises(ValueError, match="beta=0.1 needs ref_logp_BxL"):
    L.grpo_loss(logp, old, None, adv, mask, trunc, L.GRPOConfig(beta=0.1))


def test_grpo_mask_truncated_and_num_items():
  logp, old, _, adv, mask, _ = _grpo_inputs()
  trunc = np.array([False, True])
  for loss_type, expected in [("dapo", -2.98 / 3), ("grpo", (-2.98 / 3 + 0.0) / 2),
                              ("dr_grpo", -2.98 / 8)]:
    cfg = L.GRPOConfig(loss_type=loss_type, epsilon_high=0.28, max_completion_length=4,
                       mask_truncated_completions=True)
    loss, aux = L.grpo_loss(logp, old, None, adv, mask, trunc, cfg)
    _close(loss, expected)
    _close(aux["num_tokens"], 3.0)
  # without the flag the truncated row still counts
  cfg = L.GRPOConfig(loss_type="dapo", epsilon_high=0.28)
  _close(L.grpo_loss(logp, old, None, adv, mask, trunc, cfg)[0], 1.62 / 5)
  # dapo divides by a given global token count, bnpo ignores it
  _close(L.grpo_loss(logp, old, None, adv, mask, trunc, cfg, num_items=10.0)[0], 1.62 / 10)
  cfg = L.GRPOConfig(loss_type="bnpo", epsilon_high=0.28)
  _close(L.grpo_loss(logp, old, None, adv, mask, trunc, cfg, num_items=10.0)[0], 1.62 / 5)


def _grpo_ref(logp, old, ref, adv_bl, mask, cfg):
  """Explicit loops, written independently of the vectorised code."""
  b_, l_ = logp.shape
  rows, tot, n = [], 0.0, 0
  for b in range(b_):
    s, c = 0.0, 0
    for t in range(l_):
      if not mask[b, t]:
        continue
      rho = math.exp(logp[b, t] - old[b, t])
      a = adv_bl[b, t]
      clipped = min(max(rho, 1 - cfg.epsilon), 1 + cfg.epsilon_high)
      x = -min(rho * a, clipped * a)
      d = ref[b, t] - logp[b, t]
      x += cfg.beta * (math.exp(d) - d - 1)
      s, c = s + x, c + 1
    rows.append(s / max(c, 1))
    tot, n = tot + s, n + c
  return {"grpo": sum(rows) / b_, "dapo": tot / max(n, 1), "bnpo": tot / max(n, 1),
          "dr_grpo": tot / (b_ * cfg.max_completion_length)}[cfg.loss_type]


@pytest.mark.parametrize("loss_type", L.LOSS_TYPES)
def test_grpo_random_vs_loops_and_padding_and_jit(loss_type):
  rng = np.random.default_rng(7)
  b, l = 4, 6
  logp = rng.normal(-1.0, 0.5, size=(b, l)).astype(np.float32)
  old = (logp + rng.normal(0, 0.3, size=(b, l))).astype(np.float32)
  ref = (logp + rng.normal(0, 0.3, size=(b, l))).astype(np.float32)
  adv_bl = rng.normal(size=(b, l)).astype(np.float32)
  mask = (np.arange(l)[None] < rng.integers(1, l + 1, size=(b, 1))).astype(np.float32)
  cfg = L.GRPOConfig(loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, beta=0.05,
                     max_completion_length=16)
  trunc = np.zeros(b, bool)
  loss, _ = L.grpo_loss(logp, old, ref, adv_bl, mask, trunc, cfg)
  _close(loss, _grpo_ref(logp, old, ref, adv_bl, mask, cfg), tol=1e-5)
  # per-completion advantages broadcast over tokens
  adv_b = adv_bl[:, 0]
  _close(L.grpo_loss(logp, old, ref, adv_b, mask, trunc, cfg)[0],
         _grpo_ref(logp, old, ref, np.repeat(adv_b[:, None], l, 1), mask, cfg))

  # padding columns with inf/nan garbage change neither the loss nor the gradient
  def f(lp, o, r, a, m):
    return L.grpo_loss(lp, o, r, a, m, trunc, cfg)[0]
  g = jax.grad(f)(logp, old, ref, adv_bl, mask)
  pads = (_pad(logp, 3, np.inf), _pad(old, 3, -np.inf), _pad(ref, 3, np.nan),
          _pad(adv_bl, 3, np.nan), _pad(mask, 3, 0.0))
  lossp = f(*pads)
  gp = np.asarray(jax.grad(f)(*pads))
  _close(lossp, loss)
  _close(gp[:, :l], g)
  assert np.all(gp[:, l:] == 0)
  # jit; new values of the same shapes do not retrace
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def fj(lp, o, r, a, m):
    return L.grpo_loss(lp, o, r, a, m, trunc, cfg)[0]
  _close(fj(logp, old, ref, adv_bl, mask), loss)
  fj(logp + 1.0, old, ref, adv_bl, mask)


def test_grpo_gradients():
  logp, old, _, adv, mask, trunc = _grpo_inputs()
  cfg = L.GRPOConfig(loss_type="dapo", epsilon_high=0.28)
  g = np.asarray(jax.grad(lambda x: L.grpo_loss(x, old, None, adv, mask, trunc, cfg)[0])(logp))
  # d/dlogp of -ρA / N is -ρA / N where unclipped; 0 where the clip is active or padded
  _close(g, [[0.0, -0.7 / 5, -1.0 / 5], [2 * 1.5 / 5, 0.0, 0.0]])
  # on-policy shortcut (old = None): ρ = 1, gradient -A / |y_i| / B for 'grpo'
  cfg = L.GRPOConfig(loss_type="grpo")
  loss, g = jax.value_and_grad(
      lambda x: L.grpo_loss(x, None, None, adv, mask, trunc, cfg)[0])(logp)
  _close(loss, (-1.0 + 2.0) / 2)
  _close(g, [[-1 / 6] * 3, [2 / 4, 2 / 4, 0.0]])


def test_grpo_config_validation():
  assert L.GRPOConfig(epsilon=0.3).epsilon_high == 0.3
  assert L.GRPOConfig(epsilon=0.2, epsilon_high=0.28).epsilon_high == 0.28
  hash(L.GRPOConfig())
  bad = [
      (dict(loss_type="ppo"), r"GRPOConfig.loss_type must be one of \('grpo', 'dapo', "
       r"'dr_grpo', 'bnpo'\), got 'ppo'"),
      (dict(scale_rewards="batchwise"), "GRPOConfig.scale_rewards must be one of"),
      (dict(epsilon=1.5), "GRPOConfig.epsilon must be in"),
      (dict(epsilon_high=-0.1), "GRPOConfig.epsilon_high must be"),
      (dict(beta=-1.0), "GRPOConfig.beta must be >= 0"),
      (dict(num_iterations=0), "GRPOConfig.num_iterations must be an int >= 1"),
      (dict(mask_truncated_completions=1), "GRPOConfig.mask_truncated_completions"),
      (dict(max_completion_length=0), "GRPOConfig.max_completion_length"),
      (dict(overlong_buffer=600), "GRPOConfig.overlong_buffer must be"),
  ]
  for kw, msg in bad:
    with pytest.raises(ValueError, match=msg) as e:
      L.GRPOConfig(**kw)
    assert "\n" not in str(e.value)


def test_grpo_config_from_configdict():
  cfg = configlib.from_config(
      L.GRPOConfig, ml_collections.ConfigDict(dict(loss_type="dr_grpo", epsilon_high=0.28)), "grpo")
  assert cfg.loss_type == "dr_grpo" and cfg.epsilon_high == 0.28 and cfg.epsilon == 0.2
  with pytest.raises(configlib.ConfigError, match="config.grpo.loss_type='ppo': must be one of"):
    configlib.from_config(L.GRPOConfig, dict(loss_type="ppo"), "grpo")
  with pytest.raises(configlib.ConfigError, match="config.grpo.epsilon_hi: unknown key"):
    configlib.from_config(L.GRPOConfig, dict(epsilon_hi=0.28), "grpo")


# --- PPO ------------------------------------------------------------------------------------
# ρ = (1.5, 0.7), A = (1, -1), cliprange 0.2:
#   pg = max(-1.5, -1.2) = -1.2, max(0.7, 0.8) = 0.8 -> mean -0.2, both clipped
# v = (0.5, 0.0), old v = (0.2, 0.3), R = (1, -1), cliprange_value 0.2:
#   v_clip = (0.4, 0.1): max(0.25, 0.36) = 0.36, max(1.0, 1.21) = 1.21 -> vf = 0.5 * 0.785

def _ppo_inputs():
  logp = np.array([[-1.0, -2.0]], np.float32)
  old = logp - np.log(np.array([[1.5, 0.7]], np.float32))
  adv = np.array([[1.0, -1.0]], np.float32)
  v = np.array([[0.5, 0.0]], np.float32)
  old_v = np.array([[0.2, 0.3]], np.float32)
  ret = np.array([[1.0, -1.0]], np.float32)
  mask = np.ones((1, 2), np.float32)
  ent = np.array([[1.0, 2.0]], np.float32)
  return logp, old, adv, v, old_v, ret, mask, ent


def test_ppo_loss_hand_numbers():
  args = _ppo_inputs()
  cfg = L.PPOConfig(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, entropy_coef=0.01)
  loss, aux = L.ppo_loss(*args, cfg)
  _close(aux["pg_loss"], -0.2)
  _close(aux["vf_loss"], 0.3925)
  _close(aux["entropy"], 1.5)
  _close(aux["pg_clipfrac"], 1.0)
  _close(aux["vf_clipfrac"], 1.0)
  _close(loss, -0.2 + 0.1 * 0.3925 - 0.01 * 1.5)
  # no value clipping: 0.5 * (0.25 + 1.0) / 2
  loss, aux = L.ppo_loss(*args, L.PPOConfig(cliprange_value=None))
  _close(aux["vf_loss"], 0.3125)
  with pytest.raises(ValueError, match="entropy_coef=0.01 needs entropy_BxL"):
    L.ppo_loss(*args[:-1], None, L.PPOConfig(entropy_coef=0.01))


def test_ppo_padding_gradients_and_jit():
  logp, old, adv, v, old_v, ret, mask, ent = _ppo_inputs()
  cfg = L.PPOConfig(cliprange_value=None, vf_coef=0.5, entropy_coef=0.1)
  f = lambda lp, vv, e, m, *rest: L.ppo_loss(lp, rest[0], rest[1], vv, rest[2], rest[3], m, e,
                                              cfg)[0]
  gl, gv, ge = jax.grad(f, argnums=(0, 1, 2))(logp, v, ent, mask, old, adv, old_v, ret)
  # pg: both tokens clipped -> 0; vf (unclipped): 0.5 * 0.5 * 2 (v - R) / 2; entropy: -0.1/2
  _close(gl, [[0.0, 0.0]])
  _close(gv, [[0.5 * 0.5 * (0.5 - 1.0), 0.5 * 0.5 * (0.0 + 1.0)]])
  _close(ge, [[-0.05, -0.05]])
  padded = [_pad(x, 2, np.nan) for x in (logp, v, ent)] + [_pad(mask, 2, 0.0)] + \
           [_pad(x, 2, np.inf) for x in (old, adv, old_v, ret)]
  _close(f(*padded), f(logp, v, ent, mask, old, adv, old_v, ret))
  gp = jax.grad(f, argnums=(0, 1, 2))(*padded)
  for a, b in zip(gp, (gl, gv, ge)):
    _close(np.asarray(a)[:, :2], b)
    assert np.all(np.asarray(a)[:, 2:] == 0)
  fj = jax.jit(L.ppo_loss, static_argnames="cfg")
  _close(fj(logp, old, adv, v, old_v, ret, mask, ent, cfg=cfg)[0],
         L.ppo_loss(logp, old, adv, v, old_v, ret, mask, ent, cfg)[0])


def test_ppo_config_validation():
  for kw, msg in [(dict(cliprange=-0.1), "PPOConfig.cliprange must be in"),
                  (dict(gamma=1.5), "PPOConfig.gamma must be in"),
                  (dict(lam=2.0), "PPOConfig.lam must be in"),
                  (dict(num_ppo_epochs=0), "PPOConfig.num_ppo_epochs")]:
    with pytest.raises(ValueError, match=msg):
      L.PPOConfig(**kw)


# --- EM policy gradient ----------------------------------------------------------------------

def test_em_pg_loss_hand_numbers_and_grad():
  logp = np.array([[-1.0, -2.0, -3.0], [-0.5, -0.5, 9.0]], np.float32)
  mask = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
  w = np.array([2.0, -1.0], np.float32)
  loss, aux = L.em_pg_loss(logp, w, mask, "sequence_sum")
  _close(loss, -(2.0 * -6.0 + -1.0 * -1.0) / 2)  # 5.5
  _close(aux["nll_mean"], 7.0 / 5)
  _close(L.em_pg_loss(logp, w, mask, "token_mean")[0], 11.0 / 5)
  g = jax.grad(lambda x: L.em_pg_loss(x, w, mask, "sequence_sum")[0])(logp)
  _close(g, [[-1.0] * 3, [0.5, 0.5, 0.0]])  # -w_k / B, no ratio, no clip
  # the weights are constants
  gw = jax.grad(lambda ww: L.em_pg_loss(logp, ww, mask)[0])(w)
  _close(gw, [0.0, 0.0])
  _close(L.em_pg_loss(_pad(logp, 2, np.nan), w, _pad(mask, 2, 0.0))[0], loss)
  _close(jax.jit(L.em_pg_loss, static_argnums=3)(logp, w, mask, "token_mean")[0], 11.0 / 5)
  with pytest.raises(ValueError, match="normalize must be one of"):
    L.em_pg_loss(logp, w, mask, "mean")


# --- value / PRM -----------------------------------------------------------------------------

def test_value_loss_mse_and_bce():
  pred = np.array([[0.5, -0.2, 7.0]], np.float32)
  tgt = np.array([[1.0, -1.0, 0.0]], np.float32)
  mask = np.array([[1.0, 1.0, 0.0]], np.float32)
  loss, aux = L.value_loss(pred, tgt, mask, "mse")
  _close(loss, (0.25 + 0.64) / 2)
  _close(aux["accuracy"], 1.0)
  # bce on logits: z = 0, t = 1 -> ln 2; z = ln 3, t = 0 -> -ln(1 - 3/4) = ln 4
  z = np.array([[0.0, math.log(3.0), 5.0]], np.float32)
  t = np.array([[1.0, 0.0, 1.0]], np.float32)
  loss, aux = L.value_loss(z, t, mask, "bce")
  _close(loss, (LN2 + math.log(4.0)) / 2)
  _close(aux["accuracy"], 0.0)  # z = 0 says "no" for t = 1, z = ln3 says "yes" for t = 0
  # soft label t = 0.25 at z = 0: still ln 2 (BCE of p = 1/2)
  _close(L.value_loss(np.zeros((1, 1)), np.full((1, 1), 0.25), np.ones((1, 1)), "bce")[0], LN2)
  # padding and gradient: d/dz = (σ(z) - t) / N
  zp, tp, mp = _pad(z, 2, np.nan), _pad(t, 2, np.nan), _pad(mask, 2, 0.0)
  _close(L.value_loss(zp, tp, mp, "bce")[0], loss)
  g = np.asarray(jax.grad(lambda x: L.value_loss(x, tp, mp, "bce")[0])(jnp.asarray(zp)))
  _close(g[0, :2], [(0.5 - 1.0) / 2, (0.75 - 0.0) / 2])
  assert np.all(g[0, 2:] == 0)
  _close(jax.jit(L.value_loss, static_argnums=3)(z, t, mask, "bce")[0], loss)
  with pytest.raises(ValueError, match="mode must be one of"):
    L.value_loss(pred, tgt, mask, "l1")


def test_prm_targets():
  sep = 9
  tokens = np.array([[5, 9, 5, 5, 9, 0, 9],    # three separators, S = 2 -> third unlabelled
                     [9, 5, 9, 0, 0, 0, 0],
                     [5, 5, 5, 5, 5, 5, 5]])   # no separator
  labels = np.array([[1.0, -1.0], [0.5, 0.25], [1.0, 1.0]], np.float32)
  valid = np.array([[1, 1], [1, 0], [1, 1]], bool)
  tgt, mask = L.prm_targets(tokens, sep, labels)
  _close(mask, [[0, 1, 0, 0, 1, 0, 0], [1, 0, 1, 0, 0, 0, 0], [0] * 7])
  _close(tgt, [[0, 1, 0, 0, -1, 0, 0], [0.5, 0, 0.25, 0, 0, 0, 0], [0] * 7])
  tgt, mask = L.prm_targets(tokens, sep, labels, step_valid_BxS=valid)
  _close(mask[1], [1, 0, 0, 0, 0, 0, 0])
  _close(tgt[1], [0.5, 0, 0, 0, 0, 0, 0])
  # composes with value_loss: only separator positions count
  pred = np.zeros((3, 7), np.float32)
  tgt, mask = L.prm_targets(tokens, sep, labels)
  _close(L.value_loss(pred, tgt, mask, "mse")[0], (1 + 1 + 0.25 + 0.0625) / 4)
  f = jax.jit(functools.partial(L.prm_targets, step_token_id=sep))
  _close(f(tokens, step_labels_BxS=labels)[0], tgt)


@pytest.mark.parametrize("chunk_tokens", [0, 6, 1000])
def test_chunked_lm_head_logprobs_equal_the_plain_computation(chunk_tokens):
  """B=3, T=7: chunk_tokens=6 gives C=2 positions per chunk and one padded position. Values
  and gradients (w.r.t. hidden states and head weight, through log-probs and entropy) equal
  those of the whole [B, T, V] logits at T=0.7."""
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  h = jax.random.normal(k1, (3, 7, 8))
  w = jax.random.normal(k2, (8, 50))
  tg = jax.random.randint(k3, (3, 7), 0, 50)
  c = jax.random.normal(k4, (3, 7))

  def plain(h, w):
    z = (h @ w) / 0.7
    return L.token_logprobs(z, tg), L.token_entropy(z)

  def chunked(h, w):
    return L.lm_head_logprobs(h, w, tg, 0.7, chunk_tokens)

  (lp_plain, ent_plain), (lp_chunk, ent_chunk) = plain(h, w), chunked(h, w)
  np.testing.assert_allclose(lp_chunk, lp_plain, rtol=1e-5, atol=1e-5)
  # lse - Σ p·z cancels in float32 on peaked rows: both sides carry ~1e-5 absolute error.
  np.testing.assert_allclose(ent_chunk, ent_plain, rtol=1e-4, atol=5e-5)
  objective = lambda f: lambda h, w: jnp.sum(c * f(h, w)[0]) + jnp.sum(f(h, w)[1] ** 2)
  for a, b in zip(jax.grad(objective(plain), (0, 1))(h, w), jax.grad(objective(chunked), (0, 1))(h, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(chunked(h, w)[0][0, 0], jax.nn.log_softmax(h[0, 0] @ w / 0.7)[tg[0, 0]], rtol=1e-5)


@pytest.mark.parametrize("loss_type,expected", [
    ("dapo", (-2.48 + 0.96) / 5),
    ("grpo", (-2.48 / 3 + 0.96 / 2) / 2),
])
def test_grpo_loss_per_token_advantages_hand_numbers(loss_type, expected):
  # ρ per token (1.5, 0.7, 1.0) as above, A per token (1, -1, 2 | 0.5, -2, masked):
  #   row 0: -min(1.5, 1.28) = -1.28, -min(-0.7, -0.8) = 0.8, -2           -> sum -2.48
  #   row 1: -min(0.75, 0.64) = -0.64, -min(-1.4, -1.6) = 1.6               -> sum  0.96
  logp, old, _, adv_b, mask, trunc = _grpo_inputs()
  cfg = L.GRPOConfig(loss_type=loss_type, epsilon=0.2, epsilon_high=0.28)
  adv_bl = np.array([[1.0, -1.0, 2.0], [0.5, -2.0, 7.0]], np.float32)
  loss, aux = L.grpo_loss(logp, old, None, adv_bl, mask, trunc, cfg)
  _close(loss, expected)
  _close(aux["clip_high"], 0.4)  # token 0 of both rows: ρ = 1.5 > 1.28 with A > 0
  _close(aux["clip_low"], 0.4)  # token 1 of both rows: ρ = 0.7 < 0.8 with A < 0
  # A per sequence [B] equals the same A broadcast over each row's tokens.
  per_seq, _ = L.grpo_loss(logp, old, None, adv_b, mask, trunc, cfg)
  per_tok, _ = L.grpo_loss(logp, old, None, np.repeat(adv_b[:, None], 3, 1), mask, trunc, cfg)
  _close(per_seq, per_tok)


def test_em_pg_negative_weights_are_bounded_by_the_logp_floor():
  """A negatively weighted sample no longer pays off for log π → -∞: its tokens are held at
  the floor (-5 here), where they get no gradient; the plain objective (floor None) is
  unbounded below. Positive weights are never clipped."""
  mask = np.ones((2, 2), np.float32)
  w = np.array([1.0, -1.0], np.float32)
  logp = lambda x: np.array([[-8.0, -1.0], [x, -1.0]], np.float32)
  # row 0: 1·(-8 - 1) = -9; row 1: -1·(max(x, -5) - 1); loss = -(sum) / 2
  for x, want in [(-2.0, -(-9.0 + 3.0) / 2), (-1e6, -(-9.0 + 6.0) / 2)]:
    loss, aux = L.em_pg_loss(logp(x), w, mask)
    _close(loss, want)
  _close(aux["floored_frac"], 0.25)
  g = jax.grad(lambda x: L.em_pg_loss(x, w, mask)[0])(logp(-7.0))
  _close(g, [[-0.5, -0.5], [0.0, 0.5]])  # the floored token: no push further down
  plain, _ = L.em_pg_loss(logp(-1e6), w, mask, neg_logp_floor=None)
  assert float(plain) < -1e5  # unbounded without the floor
  with pytest.raises(ValueError, match="neg_logp_floor must be < 0"):
    L.em_pg_loss(logp(-1.0), w, mask, neg_logp_floor=0.5)
