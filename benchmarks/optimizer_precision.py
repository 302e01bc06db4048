"""bfloat16 against float32 in the update, the same KLQ updates side by side: the AdamW first moment
(`--compare mu_dtype`, the default) or the matmul operands (`--compare matmul_dtype`, model.matmul_dtype).

SmolLM2-135M-Instruct with its value head, set up as the trainer does (remat full, `optim` defaults but
`mu_dtype`, the model's `matmul_dtype`). Each run starts from the same weights and takes `--steps` updates, step `i` on the same
random rollout batch (`update_cost.make_batch`, key `i`) in both runs. Prints the per-step loss,
approx. KL and gradient norm of both, how far the bf16 run's parameters end from the fp32 run's relative
to how far the fp32 run moved them, the optimiser state of each, and
`RESULT param_deviation=<rel> loss_max_rel_diff=<x> ...`.

    python benchmarks/optimizer_precision.py [--steps 8 --batch 8 --length 176 --response 128]
                                             [--compare matmul_dtype]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klq_jax.models.gguf import embedded_smollm2_path
from klq_jax.models.hf import load_model
from klq_jax.rl.train_step import TrainState, default_algo_config, default_optim_config, make_optimizer, make_update
from update_cost import make_batch  # this folder is the script's: sys.path[0]

KEYS = ("loss", "approx_kl", "grad_norm")


def run(graphdef, cfg, params0, algo, mu_dtype: str, args) -> tuple[list, dict, float]:
    """`--steps` updates from `params0` with the first moment in `mu_dtype`: (per-step metrics, final
    params as numpy, optimiser-state GiB)."""
    def apply_fn(params, tokens, positions, mask, logits_from=0, logits_to=None):
        out = nnx.merge(graphdef, params)(tokens, positions, mask, logits_from=logits_from, logits_to=logits_to)
        return out.logits_btv, out.values_bt

    optim = default_optim_config()
    optim.mu_dtype = mu_dtype
    optimizer = make_optimizer(optim)
    state = TrainState.create(jax.tree.map(jnp.asarray, params0), optimizer, 0.05)  # a fresh copy: donated
    opt_gib = sum(x.nbytes for x in jax.tree.leaves(state.opt_state)) / 2**30
    update = make_update(apply_fn, algo, optimizer)
    metrics = []
    for i in range(args.steps):
        batch = make_batch(jax.random.key(i), cfg, args.batch, args.length, args.response)
        state, m = update(state, batch, jax.random.key(1000 + i), 1, 1)
        metrics.append({k: float(m[k]) for k in KEYS})
    return metrics, jax.tree.map(np.asarray, state.params), opt_gib


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=176)
    parser.add_argument("--response", type=int, default=128)
    parser.add_argument("--compare", default="mu_dtype", choices=("mu_dtype", "matmul_dtype"))
    args = parser.parse_args()

    model = load_model(embedded_smollm2_path(), value_head=True, remat="full")
    graphdef, params = nnx.split(model)
    graphdef16 = nnx.graphdef(load_model(embedded_smollm2_path(), value_head=True, remat="full",
                                         matmul_dtype=jnp.bfloat16))
    cfg = model.cfg
    params0 = jax.tree.map(np.asarray, params)
    del model, params
    algo = default_algo_config()
    algo.algo = "klq"

    if args.compare == "mu_dtype":
        results = {mu: run(graphdef, cfg, params0, algo, mu, args) for mu in ("float32", "bfloat16")}
    else:  # both with the fp32 first moment
        results = {"float32": run(graphdef, cfg, params0, algo, "float32", args),
                   "bfloat16": run(graphdef16, cfg, params0, algo, "float32", args)}
    (m32, p32, gib32), (m16, p16, gib16) = results["float32"], results["bfloat16"]

    print(f"KLQ updates of SmolLM2-135M, {args.batch} x {args.length} tokens ({args.response} response), "
          f"same batches in both runs; bf16 against fp32: {args.compare}")
    print(f"{'step':>4}" + "".join(f"{k + ' fp32':>16}{k + ' bf16':>16}" for k in KEYS))
    for i, (a, b) in enumerate(zip(m32, m16)):
        print(f"{i:>4}" + "".join(f"{a[k]:>16.6f}{b[k]:>16.6f}" for k in KEYS))
    leaves0, leaves32, leaves16 = (jax.tree.leaves(t) for t in (params0, p32, p16))
    moved = np.sqrt(sum(np.sum((b - a).astype(np.float64) ** 2) for a, b in zip(leaves0, leaves32)))
    apart = np.sqrt(sum(np.sum((b - a).astype(np.float64) ** 2) for a, b in zip(leaves32, leaves16)))
    rel = {k: max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for a, b in zip(m32, m16)) for k in KEYS}
    print(f"parameters: fp32 moved them {moved:.4f} (L2 over all); bf16 ends {apart:.6f} from fp32 "
          f"({apart / moved:.2%} of the move)")
    print(f"optimiser state: {gib32:.3f} GiB fp32 mu, {gib16:.3f} GiB bf16 mu")
    print(f"RESULT param_deviation={apart / moved:.5f} loss_max_rel_diff={rel['loss']:.2e} "
          f"approx_kl_max_rel_diff={rel['approx_kl']:.2e} grad_norm_max_rel_diff={rel['grad_norm']:.2e} "
          f"opt_state_gib_fp32={gib32:.3f} opt_state_gib_bf16={gib16:.3f} steps={args.steps}")


if __name__ == "__main__":
    main()
