"""How far the fp32 update's bf16 replays move its gradient, on SmolLM2 (item 71).

One rollout of `--batch` prompts x `--new_tokens` tokens from the policy itself (fp32, the native decode step where it
runs, recording what every replay reads: layer inputs, gate|up, attention q|k|v and output projection, the head's
`onehot - softmax`; drawn twice, the same tokens, the second time with the attention's record, which keeps the layer
inputs in bf16 too), then the KLQ loss's gradient at the sampling parameters, the trainer's way
(`train_step.policy_logprobs`), five times on that one rollout:

    none         the layers and the head replayed from their fp32 records only: the exact fp32 gradient, up to
                 summation order (the reference)
    gate|up      + the MLPs' gate|up in bf16 (`rl.replay_gate_up="on"`)
    +attention   + the attention's q|k|v and output projection in bf16, and the layer inputs with them
                 (`rl.replay_attention="on"`)
    +probs       + the head's `onehot - softmax` in bf16 (`rl.replay_probs="on"`)
    fp32 inputs  +attention's records with the first rollout's fp32 layer inputs

For the first three, the relative L2 distance of the whole gradient from the reference, and its largest over the
parameter arrays; and what the head's record (+probs against +attention) and the inputs' bf16 record (+attention
against fp32 inputs) move on their own. The prompts are random token ids of 39-48 tokens (the dialogue prompts'
lengths), rewards a linear ramp, the reference's log-probabilities the sampler's plus a small wave: what matters is
the loss's usual shape. Prints a table and a last line `RESULT ...`.

    python benchmarks/replay_quality.py [--policy HF_FOLDER] [--batch 8] [--new_tokens 128]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from klq_jax.models.gguf import embedded_smollm2_path  # noqa: E402
from klq_jax.models.hf import load_model  # noqa: E402
from klq_jax.models.sampler import Sampler  # noqa: E402
from klq_jax.models.transformer import positions_from_mask  # noqa: E402
from klq_jax.rl.train_step import Rollout, compute_targets, default_algo_config, make_loss_fn  # noqa: E402
from klq_jax.trainer import lm_apply_fn  # noqa: E402


def relative_l2(grads, ref) -> tuple[float, float]:
    """(whole gradient, worst parameter array): ||g - ref|| / ||ref||, in float64."""
    diffs = [(np.asarray(a, np.float64) - np.asarray(r, np.float64), np.asarray(r, np.float64))
             for a, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref))]
    whole = np.sqrt(sum((d ** 2).sum() for d, _ in diffs) / sum((r ** 2).sum() for _, r in diffs))
    worst = max(np.linalg.norm(d) / np.linalg.norm(r) for d, r in diffs if np.linalg.norm(r) > 0)
    return float(whole), float(worst)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", help="an HF folder of a Llama-family LM; default: the embedded "
                        "SmolLM2-135M-Instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new_tokens", type=int, default=128)
    args = parser.parse_args()
    if args.batch < 1 or args.new_tokens < 1:
        sys.exit(f"--batch={args.batch}, --new_tokens={args.new_tokens}: expected positive numbers")
    model = load_model(Path(args.policy) if args.policy else embedded_smollm2_path(), value_head=True, remat="full")
    graphdef, params = nnx.split(model)

    apply_fn = lm_apply_fn(graphdef, head_logprobs=True)  # the trainer's: the head replays the sampler's too
    rng = np.random.default_rng(0)
    vocab = model.cfg.vocab_size
    prompts = [rng.integers(min(100, vocab - 1), vocab, int(n)).tolist() for n in rng.integers(39, 49, args.batch)]

    def rollout(replay_attention):  # the same draws either way (the same key and parameters): records only differ
        sampler = Sampler.for_model(model, eos_ids=(-1,), pad_id=0, max_new_tokens=args.new_tokens, bucket=16,
                                    record_layers=True, replay_gate_up="on", replay_attention=replay_attention,
                                    replay_probs="on")
        out = sampler(params, prompts, jax.random.key(0))
        b, t = out.tokens_bt.shape
        batch = Rollout.from_samples(
            out.tokens_bt, positions_from_mask(out.attention_mask_bt), out.attention_mask_bt, out.response_mask_bt,
            out.logprobs_bt, out.eos_b, values_bt=out.values_bt, entropy_bt=out.entropy_bt,
            first_action=out.prompt_len, layer_inputs_bltd=out.layer_inputs_bltd, layer_output_btd=out.layer_output_btd,
            logsumexp_bt=out.logsumexp_bt, gate_up_bltf=out.gate_up_bltf, logp_grad_vtb=out.logp_grad_vtb)
        return compute_targets(batch.replace(rewards_b=jnp.linspace(-1.0, 1.0, b),
                                             ref_logp_bt=out.logprobs_bt + 0.05 * jnp.sin(jnp.arange(t))), 0.05, algo)

    algo = default_algo_config()
    algo.algo = "klq"
    # fp32 layer inputs and the gate|up; with the attention's projections the inputs too are recorded in bf16
    batch, batch_all = rollout("off"), rollout("on")
    if batch.layer_gate_up_bltf is None or batch.sample_logp_grad_vtb is None:
        sys.exit("the sampler recorded no gate|up or no onehot - softmax here (the native decode step does not run)")
    np.testing.assert_array_equal(np.asarray(batch.tokens_bt), np.asarray(batch_all.tokens_bt))
    b = batch.tokens_bt.shape[0]
    grad = jax.jit(jax.grad(make_loss_fn(apply_fn, algo), has_aux=True))
    settings = {
        "none": batch.replace(layer_gate_up_bltf=None, sample_logp_grad_vtb=None),
        "gate|up": batch.replace(sample_logp_grad_vtb=None),
        "+attention": batch_all.replace(sample_logp_grad_vtb=None),
        "+probs": batch_all,
        # the attention's record with the fp32 inputs: what the inputs' bf16 record adds on its own
        "fp32 inputs": batch_all.replace(layer_inputs_bltd=batch.layer_inputs_bltd, sample_logp_grad_vtb=None),
    }
    grads = {name: grad(params, setting, 0.05)[0] for name, setting in settings.items()}
    print(f"KLQ loss gradient, fp32, {b} x {args.new_tokens} tokens, {model.cfg.num_layers} layers, vocabulary "
          f"{vocab}: distance from the exact gradient (no bf16 record)")
    print(f"{'replayed in bf16':18s} {'whole (L2)':>12s} {'worst array (L2)':>18s}")
    figures = {}
    for name in ("gate|up", "+attention", "+probs"):
        whole, worst = relative_l2(grads[name], grads["none"])
        figures[name] = (whole, worst)
        print(f"{name:18s} {whole:12.2e} {worst:18.2e}")
    probs_alone = relative_l2(grads["+probs"], grads["+attention"])[0]
    inputs_alone = relative_l2(grads["+attention"], grads["fp32 inputs"])[0]
    print(f"the head's record alone (+probs against +attention): {probs_alone:.2e}")
    print(f"the layer inputs' bf16 record alone (+attention against it with fp32 inputs): {inputs_alone:.2e}")
    print("RESULT " + " ".join([f"gate_up_rel_l2={figures['gate|up'][0]:.3g}",
                                f"attention_rel_l2={figures['+attention'][0]:.3g}",
                                f"probs_rel_l2={figures['+probs'][0]:.3g}", f"probs_alone_rel_l2={probs_alone:.3g}",
                                f"probs_worst_array_rel_l2={figures['+probs'][1]:.3g}",
                                f"inputs_alone_rel_l2={inputs_alone:.3g}"]))


if __name__ == "__main__":
    main()
