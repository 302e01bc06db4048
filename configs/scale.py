"""Configs at the paper's scale and beyond, one variant per model and machine:

    launch/tpu.sh all --accelerator v4-8 --config configs/scale.py:pythia1b_tldr_v4_8
    python -m klq_jax.main --config=configs/scale.py:pythia1b_tldr_v4_8      # on a single-host VM itself

| variant               | policy = reference; reward; data  | machine                         | mesh   | GiB/dev |
| --------------------- | --------------------------------- | ------------------------------- | ------ | ------- |
| pythia1b_tldr_v4_8    | Pythia 1B SFT; 1B RM; TL;DR       | TPU v4-8: 4 chips x 32 GiB      | 1,4,1  | 11.6    |
| pythia1b_tldr_v5e_8   | Pythia 1B SFT; 1B RM; TL;DR       | TPU v5e-8: 8 chips x 16 GiB     | 1,8,1  | 7.4     |
| pythia2p8b_tldr_v5p_8 | Pythia 2.8B SFT; 2.8B RM; TL;DR   | TPU v5p-8: 4 chips x 95 GiB     | 1,4,1  | 28.7    |
| pythia2p8b_tldr_v6e_8 | Pythia 2.8B SFT; 2.8B RM; TL;DR   | TPU v6e-8: 8 chips x 32 GiB     | 1,8,1  | 17.6    |
| pythia2p8b_tldr_v4_16 | Pythia 2.8B SFT; 2.8B RM; TL;DR   | TPU v4-16: 8 chips x 32, 2 hosts| 1,8,1  | 17.6    |
| llama8b_hh_v5p_64     | Llama 3.1 8B Instruct; 8B RM; HH  | TPU v5p-64: 32 chips, 8 hosts   | 1,16,2 | 23.5    |
| pythia1b_tldr_gpu8    | Pythia 1B SFT; 1B RM; TL;DR       | 8 x A100 40 GB, one node        | 1,8,1  | 7.4     |
| tiny_mesh             | embedded SmolLM2-135M; dialogue   | 8 (fake CPU) devices            | 2,2,2  |  0.8    |

All keep the paper's settings of the task config (192 episodes per batch, 4 epochs x 4 minibatches;
TL;DR prompts padded to 512 tokens and 53 new tokens), float32 parameters and AdamW second moment (the
first in bfloat16, `optim.mu_dtype`), bfloat16 compute, FSDP over the chips. GiB/dev is
`python -m klq_jax.memory --config configs/scale.py:<variant>`'s per-device peak (`EXPECTED_PEAK_GIB`,
checked by tests/test_memory.py; docs/scaling.md breaks it down). The reward model is counted as
`HFRewardModel` holds it: whole, on one device of each host, in `reward.dtype` (bfloat16).

Pythia 2.8B at 192 episodes does not fit 16-32 GiB chips four or eight at a time (v4-8, v5e-8): sampling
decodes the whole batch at once, and its KV cache and prefill logits for 24-48 rows per chip come on top of
~15 GiB of resident state; the 2.8B variants use v5p-8, v6e-8 or v4-16 instead.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import dialogue  # noqa: E402
import summarisation  # noqa: E402

# variant -> the machine it is sized for: accelerator type (launch/tpu.sh --accelerator), chip (HBM table in
# klq_jax.memory), JAX devices, hosts, and the klq_jax.memory presets of its policy and reward model.
HARDWARE = {
    "pythia1b_tldr_v4_8": dict(accelerator="v4-8", chip="v4", devices=4, hosts=1, model="pythia-1b",
                               reward_model="pythia-1b"),
    "pythia1b_tldr_v5e_8": dict(accelerator="v5litepod-8", chip="v5e", devices=8, hosts=1, model="pythia-1b",
                                reward_model="pythia-1b"),
    "pythia2p8b_tldr_v5p_8": dict(accelerator="v5p-8", chip="v5p", devices=4, hosts=1, model="pythia-2.8b",
                                  reward_model="pythia-2.8b"),
    "pythia2p8b_tldr_v6e_8": dict(accelerator="v6e-8", chip="v6e", devices=8, hosts=1, model="pythia-2.8b",
                                  reward_model="pythia-2.8b"),
    "pythia2p8b_tldr_v4_16": dict(accelerator="v4-16", chip="v4", devices=8, hosts=2, model="pythia-2.8b",
                                  reward_model="pythia-2.8b"),
    "llama8b_hh_v5p_64": dict(accelerator="v5p-64", chip="v5p", devices=32, hosts=8, model="llama3-8b",
                              reward_model="llama3-8b"),
    "pythia1b_tldr_gpu8": dict(accelerator="8xA100-40GB", chip="a100-40gb", devices=8, hosts=1, model="pythia-1b",
                               reward_model="pythia-1b"),
    "tiny_mesh": dict(accelerator="cpu", chip=None, devices=8, hosts=1, model="smollm2-135m", reward_model=None),
}

# Per-device peak (GiB) from `klq_jax.memory.estimate` for each variant on its machine.
EXPECTED_PEAK_GIB = {
    "pythia1b_tldr_v4_8": 11.6,
    "pythia1b_tldr_v5e_8": 7.4,
    "pythia2p8b_tldr_v5p_8": 28.7,
    "pythia2p8b_tldr_v6e_8": 17.6,
    "pythia2p8b_tldr_v4_16": 17.6,
    "llama8b_hh_v5p_64": 23.5,
    "pythia1b_tldr_gpu8": 7.4,
    "tiny_mesh": 0.8,
}


def _tldr(size: str):
    """The paper's TL;DR setting (configs/summarisation.py:tldr) with the Pythia `size` SFT and reward models."""
    c = summarisation.get_config("tldr")
    c.model.policy = f"cleanrl/EleutherAI_pythia-{size}-deduped__sft__tldr"
    c.model.reference = ""               # the SFT checkpoint
    c.reward.path = f"cleanrl/EleutherAI_pythia-{size}-deduped__reward__tldr"
    c.model.param_dtype = "float32"      # master weights and AdamW second moment in float32 ...
    c.model.compute_dtype = "bfloat16"   # ... matmuls in bfloat16
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.checkpoint.every = 20
    c.checkpoint.keep = 3
    return c


def get_config(arg: str = ""):
    if arg == "pythia1b_tldr_v4_8":
        c = _tldr("1b")
        c.rl.num_microbatches = 4        # 48-episode minibatches in 4 steps of 3 rows per chip
    elif arg in ("pythia1b_tldr_v5e_8", "pythia1b_tldr_gpu8"):
        c = _tldr("1b")
        c.rl.num_microbatches = 2
    elif arg == "pythia2p8b_tldr_v5p_8":
        c = _tldr("2.8b")
        c.model.remat = "dots"
        c.rl.num_microbatches = 2
    elif arg == "pythia2p8b_tldr_v6e_8":
        c = _tldr("2.8b")
        c.model.remat = "full"
        c.rl.num_microbatches = 2
    elif arg == "pythia2p8b_tldr_v4_16":
        # Two hosts: run with --distributed (launch/tpu.sh adds it) and a gs:// workdir for checkpoints.
        c = _tldr("2.8b")
        c.model.remat = "dots"
        c.rl.num_microbatches = 2
    elif arg == "llama8b_hh_v5p_64":
        # Llama 3.1 8B Instruct on single-turn HH with an 8B Llama reward model. v5p-64 is 32 chips (64
        # TensorCores) on 8 hosts of 4: FSDP over 16 and tensor parallelism over 2 chips of a host (192
        # episodes split 16 ways; 32-way FSDP would need a multiple of 128).
        c = dialogue.get_config("hh")
        c.model.policy = "meta-llama/Llama-3.1-8B-Instruct"
        c.model.reference = ""
        c.reward.kind = "hf"
        c.reward.path = "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"
        c.reward.chat = True
        c.data.chat_template = True
        c.model.param_dtype = "float32"
        c.model.compute_dtype = "bfloat16"
        c.model.remat = "dots"
        c.optim.learning_rate = 1e-6
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 16, 2
        c.checkpoint.every = 10
        c.checkpoint.keep = 2
    elif arg == "tiny_mesh":
        # The embedded offline default on 8 devices (fake CPU ones: XLA_FLAGS=
        # --xla_force_host_platform_device_count=8), every mesh axis used once.
        c = dialogue.get_config("tiny")
        c.batch_size = 8
        c.rl.num_minibatches = 2
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    else:
        raise ValueError(f"unknown scale config variant {arg!r}; accepted: {sorted(HARDWARE)}")
    return c
