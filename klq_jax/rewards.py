"""Reward functions: ``reward(prompts, responses, references) -> float32 [N]``.

Every reward is a :class:`Reward`; calling one validates the inputs and checks the output (one
finite float per response, else a one-line :class:`RewardError` naming the index and the value).

- :class:`SimilarityReward`: the embedded, offline reward. Cosine similarity of the response's
  sentence embedding (all-MiniLM-L6-v2, our JAX encoder) with the reference answer's, minus light
  penalties for loops, for overlong replies and for echoing the prompt (see the class docstring).
- :class:`CallableReward`: a user function ``module:function`` (verifiable rewards).
- HF sequence-classification reward models: ``klq_jax.reward_models.HFRewardModel``.
"""

from __future__ import annotations

import abc
import collections
import importlib
import importlib.util
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np


class RewardError(ValueError):
    """A bad reward spec, bad reward inputs, or a reward model output that is not finite. One line."""


def check_rewards(values: Any, n: int, name: str) -> np.ndarray:
    """``values`` as a float32 [n] array, or a one-line :class:`RewardError`.

    Fails on a wrong count, a non-numeric value and NaN/inf (also values that overflow float32),
    naming the first bad index and its value.
    """
    try:
        arr64 = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise RewardError(f"reward {name} returned non-numeric values ({type(values).__name__}): {e}") from None
    if arr64.ndim == 2 and arr64.shape[1] == 1:  # [N, 1] scores (e.g. a 1-label classifier)
        arr64 = arr64[:, 0]
    if arr64.shape != (n,):
        raise RewardError(
            f"reward {name} returned shape {arr64.shape}; expected one float per response, shape ({n},)"
        )
    with np.errstate(over="ignore"):
        arr = arr64.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        i = int(bad[0])
        raise RewardError(
            f"reward {name} returned {float(arr64[i])!r} at index {i} ({bad.size} of {n} not finite); "
            "rewards must be finite float32 numbers"
        )
    return arr


class Reward(abc.ABC):
    """The common interface: ``reward(prompts, responses, references) -> np.ndarray float32 [N]``.

    ``references`` may be None (no references) or hold None entries; rewards that need a reference
    raise a :class:`RewardError` for those. Subclasses implement :meth:`score`.
    """

    name: str = "reward"
    needs_reference: bool = False

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 references: Sequence[str | None] | None = None) -> np.ndarray:
        prompts, responses = list(prompts), list(responses)
        n = len(responses)
        references = [None] * n if references is None else list(references)
        if len(prompts) != n or len(references) != n:
            raise RewardError(
                f"reward {self.name} got {len(prompts)} prompts, {n} responses and {len(references)} "
                "references; expected equal counts"
            )
        if self.needs_reference:
            missing = [i for i, r in enumerate(references) if r is None]
            if missing:
                raise RewardError(
                    f"reward {self.name} needs a reference answer for every prompt; reference {missing[0]} "
                    f"is None ({len(missing)} of {n} missing); use a prompt set with a reference field"
                )
        if n == 0:
            return np.zeros((0,), np.float32)
        return check_rewards(self.score(prompts, responses, references), n, self.name)

    @abc.abstractmethod
    def score(self, prompts: list[str], responses: list[str], references: list[str | None]) -> Any:
        """Raw scores, one per response (checked by ``__call__``)."""


# ----------------------------------------------------------------------------------------------
# Embedded reference-based reward
# ----------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+", re.UNICODE)


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def repeated_ngram_fraction(text: str, n: int = 3) -> float:
    """Fraction of word n-grams (lower-cased ``\\w+`` words) that repeat an earlier n-gram.

    ``1 - distinct / total``: 0 for text without repeats, near 1 for a phrase looped many times,
    0 for texts shorter than ``n`` words.
    """
    grams = _ngrams(text, n)
    if len(grams) <= 1:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def length_excess(response: str, reference: str, free_ratio: float = 2.0) -> float:
    """``max(0, log2(words(y) / (free_ratio * words(r))))``: 0 up to ``free_ratio`` times the
    reference's length (in ``\\w+`` words), then +1 per doubling."""
    n_y, n_r = len(_WORD.findall(response)), max(1, len(_WORD.findall(reference)))
    if n_y == 0:
        return 0.0
    return max(0.0, math.log2(n_y / (free_ratio * n_r)))


def copied_ngram_fraction(response: str, prompt: str, n: int = 3) -> float:
    """Fraction of the response's word n-grams that occur in the prompt (1 for an echoed prompt)."""
    grams = _ngrams(response, n)
    if not grams:
        return 0.0
    source = set(_ngrams(prompt, n))
    return sum(g in source for g in grams) / len(grams)


def _text(prompt: Any) -> str:
    """A prompt as text: chat messages ``[{"role", "content"}, ...]`` are joined by newlines."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        return "\n".join(m.get("content", "") if isinstance(m, dict) else str(m) for m in prompt)
    return str(prompt)


class SimilarityReward(Reward):
    """Reference-based reward with all-MiniLM-L6-v2 sentence embeddings (BERTScore-like).

    For a prompt ``x``, a response ``y`` and a reference answer ``r``::

        cos    = <e(y), e(r)>                                  # unit-norm sentence embeddings
        rep    = repeated_ngram_fraction(y, 3)                 # 0 for natural text, -> 1 for loops
        long   = max(0, log2(words(y) / (2 * words(r))))       # 0 up to twice the reference length
        copy   = max(0, copied_ngram_fraction(y, x, 3) - 0.5)  # > 0 only when y mostly echoes x
        reward = scale * max(cos - 0.5 rep - 0.5 long - 0.5 copy, -1) + offset

    (the 0.5s and 2 are the defaults ``repetition_penalty``, ``length_penalty``, ``copy_penalty``,
    ``free_length_ratio``; ``free_copy_fraction`` is the 0.5 inside ``copy``). With the defaults
    (``scale=1, offset=0``) the reward lies in ``[-1, 1]``; empty or whitespace-only responses get
    the minimum, ``-scale + offset`` (``cos`` is taken as -1 for them).

    Measured on the embedded eval sets (klq_jax/data/*_eval.jsonl, median): a second good answer
    scores 0.80 (dialogue) / 0.73 (summaries), its first three words ~0.3, another prompt's answer
    ~0.04, the empty reply -1. Why the penalties (tests/test_rewards.py measures each): by pure
    cosine, the good answer followed by one sentence looped 10 times beat the good answer in 3-5%
    of pairs (``rep`` fixes it); echoing the document beat a good summary in 82% of pairs (``long``
    and ``copy`` fix it), echoing the question beat a good answer in 15% (``copy`` fixes it).
    Natural text has ``rep`` ~0 (max 0.03 on the eval sets), and no good answer there is penalised
    by ``copy``.

    Reference embeddings are cached (references repeat across samples of the same prompt).
    """

    name = "similarity"
    needs_reference = True

    def __init__(self, encoder=None, *, repetition_penalty: float = 0.5, ngram: int = 3,
                 length_penalty: float = 0.5, free_length_ratio: float = 2.0,
                 copy_penalty: float = 0.5, free_copy_fraction: float = 0.5,
                 scale: float = 1.0, offset: float = 0.0, cache_size: int = 8192):
        if encoder is None:
            from klq_jax.models.bert import embedded_minilm_encoder

            encoder = embedded_minilm_encoder()
        self.encoder = encoder
        self.repetition_penalty = float(repetition_penalty)
        self.ngram = int(ngram)
        self.length_penalty = float(length_penalty)
        self.free_length_ratio = float(free_length_ratio)
        self.copy_penalty = float(copy_penalty)
        self.free_copy_fraction = float(free_copy_fraction)
        self.scale = float(scale)
        self.offset = float(offset)
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._cache_size = int(cache_size)

    @property
    def minimum(self) -> float:
        return -self.scale + self.offset

    def _reference_embeddings(self, refs: list[str]) -> np.ndarray:
        todo = list(dict.fromkeys(r for r in refs if r not in self._cache))
        if todo:
            for r, e in zip(todo, self.encoder.encode(todo)):
                self._cache[r] = e
        out = np.stack([self._cache[r] for r in refs])
        for r in refs:
            self._cache.move_to_end(r)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out

    def cosine(self, responses: Sequence[str], references: Sequence[str]) -> np.ndarray:
        """Raw cosine similarities ``<e(y), e(r)>`` (no penalty, no rescaling; empty -> -1)."""
        responses, references = list(responses), list(references)
        cos = np.full((len(responses),), -1.0, np.float32)
        live = [i for i, y in enumerate(responses) if y.strip()]
        if live:
            e_y = self.encoder.encode([responses[i] for i in live])
            e_r = self._reference_embeddings([references[i] for i in live])
            cos[live] = np.sum(e_y * e_r, axis=-1)
        return cos

    def score(self, prompts, responses, references):
        cos = self.cosine(responses, references)
        rep = np.array([repeated_ngram_fraction(y, self.ngram) for y in responses], np.float32)
        excess = np.array([length_excess(y, r, self.free_length_ratio) for y, r in zip(responses, references)],
                          np.float32)
        copy = np.array([max(0.0, copied_ngram_fraction(y, _text(x), self.ngram) - self.free_copy_fraction)
                         for x, y in zip(prompts, responses)], np.float32)
        raw = cos - self.repetition_penalty * rep - self.length_penalty * excess - self.copy_penalty * copy
        raw = np.maximum(raw, -1.0)  # empty responses: cos = -1
        return self.scale * raw + self.offset


# ----------------------------------------------------------------------------------------------
# User function rewards ("module:function")
# ----------------------------------------------------------------------------------------------


def load_callable(spec: str) -> Callable:
    """Resolves ``'package.module:function'`` (or ``'path/to/file.py:function'``; the attribute
    may be dotted, e.g. ``'mod:Class.method'``) to a callable, with one-line errors."""
    if not isinstance(spec, str) or spec.count(":") < 1 or not all(spec.rpartition(":")[::2]):
        raise RewardError(
            f"reward function spec {spec!r} is not 'module:function'; expected e.g. "
            "'my_rewards:exact_match' or 'path/to/rewards.py:exact_match'"
        )
    mod_name, _, attr = spec.rpartition(":")
    if mod_name.endswith(".py"):
        path = Path(mod_name).expanduser()
        if not path.is_file():
            raise RewardError(f"reward module file {mod_name!r} (from spec {spec!r}) does not exist")
        name = f"_klq_jax_reward_{abs(hash(str(path.resolve())))}"
        file_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(file_spec)
        try:
            sys.modules[name] = module
            file_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - user code: report in one line
            sys.modules.pop(name, None)
            raise RewardError(f"importing reward module file {mod_name!r} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name is not None and (mod_name == e.name or mod_name.startswith(e.name + ".")):
                raise RewardError(
                    f"reward module {mod_name!r} (from spec {spec!r}) not found; it must be importable "
                    "(on PYTHONPATH) or a path ending in .py"
                ) from None
            raise RewardError(f"importing reward module {mod_name!r} failed: {type(e).__name__}: {e}") from None
        except Exception as e:  # noqa: BLE001 - user code: report in one line
            raise RewardError(f"importing reward module {mod_name!r} failed: {type(e).__name__}: {e}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"reward module {mod_name!r} has no attribute {attr!r} (from spec {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(
            f"reward spec {spec!r} names a {type(obj).__name__}, not a callable; expected a function "
            "f(prompts, responses, references) -> list of floats"
        )
    return obj


class CallableReward(Reward):
    """A user reward ``f(prompts: list[str], responses: list[str], references: list[str | None])
    -> sequence of floats`` (one per response), given as ``'module:function'``.

    For verifiable rewards (exact match, unit tests, ...). The output is checked like every reward:
    wrong count, non-numeric values and NaN/inf are one-line :class:`RewardError`s.
    """

    def __init__(self, spec: str | Callable):
        if callable(spec):
            self.fn, self.name = spec, getattr(spec, "__qualname__", repr(spec))
        else:
            self.fn, self.name = load_callable(spec), spec

    def score(self, prompts, responses, references):
        try:
            out = self.fn(prompts, responses, references)
        except Exception as e:  # noqa: BLE001 - user code: report in one line
            raise RewardError(f"reward function {self.name!r} raised {type(e).__name__}: {e}") from None
        if out is None or isinstance(out, (str, bytes)) or not hasattr(out, "__len__"):
            raise RewardError(
                f"reward function {self.name!r} returned {type(out).__name__}; expected a sequence of "
                f"{len(responses)} floats"
            )
        return out


# ----------------------------------------------------------------------------------------------
# HF sequence-classification reward models (`AutoModelForSequenceClassification` checkpoints, the
# `:hh` / `:tldr` config variants) are `Reward` subclasses too: `klq_jax.reward_models.HFRewardModel`
# (kept in its own module so that this one does not import the causal-LM stack).
# ----------------------------------------------------------------------------------------------


def make_reward(kind: str, **kwargs) -> Reward:
    """``'similarity'`` -> :class:`SimilarityReward`; ``'module:function'`` or ``'file.py:fn'`` ->
    :class:`CallableReward`."""
    if kind == "similarity":
        return SimilarityReward(**kwargs)
    if ":" in str(kind):
        return CallableReward(kind)
    raise RewardError(
        f"unknown reward {kind!r}; accepted: 'similarity' (embedded all-MiniLM-L6-v2) or a function "
        "'module:function'"
    )


__all__ = [
    "CallableReward",
    "Reward",
    "RewardError",
    "SimilarityReward",
    "check_rewards",
    "copied_ngram_fraction",
    "length_excess",
    "load_callable",
    "make_reward",
    "repeated_ngram_fraction",
]
