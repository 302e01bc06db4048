"""Single-turn dialogue. `configs/dialogue.py` is the embedded offline default; `:hh` is the paper's
Anthropic-HH setting with hub models and data; `:tiny` is a seconds-long smoke run for tests."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import base_config, paper_settings, tiny_settings  # noqa: E402


def get_config(arg: str = ""):
    c = base_config()
    c.data.task = "dialogue"
    if arg == "hh":
        # Anthropic HH, single-turn; Pythia SFT policy and a learned reward model (plain-text format).
        c.data.task = "hh"
        c.data.source = "Anthropic/hh-rlhf"
        c.data.train_split, c.data.eval_split = "train", "test"
        c.data.chat_template = False
        c.data.drop_long_prompts = True
        c.data.max_prompt_tokens = 256
        c.model.policy = "EleutherAI/pythia-1b-deduped"  # point this at your HH SFT checkpoint of this family
        c.reward.kind = "hf"
        c.reward.path = "Ray2333/gpt2-large-helpful-reward_model"  # GPT2ForSequenceClassification on HH
        c.reward.chat = False
        c.sampling.max_new_tokens = 128
        paper_settings(c)
    elif arg == "tiny":
        tiny_settings(c)
    elif arg:
        raise ValueError(f"unknown dialogue config variant {arg!r}; accepted: '', 'hh', 'tiny'")
    return c
