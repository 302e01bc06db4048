"""The frozen models' forwards with their layer matmuls on XLA's bf16 dots and on the native packed matmul
(`cpu_decode.packed_matmul`, AMX tile products on weights packed once; config `model.frozen_matmul_kernel`).

For SmolLM2-135M-Instruct, 8 rows of 176 tokens (the iteration benchmark's rollout): the reference's
log-probabilities of the last 128 positions (`CausalLM.next_token_logprobs`) and a reward model's scores (the same
model with a score head), each jitted, best of `--repeats` calls, the two kernels taking turns; and the layer
matmuls alone on the forward's shapes (x [1408, K] bf16 from fp32, fp32 results). Needs a CPU with AMX.

    python benchmarks/frozen_matmuls.py [--repeats 7]

Prints a table and a last line `RESULT reference_native_over_xla=... reward_native_over_xla=... ...`.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klq_jax.models import cpu_decode
from klq_jax.models.hf import load_model
from klq_jax.models.transformer import pack_frozen, positions_from_mask
from klq_jax.trainer import resolve_model_path


def best_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return min(times)


def frozen_forwards(kernel: str, tokens, positions, mask, first_logit: int):
    """`(reference_fn, reward_fn)`: jitted calls of the frozen model (bf16 matmuls) with `kernel`'s layer matmuls."""
    path = resolve_model_path("embedded")
    reference = load_model(path, param_dtype=jnp.float32, dtype=jnp.float32, matmul_dtype=jnp.bfloat16)
    reference.store_matmul_weights()  # as the trainer stores it
    reward = load_model(path, score_head=True, param_dtype=jnp.bfloat16, dtype=jnp.float32, matmul_dtype=jnp.bfloat16)
    fns = []
    for model, run in ((reference, lambda m: m.next_token_logprobs(tokens, positions, mask, logits_from=first_logit)),
                       (reward, lambda m: m(tokens, positions, mask, return_logits=False).scores_b)):
        pack_frozen(model, kernel)
        graphdef, state = nnx.split(model)
        call = jax.jit(lambda state, graphdef=graphdef, run=run: run(nnx.merge(graphdef, state)))
        fns.append(lambda call=call, state=state: call(state))
    return fns


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=176)
    args = parser.parse_args()
    if cpu_decode.packed_matmul_unsupported() is not None:
        raise SystemExit(f"the packed matmul cannot run here: {cpu_decode.packed_matmul_unsupported()}")

    rng = np.random.default_rng(0)
    b, t = args.rows, args.tokens
    tokens = jnp.asarray(rng.integers(0, 49152, (b, t)), jnp.int32)
    mask = jnp.ones((b, t), bool).at[:, :8].set(False)  # left padding, as in a rollout
    positions = positions_from_mask(mask)
    fns = {k: frozen_forwards(k, tokens, positions, mask, t - 129) for k in ("xla", "native")}
    outputs = {k: [np.asarray(f()) for f in fs] for k, fs in fns.items()}
    gaps = [float(np.max(np.abs(a - b))) for a, b in zip(outputs["native"], outputs["xla"])]
    times = {k: [np.inf, np.inf] for k in fns}
    for _ in range(args.repeats):  # the kernels take turns, so both see the machine's same minutes
        for k, fs in fns.items():
            times[k] = [min(old, best_seconds(f, 1)) for old, f in zip(times[k], fs)]

    m = b * t
    shapes = [("q|o", 576, 576), ("k|v", 576, 192), ("gate|up", 576, 1536), ("down", 1536, 576)]
    mm = {}
    for name, k, n in shapes:
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        w_io = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.bfloat16)
        packed = cpu_decode.pack_io(w_io)
        xla = jax.jit(lambda x, w: jnp.dot(x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32))
        native = jax.jit(lambda x, w, n=n: cpu_decode.packed_matmul(x, w, n))
        flop = 2 * m * k * n
        mm[name] = {"xla": np.inf, "native": np.inf}
        for _ in range(args.repeats):
            mm[name]["xla"] = min(mm[name]["xla"], best_seconds(lambda: xla(x, w_io), 5))
            mm[name]["native"] = min(mm[name]["native"], best_seconds(lambda: native(x, packed), 5))
        mm[name] = {k: flop / s / 1e9 for k, s in mm[name].items()}

    print(f"SmolLM2-135M-Instruct, {b} x {t} tokens, bf16 matmul operands (fp32 accumulation), jax "
          f"{jax.__version__}, {os.cpu_count()} cores; best of {args.repeats}")
    print(f"{'forward (s)':<28}{'xla':>8}{'native':>8}{'native/xla':>12}{'max |gap|':>12}")
    for i, name in enumerate(("reference log-probabilities", "reward scores")):
        x, nat = times["xla"][i], times["native"][i]
        print(f"{name:<28}{x:>8.3f}{nat:>8.3f}{nat / x:>12.2f}{gaps[i]:>12.2e}")
    print(f"{'matmul [' + str(m) + ', K] x [K, N]':<28}{'xla':>8}{'native':>8}   GFLOP/s")
    for name, k, n in shapes:
        print(f"{name + f' (K={k}, N={n})':<28}{mm[name]['xla']:>8.0f}{mm[name]['native']:>8.0f}")
    result = {"reference_xla_s": times["xla"][0], "reference_native_s": times["native"][0],
              "reference_native_over_xla": times["native"][0] / times["xla"][0],
              "reward_xla_s": times["xla"][1], "reward_native_s": times["native"][1],
              "reward_native_over_xla": times["native"][1] / times["xla"][1],
              "max_gap_logprob": gaps[0], "max_gap_score": gaps[1],
              **{f"{name.replace('|', '_')}_{k}_gflops": v for name, _, _ in shapes for k, v in mm[name].items()}}
    print("RESULT " + " ".join(f"{k}={v:.3g}" for k, v in result.items()))


if __name__ == "__main__":
    main()
