"""One KLQ update against one PPO update on the same model and batch, in one run.

SmolLM2-135M-Instruct with its value head, a rollout batch of `--batch` sequences of `--length` tokens
(the last `--response` are the response), one optimiser step on the whole batch with each algorithm's
jitted train step, set up as the trainer does (`--remat full`, logits only where they predict a response
token). Both steps run one forward and one backward of the same network; the losses differ only in
elementwise work. Prints a table (time, achieved FLOP/s: the FLOPs the step needs, recomputation not
counted) and `RESULT klq_over_ppo=<x> ...`.

    python benchmarks/update_cost.py [--batch 8 --length 192 --response 128 --repeats 3 --remat full]
                                     [--matmul_dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klq_jax.models.gguf import embedded_smollm2_path
from klq_jax.models.hf import load_model
from klq_jax.models.transformer import positions_from_mask
from klq_jax.rl.train_step import (Rollout, TrainState, compute_targets, default_algo_config,
                                   default_optim_config, make_optimizer, make_train_step)


def train_flops(cfg, batch: int, length: int, head_positions: int) -> float:
    """Forward + backward FLOPs: 6 * matmul params * tokens, plus attention scores and values; the LM head
    over the `head_positions` positions per row where logits are made."""
    # The embedding lookup is no matmul, the LM head is one (tied or not).
    head = cfg.vocab_size * cfg.hidden_size
    layer_params = cfg.num_params() - head - (0 if cfg.tie_embeddings else head)
    attention = 2 * 2 * cfg.num_layers * length * length * cfg.num_heads * cfg.head_dim  # QK^T and PV, per row
    return 3 * batch * (2 * layer_params * length + 2 * head * head_positions + attention)


def make_batch(rng, cfg, batch, length, response):
    k1, k2, k3, k4 = jax.random.split(rng, 4)
    tokens = jax.random.randint(k1, (batch, length), 0, cfg.vocab_size, jnp.int32)
    mask = jnp.ones((batch, length), bool)
    resp = jnp.zeros((batch, length), bool).at[:, length - response:].set(True)
    rollout = Rollout.from_samples(tokens, positions_from_mask(mask), mask, resp,
                                   jnp.zeros((batch, length)), jnp.ones((batch,), bool),
                                   first_action=length - response)
    return rollout.replace(
        rewards_b=jax.random.normal(k2, (batch,)),
        old_logp_bt=jnp.where(resp, -jax.random.uniform(k3, (batch, length)) * 3, 0.0),
        ref_logp_bt=jnp.where(resp, -jax.random.uniform(k4, (batch, length)) * 3, 0.0))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=192)
    parser.add_argument("--response", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--remat", default="full", help="none, dots or full (the trainer's model.remat)")
    parser.add_argument("--matmul_dtype", default="", help="the matmuls' operand dtype (model.matmul_dtype; empty: "
                        "float32); bfloat16 is also measured against a bf16 x bf16 -> fp32 matmul")
    args = parser.parse_args()

    model = load_model(embedded_smollm2_path(), value_head=True, remat=args.remat, matmul_dtype=args.matmul_dtype or None)
    graphdef, params = nnx.split(model)

    def apply_fn(params, tokens_bt, positions_bt, mask_bt, logits_from=0, logits_to=None):
        out = nnx.merge(graphdef, params)(tokens_bt, positions_bt, mask_bt, logits_from=logits_from,
                                          logits_to=logits_to)
        return out.logits_btv, out.values_bt

    optimizer = make_optimizer(default_optim_config())
    batch = make_batch(jax.random.key(0), model.cfg, args.batch, args.length, args.response)
    flops = train_flops(model.cfg, args.batch, args.length, args.response)  # logits_to = T - 1: N positions

    # Peak of this CPU: a large fp32 matmul, same process, same moment.
    def matmul_peak(dtype):
        a = jax.random.normal(jax.random.key(1), (2048, 2048), jnp.float32).astype(dtype)
        matmul = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
        jax.block_until_ready(matmul(a))
        t0 = time.perf_counter()
        for _ in range(5):
            jax.block_until_ready(matmul(a))
        return 5 * 2 * 2048**3 / (time.perf_counter() - t0)

    peak = matmul_peak(jnp.float32)
    peak_bf16 = matmul_peak(jnp.bfloat16) if args.matmul_dtype == "bfloat16" else None

    rows, seconds = [], {}
    for algo in ("ppo", "klq", "ppo", "klq"):  # interleaved, so drift in machine load hits both
        cfg = default_algo_config()
        cfg.algo = algo
        step = make_train_step(apply_fn, cfg, optimizer)
        mb = compute_targets(batch, 0.05, cfg)
        state = TrainState.create(jax.tree.map(jnp.copy, params), optimizer, 0.05)
        state, _ = step(state, mb)  # compile
        jax.block_until_ready(state)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            state, metrics = step(state, mb)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - t0)
        seconds[algo] = min(min(times), seconds.get(algo, np.inf))

    print(f"SmolLM2-135M-Instruct + value head, fp32, matmuls {args.matmul_dtype or 'float32'}, batch {args.batch} x {args.length} tokens, "
          f"remat {args.remat}, CPU x{os.cpu_count()}, jax {jax.__version__}")
    print(f"CPU fp32 matmul peak (2048^3): {peak / 1e9:.1f} GFLOP/s")
    if peak_bf16:
        print(f"CPU bf16 x bf16 -> fp32 matmul peak (2048^3): {peak_bf16 / 1e9:.1f} GFLOP/s")
    print(f"{'update':<8}{'seconds':>10}{'GFLOP/s':>10}{'% of matmul peak':>18}")
    for algo in ("klq", "ppo"):
        achieved = flops / seconds[algo]
        rows.append((algo, seconds[algo], achieved))
        print(f"{algo:<8}{seconds[algo]:>10.3f}{achieved / 1e9:>10.1f}{100 * achieved / peak:>17.1f}%")
    ratio = seconds["klq"] / seconds["ppo"]
    print(f"RESULT klq_over_ppo={ratio:.3f} klq_s={seconds['klq']:.3f} ppo_s={seconds['ppo']:.3f} "
          f"klq_gflops={flops / seconds['klq'] / 1e9:.1f} peak_gflops={peak / 1e9:.1f}"
          + (f" peak_bf16_gflops={peak_bf16 / 1e9:.1f} klq_bf16_fraction={flops / seconds['klq'] / peak_bf16:.3f}"
             if peak_bf16 else ""))


if __name__ == "__main__":
    main()
