"""The sampler's decode step on each of its kernels: XLA's step and the native step's builds, in one run.

SmolLM2-135M-Instruct (the embedded model), `--batch` prompts of 39-48 tokens, exactly `--new_tokens` sampled
tokens per row (no EOS), for fp32 and bf16 matmuls. Each case is one `Sampler` with `decode_kernel` "xla",
"native-avx512" or "native-avx2" (`klq_jax/models/cpu_decode.py`), where this CPU runs it; the cases take turns
within each repeat, so a machine whose speed drifts slows them alike, and each reports its best repeat. Prints a
table and a last line `RESULT ...` with each native case's time as a ratio of XLA's for the same matmuls.

    python benchmarks/decode_kernels.py [--batch 8] [--new_tokens 128] [--repeats 3]

On a CPU with AVX-512 the "native-avx2" case is the build that CPUs without AVX-512 (most laptops) run: the same
8-lane loop, not their memory system.
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
from klq_jax.models.gguf import embedded_smollm2_path
from klq_jax.models.hf import load_model
from klq_jax.models.sampler import Sampler, use_native_decode


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--matmuls", default="float32,bfloat16", help="matmul operand dtypes, comma-separated")
    parser.add_argument("--kernels", default="xla," + ",".join(f"native-{isa}" for isa in cpu_decode.ISAS),
                        help="decode kernels (sampling.decode_kernel values), comma-separated")
    args = parser.parse_args()
    path = embedded_smollm2_path()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, 49152, int(n)).tolist() for n in rng.integers(39, 49, args.batch)]

    cases = []  # (matmul name, kernel, sampler, state)
    for name in args.matmuls.split(","):
        matmul_dtype = None if name == "float32" else jnp.dtype(name)
        model = load_model(path, value_head=True, matmul_dtype=matmul_dtype)
        state = nnx.state(model)
        for kernel in args.kernels.split(","):
            try:
                use_native_decode(kernel, model, jnp.float32, True)
            except ValueError as err:
                print(f"{name} {kernel}: skipped ({err})")
                continue
            sampler = Sampler.for_model(model, eos_ids=(), pad_id=0, max_new_tokens=args.new_tokens, bucket=16,
                                        decode_kernel=kernel)
            cases.append((name, kernel, sampler, state))

    key = jax.random.key(0)
    for name, kernel, sampler, state in cases:  # compile, and check that every case makes every token
        out = sampler(state, prompts, key)
        assert int(out.response_mask_bt.sum()) == args.batch * args.new_tokens
    times = {(name, kernel): [] for name, kernel, _, _ in cases}
    for _ in range(args.repeats):
        for name, kernel, sampler, state in cases:
            start = time.perf_counter()
            jax.block_until_ready(sampler(state, prompts, key).tokens_bt)
            times[(name, kernel)].append(time.perf_counter() - start)

    flags = cpu_decode.this_cpu_flags()
    isa_flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    print(f"SmolLM2-135M-Instruct, {args.batch} x {args.new_tokens} tokens, CPU x{os.cpu_count()} "
          f"({', '.join(isa_flags)}), jax {jax.__version__}; best of {args.repeats}")
    print(f"{'matmuls':<10}{'decode':<16}{'rollout s':>10}{'ms/token':>10}{'/ xla':>8}")
    results = {}
    for name, kernel, _, _ in cases:
        best = min(times[(name, kernel)])
        xla = min(times.get((name, "xla"), [np.nan]))
        print(f"{name:<10}{kernel:<16}{best:>10.2f}{1e3 * best / args.new_tokens:>10.1f}{best / xla:>8.2f}")
        short = "fp32" if name == "float32" else "bf16"
        results[f"{short}_{kernel.replace('-', '_')}_s"] = best
        if kernel != "xla" and not np.isnan(xla):
            results[f"{short}_{kernel.replace('-', '_')}_over_xla"] = best / xla
    print("RESULT " + " ".join(f"{k}={v:.3g}" for k, v in results.items()))


if __name__ == "__main__":
    import sys

    from klq_jax.allocator import restart_with_huge_pages

    # As `python -m klq_jax.main` runs: without huge pages an fp32 rollout took 16.96 s instead of 11.83 on a
    # Zen 1 VM (stop 37), every call faulting in XLA:CPU's mapped blocks page by page.
    restart_with_huge_pages([__file__, *sys.argv[1:]])
    main()
