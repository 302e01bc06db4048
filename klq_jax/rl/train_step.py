"""Train state, optimiser, targets and the jitted KLQ / PPO train step and update.

The policy is any `apply_fn(params, tokens_bt, positions_bt, attention_mask_bt) ->
(logits_btv, values_bt)` with a value head (see docs/architecture.md for the alignment). For rollouts
whose actions start at slot `first_action > 1` (the prompt slots of an LM rollout), it is called with
`logits_from=first_action - 1, logits_to=T - 1` and returns logits for positions `first_action-1..T-2`
only: those that predict an action. The
algorithm is chosen by `algo_cfg.algo` ("klq" or "ppo"); both share everything but the loss:

    KLQ: loss = mean_t 0.5 * (Q_theta(s_t, a_t) - G_t)^2,
         Q_theta = V_theta + beta * (log pi_theta - log pi_ref),  G_t = Q_old + alpha * A_t
    PPO: loss = mean_t clipped surrogate(A_t, whitened) + vf_coef * clipped value loss(V_old + A_t)

Token losses are accumulated as sums and token counts over microbatches and divided once, so the
gradient equals the one of the full-minibatch mean whatever `num_microbatches` is.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from klq_jax.rl import losses
from klq_jax.rl.losses import LossOutput
from klq_jax.rl.optimizer import ClippedAdamW, clipped_adamw, global_norm

Array = jax.Array
# `apply_fn(params, tokens_bt, positions_bt, mask_bt[, logits_from, logits_to]) -> (logits_btv, values_bt)`. An LM's
# may also carry `apply_fn.next_token_logprobs(params, tokens_bt, positions_bt, mask_bt, logits_from, temperature)
# -> (logp, values_bt)` (`CausalLM.next_token_logprobs(..., with_values=True)`): the loss then takes the actions'
# log-probabilities from it, without the [B, T, V] logits (`policy_logprobs`). Both are called with `replay=` (a
# keyword) only for a rollout that carries the sampler's layer states (`Rollout.replay`).
ApplyFn = Callable[[Any, Array, Array, Array], tuple[Array, Array]]

ALGOS = ("klq", "ppo")


# ----------------------------------------------------------------------------- configs


def default_algo_config() -> ml_collections.ConfigDict:
    """Algorithm settings shared by the train step, the targets and the loop."""
    c = ml_collections.ConfigDict()
    c.algo = "klq"              # "klq" or "ppo"
    c.kl_coef = 0.05            # beta: KL coefficient of the objective (initial value if adaptive)
    c.temperature = 1.0         # sampling temperature; logprobs at rollout and update use it
    c.lam = 0.95                # GAE / lambda-return lambda (gamma is 1)
    # KLQ
    c.alpha = 1.0               # step size on the lambda-return correction, in (0, 1]
    c.q_clip = 0.0              # clip of Q_theta around Q_old (0 = off)
    # PPO
    c.clip_eps = 0.2            # ratio clip
    c.value_clip_eps = 0.2      # value clip around V_old (0 = off)
    c.vf_coef = 0.1             # value-loss weight
    c.whiten_advantages = True  # whiten advantages over the batch's valid tokens
    # both
    c.missing_eos_penalty = False  # replace the reward of responses truncated without EOS ...
    c.missing_eos_reward = -1.0    # ... by this value
    c.center_rewards = False       # subtract the batch mean from the training rewards (pi* unchanged)
    c.kl_target = 0.0           # adaptive KL controller target per sequence (0 = fixed beta)
    c.kl_horizon = 10000.0      # controller horizon, in sequences
    c.epochs = 4                # passes over each rollout batch
    c.num_minibatches = 4       # optimiser steps per epoch
    c.num_microbatches = 1      # gradient accumulation inside one optimiser step
    return c


def default_optim_config() -> ml_collections.ConfigDict:
    """AdamW with global-norm clipping and a warmup + constant/cosine schedule."""
    c = ml_collections.ConfigDict()
    c.learning_rate = 1e-5
    c.schedule = "constant"     # "constant" or "cosine"
    c.warmup_steps = 0
    c.total_steps = 1000        # optimiser steps, for the cosine decay
    c.end_lr_ratio = 0.0        # cosine: final lr = end_lr_ratio * learning_rate
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-8
    c.weight_decay = 0.0        # applied to parameters with ndim >= 2 only
    c.mu_dtype = "bfloat16"     # AdamW's first moment: "bfloat16" (default) or "float32"; a quarter of the state
    c.max_grad_norm = 1.0       # 0 = no clipping
    return c


def make_schedule(cfg) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps`, then constant or cosine decay."""
    lr, warm = float(cfg.learning_rate), int(cfg.warmup_steps)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, max(int(cfg.total_steps) - warm, 1), alpha=float(cfg.end_lr_ratio))
    else:
        raise ValueError(f"optim.schedule={cfg.schedule!r}: expected 'constant' or 'cosine'")
    if warm <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


def make_optimizer(cfg) -> ClippedAdamW:
    """AdamW on `make_schedule(cfg)` after clipping to global norm `max_grad_norm` (`optimizer.clipped_adamw`:
    optax's `chain(clip_by_global_norm, adamw)`, applied to the summed gradient and 1/count without
    materialising their product). Its first moment is stored in `mu_dtype` (bfloat16 by default: 8 steps of
    SmolLM2-135M move the parameters within 0.34% of fp32's change, `benchmarks/optimizer_precision.py`); the
    second moment stays float32 (bf16's 8-bit mantissa would round away `(1 - b2) g^2`). A config written
    before the key existed gets float32, as it was trained."""
    mu_dtype = cfg.get("mu_dtype", "float32")
    if mu_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"optim.mu_dtype={mu_dtype!r}: expected 'float32' or 'bfloat16'")
    return clipped_adamw(
        make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
        decay_mask=lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params),
        max_grad_norm=cfg.max_grad_norm, mu_dtype=jnp.dtype(mu_dtype))


# ----------------------------------------------------------------------------- pytrees


@flax.struct.dataclass
class Rollout:
    """One batch of sampled sequences and everything computed from it, aligned to actions.

    `rewards_b` is the sequence reward used for training (after any missing-EOS penalty).
    `advantages_bt`: KLQ the raw GAE `A_t` of the KL-penalised reward; PPO the same, whitened if
    configured. `targets_bt`: the regression target, KLQ `G_t = Q_old + alpha * A_t`, PPO the value
    target `V_old + A_t` (unwhitened).
    """

    tokens_bt: Array          # int32 (B, T): left-padded prompt + response + right padding
    positions_bt: Array       # int32 (B, T)
    attention_mask_bt: Array  # bool (B, T): real tokens
    response_mask_bt: Array   # bool (B, T): actions
    sample_logp_bt: Array     # float32 (B, T): logprobs reported by the sampler
    eos_b: Array              # bool (B,): response ended with EOS
    truncated_b: Array        # bool (B,): response hit the length limit without EOS
    rewards_b: Array          # float32 (B,)
    old_logp_bt: Array        # float32 (B, T): rollout policy, one forward at update temperature
    ref_logp_bt: Array        # float32 (B, T): reference policy
    old_values_bt: Array      # float32 (B, T): V_old(s_t)
    advantages_bt: Array      # float32 (B, T)
    targets_bt: Array         # float32 (B, T)
    entropy_bt: Array         # float32 (B, T): entropy of the rollout policy in the state of each action
    # The sampler's layer states (`SampleOutput.layer_inputs_bltd`, `layer_output_btd`; None unless it recorded
    # them): the policy forward and a one-step update at the rollout's parameters replay them instead of running the
    # layers again (`CausalLM.__call__(replay=...)`).
    layer_inputs_bltd: Array | None = None   # (B, L, T, D)
    layer_output_btd: Array | None = None    # float32 (B, T, D)
    # With them, where the sampler recorded them (`SampleOutput.gate_up_bltf`): each layer's gate|up projections
    # (and with `rl.replay_attention` its attention's q|k|v and output projection after them), which the update's
    # layers replay in their backward instead of recomputing them.
    layer_gate_up_bltf: Array | None = None  # uint16 (B, L, T, 2F or `recorded_width`): bf16 bit patterns
    # With them, where the sampler drew from the policy itself (`policy_stats_from_sampler`): the log-normaliser of
    # the distribution each action was drawn from (`SampleOutput.logsumexp_bt`), which the update's LM head replays
    # with `old_logp_bt` instead of running its forward (`CausalLM.next_token_logprobs(replay_head=...)`).
    sample_logsumexp_bt: Array | None = None  # float32 (B, T)
    # With them, where the sampler recorded it (`SampleOutput.logp_grad_vtb`, config `rl.replay_probs`): each
    # action's `onehot - softmax`, which the head's backward reads instead of recomputing the logits. The one field
    # that does not lead with B (the head's backward reads vocabulary rows): kept only on one device.
    sample_logp_grad_vtb: Array | None = None  # uint16 (V, T - first_action, B): bf16 bit patterns
    # True when the sampler drew from the policy itself (no top-k / top-p, the update's temperature) and
    # filled old_logp_bt, old_values_bt and entropy_bt: the loop then skips its policy forward.
    policy_stats_from_sampler: bool = flax.struct.field(pytree_node=False, default=False)
    # No action before this slot (an LM rollout's prompt slots): forwards compute logits from slot
    # first_action - 1 on, so the update never builds the vocabulary-wide logits of the prompt.
    first_action: int = flax.struct.field(pytree_node=False, default=1)

    @classmethod
    def from_samples(cls, tokens_bt, positions_bt, attention_mask_bt, response_mask_bt,
                     sample_logp_bt, eos_b, truncated_b=None, *, values_bt=None, entropy_bt=None,
                     first_action: int = 1, layer_inputs_bltd=None, layer_output_btd=None,
                     logsumexp_bt=None, gate_up_bltf=None, logp_grad_vtb=None) -> "Rollout":
        """What a sampler knows; the other fields are zeros until the loop fills them.

        `truncated_b` defaults to `~eos_b` (every response ends at EOS or at the length limit). Pass
        `values_bt` and `entropy_bt` (aligned to actions) only when the sampling distribution is the
        policy's at the update temperature: `sample_logp_bt` then stands for the old logprobs too.
        `first_action`: the first slot that can hold a response token (the padded prompt length); every
        `response_mask_bt` entry before it must be False. `layer_inputs_bltd`, `layer_output_btd`: the sampler's
        recorded layer states, given only when it drew with the policy's current parameters; `logsumexp_bt`, its
        log-normalisers (`SampleOutput.logsumexp_bt`), kept only with them and with the policy's own distribution
        (`values_bt` and `entropy_bt` given); `gate_up_bltf`, its recorded gate|up projections, kept with them;
        `logp_grad_vtb`, its recorded `onehot - softmax` of each action (`SampleOutput.logp_grad_vtb`), kept with the
        log-normalisers.
        """
        zeros_bt = jnp.zeros(tokens_bt.shape, jnp.float32)
        eos_b = jnp.asarray(eos_b, bool)
        sample_logp_bt = jnp.asarray(sample_logp_bt, jnp.float32)
        from_sampler = values_bt is not None and entropy_bt is not None
        replay_head = from_sampler and layer_inputs_bltd is not None and logsumexp_bt is not None
        return cls(
            tokens_bt=jnp.asarray(tokens_bt, jnp.int32),
            positions_bt=jnp.asarray(positions_bt, jnp.int32),
            attention_mask_bt=jnp.asarray(attention_mask_bt, bool),
            response_mask_bt=jnp.asarray(response_mask_bt, bool),
            sample_logp_bt=sample_logp_bt,
            eos_b=eos_b,
            truncated_b=~eos_b if truncated_b is None else jnp.asarray(truncated_b, bool),
            rewards_b=jnp.zeros(tokens_bt.shape[:1], jnp.float32),
            old_logp_bt=sample_logp_bt if from_sampler else zeros_bt, ref_logp_bt=zeros_bt,
            old_values_bt=jnp.asarray(values_bt, jnp.float32) if from_sampler else zeros_bt,
            advantages_bt=zeros_bt, targets_bt=zeros_bt,
            entropy_bt=jnp.asarray(entropy_bt, jnp.float32) if from_sampler else zeros_bt,
            policy_stats_from_sampler=from_sampler, first_action=int(first_action),
            layer_inputs_bltd=layer_inputs_bltd, layer_output_btd=layer_output_btd,
            layer_gate_up_bltf=gate_up_bltf if layer_inputs_bltd is not None else None,
            sample_logsumexp_bt=(jnp.asarray(logsumexp_bt, jnp.float32) if replay_head else None),
            sample_logp_grad_vtb=logp_grad_vtb if replay_head else None,
        )

    def replay(self) -> tuple[Array, ...] | None:
        """`(inputs_bltd, output_btd)`, with the gate|up projections `(.., gate_up_bltf)`, for
        `CausalLM.__call__(replay=...)`, or None without recorded layer states. The backward slices each layer's
        rows out of them as it reaches the layer (no transposed copy)."""
        if self.layer_inputs_bltd is None:
            return None
        gate_up = () if self.layer_gate_up_bltf is None else (self.layer_gate_up_bltf,)
        return self.layer_inputs_bltd, self.layer_output_btd, *gate_up

    def replay_head(self) -> tuple[Array, ...] | None:
        """`(logp_bt, logsumexp_bt)` for `CausalLM.next_token_logprobs(replay_head=...)`, or None: the sampler's
        log-probabilities and log-normalisers at the actions, +inf elsewhere (no gradient through the softmax at
        a slot the loss does not read); with its recorded `onehot - softmax`, `(.., logp_grad_vtb)`."""
        if self.sample_logsumexp_bt is None or self.layer_inputs_bltd is None:
            return None
        grad = () if self.sample_logp_grad_vtb is None else (self.sample_logp_grad_vtb,)
        return self.old_logp_bt, jnp.where(self.response_mask_bt, self.sample_logsumexp_bt, jnp.inf), *grad

    def without_layer_states(self) -> "Rollout":
        return self.replace(layer_inputs_bltd=None, layer_output_btd=None, layer_gate_up_bltf=None,
                            sample_logsumexp_bt=None, sample_logp_grad_vtb=None)


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; `kl_coef` is beta (adapted by the loop if asked)."""

    step: Array
    params: Any
    opt_state: Any
    kl_coef: Array

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation | ClippedAdamW, kl_coef) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                   kl_coef=jnp.asarray(kl_coef, jnp.float32))


def _check_algo(algo_cfg) -> str:
    if algo_cfg.algo not in ALGOS:
        raise ValueError(f"algo={algo_cfg.algo!r}: expected one of {ALGOS}")
    return algo_cfg.algo


# ----------------------------------------------------------------------------- targets


def compute_targets(batch: Rollout, kl_coef, algo_cfg) -> Rollout:
    """Fill `advantages_bt` and `targets_bt` from rewards, old/ref logprobs and old values.

    KLQ: `G_t = Q_old + alpha * A_t` (`losses.klq_targets`); PPO: `A_t` = GAE of the KL-penalised
    reward, value target `V_old + A_t`, then `A_t` whitened over valid tokens if configured.
    Pure and jittable (`algo_cfg` is closed over / static).
    """
    algo = _check_algo(algo_cfg)
    mask = batch.response_mask_bt
    r_bt = losses.terminal_rewards(batch.rewards_b, mask)
    if algo == "klq":
        targets, adv = losses.klq_targets(
            r_bt, batch.old_values_bt, batch.old_logp_bt, batch.ref_logp_bt, mask,
            kl_coef, algo_cfg.lam, algo_cfg.alpha)
    else:
        rtilde = losses.kl_penalised_rewards(r_bt, batch.old_logp_bt, batch.ref_logp_bt, mask, kl_coef)
        adv = losses.gae_advantages(rtilde, batch.old_values_bt, mask, algo_cfg.lam)
        targets = jnp.where(mask, batch.old_values_bt + adv, 0.0)
        if algo_cfg.whiten_advantages:
            adv = losses.masked_whiten(adv, mask)
    return batch.replace(advantages_bt=adv, targets_bt=targets)


# ----------------------------------------------------------------------------- loss


def apply_from(apply_fn: Callable, params, tokens_bt, positions_bt, attention_mask_bt, first_action: int,
               replay=None):
    """`apply_fn` over sequences whose actions start at slot `first_action`: logits for positions
    `first_action-1..T-2`, those that predict an action (all T positions when `first_action` is 1, so an
    `apply_fn` without `logits_from` / `logits_to` serves rollouts that may act from slot 1)."""
    args = (params, tokens_bt, positions_bt, attention_mask_bt)
    kwargs = {} if replay is None else {"replay": replay}
    if first_action > 1:  # the last position predicts no token of the sequence
        return apply_fn(*args, logits_from=first_action - 1, logits_to=tokens_bt.shape[1] - 1, **kwargs)
    return apply_fn(*args, **kwargs)


def policy_outputs(apply_fn: ApplyFn, params, batch: Rollout):
    """`apply_fn` over a rollout (`apply_from`): logits from its first action on, values everywhere; with the
    rollout's recorded layer states (`Rollout.replay`) passed on as `replay=`."""
    return apply_from(apply_fn, params, batch.tokens_bt, batch.positions_bt, batch.attention_mask_bt,
                      batch.first_action, batch.replay())


def policy_logprobs(apply_fn: ApplyFn, params, batch: Rollout, temperature: float) -> tuple[Array, Array]:
    """`(logp_bt, values_bt)` of a rollout's actions, aligned as `losses.shift_to_actions` aligns them: from
    `apply_fn.next_token_logprobs` where the apply function has one (an LM: the head's log-softmax a chunk of
    positions at a time, never the [B, T, V] logits, `transformer.chunked_token_logprobs`), else from its logits.
    With the rollout's recorded states, the layers replay them (`Rollout.replay`), and the head the sampler's
    log-probabilities (`Rollout.replay_head`)."""
    next_token_logprobs = getattr(apply_fn, "next_token_logprobs", None)
    if next_token_logprobs is None:
        logits_btv, values_bt = policy_outputs(apply_fn, params, batch)
        return losses.shift_to_actions(logits_btv, values_bt, batch.tokens_bt, temperature, batch.first_action)
    replays = {"replay": batch.replay(), "replay_head": batch.replay_head()}
    logp, values_bt = next_token_logprobs(params, batch.tokens_bt, batch.positions_bt, batch.attention_mask_bt,
                                          batch.first_action - 1, temperature,
                                          **{k: v for k, v in replays.items() if v is not None})
    values_bt = None if values_bt is None else losses.shift_right(values_bt.astype(jnp.float32))
    return losses.from_first_action(logp, batch.first_action), values_bt


def make_loss_fn(apply_fn: ApplyFn, algo_cfg):
    """`loss_fn(params, minibatch, kl_coef) -> (loss_sum, metrics)`.

    `loss_sum` is the sum over valid tokens (differentiate it, divide by the token count once);
    `metrics` is a dict of `LossOutput`s (`metrics["loss"].count` is the token count).
    """
    algo = _check_algo(algo_cfg)
    temperature = algo_cfg.temperature

    def loss_fn(params, mb: Rollout, kl_coef):
        logp, values = policy_logprobs(apply_fn, params, mb, temperature)
        mask = mb.response_mask_bt
        sg = jax.lax.stop_gradient
        # KL(pi_old || pi_theta) by k3, samples from pi_old. (No entropy here: it would cost another
        # full-vocabulary pass per step; the loop reports the rollout policy's entropy.)
        metrics = {"approx_kl": losses.masked_sum(losses.kl_k3(mb.old_logp_bt, sg(logp)), mask)}
        if algo == "klq":
            q = losses.klq_q_values(values, logp, mb.ref_logp_bt, kl_coef)
            q_old = losses.klq_q_values(mb.old_values_bt, mb.old_logp_bt, mb.ref_logp_bt, kl_coef)
            loss, clip_frac = losses.klq_loss(q, mb.targets_bt, mask, q_old, algo_cfg.q_clip)
            value_target = mb.old_values_bt + algo_cfg.alpha * mb.advantages_bt
            metrics.update(q_loss=loss, clip_frac=clip_frac)
        else:
            pg, clip_frac = losses.ppo_policy_loss(logp, mb.old_logp_bt, mb.advantages_bt, mask, algo_cfg.clip_eps)
            vf, vf_clip_frac = losses.ppo_value_loss(values, mb.old_values_bt, mb.targets_bt, mask,
                                                     algo_cfg.value_clip_eps)
            loss = LossOutput(pg.total + algo_cfg.vf_coef * vf.total, pg.count)
            value_target = mb.targets_bt
            metrics.update(pg_loss=pg, vf_loss=vf, clip_frac=clip_frac, vf_clip_frac=vf_clip_frac)
        metrics["value_error"] = losses.masked_sum(jnp.square(sg(values) - value_target), mask)
        metrics["loss"] = loss
        return loss.total, metrics

    return loss_fn


# ----------------------------------------------------------------------------- step and update


def _split_microbatches(tree, n: int):
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"minibatch size {x.shape[0]} is not divisible by num_microbatches={n}")
        return x.reshape(n, x.shape[0] // n, *x.shape[1:])
    return jax.tree.map(split, tree)


def make_train_step(apply_fn: ApplyFn, algo_cfg, optimizer: optax.GradientTransformation | ClippedAdamW, *,
                    jit: bool = True):
    """`train_step(state, minibatch) -> (state, metrics)`: one optimiser step.

    With `algo_cfg.num_microbatches = n > 1` the minibatch is split in `n` along the batch axis,
    gradients of the token-loss *sums* and the token counts are summed over a `lax.scan`, and the
    sum is divided by the total count once: the full-minibatch mean gradient. Metrics are
    full-minibatch token means, `grad_norm` (global norm before clipping) and `tokens` (the number
    of valid tokens in the minibatch).
    With `jit=True` (default) the step is jitted with the state donated.
    """
    loss_fn = make_loss_fn(apply_fn, algo_cfg)
    grad_fn = jax.grad(loss_fn, has_aux=True)
    n_micro = int(algo_cfg.num_microbatches)

    def train_step(state: TrainState, minibatch: Rollout):
        if n_micro == 1:
            grads, metrics = grad_fn(state.params, minibatch, state.kl_coef)
        else:
            micro = _split_microbatches(minibatch, n_micro)
            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grad_fn, state.params, first, state.kl_coef)
            # Sums in float32 (at least): bf16 layer gradients (bf16 matmul operands) are widened as they add up.
            init = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)
                                                    if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype), shapes)

            def body(acc, mmb):
                out = grad_fn(state.params, mmb, state.kl_coef)
                return jax.tree.map(lambda a, o: a + o.astype(a.dtype), acc, out), None

            (grads, metrics), _ = jax.lax.scan(body, init, micro)
        count = jnp.maximum(metrics["loss"].count, 1.0)
        if isinstance(optimizer, ClippedAdamW):  # divides as it reads the gradient (klq_jax/rl/optimizer.py)
            params, opt_state = optimizer.apply(grads, state.opt_state, state.params, grad_scale=1.0 / count)
            grad_norm = global_norm(grads) / count
        else:  # optax's transformations take gradients in the parameters' dtype
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype) / count, grads, state.params)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            grad_norm = global_norm(grads)
        out = {k: v.mean() for k, v in metrics.items()}
        out["grad_norm"] = grad_norm
        out["tokens"] = metrics["loss"].count
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, out

    return jax.jit(train_step, donate_argnums=0) if jit else train_step


def make_update(apply_fn: ApplyFn, algo_cfg, optimizer: optax.GradientTransformation | ClippedAdamW):
    """`update(state, batch, rng, epochs, num_minibatches) -> (state, metrics)`, jitted, state donated.

    Each epoch draws a permutation of the batch from `rng` (`fold_in` by epoch), cuts it into
    `num_minibatches` equal minibatches and runs one `train_step` on each (`lax.scan`); metrics
    are averaged over all `epochs * num_minibatches` steps. `epochs`, `num_minibatches` are static.
    """
    step = make_train_step(apply_fn, algo_cfg, optimizer, jit=False)

    @functools.partial(jax.jit, static_argnames=("epochs", "num_minibatches"), donate_argnums=0)
    def update(state: TrainState, batch: Rollout, rng, epochs: int, num_minibatches: int):
        b = batch.tokens_bt.shape[0]
        if b % num_minibatches:
            raise ValueError(f"batch size {b} is not divisible by num_minibatches={num_minibatches}")
        if batch.layer_inputs_bltd is not None and epochs * num_minibatches != 1:
            raise ValueError(f"a rollout with recorded layer states is replayed by one step only (they hold the "
                             f"sampling parameters' forward); got epochs={epochs}, num_minibatches={num_minibatches}")

        # One step on the whole batch (a rollout that carries layer states has no other): the rows' order does not
        # matter, and not permuting them spares copies of the states.
        shuffle = batch.layer_inputs_bltd is None

        def epoch(state, key):
            perm = jax.random.permutation(key, b)
            minibatches = jax.tree.map(
                lambda x: (x[perm] if shuffle else x).reshape(num_minibatches, b // num_minibatches, *x.shape[1:]),
                batch.replace(sample_logp_grad_vtb=None))
            if batch.sample_logp_grad_vtb is not None:  # [V, T, B]: the one step's whole batch
                minibatches = minibatches.replace(sample_logp_grad_vtb=batch.sample_logp_grad_vtb[None])
            return jax.lax.scan(step, state, minibatches)

        keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(epochs))
        state, metrics = jax.lax.scan(epoch, state, keys)
        return state, jax.tree.map(jnp.mean, metrics)

    return update
