"""A torch-free tokenizer for HF folders that carry a `tokenizer.json`.

Why: `from transformers import AutoTokenizer` imports torch whenever torch is installed, which costs
about 0.2 GiB of resident memory and 1-2 s of start-up, and the trainer's memory target is tight.
Everything this project asks of a tokenizer is in the `tokenizers` library (the Rust backend that
transformers' fast tokenizers wrap) plus jinja2 for chat templates, so `Tokenizer` reads the folder
itself and gives the same results as transformers' generic fast tokenizer (`TokenizersBackend`,
a.k.a. `PreTrainedTokenizerFast`) for the same folder.

What it covers, read the way transformers 5 reads it:
- `tokenizer.json`, with the padding and truncation stored in it switched off (transformers turns
  them off per call unless asked for them);
- special tokens from `tokenizer_config.json` (strings, or dicts with "content"), overridden by
  `special_tokens_map.json` when the config has no `added_tokens_decoder`; named special tokens that
  are not yet added tokens are added, as transformers does (this can change `len()`);
- `added_tokens_decoder` in the config, whose flags (lstrip, rstrip, ...) override `tokenizer.json`'s;
- the chat template: `chat_template.jinja` (plus `additional_chat_templates/*.jinja`) before the
  config's "chat_template"; rendered in the same jinja2 sandbox as transformers, with the special
  tokens passed as variables, and tokenized with `add_special_tokens=False`;
- `__call__`, `encode`, `decode`, `apply_chat_template`, `len()` and the special-token attributes.

Not covered: batches, padding/truncation, offsets, pairs. transformers 5's model-specific classes
(`tokenizer_class` "BertTokenizer", "GPT2Tokenizer", ...) rebuild the pipeline from the vocabulary
and their own defaults instead of using `tokenizer.json` as is; this module always uses
`tokenizer.json`. Usually the two agree, but not always: with "GPT2Tokenizer"/"Qwen2Tokenizer" on a
SmolLM2 `tokenizer.json` (digits split before the byte-level regex), transformers gives "x  1" as
x|Ġ|Ġ|1 where `tokenizer.json` (and llama.cpp) give x|ĠĠ|1.

`load_tokenizer` uses `Tokenizer` when the folder has a `tokenizer.json` and otherwise falls back to
`transformers.AutoTokenizer` (sentencepiece/vocab-only folders, hub ids), which imports torch.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

# transformers' named special tokens, in its order (the order the chat template variables come in).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_ACCEPTED = ("accepted: an HF tokenizer folder with tokenizer.json (+ tokenizer_config.json), or one "
             "transformers.AutoTokenizer reads (tokenizer.model, vocab.txt, vocab.json+merges.txt), or a hub id")
_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
# Names a message's reasoning may come under; transformers copies it to all of them for templates.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"malformed {str(path)!r} ({type(e).__name__}: {e}); {_ACCEPTED}") from None


def _added_token(value: Any, *, special: bool | None = None) -> AddedToken | str | None:
    """A token value from the config files: a string, or a dict with "content" (serialized AddedToken)."""
    if value is None or isinstance(value, (str, AddedToken)):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        fields = {k: value[k] for k in _ADDED_TOKEN_FIELDS if k in value}
        if special is not None:
            fields["special"] = special
        return AddedToken(**fields)
    raise ValueError(f"a special token must be a string or a dict with 'content', got {value!r}")


class Tokenizer:
    """The subset of transformers' fast-tokenizer API this project uses, on `tokenizers` alone."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.name_or_path = str(folder)
        folder = Path(folder)
        tok_file = folder / TOKENIZER_FILE
        if not tok_file.is_file():
            raise OSError(f"no {TOKENIZER_FILE} in {str(folder)!r}; {_ACCEPTED}")
        try:
            backend = _Backend.from_file(str(tok_file))
        except Exception as e:  # noqa: BLE001 -- the Rust side raises a bare Exception for any parse error
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise ValueError(f"malformed {str(tok_file)!r} ({first}); {_ACCEPTED}") from None
        config_file = folder / CONFIG_FILE
        config = _read_json(config_file) if config_file.is_file() else {}
        if not isinstance(config, dict):
            raise ValueError(f"malformed {str(config_file)!r} (not a JSON object); {_ACCEPTED}")

        # transformers' pad token defaults to the one tokenizer.json pads with; the padding itself
        # (and truncation) is only applied when a call asks for it, so the backend runs without.
        if backend.padding is not None:
            config.setdefault("pad_token", backend.padding.get("pad_token"))
        backend.no_padding()
        backend.no_truncation()
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))

        self._backend = backend
        self._special: dict[str, str] = {}
        self._setup_special_tokens(config, folder)
        self.chat_template: str | dict[str, str] | None = self._find_chat_template(config, folder)
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        # transformers refuses the clean-up for BPE unless forced: it strips spaces before punctuation.
        self._clean_up = self.clean_up_tokenization_spaces and (
            type(backend.model).__name__ != "BPE"
            or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)))
        self.model_max_length = int(config.get("model_max_length") or 10**30)

    # -- loading --------------------------------------------------------------------------------

    def _setup_special_tokens(self, config: dict, folder: Path) -> None:
        """Named/extra special tokens as transformers' `_from_pretrained` + `TokenizersBackend.__init__`."""
        kw = dict(config)
        extra = kw.pop("extra_special_tokens", None) or kw.pop("additional_special_tokens", None) or []
        # Other `*_token` string keys (e.g. "image_token") and a dict of extra tokens become named tokens too.
        model_specific = {k: v for k, v in kw.items()
                          if k.endswith("_token") and k not in SPECIAL_TOKEN_NAMES
                          and (isinstance(v, str) or (isinstance(v, Mapping) and v.get("__type") == "AddedToken"))}
        if isinstance(extra, Mapping):
            model_specific.update(extra)
            extra = []
        named: dict[str, Any] = {k: kw.get(k) for k in SPECIAL_TOKEN_NAMES}

        added_decoder = config.get("added_tokens_decoder")
        to_add: list[AddedToken | str] = []
        if isinstance(added_decoder, Mapping):
            # The config's added tokens are re-added: same ids, their flags override tokenizer.json's.
            for _, token in sorted(added_decoder.items(), key=lambda kv: int(kv[0])):
                to_add.append(_added_token(token))
        else:
            # Legacy: special_tokens_map.json wins over the config, but only without added_tokens_decoder.
            map_file = folder / SPECIAL_TOKENS_MAP_FILE
            smap = _read_json(map_file) if map_file.is_file() else {}
            if not isinstance(smap, dict):
                raise ValueError(f"malformed {str(map_file)!r} (not a JSON object); {_ACCEPTED}")
            for key, value in smap.items():
                if key == "extra_special_tokens" and isinstance(value, Mapping):
                    model_specific.update(value)
                elif key in ("extra_special_tokens", "additional_special_tokens") and isinstance(value, list):
                    if key == "extra_special_tokens" or not extra:
                        merged = list(extra)
                        for tok in value:
                            tok = _added_token(tok, special=True)
                            if all(str(tok) != str(t) for t in merged):
                                merged.append(tok)
                        extra = merged
                elif key in named:
                    named[key] = _added_token(value, special=True) if isinstance(value, Mapping) else value
                elif key.endswith("_token") and isinstance(value, (str, Mapping)):
                    model_specific[key] = _added_token(value, special=True)

        # Tokens named in the config but not yet added tokens are added as special tokens, as in
        # transformers (a token already in the base vocabulary keeps its id; a new one extends it).
        current = {t.content for t in self._backend.get_added_tokens_decoder().values()}
        current |= {str(t) for t in to_add}
        all_named = {k: _added_token(v) for k, v in {**named, **model_specific}.items() if v is not None}
        for token in [*all_named.values(), *(_added_token(t) for t in extra)]:
            if str(token) not in current:
                to_add.append(token)
                current.add(str(token))
        named_strings = {str(t) for t in all_named.values()}
        tokens = []
        for token in to_add:
            if isinstance(token, str):
                token = AddedToken(token, special=True)
            elif not token.special and str(token) in named_strings:
                token = AddedToken(**{**{f: getattr(token, f) for f in _ADDED_TOKEN_FIELDS}, "special": True})
            tokens.append(token)
        if tokens:
            self._backend.add_tokens(tokens)

        self._special = {k: str(v) for k, v in all_named.items()}
        self.extra_special_tokens = [str(t) for t in extra]

    @staticmethod
    def _find_chat_template(config: dict, folder: Path) -> str | dict[str, str] | None:
        """transformers' precedence: chat_template.jinja (+ additional_chat_templates/) over the config.

        `chat_template.json` is the processors' legacy file; AutoTokenizer does not read it, so neither
        does this (reading it would make the two loaders disagree on whether a model is chat-tuned).
        """
        templates: dict[str, str] = {}
        if (folder / CHAT_TEMPLATE_FILE).is_file():
            templates["default"] = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        if (folder / CHAT_TEMPLATE_DIR).is_dir():
            for f in sorted((folder / CHAT_TEMPLATE_DIR).glob("*.jinja")):
                templates[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
        if len(templates) == 1 and "default" in templates:
            return templates["default"]
        if templates:
            return templates
        value = config.get("chat_template")
        if isinstance(value, (list, tuple)):  # saved as [{"name": ..., "template": ...}, ...]
            return {t["name"]: t["template"] for t in value}
        return value

    # -- special tokens -------------------------------------------------------------------------

    def _token_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        i = self._backend.token_to_id(token)
        # transformers maps an unknown token to unk's id (None without unk).
        if i is None and token != self._special.get("unk_token"):
            return self._token_id(self._special.get("unk_token"))
        return i

    def __getattr__(self, name: str) -> Any:
        # The other named tokens (sep/cls/mask, model-specific ones like image_token) and their ids.
        special = self.__dict__.get("_special")
        base = name.removesuffix("_id")
        if special is not None and (base in special or base in SPECIAL_TOKEN_NAMES):
            return self._token_id(special.get(base)) if name.endswith("_id") else special.get(base)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens as strings; they are also the chat template's variables."""
        return dict(self._special)

    @property
    def bos_token(self) -> str | None:
        return self._special.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self._special.get("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self._special.get("unk_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._token_id(self.unk_token)

    def __len__(self) -> int:
        """The full vocabulary, added tokens included (as `len()` of a transformers tokenizer)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """The base vocabulary, without added tokens (transformers' `vocab_size`)."""
        return self._backend.get_vocab_size(with_added_tokens=False)

    @property
    def backend_tokenizer(self) -> _Backend:
        return self._backend

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self._token_id(tokens)
        return [self._token_id(t) for t in tokens]

    # -- encode / decode ------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = self.encode(text, add_special_tokens=add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str | list[str]:
        """ids: an int, a sequence of ints or a 1-D array; a 2-D batch gives a list of strings."""
        if hasattr(ids, "tolist"):  # numpy arrays and scalars (and jax arrays)
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        ids = list(ids)
        if ids and isinstance(ids[0], (list, tuple)):
            return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in ids]
        text = self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    # -- chat templates -------------------------------------------------------------------------

    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """The template to render: an explicit one, a named one, or the folder's (as transformers)."""
        own = self.chat_template
        if isinstance(own, dict):
            if chat_template is not None and chat_template in own:
                return own[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in own:
                    return own["tool_use"]
                if "default" in own:
                    return own["default"]
                raise ValueError(f"tokenizer of {self.name_or_path!r} has several chat templates "
                                 f"({sorted(own)}) and none is named 'default'; pass chat_template=NAME")
            return chat_template
        if chat_template is not None:
            return chat_template
        if own is None:
            raise ValueError(f"tokenizer of {self.name_or_path!r} has no chat template; accepted: a folder with "
                             f"'chat_template' in {CONFIG_FILE} or a {CHAT_TEMPLATE_FILE}")
        return own

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = True, return_dict: bool = False, *, tools: list[dict] | None = None,
                            documents: list[dict] | None = None, chat_template: str | None = None,
                            **template_kwargs: Any) -> list[int] | str | dict[str, list[int]]:
        """Render one conversation as transformers does; token ids unless `tokenize=False`.

        `return_dict=True` (with tokenize) gives {"input_ids", "attention_mask"}. Note transformers 5
        defaults `return_dict` to True and 4.x to False: pass it explicitly for the same result from both.
        Extra keyword arguments are template variables (e.g. `enable_thinking=False`).
        """
        template = self.get_chat_template(chat_template, tools)
        if not messages:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        chat = [_normalize_message(m) for m in messages]
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise TypeError("tools must be JSON-schema dicts (callables need transformers' get_json_schema)")
        if documents is not None and not all(isinstance(d, Mapping) for d in documents):
            raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")
        variables = _plain({**self.special_tokens_map, **template_kwargs})
        rendered = _compile_template(template).render(
            messages=_plain(chat), tools=_plain(tools), documents=_plain(documents),
            add_generation_prompt=add_generation_prompt, **variables)
        if not tokenize:
            return rendered
        # The template writes every special token itself, so none are added around it.
        out = self(rendered, add_special_tokens=False)
        return out if return_dict else out["input_ids"]

    def __repr__(self) -> str:
        return f"klq_jax.tokenizer.Tokenizer({self.name_or_path!r}, len={len(self)})"


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (WordPiece-era spacing fixes), applied only when configured."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _normalize_message(message: Any) -> dict:
    """As transformers: keys whose value is None are dropped (templates handle missing keys, not None),
    and a message's reasoning is copied under every name templates read it by."""
    if not isinstance(message, Mapping):
        raise TypeError(f"Chat messages should be dicts, but got {message!r}.")
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def _plain(value: Any) -> Any:
    """Only plain JSON-like data reaches the sandboxed template (transformers' `_plain_template_data`)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, numpy strings) carry methods: strip to the base type
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):  # np.bool_(False) must not become a truthy placeholder
        return _plain(value.item())
    return f"<{type(value).__name__}>"


@functools.lru_cache(maxsize=16)
def _compile_template(template: str):
    """The jinja2 environment of transformers' `_cached_compile_jinja_template`, minus assistant masks."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.nodes
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat templates need jinja2>=3.1.6: pip install 'jinja2>=3.1.6'") from None
    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < (3, 1, 6):
        # Older versions have known sandbox escapes; chat templates are untrusted code.
        raise ImportError(f"chat templates need jinja2>=3.1.6, found {jinja2.__version__}")

    class GenerationTag(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for transformers' assistant
        # masks; it renders its body unchanged, which is all that is needed here.
        tags = frozenset({"generation"})

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class TemplateDict:
        # `dict(...)` for templates without handing them the real type.
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # Namespaces that reject underscore names, so templates cannot reach CPython internals.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}.")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; templates expect plain json.dumps.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(template)


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The folder's tokenizer: `Tokenizer` (torch-free) when it has tokenizer.json, else AutoTokenizer.

    The fallback covers folders with only sentencepiece/vocab files and hub ids; it imports
    transformers (and torch when installed). Errors raise ValueError/OSError with one line.
    """
    p = Path(path)
    if (p / TOKENIZER_FILE).is_file():
        return Tokenizer(p)
    if p.is_file():
        raise OSError(f"{str(path)!r} is a file, not a folder; {_ACCEPTED}")
    if not p.exists() and (p.is_absolute() or str(path).startswith((".", "~")) or str(path).count("/") > 1):
        raise OSError(f"no tokenizer folder {str(path)!r}; {_ACCEPTED}")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 -- missing files, unknown class, offline hub: one line
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise OSError(f"no usable tokenizer in {str(path)!r} ({type(e).__name__}: {first}); {_ACCEPTED}") from None
