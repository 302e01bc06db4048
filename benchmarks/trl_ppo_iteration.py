"""TRL's PPO iteration, the PyTorch side of `benchmarks/iteration.py` (run there in its own process and
its own virtual environment: `benchmarks/requirements-bench.txt`, never the project's requirements).

TRL 1.12.0 is the last release with a PPO trainer (`trl.experimental.ppo.PPOTrainer`; 1.13.0 removed it).
Policy, reference, value and reward model are all SmolLM2-135M-Instruct, as TRL's PPO requires: the
policy and reference as `AutoModelForCausalLM`, the value model as `AutoModelForSequenceClassification`
(`num_labels=1`, a fresh score head) and the reward model the same class loaded from the score-head
folder our side uses, so both sides score with the same weights. Exactly `--new_tokens` tokens per
response (no stop token), temperature 1, one minibatch of the whole batch, `--epochs` PPO epochs, and
gradient checkpointing off (PPOConfig's default is on, which also turns off the KV cache in TRL's
generation: measured 322 s instead of ~10 s for the rollout; `--gradient_checkpointing` restores it).

Weights, gradients and AdamW are fp32. With `--bf16` the matmuls run on bf16 operands, torch's mixed
precision, the peer of our `model.matmul_dtype=bfloat16`: PPOConfig's `bf16=True` (accelerate's autocast
around the trained policy-and-value forward, the backward outside it) and `torch.autocast("cpu", bfloat16)`
around the rollout's generation, reference, value and reward forwards, which `bf16=True` alone leaves in
fp32 (TRL calls them on the unwrapped models). With `--device cuda` TRL runs on the GPU (the same autocast on
"cuda"; torch's default fp32 matmuls, no TF32), every timed phase ends with a `torch.cuda.synchronize()`, and
the GPU's peak is `torch.cuda.max_memory_allocated()`.

Phases are timed by wrapping the functions the trainer calls (module globals of `ppo_trainer`):

    sample     `batch_generation` (generate with the per-step logits kept: TRL's old logprobs)
    reference  `forward` without gradients (the reference model)
    forward    `get_reward` on the value model (old values)
    reward     `get_reward` on the reward model
    targets    from the end of the last of these to the first `forward` with gradients
    update     from there to the end of the iteration (`on_step_end`)

Prints one line `SIDE_JSON {...}` with per-iteration phase times and the process's peak RSS.

    /work/venv-bench/bin/python benchmarks/trl_ppo_iteration.py --model DIR --reward_model DIR \
        --prompts prompts.json [--new_tokens 128] [--epochs 1] [--iterations 3] [--bf16] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

from procstat import rss_gib  # this folder is the script's: sys.path[0]


def matmul_gflops(torch, n: int = 2048, repeats: int = 5, dtype=None, device: str = "cpu") -> float:
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--reward_model", required=True)
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--kl_coef", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="TRL's PPOConfig default; it also turns the KV cache off in generation (every "
                             "step recomputes the whole sequence: ~25x slower sampling), so the benchmark "
                             "runs TRL without it unless asked")
    parser.add_argument("--bf16", action="store_true",
                        help="torch mixed precision: every matmul on bf16 operands (autocast), fp32 weights")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda: TRL on the GPU (accelerate's device); phases are timed after a synchronize")
    args = parser.parse_args()

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(args.seed)
    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("--device=cuda: torch sees no CUDA device; accepted: cpu, or cuda on a machine with one")
    # Kernel launches are asynchronous on the GPU: a phase ends when its work has.
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    mm_n = 8192 if on_gpu else 2048  # 2048^3 takes ~20 us on a GPU: launch overhead, not its matmul rate
    mm = matmul_gflops(torch, mm_n, device=args.device)
    prompts = json.loads(open(args.prompts).read())
    batch = len(prompts)

    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    # SmolLM2's pad token is <|im_end|>, which its chat prompts contain; TRL masks every pad-id token as
    # padding, so pad with <|endoftext|> (never in these prompts) to keep the prompts whole.
    tokenizer.pad_token = "<|endoftext|>"
    fp32 = dict(dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(args.model, **fp32)
    ref = AutoModelForCausalLM.from_pretrained(args.model, **fp32)
    value = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, **fp32)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1, **fp32)
    for m in (value, reward):
        m.config.pad_token_id = tokenizer.pad_token_id
    policy.generation_config.eos_token_id = None  # no stop: exactly new_tokens per response
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    dataset = Dataset.from_dict({"input_ids": prompts})

    out_dir = tempfile.mkdtemp(prefix="trl_ppo_bench_")
    config = PPOConfig(
        output_dir=out_dir, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_mini_batches=1,
        local_rollout_forward_batch_size=batch, num_ppo_epochs=args.epochs,
        total_episodes=batch * args.iterations, response_length=args.new_tokens, temperature=1.0,
        stop_token=None, missing_eos_penalty=None, num_sample_generations=0, kl_coef=args.kl_coef,
        learning_rate=args.learning_rate, seed=args.seed, use_cpu=not on_gpu, bf16=args.bf16,
        dataloader_num_workers=0, gradient_checkpointing=args.gradient_checkpointing)

    events: list[tuple[str, float, float]] = []
    iteration_ends: list[float] = []
    iteration_cpu: list[float] = []
    lengths: list[int] = []

    def timed(name_fn, fn):
        def wrapper(*a, **k):
            sync()
            start = time.perf_counter()
            # Nested inside accelerate's own autocast in the update: the same dtype, no change there.
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
                out = fn(*a, **k)
            sync()
            events.append((name_fn(*a, **k), start, time.perf_counter()))
            return out
        return wrapper

    def gen_name(*a, **k):
        return "sample"

    def forward_name(*a, **k):
        return "update_forward" if torch.is_grad_enabled() else "reference"

    def reward_name(model, *a, **k):
        return "reward" if model is reward else "forward"

    original_generation = ppo_module.batch_generation

    def batch_generation(*a, **k):
        out = original_generation(*a, **k)
        lengths.append(int(out[0].shape[1] - a[1].shape[1]))
        return out

    ppo_module.batch_generation = timed(gen_name, batch_generation)
    ppo_module.forward = timed(forward_name, ppo_module.forward)
    ppo_module.get_reward = timed(reward_name, ppo_module.get_reward)

    class IterationEnd(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync()
            iteration_ends.append(time.perf_counter())
            iteration_cpu.append(time.process_time())

    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref,
                         reward_model=reward, value_model=value, train_dataset=dataset,
                         eval_dataset=dataset, callbacks=[IterationEnd()])
    rss_setup = rss_gib()
    start, start_cpu = time.perf_counter(), time.process_time()
    trainer.train()

    iterations = []
    begin, begin_cpu = start, start_cpu
    for end, end_cpu in zip(iteration_ends, iteration_cpu):
        mine = [e for e in events if begin <= e[1] < end]
        times = {"sample": 0.0, "reward": 0.0, "reference": 0.0, "forward": 0.0}
        for name, s, e in mine:
            if name in times:
                times[name] += e - s
        rollout_end = max(e for name, s, e in mine if name != "update_forward")
        update_start = min(s for name, s, e in mine if name == "update_forward")
        times["targets"] = update_start - rollout_end
        times["update"] = end - update_start
        times["iteration"] = end - begin
        times["cpu"] = end_cpu - begin_cpu
        iterations.append(times)
        begin, begin_cpu = end, end_cpu
    assert all(n == args.new_tokens for n in lengths), lengths
    result = {
        "side": "trl-ppo", "iterations": iterations, "matmul_gflops_torch_fp32": mm, "matmul_n": mm_n,
        **({"matmul_gflops_torch_bf16": matmul_gflops(torch, mm_n, dtype=torch.bfloat16, device=args.device)}
           if args.bf16 else {}),
        # The GPU's own peak: what torch's caching allocator held for tensors at most.
        **({"device": torch.cuda.get_device_name(), "device_peak_gib": torch.cuda.max_memory_allocated() / 2**30}
           if on_gpu else {"device": "cpu"}),
        "rss_setup_gib": rss_setup, "rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "gradient_checkpointing": args.gradient_checkpointing, "bf16": args.bf16, "batch": batch,
        "prompt_len": max(map(len, prompts)), "response_len": lengths[0],
        "versions": {"trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0]},
    }
    print("SIDE_JSON " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
