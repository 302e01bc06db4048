"""Summarisation. `configs/summarisation.py` is the embedded offline default (one-sentence summaries of
the shipped passages); `:tldr` is the paper's TL;DR setting with the public Pythia SFT and reward
checkpoints of "The N+ implementation details of RLHF with PPO"; `:tiny` is a smoke run for tests."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import base_config, paper_settings, tiny_settings  # noqa: E402


def get_config(arg: str = ""):
    c = base_config()
    c.data.task = "summarisation"
    c.data.max_prompt_tokens = 256
    c.sampling.max_new_tokens = 40
    if arg == "tldr":
        c.data.task = "tldr"
        c.data.source = "trl-lib/tldr"
        c.data.train_split, c.data.eval_split = "train", "validation"
        c.data.chat_template = False
        c.data.drop_long_prompts = True
        c.data.max_prompt_tokens = 512
        c.model.policy = "cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr"
        c.reward.kind = "hf"
        c.reward.path = "cleanrl/EleutherAI_pythia-1b-deduped__reward__tldr"
        c.reward.chat = False
        c.sampling.max_new_tokens = 53
        paper_settings(c)
        c.model.compute_dtype = "bfloat16"  # parameters and optimizer state stay float32
    elif arg == "tiny":
        tiny_settings(c)
    elif arg:
        raise ValueError(f"unknown summarisation config variant {arg!r}; accepted: '', 'tldr', 'tiny'")
    return c
