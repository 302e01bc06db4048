"""Pure loss and target functions for KLQ and PPO on token sequences.

Conventions (see docs/architecture.md): a batch is `tokens_bt` = left-padded prompt, response,
right padding. `response_mask_bt[:, t]` is True where `tokens_bt[:, t]` is a response token, i.e.
an action taken in the state `s_t = tokens[:, :t]`. Every per-action quantity (`logp_bt`,
`values_bt` = V(s_t), rewards, advantages, targets) is stored at the action's position `t`;
`shift_to_actions` produces that alignment from a model forward. Masked positions (left padding,
the prompt, right padding) never enter a sum, a scan or a statistic, so appending padding changes
nothing.

Token losses return a `LossOutput(total, count)` (sum over valid tokens, number of valid tokens):
sum them across microbatches or devices and divide once, and the result is the full-batch mean.

References:
  KLQ: Brown, Wells, Young, Bacallado, "KL-Regularised Q-Learning: A Token-level Action-Value
       perspective on Online RLHF", arXiv:2508.17000 (2025).
  PPO for RLHF: Ziegler et al. 2019 (arXiv:1909.08593, adaptive KL), Ouyang et al. 2022,
       Huang et al. 2024 "The N+ implementation details of RLHF with PPO" (arXiv:2403.17031).
  GAE: Schulman et al. 2016 (arXiv:1506.02438). KL estimators k1/k3: J. Schulman,
       "Approximating KL divergence" (2020).
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

Array = jax.Array


# ----------------------------------------------------------------------------- reductions


class LossOutput(NamedTuple):
    """A masked token reduction kept as `(total, count)`; `mean()` divides once.

    Summing `LossOutput`s (`jax.tree.map(jnp.add, a, b)`) from microbatches or data shards and
    then calling `mean()` gives the mean over all valid tokens of the full batch (not a mean of
    per-microbatch means).
    """

    total: Array
    count: Array

    def mean(self) -> Array:
        return self.total / jnp.maximum(self.count, 1.0)


def masked_sum(x: Array, mask: Array) -> LossOutput:
    """`LossOutput(sum_{mask} x, sum mask)` over all axes."""
    chex.assert_equal_shape([x, mask])
    m = mask.astype(x.dtype)
    return LossOutput(jnp.sum(jnp.where(mask, x, 0.0)), jnp.sum(m))


def masked_mean(x: Array, mask: Array, axis=None) -> Array:
    """Mean of `x` over positions where `mask`; 0 where there are none. `axis` as in `jnp.sum`."""
    chex.assert_equal_shape([x, mask])
    total = jnp.sum(jnp.where(mask, x, 0.0), axis=axis)
    count = jnp.sum(mask.astype(x.dtype), axis=axis)
    return total / jnp.maximum(count, 1.0)


def masked_whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    """`(x - mean) / sqrt(var + eps)` with mean and (biased) variance over valid positions only.

    Returns 0 at masked positions. With `shift_mean=False` the mean is added back (only rescales).
    """
    chex.assert_equal_shape([x, mask])
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(mask, out, 0.0)


# ----------------------------------------------------------------------------- alignment


def shift_right(x_bt: Array, fill=0) -> Array:
    """`out[:, t] = x[:, t-1]`, `out[:, 0] = fill`; trailing axes are kept."""
    chex.assert_rank(x_bt, {2, 3})
    pad = jnp.full_like(x_bt[:, :1], fill)
    return jnp.concatenate([pad, x_bt[:, :-1]], axis=1)


def token_logprobs(logits_btv: Array, targets_bt: Array, temperature: float = 1.0) -> Array:
    """`log softmax(logits[:, t] / temperature)[targets[:, t]]`, no shift, in float32."""
    chex.assert_rank([logits_btv, targets_bt], [3, 2])
    chex.assert_equal_shape_prefix([logits_btv, targets_bt], 2)
    return _token_logprobs(logits_btv.astype(jnp.float32), targets_bt.astype(jnp.int32),
                           jnp.asarray(temperature, jnp.float32))


@jax.custom_vjp
def _token_logprobs(logits_btv, targets_bt, temperature):
    logits = logits_btv / temperature
    picked = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


# The backward keeps one vocabulary-wide tensor, the softmax, and turns it into the logits' cotangent in
# place: autodiff keeps the logits and their exponentials side by side (2 x 192 MiB for 8 x 128 SmolLM2
# positions, the largest buffers of an update).
def _token_logprobs_fwd(logits_btv, targets_bt, temperature):
    logits = logits_btv / temperature
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
    probs_btv = jnp.exp(logits - lse[..., None])
    return picked - lse, (probs_btv, targets_bt, temperature)


def _token_logprobs_bwd(residuals, g_bt):
    probs_btv, targets_bt, temperature = residuals
    onehot = jax.lax.broadcasted_iota(jnp.int32, probs_btv.shape, 2) == targets_bt[..., None]
    dlogits_btv = (onehot.astype(jnp.float32) - probs_btv) * (g_bt / temperature)[..., None]
    return dlogits_btv, None, None


_token_logprobs.defvjp(_token_logprobs_fwd, _token_logprobs_bwd)


def _action_logits(logits_btv: Array, t: int, first_action: int) -> Array:
    """The logits at positions `first_action-1..T-2` (those that predict an action) of a forward as
    `train_step.apply_from` makes it: all T positions when `first_action` is 1, else those positions only."""
    expected = t if first_action == 1 else t - first_action
    if not 1 <= first_action <= t or logits_btv.shape[1] != expected:
        raise ValueError(f"logits over {logits_btv.shape[1]} positions for {t} tokens and first_action={first_action}; "
                         f"expected {expected} ({'all' if first_action == 1 else 'positions first_action-1..T-2'})")
    return logits_btv[:, :-1] if first_action == 1 else logits_btv


def from_first_action(x_bt: Array, first_action: int) -> Array:
    """Per-action values of the slots `first_action..T-1` ([B, T - first_action]) at their slots in [B, T]: 0 before
    `first_action`, where no action is taken."""
    return jnp.concatenate([jnp.zeros((x_bt.shape[0], first_action), x_bt.dtype), x_bt], axis=1)


def shift_to_actions(
    logits_btv: Array,
    values_bt: Array | None,
    tokens_bt: Array,
    temperature: float = 1.0,
    first_action: int = 1,
) -> tuple[Array, Array | None]:
    """Align a forward over `tokens_bt` to actions.

    `logp_bt[:, t] = log softmax(logits[:, t-1] / temperature)[tokens[:, t]]` (0 at `t = 0`),
    `values_bt[:, t] = values[:, t-1] = V(s_t)` (0 at `t = 0`), the value of the state in which
    `tokens[:, t]` is chosen. The sampling temperature must be the one used at rollout.

    With `first_action = s > 1` (static: no action before slot `s`, e.g. a rollout's prompt slots),
    `logits_btv` holds only positions `s-1..T-2`, those that predict an action (a forward with
    `logits_from = s - 1, logits_to = T - 1`, see `train_step.apply_from`), and `logp_bt` is 0 before slot `s`.
    """
    chex.assert_rank([logits_btv, tokens_bt], [3, 2])
    logits_btv = _action_logits(logits_btv, tokens_bt.shape[1], first_action)
    logp_bt = from_first_action(token_logprobs(logits_btv, tokens_bt[:, first_action:], temperature), first_action)
    if values_bt is None:
        return logp_bt, None
    chex.assert_equal_shape([values_bt, tokens_bt])
    return logp_bt, shift_right(values_bt.astype(jnp.float32))


def entropy_from_logits(logits_btv: Array, temperature: float = 1.0) -> Array:
    """`H[t] = -sum_v p log p`, `p = softmax(logits[:, t] / temperature)` (no shift)."""
    logp = jax.nn.log_softmax(logits_btv.astype(jnp.float32) / temperature, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def action_entropy(logits_btv: Array, temperature: float = 1.0, first_action: int = 1) -> Array:
    """Entropy of the policy in the state of each action: `H(pi(.|s_t))` stored at `t` (0 before slot
    `first_action`); logits over all T positions, or over `first_action-1..T-2` as in `shift_to_actions`."""
    t = logits_btv.shape[1] + (0 if first_action == 1 else first_action)
    h_bt = entropy_from_logits(_action_logits(logits_btv, t, first_action), temperature)
    return from_first_action(h_bt, first_action)


# ----------------------------------------------------------------------------- KL


def kl_k1(logp: Array, ref_logp: Array) -> Array:
    """k1 estimator of KL(pi || pi_ref) per sampled token: `l = log pi - log pi_ref`."""
    chex.assert_equal_shape([logp, ref_logp])
    return logp - ref_logp


def kl_k3(logp: Array, ref_logp: Array) -> Array:
    """k3 estimator of KL(pi || pi_ref) per token, samples from pi: `(r - 1) - log r`, r = pi_ref/pi.

    Unbiased, non-negative, lower variance than k1 when pi is close to pi_ref.
    """
    chex.assert_equal_shape([logp, ref_logp])
    log_r = ref_logp - logp
    return jnp.expm1(log_r) - log_r


def kl_exact(logits_p_btv: Array, logits_q_btv: Array, temperature: float = 1.0) -> Array:
    """Full-vocabulary `KL(p || q)[t] = sum_v p (log p - log q)`, both at `temperature` (no shift)."""
    chex.assert_equal_shape([logits_p_btv, logits_q_btv])
    logp = jax.nn.log_softmax(logits_p_btv.astype(jnp.float32) / temperature, axis=-1)
    logq = jax.nn.log_softmax(logits_q_btv.astype(jnp.float32) / temperature, axis=-1)
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


# ----------------------------------------------------------------------------- rewards


def last_token_mask(response_mask_bt: Array) -> Array:
    """True at the last response token of each row (none if the row has no response token)."""
    idx = jnp.arange(response_mask_bt.shape[1])
    last = jnp.max(jnp.where(response_mask_bt, idx, -1), axis=1)
    return (idx[None, :] == last[:, None]) & response_mask_bt


def terminal_rewards(rewards_b: Array, response_mask_bt: Array) -> Array:
    """Per-token environment reward `r_t`: the sequence reward `R` at the last response token, else 0."""
    chex.assert_rank([rewards_b, response_mask_bt], [1, 2])
    return jnp.where(last_token_mask(response_mask_bt), rewards_b[:, None].astype(jnp.float32), 0.0)


def missing_eos_rewards(rewards_b: Array, truncated_b: Array, penalty_reward: float) -> Array:
    """Reward of responses that hit the length limit without EOS is *replaced* by `penalty_reward`.

    The choice (replace, not add) follows Huang et al. 2024 (the N+ details: a truncated response
    gets score -1, whatever the reward model says about it): the reward model's score of an
    unfinished text is not meaningful, and a fixed value keeps the penalty on the reward scale.
    """
    chex.assert_equal_shape([rewards_b, truncated_b])
    return jnp.where(truncated_b, jnp.asarray(penalty_reward, rewards_b.dtype), rewards_b)


def kl_penalised_rewards(rewards_bt: Array, logp: Array, ref_logp: Array, mask: Array, beta) -> Array:
    """`rtilde_t = r_t - beta * (log pi - log pi_ref)(a_t|s_t)` on valid tokens (k1 per token), else 0."""
    chex.assert_equal_shape([rewards_bt, logp, ref_logp, mask])
    return jnp.where(mask, rewards_bt - beta * kl_k1(logp, ref_logp), 0.0)


# ----------------------------------------------------------------------------- GAE


def _reverse_scan_bt(step, init, xs_bt):
    """Reverse `lax.scan` over the time axis of `(B, T)` arrays; returns `(B, T)` outputs."""
    xs_tb = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), xs_bt)
    _, ys_tb = jax.lax.scan(step, init, xs_tb, reverse=True)
    return jax.tree.map(lambda y: jnp.swapaxes(y, 0, 1), ys_tb)


def gae_advantages(rewards_bt: Array, values_bt: Array, mask_bt: Array, lam, gamma=1.0) -> Array:
    """Generalised advantage estimates over valid positions (Schulman et al. 2016).

        delta_t = r_t + gamma * V(s_next(t)) - V(s_t)
        A_t     = delta_t + gamma * lam * A_next(t)

    where `next(t)` is the next valid position after `t` in the row and `V = A = 0` after the last
    one (terminal: EOS or the length limit). Masked positions are skipped by the reverse scan: the
    carry passes through them unchanged and their output is 0, so left/right padding (and the
    prompt) contribute nothing.
    """
    chex.assert_equal_shape([rewards_bt, values_bt, mask_bt])
    zeros_b = jnp.zeros(rewards_bt.shape[:1], jnp.float32)

    def step(carry, x):
        next_value, next_adv = carry
        r, v, m = x
        adv = r + gamma * next_value - v + gamma * lam * next_adv
        new_carry = (jnp.where(m, v, next_value), jnp.where(m, adv, next_adv))
        return new_carry, jnp.where(m, adv, 0.0)

    xs = (rewards_bt.astype(jnp.float32), values_bt.astype(jnp.float32), mask_bt)
    return _reverse_scan_bt(step, (zeros_b, zeros_b), xs)


# ----------------------------------------------------------------------------- KLQ


def klq_q_values(values_bt: Array, logp_bt: Array, ref_logp_bt: Array, beta) -> Array:
    """`Q(s_t, a_t) = V(s_t) + beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))` (KLQ parametrisation)."""
    chex.assert_equal_shape([values_bt, logp_bt, ref_logp_bt])
    return values_bt + beta * (logp_bt - ref_logp_bt)


def klq_targets(
    rewards_bt: Array,
    old_values_bt: Array,
    old_logp_bt: Array,
    ref_logp_bt: Array,
    mask_bt: Array,
    beta,
    lam,
    alpha=1.0,
) -> tuple[Array, Array]:
    """KLQ targets by the closed form; returns `(G_bt, A_bt)`, both 0 at masked positions.

        l_t      = log pi_old(a_t|s_t) - log pi_ref(a_t|s_t)
        rtilde_t = r_t - beta * l_t
        delta_t  = rtilde_t + V_old(s_{t+1}) - V_old(s_t)      (= r_t + V_old(s_{t+1}) - Q_old(s_t, a_t))
        A_t      = sum_{k>=t} lam^(k-t) delta_k                 (GAE, gamma = 1)
        G_t      = Q_old(s_t, a_t) + alpha * A_t

    `rewards_bt` is the environment reward (R at the last response token, see `terminal_rewards`).
    Equals `klq_lambda_returns` (the recursion) exactly; this form is the one used in training.
    """
    chex.assert_equal_shape([rewards_bt, old_values_bt, old_logp_bt, ref_logp_bt, mask_bt])
    rtilde = kl_penalised_rewards(rewards_bt, old_logp_bt, ref_logp_bt, mask_bt, beta)
    adv = gae_advantages(rtilde, old_values_bt, mask_bt, lam, gamma=1.0)
    q_old = klq_q_values(old_values_bt, old_logp_bt, ref_logp_bt, beta)
    return jnp.where(mask_bt, q_old + alpha * adv, 0.0), adv


def klq_lambda_returns(
    rewards_bt: Array,
    old_values_bt: Array,
    old_logp_bt: Array,
    ref_logp_bt: Array,
    mask_bt: Array,
    beta,
    lam,
    alpha=1.0,
) -> Array:
    """KLQ targets by the lambda-return recursion (a reverse `lax.scan` over valid positions).

        G_T = r_T                                                   (last response token)
        G_t = r_t + (1 - lam) * V_old(s_{t+1}) + lam * (G_{t+1} - beta * l_{t+1})
        target_t = Q_old(s_t, a_t) + alpha * (G_t - Q_old(s_t, a_t))

    `alpha` in (0, 1] is the step size of the paper on the lambda-return correction; `alpha = 1`
    is the plain lambda-return. Masked positions are skipped (carry passes through), output 0.
    """
    chex.assert_equal_shape([rewards_bt, old_values_bt, old_logp_bt, ref_logp_bt, mask_bt])
    zeros_b = jnp.zeros(rewards_bt.shape[:1], jnp.float32)
    l_bt = kl_k1(old_logp_bt, ref_logp_bt).astype(jnp.float32)

    def step(carry, x):
        g_next, v_next, l_next = carry  # all 0 after the last valid token: V(terminal) = 0
        r, v, l, m = x
        g = r + (1.0 - lam) * v_next + lam * (g_next - beta * l_next)
        new_carry = tuple(jnp.where(m, a, b) for a, b in ((g, g_next), (v, v_next), (l, l_next)))
        return new_carry, jnp.where(m, g, 0.0)

    xs = (rewards_bt.astype(jnp.float32), old_values_bt.astype(jnp.float32), l_bt, mask_bt)
    g_lam = _reverse_scan_bt(step, (zeros_b, zeros_b, zeros_b), xs)
    q_old = klq_q_values(old_values_bt, old_logp_bt, ref_logp_bt, beta)
    return jnp.where(mask_bt, q_old + alpha * (g_lam - q_old), 0.0)


def klq_loss(
    q_bt: Array,
    targets_bt: Array,
    mask_bt: Array,
    q_old_bt: Array | None = None,
    clip: float | None = None,
) -> tuple[LossOutput, LossOutput]:
    """KLQ regression `0.5 * (Q_theta(s_t, a_t) - G_t)^2` over valid tokens, `G` held constant.

    With `clip` (> 0) the loss is PPO-value-clip style, pessimistic:
        Q_clip = Q_old + clip(Q_theta - Q_old, -clip, clip)
        loss_t = 0.5 * max((Q_theta - G)^2, (Q_clip - G)^2)
    Returns `(loss, clip_fraction)` as `LossOutput`s (clip fraction: tokens where the clipped term
    is the larger one; 0 without clipping).

    Gradient: `d loss_t / d log pi_theta(a_t|s_t) = beta * (Q_theta - G_t)`; at theta = theta_old
    this is `-alpha * beta * A_t` (the KL-penalised policy gradient, arXiv:2508.17000).
    """
    chex.assert_equal_shape([q_bt, targets_bt, mask_bt])
    targets_bt = jax.lax.stop_gradient(targets_bt)
    err = 0.5 * jnp.square(q_bt - targets_bt)
    clipped = jnp.zeros_like(err, dtype=bool)
    if clip is not None and clip > 0:
        chex.assert_equal_shape([q_bt, q_old_bt])
        q_old_bt = jax.lax.stop_gradient(q_old_bt)
        q_clip = q_old_bt + jnp.clip(q_bt - q_old_bt, -clip, clip)
        err_clip = 0.5 * jnp.square(q_clip - targets_bt)
        clipped = err_clip > err
        err = jnp.maximum(err, err_clip)
    return masked_sum(err, mask_bt), masked_sum(clipped.astype(jnp.float32), mask_bt)


# ----------------------------------------------------------------------------- PPO


def ppo_policy_loss(
    logp_bt: Array, old_logp_bt: Array, advantages_bt: Array, mask_bt: Array, clip_eps: float
) -> tuple[LossOutput, LossOutput]:
    """Clipped surrogate (Schulman et al. 2017), per valid token:

        rho_t  = exp(log pi_theta - log pi_old)
        loss_t = max(-rho_t * A_t, -clip(rho_t, 1 - eps, 1 + eps) * A_t)

    Returns `(loss, clip_fraction)` as `LossOutput`s; the clip fraction counts tokens where the
    clipped term is active (strictly larger).
    """
    chex.assert_equal_shape([logp_bt, old_logp_bt, advantages_bt, mask_bt])
    adv = jax.lax.stop_gradient(advantages_bt)
    ratio = jnp.exp(logp_bt - jax.lax.stop_gradient(old_logp_bt))
    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = jnp.maximum(pg1, pg2)
    return masked_sum(loss, mask_bt), masked_sum((pg2 > pg1).astype(jnp.float32), mask_bt)


def ppo_value_loss(
    values_bt: Array, old_values_bt: Array, returns_bt: Array, mask_bt: Array, clip_eps: float | None
) -> tuple[LossOutput, LossOutput]:
    """Clipped value loss, per valid token (returns `R_t = V_old(s_t) + A_t`, held constant):

        V_clip = V_old + clip(V_theta - V_old, -eps_v, eps_v)
        loss_t = 0.5 * max((V_theta - R_t)^2, (V_clip - R_t)^2)      (unclipped if eps_v is None/0)

    Returns `(loss, clip_fraction)` as `LossOutput`s.
    """
    chex.assert_equal_shape([values_bt, old_values_bt, returns_bt, mask_bt])
    returns_bt = jax.lax.stop_gradient(returns_bt)
    err = 0.5 * jnp.square(values_bt - returns_bt)
    clipped = jnp.zeros_like(err, dtype=bool)
    if clip_eps is not None and clip_eps > 0:
        old = jax.lax.stop_gradient(old_values_bt)
        v_clip = old + jnp.clip(values_bt - old, -clip_eps, clip_eps)
        err_clip = 0.5 * jnp.square(v_clip - returns_bt)
        clipped = err_clip > err
        err = jnp.maximum(err, err_clip)
    return masked_sum(err, mask_bt), masked_sum(clipped.astype(jnp.float32), mask_bt)


def adaptive_kl_coef(beta, observed_kl, target, horizon, n_steps):
    """Adaptive KL controller of Ziegler et al. 2019 (eq. 2), a pure update:

        e       = clip(KL_observed / KL_target - 1, -0.2, 0.2)
        beta   <- beta * (1 + e * n_steps / horizon)

    `observed_kl` is the per-sequence KL of the batch just sampled, `n_steps` the number of
    sequences (episodes) in it, `horizon` the controller's time constant in sequences.
    """
    err = jnp.clip(observed_kl / target - 1.0, -0.2, 0.2)
    return beta * (1.0 + err * n_steps / horizon)
