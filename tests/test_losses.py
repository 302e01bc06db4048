"""Unit tests of klq_jax.rl.losses against plain numpy loops (klq-method.md section 6, facts 1, 2, 5)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from klq_jax.rl import losses

B, T, V = 5, 12, 7


def random_layout(rng, b=B, t=T):
    """Rows of [left pad][prompt][response][right pad]; one row has no response at all."""
    attn = np.zeros((b, t), bool)
    resp = np.zeros((b, t), bool)
    for i in range(b):
        left = rng.integers(0, 3)
        prompt = rng.integers(1, 4)
        n_resp = 0 if i == b - 1 else rng.integers(1, t - left - prompt + 1)
        attn[i, left:left + prompt + n_resp] = True
        resp[i, left + prompt:left + prompt + n_resp] = True
    return attn, resp


def random_inputs(seed):
    rng = np.random.default_rng(seed)
    attn, resp = random_layout(rng)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    return dict(
        rewards=f(B, T), values=f(B, T), logp=-np.abs(f(B, T)), ref_logp=-np.abs(f(B, T)), mask=resp, attn=attn,
    )


# ----------------------------------------------------------------------------- numpy references


def np_gae(r, v, m, lam, gamma=1.0):
    out = np.zeros_like(r)
    for b in range(r.shape[0]):
        adv, next_v = 0.0, 0.0
        for t in reversed(np.flatnonzero(m[b])):
            adv = r[b, t] + gamma * next_v - v[b, t] + gamma * lam * adv
            out[b, t] = adv
            next_v = v[b, t]
    return out


def np_lambda_returns(r, v, logp, ref_logp, m, beta, lam, alpha):
    """The paper's recursion, literally, on the list of valid positions of each row."""
    out = np.zeros_like(r)
    for b in range(r.shape[0]):
        idx = np.flatnonzero(m[b])
        g = np.zeros(len(idx))
        for j in reversed(range(len(idx))):
            t = idx[j]
            if j == len(idx) - 1:
                g[j] = r[b, t]
            else:
                tn = idx[j + 1]
                g[j] = r[b, t] + (1 - lam) * v[b, tn] + lam * (g[j + 1] - beta * (logp[b, tn] - ref_logp[b, tn]))
            q_old = v[b, t] + beta * (logp[b, t] - ref_logp[b, t])
            out[b, t] = q_old + alpha * (g[j] - q_old)
    return out


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------- targets


@pytest.mark.parametrize("lam", [0.0, 0.7, 0.95, 1.0])
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_lambda_return_recursion_equals_closed_form(lam, alpha):
    d = random_inputs(seed=int(lam * 100 + alpha * 10))
    beta = 0.3
    args = (d["rewards"], d["values"], d["logp"], d["ref_logp"], d["mask"], beta, lam, alpha)
    g_rec = losses.klq_lambda_returns(*args)
    g_closed, adv = losses.klq_targets(*args)
    np.testing.assert_allclose(g_rec, g_closed, atol=1e-5)
    np.testing.assert_allclose(g_rec, np_lambda_returns(*args), atol=1e-5)
    # closed form by hand: Q_old + alpha * GAE(rtilde)
    rtilde = np.where(d["mask"], d["rewards"] - beta * (d["logp"] - d["ref_logp"]), 0.0)
    a_np = np_gae(rtilde, d["values"], d["mask"], lam)
    np.testing.assert_allclose(adv, a_np, atol=1e-5)
    q_old = d["values"] + beta * (d["logp"] - d["ref_logp"])
    np.testing.assert_allclose(g_closed, np.where(d["mask"], q_old + alpha * a_np, 0), atol=1e-5)
    assert np.all(np.asarray(g_closed)[~d["mask"]] == 0)


@pytest.mark.parametrize("lam,gamma", [(0.95, 1.0), (0.5, 0.9), (1.0, 1.0)])
def test_gae_matches_numpy_loop(lam, gamma):
    d = random_inputs(seed=3)
    adv = losses.gae_advantages(d["rewards"], d["values"], d["mask"], lam, gamma)
    np.testing.assert_allclose(adv, np_gae(d["rewards"], d["values"], d["mask"], lam, gamma), atol=1e-5)


def test_terminal_rewards_and_missing_eos():
    _, resp = random_layout(np.random.default_rng(0))
    r_b = np.arange(1, B + 1, dtype=np.float32)
    r_bt = np.asarray(losses.terminal_rewards(r_b, resp))
    for b in range(B):
        idx = np.flatnonzero(resp[b])
        expect = np.zeros(T, np.float32)
        if len(idx):
            expect[idx[-1]] = r_b[b]
        np.testing.assert_array_equal(r_bt[b], expect)
    trunc = np.array([True, False, True, False, False])
    np.testing.assert_array_equal(losses.missing_eos_rewards(r_b, trunc, -1.0), np.where(trunc, -1.0, r_b))


def test_lambda_one_target_is_monte_carlo_soft_return():
    """lam = 1, alpha = 1: G_t = R - beta * sum_{k>t} l_k (the KL-penalised return to go after a_t)."""
    d = random_inputs(seed=11)
    beta = 0.2
    r_bt = np.asarray(losses.terminal_rewards(np.ones(B, np.float32) * 2.0, d["mask"]))
    g, _ = losses.klq_targets(r_bt, d["values"], d["logp"], d["ref_logp"], d["mask"], beta, 1.0, 1.0)
    l = np.where(d["mask"], d["logp"] - d["ref_logp"], 0.0)
    after = np.cumsum(l[:, ::-1], axis=1)[:, ::-1] - l  # sum_{k>t} l_k
    np.testing.assert_allclose(np.asarray(g)[d["mask"]], (2.0 - beta * after)[d["mask"]], atol=1e-5)


# ----------------------------------------------------------------------------- alignment and KL


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shift_to_actions(temperature):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    values = rng.normal(size=(B, T)).astype(np.float32)
    tokens = rng.integers(0, V, size=(B, T))
    logp, v = losses.shift_to_actions(logits, values, tokens, temperature)
    ls = np_log_softmax(logits / temperature)
    for t in range(1, T):
        np.testing.assert_allclose(logp[:, t], ls[np.arange(B), t - 1, tokens[:, t]], atol=1e-5)
        np.testing.assert_allclose(v[:, t], values[:, t - 1])
    assert np.all(np.asarray(logp[:, 0]) == 0) and np.all(np.asarray(v[:, 0]) == 0)


@pytest.mark.parametrize("first_action", [2, 4])
def test_shift_to_actions_from_first_action(first_action):
    """Logits over positions first_action-1..T-2 only (those that predict an action) give the full
    alignment from slot first_action on, and 0 before it (logprobs, entropy); any other number of positions
    is refused."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    tokens = rng.integers(0, V, size=(B, T))
    full_logp, _ = losses.shift_to_actions(logits, None, tokens, 0.7)
    part_logp, _ = losses.shift_to_actions(logits[:, first_action - 1:-1], None, tokens, 0.7, first_action)
    np.testing.assert_array_equal(np.asarray(part_logp[:, :first_action]), 0.0)
    np.testing.assert_allclose(part_logp[:, first_action:], full_logp[:, first_action:], rtol=1e-6)
    full_h = losses.action_entropy(logits, 0.7)
    part_h = losses.action_entropy(logits[:, first_action - 1:-1], 0.7, first_action)
    np.testing.assert_array_equal(np.asarray(part_h[:, :first_action]), 0.0)
    np.testing.assert_allclose(part_h[:, first_action:], full_h[:, first_action:], rtol=1e-6)
    for wrong in (logits[:, first_action - 1:], logits[:, first_action:-1]):
        with pytest.raises(ValueError, match="expected"):
            losses.shift_to_actions(wrong, None, tokens, 1.0, first_action)


def test_token_logprobs_gradient_equals_autodiff():
    """The written-out backward of `token_logprobs` (softmax turned into the cotangent) is autodiff's."""
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(size=(B, T, V)) * 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, size=(B, T)))
    weights = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)

    def reference(logits_btv):
        scaled = logits_btv / 0.7
        picked = jnp.take_along_axis(scaled, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(weights * (picked - jax.nn.logsumexp(scaled, axis=-1)))

    ours = jax.grad(lambda x: jnp.sum(weights * losses.token_logprobs(x, targets, 0.7)))(logits)
    expected = np_log_softmax(np.asarray(logits) / 0.7)[np.arange(B)[:, None], np.arange(T), np.asarray(targets)]
    np.testing.assert_allclose(losses.token_logprobs(logits, targets, 0.7), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours, jax.grad(reference)(logits), rtol=1e-5, atol=1e-6)


def test_kl_estimators_and_exact_kl():
    rng = np.random.default_rng(1)
    lp, lq = rng.normal(size=(2, B, T, V)).astype(np.float32) * 2
    logp, logq = np_log_softmax(lp), np_log_softmax(lq)
    p = np.exp(logp)
    kl_np = np.sum(p * (logp - logq), -1)
    np.testing.assert_allclose(losses.kl_exact(lp, lq), kl_np, atol=1e-5)
    np.testing.assert_allclose(losses.kl_exact(lp, lq, 0.5), np.sum(
        np.exp(np_log_softmax(2 * lp)) * (np_log_softmax(2 * lp) - np_log_softmax(2 * lq)), -1), atol=1e-4)
    ent_np = -np.sum(p * logp, -1)
    np.testing.assert_allclose(losses.entropy_from_logits(lp), ent_np, atol=1e-5)
    k1 = losses.kl_k1(logp, logq)
    k3 = losses.kl_k3(logp, logq)
    np.testing.assert_allclose(k1, logp - logq, atol=1e-6)
    np.testing.assert_allclose(k3, np.exp(logq - logp) - 1 - (logq - logp), rtol=1e-5, atol=1e-5)
    # Both are unbiased: their expectation under p is the exact KL.
    np.testing.assert_allclose(np.sum(p * np.asarray(k1), -1), kl_np, atol=1e-5)
    np.testing.assert_allclose(np.sum(p * np.asarray(k3), -1), kl_np, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(k3) >= 0)


def test_masked_whiten_ignores_padding():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(B, T)).astype(np.float32) * 3 + 1
    _, mask = random_layout(rng)
    w = np.asarray(losses.masked_whiten(x, mask))
    valid = x[mask]
    np.testing.assert_allclose(w[mask], (valid - valid.mean()) / np.sqrt(valid.var() + 1e-8), atol=1e-5)
    assert np.all(w[~mask] == 0)
    x2 = np.where(mask, x, 1e6)  # garbage in padding changes nothing
    np.testing.assert_array_equal(losses.masked_whiten(x2, mask), w)
    np.testing.assert_allclose(losses.masked_mean(x2, mask), valid.mean(), rtol=1e-6)


# ----------------------------------------------------------------------------- PPO losses


def test_ppo_losses_match_numpy():
    rng = np.random.default_rng(4)
    logp, old = (-np.abs(rng.normal(size=(2, B, T)))).astype(np.float32)
    adv, v, v_old, ret = rng.normal(size=(4, B, T)).astype(np.float32)
    _, mask = random_layout(rng)
    eps, eps_v = 0.2, 0.3
    pg, cf = losses.ppo_policy_loss(logp, old, adv, mask, eps)
    ratio = np.exp(logp - old)
    pg_np = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps))
    np.testing.assert_allclose(pg.total, pg_np[mask].sum(), rtol=1e-5)
    assert pg.count == mask.sum()
    np.testing.assert_allclose(cf.mean(), (-adv * np.clip(ratio, 1 - eps, 1 + eps) > -adv * ratio)[mask].mean())
    vl, _ = losses.ppo_value_loss(v, v_old, ret, mask, eps_v)
    v_clip = v_old + np.clip(v - v_old, -eps_v, eps_v)
    vl_np = 0.5 * np.maximum((v - ret) ** 2, (v_clip - ret) ** 2)
    np.testing.assert_allclose(vl.mean(), vl_np[mask].mean(), rtol=1e-5)
    vl0, _ = losses.ppo_value_loss(v, v_old, ret, mask, None)
    np.testing.assert_allclose(vl0.mean(), (0.5 * (v - ret) ** 2)[mask].mean(), rtol=1e-5)
    # KLQ clipped loss has the same form on Q.
    kq, _ = losses.klq_loss(v, ret, mask, v_old, eps_v)
    np.testing.assert_allclose(kq.mean(), vl_np[mask].mean(), rtol=1e-5)


def test_adaptive_kl_coef():
    for kl, target in [(3.0, 6.0), (6.0, 6.0), (20.0, 6.0)]:
        err = np.clip(kl / target - 1, -0.2, 0.2)
        np.testing.assert_allclose(losses.adaptive_kl_coef(0.1, kl, target, 1000.0, 64), 0.1 * (1 + err * 64 / 1000),
                                   rtol=1e-6)


# ----------------------------------------------------------------------------- gradient identity


def klq_loss_of_logits(logits, values, tokens, mask, ref_logp, targets, beta, temperature):
    logp, v = losses.shift_to_actions(logits, values, tokens, temperature)
    q = losses.klq_q_values(v, logp, ref_logp, beta)
    return losses.klq_loss(q, targets, mask)[0].mean()


@pytest.mark.parametrize("alpha,temperature", [(1.0, 1.0), (0.5, 0.8)])
def test_klq_gradient_at_old_params_is_policy_gradient(alpha, temperature):
    """At theta = theta_old: dL/dlogits[t-1] = -(1/N) alpha beta A_t dlog pi(a_t)/dlogits, token by token,
    and dL/dV(s_t) = -(1/N) alpha A_t (klq-method.md section 3, fact 2)."""
    rng = np.random.default_rng(5)
    attn, mask = random_layout(rng)
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    values = rng.normal(size=(B, T)).astype(np.float32)
    tokens = rng.integers(0, V, size=(B, T))
    ref_logp = -np.abs(rng.normal(size=(B, T))).astype(np.float32)
    beta, lam = 0.4, 0.9
    old_logp, old_v = losses.shift_to_actions(logits, values, tokens, temperature)
    r_bt = losses.terminal_rewards(rng.normal(size=B).astype(np.float32), mask)
    targets, adv = losses.klq_targets(r_bt, old_v, old_logp, ref_logp, mask, beta, lam, alpha)
    g_logits, g_values = jax.grad(klq_loss_of_logits, argnums=(0, 1))(
        logits, values, tokens, mask, ref_logp, targets, beta, temperature)
    n = mask.sum()
    probs = np.exp(np_log_softmax(logits / temperature))
    expect_logits = np.zeros_like(logits)
    expect_values = np.zeros_like(values)
    adv = np.asarray(adv)
    for b, t in zip(*np.nonzero(mask)):
        dlogpi = (np.eye(V)[tokens[b, t]] - probs[b, t - 1]) / temperature
        expect_logits[b, t - 1] = -alpha * beta * adv[b, t] * dlogpi / n
        expect_values[b, t - 1] = -alpha * adv[b, t] / n
    np.testing.assert_allclose(g_logits, expect_logits, atol=1e-6)
    np.testing.assert_allclose(g_values, expect_values, atol=1e-6)


# ----------------------------------------------------------------------------- padding invariance


def pad_bt(x, left, right, fill):
    widths = [(0, 0), (left, right)] + [(0, 0)] * (x.ndim - 2)
    return np.pad(x, widths, constant_values=fill)


@pytest.mark.parametrize("algo", ["klq", "ppo"])
def test_appending_padding_changes_nothing(algo):
    """Extra left and right padding (with garbage in it) leaves targets, losses and gradients unchanged."""
    rng = np.random.default_rng(6)
    attn, mask = random_layout(rng)
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    values = rng.normal(size=(B, T)).astype(np.float32)
    tokens = rng.integers(0, V, size=(B, T))
    ref_logp = -np.abs(rng.normal(size=(B, T))).astype(np.float32)
    rewards_b = rng.normal(size=B).astype(np.float32)
    beta, lam, alpha = 0.3, 0.95, 0.7
    # perturb the "current" parameters away from the old ones so the ratio/clip paths are exercised
    new_logits = logits + 0.3 * rng.normal(size=logits.shape).astype(np.float32)
    new_values = values + 0.3 * rng.normal(size=values.shape).astype(np.float32)

    def everything(logits, values, new_logits, new_values, tokens, mask, ref_logp):
        old_logp, old_v = losses.shift_to_actions(logits, values, tokens)
        r_bt = losses.terminal_rewards(rewards_b, mask)
        if algo == "klq":
            targets, adv = losses.klq_targets(r_bt, old_v, old_logp, ref_logp, mask, beta, lam, alpha)
        else:
            rt = losses.kl_penalised_rewards(r_bt, old_logp, ref_logp, mask, beta)
            adv = losses.gae_advantages(rt, old_v, mask, lam)
            targets = jnp.where(mask, old_v + adv, 0.0)
            adv = losses.masked_whiten(adv, mask)

        def loss(nl, nv):
            logp, v = losses.shift_to_actions(nl, nv, tokens)
            if algo == "klq":
                q_old = losses.klq_q_values(old_v, old_logp, ref_logp, beta)
                q = losses.klq_q_values(v, logp, ref_logp, beta)
                return losses.klq_loss(q, targets, mask, q_old, 0.1)[0].mean()
            pg, _ = losses.ppo_policy_loss(logp, old_logp, adv, mask, 0.2)
            vf, _ = losses.ppo_value_loss(v, old_v, targets, mask, 0.2)
            return pg.mean() + 0.1 * vf.mean()

        val, grads = jax.value_and_grad(loss, argnums=(0, 1))(new_logits, new_values)
        return targets, adv, val, grads

    base = jax.jit(everything)(logits, values, new_logits, new_values, tokens, mask, ref_logp)
    left, right = 3, 2
    g = lambda x, fill=0.0: pad_bt(x, left, right, fill)  # noqa: E731
    garbage = lambda x: g(x, 5.0)  # noqa: E731
    padded = jax.jit(everything)(garbage(logits), garbage(values), garbage(new_logits), garbage(new_values),
                                 g(tokens, 1), g(mask, False), garbage(ref_logp))
    sl = slice(left, left + T)
    np.testing.assert_allclose(padded[0][:, sl], base[0], atol=1e-6)  # targets
    np.testing.assert_allclose(padded[1][:, sl], base[1], atol=1e-6)  # advantages
    np.testing.assert_allclose(padded[2], base[2], rtol=1e-6)  # loss
    for gp, gb in zip(padded[3], base[3]):
        np.testing.assert_allclose(gp[:, sl], gb, atol=1e-7)
        assert np.all(np.asarray(gp[:, :left]) == 0) and np.all(np.asarray(gp[:, left + T:]) == 0)


@pytest.mark.parametrize("algo", ["klq", "ppo"])
def test_rollout_targets_are_compute_targets_fields_and_leave_the_recorded_states_out(algo):
    """The loop's jitted targets (`loop.rollout_targets`) give `compute_targets`' advantages and targets, and its
    program returns those two arrays alone: returning the rollout copied the sampler's recorded layer states
    (~0.5 GB a SmolLM2 iteration)."""
    from klq_jax.rl.loop import rollout_targets
    from klq_jax.rl.train_step import Rollout, compute_targets, default_algo_config

    b, t, layers, d, f = 3, 12, 2, 8, 40
    rng = np.random.default_rng(0)
    response_bt = np.zeros((b, t), bool)
    response_bt[:, 4:] = True
    response_bt[1, 9:] = False  # an early EOS
    batch = Rollout.from_samples(
        rng.integers(0, 50, (b, t)), np.tile(np.arange(t), (b, 1)), np.ones((b, t), bool), response_bt,
        rng.normal(size=(b, t)) - 2.0, np.array([False, True, False]), values_bt=rng.normal(size=(b, t)),
        entropy_bt=np.abs(rng.normal(size=(b, t))), first_action=4,
        layer_inputs_bltd=jnp.asarray(rng.normal(size=(b, layers, t, d)), jnp.float32),
        layer_output_btd=jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32),
        logsumexp_bt=jnp.asarray(rng.normal(size=(b, t)), jnp.float32),
        gate_up_bltf=jnp.asarray(rng.integers(0, 2**16, (b, layers, t, f)), jnp.uint16))
    batch = batch.replace(rewards_b=jnp.asarray([1.0, -0.5, 0.25]),
                          ref_logp_bt=jnp.asarray(rng.normal(size=(b, t)) - 2.0, jnp.float32))
    algo_cfg = default_algo_config()
    algo_cfg.algo = algo

    targets_fn = jax.jit(functools.partial(rollout_targets, algo_cfg=algo_cfg))
    advantages, targets = targets_fn(batch, 0.1)
    want = jax.jit(functools.partial(compute_targets, algo_cfg=algo_cfg))(batch, 0.1)  # what the loop ran before
    np.testing.assert_array_equal(np.asarray(advantages), np.asarray(want.advantages_bt))
    np.testing.assert_array_equal(np.asarray(targets), np.asarray(want.targets_bt))
    assert float(np.abs(np.asarray(advantages)).max()) > 0
    out_info = jax.tree.leaves(targets_fn.lower(batch, 0.1).out_info)
    assert [(o.shape, o.dtype) for o in out_info] == [((b, t), jnp.float32)] * 2
