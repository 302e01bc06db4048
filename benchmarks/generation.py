"""Sampler speed against transformers' PyTorch `generate`, and forward+backward throughput, in one run.

SmolLM2-135M-Instruct (the embedded model) on this machine's CPU; chat prompts; sampling with the same
settings on both sides (temperature 1, no top-k/top-p), exactly `--new_tokens` tokens per row (EOS
ignored on both sides so both do the same work). Prints a table and a last line `RESULT ...`.

    python benchmarks/generation.py [--new_tokens 128] [--batches 1,8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers
from flax import nnx

from klq_jax.models.gguf import embedded_smollm2_path
from klq_jax.models.hf import load_model
from klq_jax.models.sampler import Sampler
from klq_jax.models.transformer import positions_from_mask

QUESTIONS = ["How do I keep basil alive on a windowsill?", "Explain what a hash table is.",
             "Write a two-line poem about rain.", "What causes the seasons on Earth?",
             "Give me three tips for a job interview.", "How does a bicycle stay upright?",
             "What is the difference between weather and climate?", "Suggest a name for a grey cat."]


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train_batch", type=int, default=8)
    parser.add_argument("--train_len", type=int, default=192)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    path = embedded_smollm2_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for q in QUESTIONS]
    model = load_model(path)
    state = nnx.state(model)
    sampler = Sampler.for_model(model, eos_ids=(), pad_id=tokenizer.pad_token_id or 0,
                                max_new_tokens=args.new_tokens)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer.padding_side = "left"

    rows, results = [], {}
    for batch in [int(b) for b in args.batches.split(",")]:
        batch_prompts = [prompts[i % len(prompts)] for i in range(batch)]
        key = jax.random.key(0)

        def ours():
            out = sampler(state, batch_prompts, key)
            jax.block_until_ready(out.tokens_bt)
            assert int(out.response_mask_bt.sum()) == batch * args.new_tokens

        enc = tokenizer.pad({"input_ids": batch_prompts}, return_tensors="pt")

        def theirs():
            with torch.no_grad():
                out = torch_model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                           max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                           pad_token_id=tokenizer.pad_token_id)
            assert out.shape[1] - enc["input_ids"].shape[1] == args.new_tokens

        ours()  # compile
        t_ours = best_of(ours, args.repeats)
        theirs()  # warm up
        t_theirs = best_of(theirs, args.repeats)
        tok = batch * args.new_tokens
        rows.append((f"generate b={batch}", tok / t_ours, tok / t_theirs, t_theirs / t_ours))
        results[f"speedup_b{batch}"] = t_theirs / t_ours
        results[f"ours_tok_s_b{batch}"] = tok / t_ours

    # Forward + backward of the LM loss (next-token cross-entropy), same batch on both sides.
    b, t = args.train_batch, args.train_len
    tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (b, t)).astype(np.int32)
    graphdef, params = nnx.split(model)

    @jax.jit
    def grad_fn(params, tokens_bt):
        def loss(params):
            mask = jnp.ones(tokens_bt.shape, bool)
            logits = nnx.merge(graphdef, params)(tokens_bt, positions_from_mask(mask), mask).logits_btv
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens_bt[:, 1:]).mean()
        return jax.grad(loss)(params)

    tokens_j = jnp.asarray(tokens)
    jax.block_until_ready(grad_fn(params, tokens_j))
    t_ours = best_of(lambda: jax.block_until_ready(grad_fn(params, tokens_j)), args.repeats)
    tokens_t = torch.as_tensor(tokens, dtype=torch.long)

    def torch_step():
        torch_model.zero_grad(set_to_none=True)
        torch_model(input_ids=tokens_t, labels=tokens_t).loss.backward()

    torch_model.train()
    torch_step()
    t_theirs = best_of(torch_step, args.repeats)
    rows.append((f"fwd+bwd {b}x{t}", b * t / t_ours, b * t / t_theirs, t_theirs / t_ours))
    results["fwdbwd_speedup"] = t_theirs / t_ours
    results["fwdbwd_tok_s"] = b * t / t_ours

    print(f"SmolLM2-135M-Instruct, fp32, CPU x{os.cpu_count()}, jax {jax.__version__}, torch {torch.__version__}")
    print(f"{'case':<22}{'ours tok/s':>12}{'torch tok/s':>13}{'ours/torch':>12}")
    for name, ours_rate, theirs_rate, ratio in rows:
        print(f"{name:<22}{ours_rate:>12.1f}{theirs_rate:>13.1f}{ratio:>12.2f}")
    print("RESULT " + " ".join(f"{k}={v:.2f}" for k, v in results.items()))


if __name__ == "__main__":
    import sys

    from klq_jax.allocator import restart_with_huge_pages

    # As `python -m klq_jax.main` runs: without huge pages an fp32 rollout took 16.96 s instead of 11.83 on a
    # Zen 1 VM (stop 37), every call faulting in XLA:CPU's mapped blocks page by page.
    restart_with_huge_pages([__file__, *sys.argv[1:]])
    main()
