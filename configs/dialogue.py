"""Single-turn dialogue. `configs/dialogue.py` is the embedded offline default; `:hh` is the paper's
Anthropic-HH setting with hub models and data; `:tiny` is a seconds-long smoke run for tests."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import base_config  # noqa: E402


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
        c.batch_size = 64
        c.num_iterations = 1000
        c.rl.epochs = 4
        c.rl.num_minibatches = 4
        c.rl.missing_eos_penalty = True  # Huang et al. 2024: reward -1 for responses without EOS
        c.optim.learning_rate = 1.41e-5
    elif arg == "tiny":
        c.num_iterations = 2
        c.batch_size = 2
        c.sampling.max_new_tokens = 8
        c.data.max_examples = 16
        c.rl.num_minibatches = 1
        c.rl.epochs = 1
        c.checkpoint.every = 1
        c.eval.num_prompts = 4
    elif arg:
        raise ValueError(f"unknown dialogue config variant {arg!r}; accepted: '', 'hh', 'tiny'")
    return c
