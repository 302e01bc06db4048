"""The online RL loop, one for KLQ and PPO, written against injected functions.

Per iteration:

    prompts -> sample_fn (rollout with the current policy) -> reward_fn
      -> ref_logprob_fn (one reference forward) and the policy forward (old logprobs and values; skipped
         when the sampler drew from the policy itself and returned them)
      -> compute_targets (KLQ lambda-returns or PPO GAE) -> update (epochs x minibatches)
      -> metrics (and the adaptive KL coefficient, if configured)

Injected functions (the tests use a tabular tree MDP; the trainer plugs in the LM):

    sample_fn(params, prompt_batch, rng) -> Rollout      (`Rollout.from_samples(...)`: tokens, masks,
                                                          sampler logprobs, eos/truncated flags; with
                                                          values and entropy the policy forward is skipped)
    reward_fn(prompt_batch, rollout) -> rewards_b        (host or device array, float; the prompt batch
                                                          is passed for rewards that need more than the
                                                          tokens, e.g. a reference answer)
    ref_logprob_fn(tokens_bt, positions_bt, attention_mask_bt, first_action) -> ref_logp_bt
                                                         (aligned to actions, at the sampling temperature;
                                                          0 before slot `first_action`)
    apply_fn(params, tokens_bt, positions_bt, attention_mask_bt[, logits_from, logits_to])
        -> (logits_btv, values_bt)                       (`logits_from`/`logits_to` only for rollouts that
                                                          act from a later slot than 1, see
                                                          `Rollout.first_action` and `apply_from`)
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import itertools
import math
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from klq_jax.allocator import HeapGrowthGuard, release_freed_memory
from klq_jax.rl import losses
from klq_jax.rl.train_step import ApplyFn, Rollout, TrainState, apply_from, compute_targets, make_update, policy_outputs

Array = jax.Array
SampleFn = Callable[[Any, Any, Array], Rollout]
RewardFn = Callable[[Any, Rollout], Any]
RefLogprobFn = Callable[[Array, Array, Array, int], Array]
Callback = Callable[[int, TrainState, dict], None]


def make_policy_forward(apply_fn: ApplyFn, temperature: float):
    """Jitted `forward(params, batch) -> (logp_bt, values_bt, entropy_bt)` over a `Rollout`'s tokens, all
    aligned to actions (`losses.shift_to_actions`)."""

    @jax.jit
    def forward(params, batch: Rollout):
        logits_btv, values_bt = policy_outputs(apply_fn, params, batch)
        logp_bt, values_bt = losses.shift_to_actions(logits_btv, values_bt, batch.tokens_bt, temperature,
                                                     batch.first_action)
        return logp_bt, values_bt, losses.action_entropy(logits_btv, temperature, batch.first_action)

    return forward


def make_ref_logprob_fn(ref_apply_fn: Callable, ref_params, temperature: float) -> RefLogprobFn:
    """`ref_logprob_fn` from a reference model `ref_apply_fn(params, tokens, positions, mask[, logits_from,
    logits_to]) -> logits` (or a tuple starting with the logits; the slice is passed when `first_action > 1`). The
    parameters are passed to the jitted function as an argument, not closed over (a closure would bake
    them into the program as constants)."""

    @functools.partial(jax.jit, static_argnames="first_action")
    def ref_logprobs(params, tokens_bt, positions_bt, attention_mask_bt, first_action: int = 1):
        out = apply_from(ref_apply_fn, params, tokens_bt, positions_bt, attention_mask_bt, first_action)
        logits_btv = out[0] if isinstance(out, tuple) else out
        return losses.shift_to_actions(logits_btv, None, tokens_bt, temperature, first_action)[0]

    return functools.partial(ref_logprobs, ref_params)


def make_ref_next_token_logprob_fn(next_token_logprobs_fn: Callable, ref_params, temperature: float) -> RefLogprobFn:
    """`ref_logprob_fn` from `next_token_logprobs_fn(params, tokens, positions, mask, logits_from, temperature)`,
    which returns [B, T - 1 - logits_from]: the log-probability of the token after each position from
    `logits_from` on (`CausalLM.next_token_logprobs`, which never makes the vocabulary-wide logits). Same result
    as `make_ref_logprob_fn` on the logits of the same model."""

    @functools.partial(jax.jit, static_argnames="first_action")
    def ref_logprobs(params, tokens_bt, positions_bt, attention_mask_bt, first_action: int = 1):
        logp_bt = next_token_logprobs_fn(params, tokens_bt, positions_bt, attention_mask_bt, first_action - 1,
                                         temperature)
        return losses.from_first_action(logp_bt, first_action)

    return functools.partial(ref_logprobs, ref_params)


def rollout_metrics(batch: Rollout, raw_rewards_b: Array, kl_coef) -> dict[str, Array]:
    """Metrics of a sampled batch, before the update (device arrays; pure and jittable).

    `kl` is the k1 estimate of the sequence KL `E[sum_t log pi_old - log pi_ref]`, `objective`
    is `reward - kl_coef * kl` (the LM-RLHF objective J, with the raw reward).
    """
    mask = batch.response_mask_bt
    kl_b = jnp.sum(jnp.where(mask, losses.kl_k1(batch.old_logp_bt, batch.ref_logp_bt), 0.0), axis=1)
    kl3_b = jnp.sum(jnp.where(mask, losses.kl_k3(batch.old_logp_bt, batch.ref_logp_bt), 0.0), axis=1)
    reward = jnp.mean(raw_rewards_b)
    kl = jnp.mean(kl_b)
    return {
        "rollout/reward": reward,
        "rollout/reward_train": jnp.mean(batch.rewards_b),
        "rollout/kl": kl,
        "rollout/kl_k3": jnp.mean(kl3_b),
        "rollout/objective": reward - kl_coef * kl,
        "rollout/entropy": losses.masked_mean(batch.entropy_bt, mask),
        "rollout/response_length": jnp.mean(jnp.sum(mask, axis=1).astype(jnp.float32)),
        "rollout/eos_rate": jnp.mean(batch.eos_b.astype(jnp.float32)),
        "rollout/truncated_rate": jnp.mean(batch.truncated_b.astype(jnp.float32)),
        "rollout/logp_mismatch": losses.masked_mean(jnp.abs(batch.sample_logp_bt - batch.old_logp_bt), mask),
        "rollout/advantage_abs": losses.masked_mean(jnp.abs(batch.advantages_bt), mask),
        "rollout/kl_coef": jnp.asarray(kl_coef, jnp.float32),
        "rollout/response_tokens": jnp.sum(mask).astype(jnp.float32),
    }


def _shaped_rewards(raw_rewards_b: Array, batch: Rollout, algo_cfg) -> Array:
    """Training rewards: the missing-EOS penalty, then optional centring on the batch mean.

    Centring subtracts one constant from every sequence's terminal reward, which leaves the optimal
    policy `pi_ref exp(R/beta)` unchanged; it keeps KLQ's value targets near zero so that a value head
    that starts at 0 does not first spend its (shared-backbone) updates learning the mean reward.
    """
    rewards_b = raw_rewards_b
    if algo_cfg.missing_eos_penalty:
        rewards_b = losses.missing_eos_rewards(rewards_b, batch.truncated_b, algo_cfg.missing_eos_reward)
    if algo_cfg.center_rewards:
        rewards_b = rewards_b - jnp.mean(rewards_b)
    return rewards_b


def rollout_targets(batch: Rollout, kl_coef, algo_cfg) -> tuple[Array, Array]:
    """`compute_targets`' advantages and targets alone. Jitted on the whole rollout, a program that returns the
    rollout returns a copy of every array in it, the sampler's recorded layer states included (SmolLM2, 8 x 176
    slots with the gate|up and attention projections recorded: ~0.5 GB copied, 0.48 s of a 34 s fp32 iteration
    on a Zen 1 VM); the inputs it does not read are pruned from the program."""
    out = compute_targets(batch, kl_coef, algo_cfg)
    return out.advantages_bt, out.targets_bt


def _reference_beside_reward(pool: concurrent.futures.Executor, reference: Callable[[], Array],
                              reward: Callable[[], Array]) -> tuple[Array, Array, float, float]:
    """`(ref_logp, raw_rewards, reference_s, reward_s)`: `reference()` on `pool`'s thread while `reward()` runs
    on this one, each waited for; the seconds are each one's own, from the common start.

    XLA:CPU runs a program's dots on every core but much of its other work (norms, softmax, casts) one fusion
    after another, leaving a core idle; a second program dispatched from another thread runs in those gaps
    (programs dispatched from one thread run one after the other). The worker enters this thread's mesh
    (`jax.set_mesh` is per thread)."""
    mesh = jax.sharding.get_mesh()
    start = time.perf_counter()

    def on_worker():
        with jax.set_mesh(mesh) if not mesh.empty else contextlib.nullcontext():
            out = jax.block_until_ready(reference())
        return out, time.perf_counter() - start

    future = pool.submit(on_worker)
    try:
        raw_rewards = jax.block_until_ready(reward())
    finally:  # the reference is waited for even when the reward fails: no program left running behind
        reward_s = time.perf_counter() - start
        ref_logp, reference_s = future.result()
    return ref_logp, raw_rewards, reference_s, reward_s


def run(
    *,
    state: TrainState,
    apply_fn: ApplyFn,
    optimizer,
    algo_cfg,
    sample_fn: SampleFn,
    reward_fn: RewardFn,
    ref_logprob_fn: RefLogprobFn,
    prompts: Iterable,
    rng: Array,
    num_iterations: int | None = None,
    start_iteration: int = 0,
    callback: Callback | None = None,
    overlap_reference: bool = False,
) -> Iterator[tuple[TrainState, dict[str, float]]]:
    """Run the online loop; yields `(state, metrics)` after every iteration.

    `prompts` is an iterable of prompt batches in whatever form `sample_fn` takes; the loop stops
    when it is exhausted or after `num_iterations` iterations. Iterations are numbered from
    `start_iteration` (set it when resuming: the per-iteration rng is `fold_in(rng, iteration)`, so a
    resumed run draws the same keys it would have). `state` is donated to the update: use only the
    states this generator yields. `metrics` are host floats: `rollout/*` (before the update),
    `train/*` (averaged over the update's steps), `time/*` (seconds per phase), `perf/*`.
    `callback(iteration, state, metrics)` runs before each yield (logging, checkpoints).
    `overlap_reference`: the reference forward runs on a second thread while `reward_fn` scores the rollout
    (meant for one device in one process: `trainer.overlap_reference` says why). `time/reference` and
    `time/reward` then overlap; `time/scoring` is their joint time (their sum when they run one after the other).
    Raises `FloatingPointError` naming the metric if any metric is NaN or infinite.
    """
    forward = make_policy_forward(apply_fn, algo_cfg.temperature)
    update = make_update(apply_fn, algo_cfg, optimizer)
    targets_fn = jax.jit(functools.partial(rollout_targets, algo_cfg=algo_cfg))
    shape_rewards = jax.jit(functools.partial(_shaped_rewards, algo_cfg=algo_cfg))
    summarise = jax.jit(rollout_metrics)

    # Its idle worker thread ends when the generator (and with it the pool) is garbage-collected.
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="klq-reference") if overlap_reference else None
    heap_guard = HeapGrowthGuard()  # klq_jax/allocator.py: kept host memory does not pile up across iterations
    # islice stops before pulling a batch it will not use (a resumable prompt stream stays exact).
    for it, prompt_batch in zip(itertools.count(start_iteration), itertools.islice(prompts, num_iterations)):
        k_sample, k_update = jax.random.split(jax.random.fold_in(rng, it))
        times: dict[str, float] = {}
        t_iter = t = time.perf_counter()

        def lap(name, out):
            nonlocal t
            jax.block_until_ready(out)
            if it == start_iteration:  # what compiling this phase's programs freed: not kept under the next
                release_freed_memory()
            now = time.perf_counter()
            times[f"time/{name}"] = now - t
            t = now
            return out

        batch = lap("sample", sample_fn(state.params, prompt_batch, k_sample))
        # One after the other, the reference before the reward: XLA frees a program's temporaries on its own thread
        # a few ms after its outputs are ready, and the reward's host work (decoding, tokenising) covers that, where
        # the update dispatched right after the reference could find the reference's block still held and land
        # above it (kept malloc arena, klq_jax/allocator.py: +0.2 GiB of peak RSS in some runs). Side by side
        # (`overlap_reference`) the peak moved by 0.01-0.02 GiB (SmolLM2, bf16 matmuls).
        reference = functools.partial(ref_logprob_fn, batch.tokens_bt, batch.positions_bt, batch.attention_mask_bt,
                                      batch.first_action)

        def reward():  # the recorded layer states are the update's alone (not brought to the host with the rest)
            return jnp.asarray(reward_fn(prompt_batch, batch.without_layer_states()), jnp.float32)

        if pool is None:
            ref_logp = lap("reference", reference())
            raw_rewards = lap("reward", reward())
            times["time/scoring"] = times["time/reference"] + times["time/reward"]
        else:
            ref_logp, raw_rewards, times["time/reference"], times["time/reward"] = _reference_beside_reward(
                pool, reference, reward)
            lap("scoring", (ref_logp, raw_rewards))  # both ready: sets time/scoring, moves `t`
        if batch.policy_stats_from_sampler:  # the rollout already holds the policy's logprobs and values
            times["time/forward"] = 0.0
        else:
            old_logp, old_values, entropy = lap("forward", forward(state.params, batch))
            batch = batch.replace(old_logp_bt=old_logp, old_values_bt=old_values, entropy_bt=entropy)
        batch = batch.replace(rewards_b=shape_rewards(raw_rewards, batch), ref_logp_bt=ref_logp)
        advantages, targets = targets_fn(batch, state.kl_coef)
        batch = batch.replace(advantages_bt=advantages, targets_bt=targets)
        stats = lap("targets", summarise(batch, raw_rewards, state.kl_coef))
        update_args = (state, batch, k_update, algo_cfg.epochs, algo_cfg.num_minibatches)
        if it == start_iteration:
            # Compiled on its own first, and what compiling freed handed back before the first run: the run's
            # temporaries did not reuse those freed pages, and landed above them (SmolLM2 benchmark, bf16
            # matmuls: peak RSS 3.31-3.34 -> 3.15 GiB, the later iterations' own peak). The call below
            # finds the compiled program in jit's cache.
            update.lower(*update_args).compile()
            release_freed_memory()
        state, train_metrics = update(*update_args)
        # The recorded layer states are the update's alone: not held while the next rollout records its own (the
        # gate|up projections are 0.24 GiB for SmolLM2's 8 x 176 slots).
        batch, update_args = batch.without_layer_states(), None
        lap("update", train_metrics)
        heap_guard.after_iteration()

        metrics = {k: float(v) for k, v in jax.device_get(stats).items()}
        metrics.update({f"train/{k}": float(v) for k, v in jax.device_get(train_metrics).items()})
        metrics.update(times)
        total = time.perf_counter() - t_iter
        batch_size = int(batch.tokens_bt.shape[0])
        metrics.update({
            "iteration": float(it), "episodes": float((it + 1) * batch_size),  # a fixed batch size
            "time/iteration": total,
            "perf/tokens_per_s": metrics["rollout/response_tokens"] / max(total, 1e-9),
        })
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"non-finite metrics at iteration {it}: {', '.join(sorted(bad))}")

        if algo_cfg.kl_target and algo_cfg.kl_target > 0:
            new_coef = losses.adaptive_kl_coef(np.float32(metrics["rollout/kl_coef"]), metrics["rollout/kl"],
                                               algo_cfg.kl_target, algo_cfg.kl_horizon, batch_size)
            state = state.replace(kl_coef=jnp.asarray(new_coef, jnp.float32))

        if callback is not None:
            callback(it, state, metrics)
        yield state, metrics
