"""Advantage estimators against hand-computed numbers and explicit-loop numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rlm_jax.training import advantages as A


def _close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# --- group_advantages ------------------------------------------------------------------------

def test_group_advantages_hand_numbers_unbiased_std():
  # G = 2, rewards (1, 0): mean 0.5, unbiased std sqrt(0.5) = 0.70711 (biased would give 0.5).
  adv = A.group_advantages(jnp.array([[1.0, 0.0]]), "group", eps=1e-4)
  _close(adv, [[0.5 / (math.sqrt(0.5) + 1e-4), -0.5 / (math.sqrt(0.5) + 1e-4)]])
  # G = 4, (1, 0, 0, 1): std = sqrt(4 * 0.25 / 3).
  adv = A.group_advantages(jnp.array([[1.0, 0.0, 0.0, 1.0]]), "group", eps=0.0)
  s = math.sqrt(1.0 / 3.0)
  _close(adv, [[0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s]])


def test_group_advantages_matches_torch_std_convention():
  # torch.std is unbiased, as TRL uses it; an independent reference for the convention.
  r = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
  t = torch.tensor(r)
  mean = t.mean(1, keepdim=True)
  ref_group = (t - mean) / (t.std(1, keepdim=True) + 1e-4)
  ref_batch = (t - mean) / (t.std() + 1e-4)
  _close(A.group_advantages(r, "group"), ref_group.numpy())
  _close(A.group_advantages(r, "batch"), ref_batch.numpy())
  _close(A.group_advantages(r, "none"), (t - mean).numpy())


def test_group_advantages_valid_mask_equals_subset():
  r = np.array([[1.0, 3.0, 100.0, 2.0], [0.0, 0.0, 1.0, -50.0]], np.float32)
  valid = np.array([[1, 1, 0, 1], [1, 1, 1, 0]], bool)
  adv = np.asarray(A.group_advantages(r, "group", valid_BxG=valid))
  for b in range(2):
    sub = r[b][valid[b]]
    m, s = sub.mean(), sub.std(ddof=1)
    _close(adv[b][valid[b]], (sub - m) / (s + 1e-4))
    assert np.all(adv[b][~valid[b]] == 0.0)
  # batch std over the valid entries only: 1, 3, 2, 0, 0, 1
  adv = np.asarray(A.group_advantages(r, "batch", eps=0.0, valid_BxG=valid))
  s = np.array([1.0, 3.0, 2.0, 0.0, 0.0, 1.0]).std(ddof=1)
  _close(adv[0, 0], (1.0 - 2.0) / s)


def test_group_advantages_constant_group_and_single_sample_give_zero():
  adv = A.group_advantages(jnp.array([[2.0, 2.0, 2.0]]), "group")
  _close(adv, [[0.0, 0.0, 0.0]])
  adv = A.group_advantages(jnp.array([[5.0, 1.0]]), "group", valid_BxG=jnp.array([[True, False]]))
  _close(adv, [[0.0, 0.0]])


def test_group_advantages_bad_scale_names_the_knob():
  with pytest.raises(ValueError, match="scale_rewards must be one of .*'group'.*got 'grp'"):
    A.group_advantages(jnp.zeros((1, 2)), "grp")


# --- DAPO filters ------------------------------------------------------------------------------

def test_mixed_reward_groups():
  r = jnp.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.5 + 1e-8], [0.0, 0.0, 2.0]])
  _close(A.mixed_reward_groups(r), [False, True, False, True])
  # the only differing reward is invalid -> constant group
  valid = jnp.array([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0]], bool)
  _close(A.mixed_reward_groups(r, valid_BxG=valid), [False, True, False, False])


def test_overlong_penalty_in_tokens():
  lengths = jnp.array([50, 80, 81, 90, 100, 101, 400])
  # Lmax = 100, buffer 20: linear from 0 at 80 to -1 at 100 (TRL docstring: 90 -> -0.5).
  _close(A.overlong_penalty(lengths, 100, 20, 1.0), [0, 0, -0.05, -0.5, -1.0, -1.0, -1.0])
  _close(A.overlong_penalty(lengths, 100, 20, 2.0), [0, 0, -0.1, -1.0, -2.0, -2.0, -2.0])
  _close(A.overlong_penalty(lengths, 100, 0, 1.0), [0, 0, 0, 0, 0, -1.0, -1.0])
  with pytest.raises(ValueError, match="overlong_buffer must be in"):
    A.overlong_penalty(lengths, 100, 101, 1.0)


# --- process supervision ----------------------------------------------------------------------

def _process_ref(step_r, step_valid, token_step, eps):
  b_, g_, s_ = step_r.shape
  out = np.zeros(token_step.shape, np.float64)
  for b in range(b_):
    vals = [step_r[b, g, s] for g in range(g_) for s in range(s_) if step_valid[b, g, s]]
    m = np.mean(vals)
    sd = np.std(vals, ddof=1) if len(vals) > 1 else 0.0
    for g in range(g_):
      for t in range(token_step.shape[2]):
        k = token_step[b, g, t]
        if k < 0:
          continue
        out[b, g, t] = sum((step_r[b, g, j] - m) / (sd + eps)
                           for j in range(k, s_) if step_valid[b, g, j])
  return out


def test_process_advantages_hand_numbers():
  # one prompt, two samples; valid step rewards {1, 0, 1 | 0, 1}: mean 0.6, unbiased var 0.3
  step_r = np.array([[[1.0, 0.0, 1.0], [0.0, 1.0, 9.0]]], np.float32)
  step_valid = np.array([[[1, 1, 1], [1, 1, 0]]], bool)
  token_step = np.array([[[0, 0, 1, 2, 2, -1], [0, 1, 1, -1, -1, -1]]], np.int32)
  adv = np.asarray(A.process_advantages(step_r, step_valid, token_step, eps=0.0))
  sd = math.sqrt(0.3)
  n1, n0 = 0.4 / sd, -0.6 / sd  # normalised reward of a 1-step and of a 0-step
  _close(adv[0, 0], [n1 + n0 + n1, n1 + n0 + n1, n0 + n1, n1, n1, 0.0])
  _close(adv[0, 1], [n0 + n1, n1, n1, 0.0, 0.0, 0.0])


def test_process_advantages_random_vs_loops():
  rng = np.random.default_rng(1)
  b, g, s, l = 2, 3, 4, 7
  step_r = rng.normal(size=(b, g, s)).astype(np.float32)
  n_steps = rng.integers(1, s + 1, size=(b, g))
  step_valid = np.arange(s)[None, None, :] < n_steps[..., None]
  token_step = np.full((b, g, l), -1, np.int32)
  for i in range(b):
    for j in range(g):
      cuts = np.sort(rng.integers(0, n_steps[i, j], size=l - 2))
      token_step[i, j, : l - 2] = cuts
  got = A.process_advantages(step_r, step_valid, token_step, eps=1e-4)
  _close(got, _process_ref(step_r, step_valid, token_step, 1e-4), tol=1e-4)


# --- GAE ---------------------------------------------------------------------------------------

def test_gae_hand_numbers():
  r = jnp.array([[0.0, 1.0]])
  v = jnp.array([[0.5, 0.4]])
  ok = jnp.ones((1, 2), bool)
  adv, ret = A.gae(r, v, ok, gamma=0.9, lam=0.8)
  # d1 = 1 - .4 = .6; d0 = .9*.4 - .5 = -.14; A0 = -.14 + .72*.6 = .292
  _close(adv, [[0.292, 0.6]])
  _close(ret, [[0.792, 1.0]])
  adv, _ = A.gae(r, v, ok, gamma=0.9, lam=0.8, last_value_B=jnp.array([1.0]))
  # d1 = 1 + .9 - .4 = 1.5; A0 = -.14 + .72*1.5 = .94
  _close(adv, [[0.94, 1.5]])


def _gae_ref(r, v, gamma, lam, last_v=0.0):
  """TRL-style backward loop on one unpadded row."""
  out, nxt_a = [], 0.0
  for t in reversed(range(len(r))):
    nxt_v = v[t + 1] if t + 1 < len(r) else last_v
    nxt_a = r[t] + gamma * nxt_v - v[t] + gamma * lam * nxt_a
    out.append(nxt_a)
  return np.array(out[::-1])


@pytest.mark.parametrize("where", ["right", "left", "interior"])
def test_gae_padding_is_skipped(where):
  rng = np.random.default_rng(2)
  n, pad = 5, 3
  r, v = rng.normal(size=n), rng.normal(size=n)
  ref = _gae_ref(r, v, 0.95, 0.9, last_v=0.7)
  garbage = rng.normal(size=pad) * 100
  pos = {"right": n, "left": 0, "interior": 2}[where]
  rp = np.insert(r, pos, garbage)
  vp = np.insert(v, pos, garbage)
  ok = np.insert(np.ones(n, bool), pos, np.zeros(pad, bool))
  adv, ret = A.gae(rp[None], vp[None], ok[None], 0.95, 0.9, last_value_B=jnp.array([0.7]))
  _close(np.asarray(adv)[0][ok], ref)
  _close(np.asarray(ret)[0][ok], ref + v)
  assert np.all(np.asarray(adv)[0][~ok] == 0) and np.all(np.asarray(ret)[0][~ok] == 0)


# --- tree TD advantages ----------------------------------------------------------------------

def test_step_td_advantages_hand_numbers():
  g = 0.9
  r = jnp.array([[0.0, 0.0, 1.0]])
  q = jnp.array([[0.45, 0.6, 1.0]])  # terminal node's q = its reward
  v0 = jnp.array([0.3])
  # v(s_i) = [0.3, 0.45/.9, 0.6/.9] = [0.3, 0.5, 0.6667]; gamma*v(s_{i+1}) = [0.45, 0.6, 0]
  _close(A.step_td_advantages(r, q, g, v0_B=v0), [[0.15, 0.1, 1.0 - 0.6 / 0.9]])
  # a cut-off (non-terminal) path bootstraps with its last q
  adv = A.step_td_advantages(r, q, g, v0_B=v0, terminal_B=jnp.array([False]))
  _close(adv, [[0.15, 0.1, 1.0 + 1.0 - 0.6 / 0.9]])


def test_step_td_advantages_padding():
  g = 0.95
  r = jnp.array([[0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
  q = jnp.array([[0.2, -1.0, 7.0, 7.0], [0.1, 0.3, 0.5, 1.0]])
  ok = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool)
  adv = np.asarray(A.step_td_advantages(r, q, g, valid_BxS=ok))
  _close(adv[0], [0.2 - 0.0, -1.0 - 0.2 / g, 0.0, 0.0])
  _close(adv[1], [0.1, 0.3 - 0.1 / g, 0.5 - 0.3 / g, 1.0 - 0.5 / g])
  with pytest.raises(ValueError, match="gamma must be in"):
    A.step_td_advantages(r, q, 0.0)


# --- EM weights, whitening --------------------------------------------------------------------

def test_em_weights():
  r = jnp.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 6.0]])
  _close(A.em_weights(r, "raw"), r)
  _close(A.em_weights(r, "centered"), [[0.5, -0.5, -0.5, 0.5], [-1.0, -1.0, -1.0, 3.0]])
  _close(A.em_weights(r, "normalized"), A.group_advantages(r, "group"))
  with pytest.raises(ValueError, match="em weight kind must be one of"):
    A.em_weights(r, "softmax")


def test_masked_whiten():
  x = np.array([[1.0, 2.0, 99.0], [3.0, 4.0, -99.0]])
  m = np.array([[1, 1, 0], [1, 1, 0]], bool)
  vals = np.array([1.0, 2.0, 3.0, 4.0])
  ref = (vals - vals.mean()) / np.sqrt(vals.var(ddof=1) + 1e-8)
  out = np.asarray(A.masked_whiten(x, m))
  _close(out[m], ref)
  assert np.all(out[~m] == 0)


# --- jit --------------------------------------------------------------------------------------

def test_everything_jits_and_matches_eager():
  rng = np.random.default_rng(3)
  r = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
  for scale in A.SCALE_REWARDS:
    f = jax.jit(A.group_advantages, static_argnums=(1,))
    _close(f(r, scale), A.group_advantages(r, scale))
  _close(jax.jit(A.mixed_reward_groups)(r), A.mixed_reward_groups(r))
  f = jax.jit(A.overlong_penalty, static_argnums=(1, 2, 3))
  _close(f(jnp.array([90, 10]), 100, 20, 1.0), [-0.5, 0.0])
  ok = jnp.ones((2, 4), bool)
  adv, ret = jax.jit(A.gae, static_argnums=(3, 4))(r, r * 0.5, ok, 0.9, 0.8)
  adv_e, ret_e = A.gae(r, r * 0.5, ok, 0.9, 0.8)
  _close(adv, adv_e)
  _close(ret, ret_e)
  f = jax.jit(A.step_td_advantages, static_argnums=(2,))
  _close(f(r, r, 0.9), A.step_td_advantages(r, r, 0.9))
  step_r = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)
  tok = jnp.zeros((2, 4, 5), jnp.int32)
  _close(jax.jit(A.process_advantages)(step_r, step_r > -9, tok),
         A.process_advantages(step_r, step_r > -9, tok))
