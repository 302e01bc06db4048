"""Learned reward models: HF sequence-classification checkpoints (Llama family, GPT-NeoX, GPT-2) run by
our Flax code, scoring at the last non-padding token."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klq_jax.models.hf import load_model, resolve_checkpoint
from klq_jax.models.sampler import bucket_length
from klq_jax.models.transformer import pack_frozen, positions_from_mask
from klq_jax.rewards import Reward, RewardError


@functools.partial(jax.jit, static_argnames="graphdef")
def _scores(graphdef, state, tokens_bt, mask_bt):
    return nnx.merge(graphdef, state)(tokens_bt, positions_from_mask(mask_bt), mask_bt).scores_b


class HFRewardModel(Reward):
    """`AutoModelForSequenceClassification`-style reward model with one label.

    Text format: with `chat=True` (and a tokenizer chat template) the prompt and response are a
    user/assistant conversation; otherwise `prompt_text + response` (the TL;DR/HH SFT setting, where
    the prompt already ends in "TL;DR:" or "Assistant:"). Rows are left-padded to a length bucket so
    batches compile once per bucket; sequences longer than `max_length` keep their last tokens.
    """

    name = "hf-reward-model"

    def __init__(self, path: str, *, chat: bool | None = None, max_length: int = 1024, batch_size: int = 16,
                 param_dtype=jnp.float32, dtype=None, matmul_dtype=None, matmul_kernel: str = "auto", mesh=None):
        from klq_jax.tokenizer import load_tokenizer

        folder = resolve_checkpoint(path)
        # Stored in `param_dtype`, computing in `dtype` (default: the same), matmul operands in `matmul_dtype`
        # (default: `dtype`); bf16 storage with fp32 compute widens one layer at a time (models/transformer.py).
        model = load_model(folder, score_head=True, param_dtype=param_dtype, dtype=dtype, matmul_dtype=matmul_dtype)
        # `matmul_kernel` (config `model.frozen_matmul_kernel`): the layers' bf16 matmuls as native AMX tile products
        # on weights packed once ("auto": where they run; `transformer.pack_frozen`).
        try:
            pack_frozen(model, matmul_kernel, devices=1 if mesh is None else mesh.size)
        except ValueError as err:
            raise RewardError(f"reward model {path!r}: {err}") from None
        model.store_layers_as_bits()  # bf16 layers read in place by each forward (item 60)
        self.cfg = model.cfg
        self.graphdef, self.state = nnx.split(model)  # the state alone holds the weights (no second copy)
        if mesh is not None:  # weights split over this host's devices by the parameter rules (FSDP/tensor)
            from klq_jax.sharding import place_state

            self.state = place_state(self.state, mesh)
        try:
            self.tokenizer = load_tokenizer(folder)
        except (OSError, ValueError) as e:
            raise RewardError(f"reward model {path!r}: {e}") from None
        if len(self.tokenizer) > self.cfg.vocab_size:
            raise RewardError(f"reward model {path!r}: its tokenizer has {len(self.tokenizer)} tokens, the model "
                              f"only {self.cfg.vocab_size}; accepted: a tokenizer that fits the model")
        self.chat = bool(self.tokenizer.chat_template) if chat is None else chat
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.max_length, self.batch_size = max_length, batch_size
        self.name = f"hf:{path}"

    def _encode(self, prompt: str, response: str) -> list[int]:
        if self.chat:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                tokenize=True, return_dict=False)
        else:
            ids = self.tokenizer(prompt + response)["input_ids"]
        return list(ids)[-self.max_length:]

    def score(self, prompts, responses, references):
        encoded = [self._encode(str(p), r) for p, r in zip(prompts, responses)]
        out = np.zeros(len(encoded), np.float32)
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start:start + self.batch_size]
            length = bucket_length(max(map(len, chunk)), 64)
            tokens = np.full((self.batch_size, length), self.pad_id, np.int32)
            mask = np.zeros((self.batch_size, length), bool)
            for row, ids in enumerate(chunk):
                tokens[row, length - len(ids):], mask[row, length - len(ids):] = ids, True
            mask[len(chunk):, -1] = True  # filler rows of a partial batch: one token, ignored
            scores = _scores(self.graphdef, self.state, jnp.asarray(tokens), jnp.asarray(mask))
            out[start:start + len(chunk)] = np.asarray(scores)[:len(chunk)]
        return out
