"""The sampler's decode weights as stored ([in, out]) against [out, in] copies (`Sampler.weights_oi`), paired.
The [out, in] side is the feature-major decode step (`Block.decode_feature_major`: activations [features, rows],
each weight the left operand of its dot), the [in, out] side the row-major one, with fp32 matmuls (the default)
or `--matmul_dtype bfloat16`.

SmolLM2-135M-Instruct (the embedded model), 8 prompts of 41-48 tokens, `--new_tokens` sampled tokens per row
(EOS ignored: the same work on both sides). Both programs are compiled in one process and run alternately,
`--repeats` times each, so that a noisy machine slows both alike; the ratio is the median of the per-pair
ratios. Prints a table and a last line `RESULT ...`.

    python benchmarks/decode_layout.py [--new_tokens 128] [--repeats 5] [--matmul_dtype bfloat16]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klq_jax.allocator import keep_freed_memory
from klq_jax.models.gguf import embedded_smollm2_path
from klq_jax.models.hf import load_model
from klq_jax.models.sampler import Sampler


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--matmul_dtype", default="float32", choices=("float32", "bfloat16"),
                        help="config model.matmul_dtype: bfloat16 decodes from bf16 copies of the weights")
    args = parser.parse_args()
    keep_freed_memory()  # as the trainer does: freed blocks reused, not returned to the OS and faulted back in
    model = load_model(embedded_smollm2_path(),
                       matmul_dtype=jnp.bfloat16 if args.matmul_dtype == "bfloat16" else None)
    state = nnx.state(model)
    prompts = [[1] + list(range(100, 140 + i)) for i in range(args.batch)]
    samplers = {layout: Sampler.for_model(model, eos_ids=(), pad_id=0, max_new_tokens=args.new_tokens,
                                          weights_oi=layout == "[out, in]")
                for layout in ("[in, out]", "[out, in]")}

    def run(sampler):
        start = time.perf_counter()
        jax.block_until_ready(sampler(state, prompts, jax.random.key(0), prompt_length=48))
        return time.perf_counter() - start

    for sampler in samplers.values():
        run(sampler)  # compile
    times = {layout: [] for layout in samplers}
    for _ in range(args.repeats):
        for layout, sampler in samplers.items():
            times[layout].append(run(sampler))
    steps = args.new_tokens
    print(f"SmolLM2-135M-Instruct, fp32 weights, {args.matmul_dtype} matmuls, {args.batch} rows x {steps} tokens, CPU x{jax.local_device_count()} "
          f"(jax {jax.__version__}), {args.repeats} alternating runs each")
    print(f"{'decode weights':<16}{'median s':>10}{'ms/step':>10}  runs (s)")
    for layout, ts in times.items():
        print(f"{layout:<16}{np.median(ts):>10.2f}{np.median(ts) / steps * 1e3:>10.1f}  "
              + ", ".join(f"{t:.2f}" for t in ts))
    ratio = float(np.median(np.array(times["[out, in]"]) / np.array(times["[in, out]"])))
    print(f"RESULT oi_over_io={ratio:.3f} io_ms_per_step={np.median(times['[in, out]']) / steps * 1e3:.1f} "
          f"oi_ms_per_step={np.median(times['[out, in]']) / steps * 1e3:.1f}")


if __name__ == "__main__":
    main()
