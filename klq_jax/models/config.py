"""Model configuration shared by every decoder family, and its construction from HF `config.json`."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

FAMILIES = ("llama", "gpt_neox", "gpt2")
# HF model_type -> our family. Llama-shaped models (RMSNorm, SwiGLU, RoPE, GQA) share one code path.
HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "smollm2": "llama",
    "gpt_neox": "gpt_neox",
    "gpt2": "gpt2",
}


class ModelConfigError(ValueError):
    """A config.json this project cannot build a model from."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only LM (hashable, so it can be a static jit argument).

    family: `llama` (Llama 2/3, SmolLM2, Mistral, Qwen2), `gpt_neox` (Pythia), `gpt2`.
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (Qwen2, GPT-NeoX, GPT-2)
    output_bias: bool = False  # bias on the attention output and MLP projections (GPT-NeoX, GPT-2)
    mlp_bias: bool = False
    activation: str = "silu"  # silu (gated), gelu (exact), gelu_new (tanh)
    rope_theta: float = 10000.0
    rotary_dim: int = 0  # dims of each head that get RoPE (partial rotary for GPT-NeoX); 0 = no RoPE
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # Llama 3 scaling, as sorted items
    parallel_residual: bool = False  # GPT-NeoX: x + attn(ln1 x) + mlp(ln2 x)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def num_params(self) -> int:
        """Parameter count of the LM (without value/score heads)."""
        d, f, h, kv, hd, v = (self.hidden_size, self.intermediate_size, self.num_heads,
                              self.num_kv_heads, self.head_dim, self.vocab_size)
        attn = d * h * hd * 2 + d * kv * hd * 2
        mlp = d * f * (3 if self.family == "llama" else 2)
        per_layer = attn + mlp + 2 * d * (1 if self.family == "llama" else 2)
        embed = v * d * (1 if self.tie_embeddings else 2)
        pos = self.max_position_embeddings * d if self.family == "gpt2" else 0
        return self.num_layers * per_layer + embed + pos + d


def _rope_params(hf: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE settings from either transformers>=5 `rope_parameters` or the older top-level keys."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    for key, value in legacy.items():
        params.setdefault(key, value)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    if "rotary_pct" in hf:
        params.setdefault("partial_rotary_factor", hf["rotary_pct"])
    return params


def from_hf_config(hf: Mapping[str, Any]) -> ModelConfig:
    """Builds a ModelConfig from a parsed HF `config.json`; one-line ModelConfigError if unsupported."""
    model_type = hf.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ModelConfigError(
            f"unsupported architecture model_type={model_type!r}; supported: {sorted(HF_MODEL_TYPES)}")
    family = HF_MODEL_TYPES[model_type]
    ids = dict(bos_token_id=_first(hf.get("bos_token_id")), eos_token_id=_first(hf.get("eos_token_id")),
               pad_token_id=_first(hf.get("pad_token_id")))
    if family == "gpt2":
        d = hf["n_embd"]
        return ModelConfig(
            family=family, vocab_size=hf["vocab_size"], hidden_size=d,
            intermediate_size=hf.get("n_inner") or 4 * d, num_layers=hf["n_layer"],
            num_heads=hf["n_head"], num_kv_heads=hf["n_head"], head_dim=d // hf["n_head"],
            max_position_embeddings=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=True, attention_bias=True, output_bias=True, mlp_bias=True,
            activation=_activation(hf.get("activation_function", "gelu_new")), rotary_dim=0, **ids)
    rope = _rope_params(hf)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ("default", "llama3"):
        raise ModelConfigError(f"unsupported rope_type={rope_type!r}; supported: ['default', 'llama3']")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    scaling = None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        scaling = tuple(sorted((k, rope[k]) for k in keys))
    if family == "gpt_neox":
        rotary_dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
        return ModelConfig(
            family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
            max_position_embeddings=hf["max_position_embeddings"], norm_eps=hf.get("layer_norm_eps", 1e-5),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=hf.get("attention_bias", True), output_bias=hf.get("attention_bias", True),
            mlp_bias=True, activation=_activation(hf.get("hidden_act", "gelu")),
            rope_theta=float(rope["rope_theta"]), rotary_dim=rotary_dim, rope_scaling=scaling,
            parallel_residual=hf.get("use_parallel_residual", True), **ids)
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelConfigError(f"unsupported hidden_act={hf.get('hidden_act')!r} for {model_type}; supported: ['silu']")
    is_qwen2 = model_type == "qwen2"
    if is_qwen2 and hf.get("use_sliding_window"):
        raise ModelConfigError("unsupported use_sliding_window=True for qwen2; supported: False")
    return ModelConfig(
        family=family, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=is_qwen2 or bool(hf.get("attention_bias", False)),
        output_bias=bool(hf.get("attention_bias", False)) and not is_qwen2,
        mlp_bias=bool(hf.get("mlp_bias", False)), activation="silu",
        rope_theta=float(rope["rope_theta"]), rotary_dim=head_dim, rope_scaling=scaling, **ids)


def _first(token_id):
    return token_id[0] if isinstance(token_id, (list, tuple)) else token_id


def _activation(name: str) -> str:
    aliases = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_fast": "gelu_new", "gelu_pytorch_tanh": "gelu_new"}
    if name not in aliases:
        raise ModelConfigError(f"unsupported activation {name!r}; supported: {sorted(aliases)}")
    return aliases[name]
