"""Configs at the paper's scale and beyond, one variant per model and machine:

    python -m klq_jax.main --config=configs/scale.py:pythia1b_tldr_v4_8 --distributed    # on every worker

| variant | model (policy = reference, reward) | machine | mesh data,fsdp,tensor | peak GiB / device |
| --- | --- | --- | --- | --- |
| pythia1b_tldr_v4_8     | Pythia 1B SFT, 1B RM, TL;DR           | TPU v4-8 (4 chips, 32 GiB)       | 1,4,1  | see EXPECTED_PEAK_GIB |
| pythia1b_tldr_v5e_8    | Pythia 1B SFT, 1B RM, TL;DR           | TPU v5e-8 (8 chips, 16 GiB)      | 1,8,1  |  |
| pythia2p8b_tldr_v4_8   | Pythia 2.8B SFT, 2.8B RM, TL;DR       | TPU v4-8 (4 chips, 32 GiB)       | 1,4,1  |  |
| pythia2p8b_tldr_v5e_8  | Pythia 2.8B SFT, 2.8B RM, TL;DR       | TPU v5e-8 (8 chips, 16 GiB)      | 1,8,1  |  |
| llama8b_hh_v5p_64      | Llama 3.1 8B Instruct, 8B RM, HH      | TPU v5p-64 (32 chips, 8 hosts)   | 1,32,1 |  |
| pythia1b_tldr_gpu8     | Pythia 1B SFT, 1B RM, TL;DR           | 8 x A100 40 GB, one node         | 1,8,1  |  |
| tiny_mesh              | embedded SmolLM2-135M, dialogue       | 8 (fake CPU) devices             | 2,2,2  |  |

`EXPECTED_PEAK_GIB` holds `python -m klq_jax.memory`'s per-device peak for each variant (checked by
tests/test_memory.py); docs/scaling.md breaks it down. Parameters are float32 (AdamW needs the precision),
compute bfloat16. The reward model is counted as `HFRewardModel` holds it: whole, on one device of each
host, in `reward.param_dtype` (float32 unless a variant says otherwise; the 2.8B variants need bfloat16).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import dialogue  # noqa: E402
import summarisation  # noqa: E402

# variant -> the machine it is sized for: accelerator type (launch/tpu.sh --accelerator), chip (HBM table
# in klq_jax.memory), JAX devices, hosts, and the memory presets of its policy and reward model.
HARDWARE = {
    "pythia1b_tldr_v4_8": dict(accelerator="v4-8", chip="v4", devices=4, hosts=1, model="pythia-1b",
                               reward_model="pythia-1b"),
    "pythia1b_tldr_v5e_8": dict(accelerator="v5litepod-8", chip="v5e", devices=8, hosts=1, model="pythia-1b",
                                reward_model="pythia-1b"),
    "pythia2p8b_tldr_v4_8": dict(accelerator="v4-8", chip="v4", devices=4, hosts=1, model="pythia-2.8b",
                                 reward_model="pythia-2.8b"),
    "pythia2p8b_tldr_v5e_8": dict(accelerator="v5litepod-8", chip="v5e", devices=8, hosts=1, model="pythia-2.8b",
                                  reward_model="pythia-2.8b"),
    "llama8b_hh_v5p_64": dict(accelerator="v5p-64", chip="v5p", devices=32, hosts=8, model="llama3-8b",
                              reward_model="llama3-8b"),
    "pythia1b_tldr_gpu8": dict(accelerator="8xA100-40GB", chip="a100-40gb", devices=8, hosts=1, model="pythia-1b",
                               reward_model="pythia-1b"),
    "tiny_mesh": dict(accelerator="cpu", chip=None, devices=8, hosts=1, model="smollm2-135m", reward_model=None),
}

# Per-device peak (GiB) from `klq_jax.memory.estimate` for each variant on its machine.
EXPECTED_PEAK_GIB = {
    "pythia1b_tldr_v4_8": 15.4,
    "pythia1b_tldr_v5e_8": 9.9,
    "pythia2p8b_tldr_v4_8": 24.0,
    "pythia2p8b_tldr_v5e_8": 10.9,
    "llama8b_hh_v5p_64": 40.0,
    "pythia1b_tldr_gpu8": 9.9,
    "tiny_mesh": 1.3,
}


def _tldr(size: str):
    c = summarisation.get_config("tldr")
    c.model.policy = f"cleanrl/EleutherAI_pythia-{size}-deduped__sft__tldr"
    c.model.reference = ""             # the SFT checkpoint
    c.reward.path = f"cleanrl/EleutherAI_pythia-{size}-deduped__reward__tldr"
    c.model.param_dtype = "float32"    # master weights and AdamW moments in float32 ...
    c.model.compute_dtype = "bfloat16"  # ... matmuls in bfloat16
    c.batch_size = 64
    c.rl.num_minibatches = 4
    c.checkpoint.every = 50
    c.checkpoint.keep = 3
    return c


def get_config(arg: str = ""):
    if arg == "pythia1b_tldr_v4_8":
        c = _tldr("1b")
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    elif arg == "pythia1b_tldr_v5e_8":
        c = _tldr("1b")
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    elif arg == "pythia1b_tldr_gpu8":
        c = _tldr("1b")
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    elif arg == "pythia2p8b_tldr_v4_8":
        # 32 layers x 565 tokens: full remat; the 2.8B reward model in bfloat16 (5 GiB on device 0; float32
        # would put the peak at 29 of 32 GiB).
        c = _tldr("2.8b")
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
        c.model.remat = "full"
        c.reward.param_dtype = "bfloat16"
    elif arg == "pythia2p8b_tldr_v5e_8":
        # 16 GiB chips: bfloat16 parameters (and AdamW moments), full remat, two microbatches; the reward
        # model must be loaded in bfloat16 too (float32 it takes 10.4 GiB of device 0 alone).
        c = _tldr("2.8b")
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
        c.model.param_dtype = "bfloat16"
        c.model.remat = "full"
        c.rl.num_microbatches = 2
        c.reward.param_dtype = "bfloat16"
    elif arg == "llama8b_hh_v5p_64":
        # Llama 3.1 8B Instruct on single-turn HH with an 8B Llama reward model. v5p-64 is 32 chips (64
        # TensorCores) on 8 hosts of 4 chips: run with --distributed on every worker (launch/tpu.sh does).
        c = dialogue.get_config("hh")
        c.model.policy = "meta-llama/Llama-3.1-8B-Instruct"
        c.model.reference = ""
        c.reward.kind = "hf"
        c.reward.path = "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"
        c.reward.chat = True
        c.data.chat_template = True
        c.data.max_prompt_tokens = 256
        c.sampling.max_new_tokens = 128
        c.model.param_dtype = "float32"
        c.model.compute_dtype = "bfloat16"
        c.model.remat = "dots"
        c.batch_size = 128
        c.rl.num_minibatches = 4
        c.optim.learning_rate = 1e-6
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
        c.checkpoint.every = 25
        c.checkpoint.keep = 2
    elif arg == "tiny_mesh":
        # The embedded offline default on 8 devices (fake CPU ones in tests: XLA_FLAGS=
        # --xla_force_host_platform_device_count=8): every mesh axis used once.
        c = dialogue.get_config("tiny")
        c.batch_size = 8
        c.rl.num_minibatches = 2
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    else:
        raise ValueError(f"unknown scale config variant {arg!r}; accepted: {sorted(HARDWARE)}")
    return c
