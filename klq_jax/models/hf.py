"""Hugging Face checkpoints <-> our Flax models: one declarative conversion table per family.

A checkpoint is a folder (or hub id) with `config.json` and `model.safetensors` or a sharded
`model.safetensors.index.json`. Tensors are read through a memory map (bf16 included), converted by
the table, checked against the model's shapes and assembled into the NNX state. Export runs the same
table backwards and writes a folder transformers loads with the same logits.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from klq_jax.models.config import ModelConfig, ModelConfigError, from_hf_config
from klq_jax.models.transformer import CausalLM


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing files, missing tensors, mismatched shapes."""


# ----------------------------------------------------------------------------------------------------
# safetensors through a memory map (numpy has no bfloat16; ml_dtypes provides it).

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one file as read-only numpy views over a memory map."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']}; accepted: {sorted(_ST_DTYPES)}")
        tensors[name] = data[start:end].view(dtype).reshape(info["shape"])
    return tensors


def write_safetensors(tensors: dict[str, np.ndarray], path: Path, metadata: dict | None = None) -> None:
    header, offset = {}, 0
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    for name, arr in arrays.items():
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    header["__metadata__"] = metadata or {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    # Written beside the target and renamed: a crash leaves the old file whole, and readers that
    # memory-mapped the old file keep a valid mapping.
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays.values():
            f.write(arr.reshape(-1).view(np.uint8).data)  # its own bytes, not a copy (bf16 has no buffer format)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# Conversion tables. A rule maps one HF tensor to one or more of our parameters (fused QKV) and back.
# `{i}` marks per-layer tensors; ours are stacked over layers under `blocks`.


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str
    ours: tuple[str, ...]
    load: Callable[[np.ndarray, ModelConfig], tuple[np.ndarray, ...]]
    save: Callable[[tuple[np.ndarray, ...], ModelConfig], np.ndarray]
    optional: bool = False  # present only in some checkpoints (biases, heads)


def _same(w, cfg):
    return (w,)


def _same_back(ws, cfg):
    return ws[0]


def _t(w, cfg):
    return (w.T,)


def _t_back(ws, cfg):
    return ws[0].T


def _linear_in(heads_attr):  # HF Linear [heads*hd, D] -> ours [D, heads, hd]
    def load(w, cfg):
        return (w.T.reshape(cfg.hidden_size, getattr(cfg, heads_attr), cfg.head_dim),)

    def save(ws, cfg):
        return ws[0].reshape(cfg.hidden_size, -1).T
    return load, save


def _bias_in(heads_attr):
    def load(b, cfg):
        return (b.reshape(getattr(cfg, heads_attr), cfg.head_dim),)

    def save(bs, cfg):
        return bs[0].reshape(-1)
    return load, save


def _out_load(w, cfg):  # HF Linear [D, H*hd] -> [H, hd, D]
    return (w.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size),)


def _out_save(ws, cfg):
    return ws[0].reshape(-1, cfg.hidden_size).T


def _neox_qkv_load(w, cfg):  # [H*3*hd, D], per head (q, k, v) -> three [D, H, hd]
    w = w.reshape(cfg.num_heads, 3, cfg.head_dim, cfg.hidden_size)
    return tuple(w[:, j].transpose(2, 0, 1) for j in range(3))


def _neox_qkv_save(ws, cfg):
    return np.stack([w.transpose(1, 2, 0) for w in ws], axis=1).reshape(-1, cfg.hidden_size)


def _neox_qkv_bias_load(b, cfg):
    b = b.reshape(cfg.num_heads, 3, cfg.head_dim)
    return tuple(b[:, j] for j in range(3))


def _neox_qkv_bias_save(bs, cfg):
    return np.stack(bs, axis=1).reshape(-1)


def _gpt2_qkv_load(w, cfg):  # Conv1D [D, 3D] -> three [D, H, hd]
    return tuple(p.reshape(cfg.hidden_size, cfg.num_heads, cfg.head_dim) for p in np.split(w, 3, axis=1))


def _gpt2_qkv_save(ws, cfg):
    return np.concatenate([w.reshape(cfg.hidden_size, -1) for w in ws], axis=1)


def _gpt2_qkv_bias_load(b, cfg):
    return tuple(p.reshape(cfg.num_heads, cfg.head_dim) for p in np.split(b, 3))


def _gpt2_out_load(w, cfg):  # Conv1D [H*hd, D] -> [H, hd, D]
    return (w.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size),)


def _gpt2_out_save(ws, cfg):
    return ws[0].reshape(-1, cfg.hidden_size)


def _score_load(w, cfg):
    if w.shape[0] != 1:
        raise CheckpointError(f"score head has {w.shape[0]} labels; accepted: 1 (a scalar reward model)")
    return (w[0],)


def _score_save(ws, cfg):
    return ws[0][None]


def _scalar_load(b, cfg):
    return (b.reshape(()),)


def _scalar_save(bs, cfg):
    return bs[0].reshape(1)


_q_in, _kv_in = _linear_in("num_heads"), _linear_in("num_kv_heads")
_qb_in, _kvb_in = _bias_in("num_heads"), _bias_in("num_kv_heads")

LLAMA_RULES = (
    Rule("model.embed_tokens.weight", ("embed_vd",), _same, _same_back),
    Rule("model.norm.weight", ("final_scale",), _same, _same_back),
    Rule("lm_head.weight", ("lm_head_dv",), _t, _t_back, optional=True),
    Rule("score.weight", ("score_w_d",), _score_load, _score_save, optional=True),
    Rule("model.layers.{i}.input_layernorm.weight", ("blocks.ln1_scale",), _same, _same_back),
    Rule("model.layers.{i}.post_attention_layernorm.weight", ("blocks.ln2_scale",), _same, _same_back),
    Rule("model.layers.{i}.self_attn.q_proj.weight", ("blocks.wq_dnh",), *_q_in),
    Rule("model.layers.{i}.self_attn.k_proj.weight", ("blocks.wk_dkh",), *_kv_in),
    Rule("model.layers.{i}.self_attn.v_proj.weight", ("blocks.wv_dkh",), *_kv_in),
    Rule("model.layers.{i}.self_attn.q_proj.bias", ("blocks.bq_nh",), *_qb_in, optional=True),
    Rule("model.layers.{i}.self_attn.k_proj.bias", ("blocks.bk_kh",), *_kvb_in, optional=True),
    Rule("model.layers.{i}.self_attn.v_proj.bias", ("blocks.bv_kh",), *_kvb_in, optional=True),
    Rule("model.layers.{i}.self_attn.o_proj.weight", ("blocks.wo_nhd",), _out_load, _out_save),
    Rule("model.layers.{i}.self_attn.o_proj.bias", ("blocks.bo_d",), _same, _same_back, optional=True),
    Rule("model.layers.{i}.mlp.gate_proj.weight", ("blocks.w_gate_df",), _t, _t_back),
    Rule("model.layers.{i}.mlp.up_proj.weight", ("blocks.w_up_df",), _t, _t_back),
    Rule("model.layers.{i}.mlp.down_proj.weight", ("blocks.w_down_fd",), _t, _t_back),
    Rule("model.layers.{i}.mlp.up_proj.bias", ("blocks.b_up_f",), _same, _same_back, optional=True),
    Rule("model.layers.{i}.mlp.down_proj.bias", ("blocks.b_down_d",), _same, _same_back, optional=True),
)

GPT_NEOX_RULES = (
    Rule("gpt_neox.embed_in.weight", ("embed_vd",), _same, _same_back),
    Rule("gpt_neox.final_layer_norm.weight", ("final_scale",), _same, _same_back),
    Rule("gpt_neox.final_layer_norm.bias", ("final_bias",), _same, _same_back),
    Rule("embed_out.weight", ("lm_head_dv",), _t, _t_back, optional=True),
    Rule("score.weight", ("score_w_d",), _score_load, _score_save, optional=True),
    Rule("gpt_neox.layers.{i}.input_layernorm.weight", ("blocks.ln1_scale",), _same, _same_back),
    Rule("gpt_neox.layers.{i}.input_layernorm.bias", ("blocks.ln1_bias",), _same, _same_back),
    Rule("gpt_neox.layers.{i}.post_attention_layernorm.weight", ("blocks.ln2_scale",), _same, _same_back),
    Rule("gpt_neox.layers.{i}.post_attention_layernorm.bias", ("blocks.ln2_bias",), _same, _same_back),
    Rule("gpt_neox.layers.{i}.attention.query_key_value.weight", ("blocks.wq_dnh", "blocks.wk_dkh", "blocks.wv_dkh"),
         _neox_qkv_load, _neox_qkv_save),
    Rule("gpt_neox.layers.{i}.attention.query_key_value.bias", ("blocks.bq_nh", "blocks.bk_kh", "blocks.bv_kh"),
         _neox_qkv_bias_load, _neox_qkv_bias_save, optional=True),
    Rule("gpt_neox.layers.{i}.attention.dense.weight", ("blocks.wo_nhd",), _out_load, _out_save),
    Rule("gpt_neox.layers.{i}.attention.dense.bias", ("blocks.bo_d",), _same, _same_back, optional=True),
    Rule("gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight", ("blocks.w_up_df",), _t, _t_back),
    Rule("gpt_neox.layers.{i}.mlp.dense_h_to_4h.bias", ("blocks.b_up_f",), _same, _same_back),
    Rule("gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight", ("blocks.w_down_fd",), _t, _t_back),
    Rule("gpt_neox.layers.{i}.mlp.dense_4h_to_h.bias", ("blocks.b_down_d",), _same, _same_back),
)

GPT2_RULES = (
    Rule("transformer.wte.weight", ("embed_vd",), _same, _same_back),
    Rule("transformer.wpe.weight", ("pos_embed_pd",), _same, _same_back),
    Rule("transformer.ln_f.weight", ("final_scale",), _same, _same_back),
    Rule("transformer.ln_f.bias", ("final_bias",), _same, _same_back),
    Rule("score.weight", ("score_w_d",), _score_load, _score_save, optional=True),
    Rule("transformer.h.{i}.ln_1.weight", ("blocks.ln1_scale",), _same, _same_back),
    Rule("transformer.h.{i}.ln_1.bias", ("blocks.ln1_bias",), _same, _same_back),
    Rule("transformer.h.{i}.ln_2.weight", ("blocks.ln2_scale",), _same, _same_back),
    Rule("transformer.h.{i}.ln_2.bias", ("blocks.ln2_bias",), _same, _same_back),
    Rule("transformer.h.{i}.attn.c_attn.weight", ("blocks.wq_dnh", "blocks.wk_dkh", "blocks.wv_dkh"),
         _gpt2_qkv_load, _gpt2_qkv_save),
    Rule("transformer.h.{i}.attn.c_attn.bias", ("blocks.bq_nh", "blocks.bk_kh", "blocks.bv_kh"),
         _gpt2_qkv_bias_load, lambda bs, cfg: np.concatenate([b.reshape(-1) for b in bs])),
    Rule("transformer.h.{i}.attn.c_proj.weight", ("blocks.wo_nhd",), _gpt2_out_load, _gpt2_out_save),
    Rule("transformer.h.{i}.attn.c_proj.bias", ("blocks.bo_d",), _same, _same_back),
    Rule("transformer.h.{i}.mlp.c_fc.weight", ("blocks.w_up_df",), _same, _same_back),
    Rule("transformer.h.{i}.mlp.c_fc.bias", ("blocks.b_up_f",), _same, _same_back),
    Rule("transformer.h.{i}.mlp.c_proj.weight", ("blocks.w_down_fd",), _same, _same_back),
    Rule("transformer.h.{i}.mlp.c_proj.bias", ("blocks.b_down_d",), _same, _same_back),
)

RULES = {"llama": LLAMA_RULES, "gpt_neox": GPT_NEOX_RULES, "gpt2": GPT2_RULES}
SCORE_BIAS_KEY = "score.bias"
_HF_ARCH = {"llama": "LlamaForCausalLM", "gpt_neox": "GPTNeoXForCausalLM", "gpt2": "GPT2LMHeadModel"}
_HF_SCORE_ARCH = {"llama": "LlamaForSequenceClassification", "gpt_neox": "GPTNeoXForSequenceClassification",
                  "gpt2": "GPT2ForSequenceClassification"}


# ----------------------------------------------------------------------------------------------------
# Locating and reading a checkpoint.


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A local folder, or a hub id downloaded (config, safetensors, tokenizer files) into the HF cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} is a file; expected a folder with config.json "
                              "and model.safetensors, or a hub id")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(name_or_path)):
        raise CheckpointError(f"checkpoint {str(name_or_path)!r} is neither an existing folder nor a hub id")
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(
            str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # offline, unknown repo, gated repo
        raise CheckpointError(f"checkpoint {str(name_or_path)!r}: no local folder and the hub download failed "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def read_hf_config(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no config.json")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: malformed JSON ({e})") from None


def read_hf_tensors(path: Path) -> dict[str, np.ndarray]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif single.is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"checkpoint {str(path)!r} has no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for name in files:
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {str(path)!r}: shard {name} named in the index is missing")
        try:
            tensors.update(read_safetensors(path / name))
        except (ValueError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{path / name}: not a valid safetensors file ({e})") from None
    return tensors


def _add_prefix_if_bare(tensors: dict[str, np.ndarray], family: str) -> dict[str, np.ndarray]:
    """Bare base-model checkpoints (LlamaModel, GPT2Model, ...) omit the prefix of the CausalLM keys."""
    prefix = {"llama": "model.", "gpt_neox": "gpt_neox.", "gpt2": "transformer."}[family]
    if any(k.startswith(prefix) for k in tensors):
        return tensors
    heads = ("lm_head.", "embed_out.", "score.")
    return {k if k.startswith(heads) else prefix + k: v for k, v in tensors.items()}


# ----------------------------------------------------------------------------------------------------
# Loading.


def _flat_state(model) -> dict[str, nnx.Variable]:
    return {".".join(str(p) for p in path): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def hf_tensors_to_params(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF tensor dict -> our flat parameter dict (`blocks.*` stacked over layers), as numpy."""
    tensors = _add_prefix_if_bare(tensors, cfg.family)
    params: dict[str, np.ndarray] = {}
    for rule in RULES[cfg.family]:
        if "{i}" not in rule.hf:
            if rule.hf not in tensors:
                continue
            for name, value in zip(rule.ours, rule.load(tensors[rule.hf], cfg)):
                params[name] = value
            continue
        keys = [rule.hf.format(i=i) for i in range(cfg.num_layers)]
        present = [k in tensors for k in keys]
        if not any(present):
            continue
        if not all(present):
            missing = keys[present.index(False)]
            raise CheckpointError(f"checkpoint is missing tensor {missing!r} (other layers have it)")
        per_layer = [rule.load(tensors[k], cfg) for k in keys]
        for j, name in enumerate(rule.ours):
            params[name] = np.stack([layer[j] for layer in per_layer])
    if SCORE_BIAS_KEY in tensors:
        params["score_b"] = _scalar_load(tensors[SCORE_BIAS_KEY], cfg)[0]
    return params


def load_model(name_or_path: str | os.PathLike, *, value_head: bool = False, score_head: bool = False,
               param_dtype=jnp.float32, dtype=None, matmul_dtype=None, remat: str = "none",
               seed: int = 0) -> CausalLM:
    """Loads an HF checkpoint into a CausalLM. Heads the checkpoint lacks (value head; a score head of
    a base model) are freshly initialised; every tensor the model needs otherwise must be present.
    Stored in `param_dtype`, computing in `dtype` (default: `param_dtype`), matmul operands in `matmul_dtype`
    (default: `dtype`; accumulated in fp32)."""
    path = resolve_checkpoint(name_or_path)
    hf_config = read_hf_config(path)
    try:
        cfg = from_hf_config(hf_config)
    except KeyError as e:
        raise CheckpointError(f"{path / 'config.json'} lacks the key {e.args[0]!r}") from None
    params = hf_tensors_to_params(read_hf_tensors(path), cfg)
    if score_head:
        params.pop("lm_head_dv", None)  # a reward model needs no LM head
    abstract = nnx.eval_shape(lambda: CausalLM(
        cfg, lm_head=not score_head, value_head=value_head, score_head=score_head,
        score_bias="score_b" in params, param_dtype=param_dtype, dtype=dtype or param_dtype,
        matmul_dtype=matmul_dtype, remat=remat,
        rngs=nnx.Rngs(seed)))
    flat = _flat_state(abstract)
    unused = set(params) - set(flat)
    if unused:
        raise CheckpointError(f"checkpoint {str(path)!r} has tensors for {sorted(unused)[0]!r}, which a "
                              f"{cfg.family} model with these heads does not use")
    key = jax.random.key(seed)
    for name, var in flat.items():
        abstract_value = var.get_value()
        shape, dtype = tuple(abstract_value.shape), abstract_value.dtype
        if name in params:
            if tuple(params[name].shape) != shape:
                raise CheckpointError(f"checkpoint {str(path)!r}: {name} has shape {tuple(params[name].shape)}, "
                                      f"the config implies {shape}")
            var.set_value(jnp.asarray(params[name], dtype=dtype))
        elif name in ("value_w_d", "value_b"):  # a fresh critic starts at V = 0
            var.set_value(jnp.zeros(shape, dtype))
        elif name == "score_w_d":  # a base model loaded as a reward model: a fresh linear score head
            var.set_value(jax.random.normal(key, shape, dtype) / np.sqrt(cfg.hidden_size))
        else:
            raise CheckpointError(f"checkpoint {str(path)!r} lacks the tensor for {name} (family {cfg.family})")
    model = abstract
    model.hf_config_json = json.dumps(hf_config)  # kept (hashable) for export
    # The checkpoint's memory maps are left in reference cycles and stay mapped until a collection: their
    # pages then count in the process's RSS (one file's worth per model loaded: 0.5 GiB for SmolLM2-135M).
    del params
    gc.collect()
    return model


# ----------------------------------------------------------------------------------------------------
# Export.


def params_to_hf_tensors(model: CausalLM, dtype=np.float32) -> dict[str, np.ndarray]:
    """HF-named contiguous `dtype` tensors of `model`'s weights (read-only where they are the model's own fp32
    host arrays). Peak memory about one copy of the weights: fp32 host arrays are read in place, and each tensor
    replaces its view of them as it is made contiguous (SmolLM2-135M's export: +0.40 GiB of RSS, +1.01 before)."""
    cfg = model.cfg
    flat = {k: np.asarray(jax.device_get(v.get_value())).astype(np.float32, copy=False)
            for k, v in _flat_state(model).items()}
    tensors = {}
    for rule in RULES[cfg.family]:
        if not all(name in flat for name in rule.ours):
            continue
        if "{i}" not in rule.hf:
            tensors[rule.hf] = rule.save(tuple(flat[n] for n in rule.ours), cfg)
            continue
        for i in range(cfg.num_layers):
            tensors[rule.hf.format(i=i)] = rule.save(tuple(flat[n][i] for n in rule.ours), cfg)
    if "score_b" in flat:
        tensors[SCORE_BIAS_KEY] = _scalar_save((flat["score_b"],), cfg)
    if cfg.family == "gpt2" and "score_w_d" not in flat:
        tensors["lm_head.weight"] = tensors["transformer.wte.weight"]
    del flat  # what is still viewed stays until its tensor below is copied
    for name in tensors:  # one at a time: the views they replace are freed as they go
        tensors[name] = np.ascontiguousarray(tensors[name], dtype=dtype)
    return tensors


def export_model(model: CausalLM, out_dir: str | os.PathLike, *, tokenizer_from: str | os.PathLike | None = None,
                 dtype=np.float32) -> Path:
    """Writes an HF folder (config.json, model.safetensors, tokenizer files copied from `tokenizer_from`)
    atomically: a temp folder beside `out_dir` is renamed into place, so a crash leaves no half folder."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        hf_json = getattr(model, "hf_config_json", None)
        hf_config = json.loads(hf_json) if hf_json else _hf_config_from(model.cfg)
        score = model.score_w_d is not None
        hf_config["architectures"] = [(_HF_SCORE_ARCH if score else _HF_ARCH)[model.cfg.family]]
        if score:
            hf_config["num_labels"] = 1
            hf_config.pop("id2label", None), hf_config.pop("label2id", None)
        hf_config["torch_dtype"] = hf_config["dtype"] = np.dtype(dtype).name
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        write_safetensors(params_to_hf_tensors(model, dtype), tmp / "model.safetensors")
        if tokenizer_from is not None:
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                         "generation_config.json", "chat_template.jinja", "vocab.json", "merges.txt"):
                src = Path(tokenizer_from) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def _hf_config_from(cfg: ModelConfig) -> dict:
    ids = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
    if cfg.family == "gpt2":
        return {"model_type": "gpt2", "vocab_size": cfg.vocab_size, "n_embd": cfg.hidden_size,
                "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_inner": cfg.intermediate_size,
                "n_positions": cfg.max_position_embeddings, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu_new" if cfg.activation == "gelu_new" else "gelu", **ids}
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope.update(dict(cfg.rope_scaling), rope_type="llama3")
    common = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
              "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
              "num_attention_heads": cfg.num_heads, "max_position_embeddings": cfg.max_position_embeddings,
              "tie_word_embeddings": cfg.tie_embeddings, **ids}
    if cfg.family == "gpt_neox":
        rope["partial_rotary_factor"] = cfg.rotary_dim / cfg.head_dim
        return {"model_type": "gpt_neox", **common, "layer_norm_eps": cfg.norm_eps, "hidden_act": cfg.activation,
                "use_parallel_residual": cfg.parallel_residual, "attention_bias": cfg.attention_bias,
                "rope_parameters": rope, "rotary_pct": rope["partial_rotary_factor"], "rope_theta": cfg.rope_theta}
    return {"model_type": "llama", **common, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "attention_bias": cfg.attention_bias,
            "mlp_bias": cfg.mlp_bias, "rope_parameters": rope, "rope_theta": cfg.rope_theta}


__all__ = ["CheckpointError", "ModelConfigError", "load_model", "export_model", "read_safetensors",
           "write_safetensors", "resolve_checkpoint", "hf_tensors_to_params", "params_to_hf_tensors"]
