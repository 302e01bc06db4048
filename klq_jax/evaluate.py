"""LLM-judge evaluation: pairwise win-rates of policies on held-out prompts.

    python -m klq_jax.evaluate --policies klq=runs/klq/export,ppo=runs/ppo/export,sft=embedded \\
        --prompts embedded:dialogue --judge embedded --out runs/eval

1. Each policy (an HF folder, a hub id, or ``embedded`` = the packaged SmolLM2-135M-Instruct)
   answers the eval split of the prompt set (chat template when the tokenizer has one), greedily
   by default or with ``--temperature``/``--top-p`` sampling, with our jit `Sampler`.
2. For every pair of policies (X, Y) a judge sees each prompt twice, with the responses in both
   orders (X as "A", Y as "B", then swapped), and answers "A" or "B" to a fixed question: which
   response is more helpful, accurate and concise.
3. Per prompt, X scores 1 if preferred in both orders, 0 if Y is, and 0.5 when the verdict follows
   the position (position-inconsistent) or a verdict is unreadable. Reported per pair: the win-rate
   (mean score), a 95% Wilson interval (ties count as half wins; n = prompts) and a bootstrap
   interval over prompts, W/T/L counts, and the position-consistency rate.

Judges:
- ``embedded`` or an HF folder/hub id: a local instruct model run by our Flax code. No sampling: the
  judge's next-token probabilities of "A" vs "B" (incl. the space-prefixed tokens) right after the
  judge prompt; P(A) = p(A) / (p(A) + p(B)). Deterministic.
- ``openai:MODEL``: an OpenAI-compatible ``/chat/completions`` endpoint at ``$OPENAI_BASE_URL``
  (default https://api.openai.com/v1) with ``$OPENAI_API_KEY``, temperature 0; "A"/"B" is parsed
  from the reply.

Outputs in ``--out``: ``responses.jsonl`` (every prompt and each policy's response),
``judgements.jsonl`` (one line per pair and prompt, both orders), ``summary.json``; a table is
printed. Every bad argument is a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
Z95 = 1.959963984540054  # two-sided 95% normal quantile

JUDGE_TEMPLATE = (
    "You are an impartial judge. Compare two responses to the same user request and decide which one "
    "is more helpful, accurate and concise. Ignore the order in which they are shown.\n\n"
    "[User request]\n{request}\n\n"
    "[Response A]\n{response_a}\n\n"
    "[Response B]\n{response_b}\n\n"
    "Which response is better? Answer with a single letter: \"A\" or \"B\"."
)


class EvalError(ValueError):
    """A bad evaluation argument or a failing judge. The message is one line."""


# ----------------------------------------------------------------------------------------------------
# Argument specs.

_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_POLICIES_ACCEPTED = ("accepted: NAME=PATH pairs separated by commas, at least two, unique names of "
                      "letters/digits/._-, PATH an HF model folder, a hub id (org/name) or 'embedded'")


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    name: str
    path: str  # "embedded", a local HF folder or a hub id


def _check_model_ref(ref: str, what: str, accepted: str) -> str:
    ref = ref.strip()
    if ref == "embedded":
        return ref
    p = Path(ref).expanduser()
    if p.is_dir():
        return str(p)
    if p.exists():
        raise EvalError(f"{what} {ref!r} is a file, not a model folder; {accepted}")
    if _HUB_ID.fullmatch(ref) and not ref.startswith((".", "~")):
        return ref  # a hub id, resolved (downloaded) when loaded
    raise EvalError(f"{what} {ref!r} does not exist; {accepted}")


def parse_policies(spec: str) -> list[PolicySpec]:
    """``name1=PATH1,name2=PATH2[,sft=embedded]`` -> `PolicySpec`s; one-line `EvalError` if bad."""
    if not spec or not spec.strip():
        raise EvalError(f"--policies is empty; {_POLICIES_ACCEPTED}")
    out: list[PolicySpec] = []
    for item in spec.split(","):
        item = item.strip()
        name, sep, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise EvalError(f"--policies item {item!r} is not NAME=PATH; {_POLICIES_ACCEPTED}")
        if not _NAME.fullmatch(name):
            raise EvalError(f"--policies name {name!r} has characters other than letters, digits, '.', '_', "
                            f"'-'; {_POLICIES_ACCEPTED}")
        if any(p.name == name for p in out):
            raise EvalError(f"--policies names {name!r} twice; {_POLICIES_ACCEPTED}")
        out.append(PolicySpec(name, _check_model_ref(path, f"--policies {name}: path", _POLICIES_ACCEPTED)))
    if len(out) < 2:
        raise EvalError(f"--policies names {len(out)} policy ({out[0].name}); pairwise evaluation needs at "
                        f"least two; {_POLICIES_ACCEPTED}")
    return out


def parse_prompts(spec: str) -> tuple[str, str]:
    """``SOURCE[:TASK]`` -> (source, task); e.g. ``embedded:dialogue``, ``data/eval.jsonl:summarisation``,
    ``Anthropic/hh-rlhf:hh``. Without a task suffix the task is ``dialogue``."""
    from klq_jax.data.datasets import TASKS, DataError, canonical_task

    spec = (spec or "").strip()
    if not spec:
        raise EvalError("--prompts is empty; accepted: SOURCE[:TASK], e.g. embedded:dialogue")
    source, sep, task = spec.rpartition(":")
    if sep:
        try:
            return source.strip() or "embedded", canonical_task(task)
        except DataError:
            if source.strip() == "embedded":
                raise EvalError(f"--prompts task {task!r} is unknown; accepted: SOURCE[:TASK] with TASK one of "
                                f"{', '.join(TASKS)}") from None
    return spec, "dialogue"


def parse_judge(spec: str) -> tuple[str, str]:
    """``embedded`` | ``openai:MODEL`` | an HF folder or hub id -> (kind, value)."""
    accepted = "accepted: 'embedded', 'openai:MODEL', or an HF instruct-model folder or hub id"
    spec = (spec or "").strip()
    if spec.startswith("openai:"):
        model = spec[len("openai:"):].strip()
        if not model:
            raise EvalError(f"--judge {spec!r} names no model; {accepted}")
        return "openai", model
    if not spec:
        raise EvalError(f"--judge is empty; {accepted}")
    return "local", _check_model_ref(spec, "--judge", accepted)


# ----------------------------------------------------------------------------------------------------
# Verdicts and their combination.


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One judgement of one ordering: `choice` "A", "B" or None (unreadable / exact tie); `p_a` the
    judge's P(A) when it has probabilities; `raw` its reply when it is a text model."""

    choice: str | None
    p_a: float | None = None
    raw: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k == "choice"}


def combine_orders(first: Verdict, swapped: Verdict) -> tuple[float, bool]:
    """Score of X for one prompt from `first` (X shown as A, Y as B) and `swapped` (Y as A, X as B):
    1 if X is preferred in both orders, 0 if Y is, else 0.5; and whether the orders agreed."""
    pref1 = {"A": "X", "B": "Y"}.get(first.choice or "")
    pref2 = {"A": "Y", "B": "X"}.get(swapped.choice or "")
    if pref1 is not None and pref1 == pref2:
        return (1.0 if pref1 == "X" else 0.0), True
    return 0.5, False


def wilson_interval(p_hat: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion `p_hat` observed over `n` trials."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1.0 + z * z / n
    center = (p_hat + z * z / (2 * n)) / denom
    half = z * math.sqrt(p_hat * (1 - p_hat) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def bootstrap_interval(scores: Sequence[float], *, n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-prompt scores (resampling prompts)."""
    x = np.asarray(scores, np.float64)
    if x.size == 0:
        return 0.0, 1.0
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def pair_summary(scores: Sequence[float], consistent: Sequence[bool], *, invalid: int = 0,
                 seed: int = 0) -> dict[str, Any]:
    """Win-rate of X over Y from per-prompt scores in {0, 0.5, 1}."""
    n = len(scores)
    s = np.asarray(scores, np.float64)
    win_rate = float(s.mean()) if n else float("nan")
    return {
        "n": n,
        "wins": int(np.sum(s == 1.0)),
        "ties": int(np.sum(s == 0.5)),
        "losses": int(np.sum(s == 0.0)),
        "win_rate": win_rate,
        "ci95": list(wilson_interval(win_rate, n)) if n else [0.0, 1.0],
        "ci95_bootstrap": list(bootstrap_interval(s, seed=seed)),
        "consistency": float(np.mean(consistent)) if n else float("nan"),
        "invalid_verdicts": int(invalid),
    }


def probability_summary(p_first: Sequence[float], p_swapped: Sequence[float], *, seed: int = 0) -> dict[str, Any]:
    """Extra win-rates for judges with probabilities (secondary to the hard-verdict win-rate).

    p_first[i] = P(A) with X shown as A; p_swapped[i] = P(A) with Y shown as A.
    soft_win_rate: mean of (p_first + 1 - p_swapped) / 2, the judge's order-averaged P(X better).
    debiased_win_rate: X wins a prompt when the judge gives slot A more probability with X in it than
    with Y in it (p_first > p_swapped; equal = 0.5): a position bias common to both orders cancels,
    which matters for small judges that nearly always answer "A".
    """
    p1, p2 = np.asarray(p_first, np.float64), np.asarray(p_swapped, np.float64)
    soft = (p1 + 1.0 - p2) / 2.0
    debiased = np.where(p1 > p2, 1.0, np.where(p1 < p2, 0.0, 0.5))
    n = len(p1)
    rate = float(debiased.mean()) if n else float("nan")
    return {
        "soft_win_rate": float(soft.mean()) if n else float("nan"),
        "soft_ci95_bootstrap": list(bootstrap_interval(soft, seed=seed)),
        "debiased_win_rate": rate,
        "debiased_ci95": list(wilson_interval(rate, n)) if n else [0.0, 1.0],
        "mean_p_a": float(np.concatenate([p1, p2]).mean()) if n else float("nan"),  # position bias: 0.5 = none
    }


_AB_START = re.compile(r"^[\s\W_]*([AB])(?![A-Za-z0-9])")
_AB_NAMED = re.compile(r"\b(?:response|answer|assistant|option|choice)\s*[:(\[]?\s*([AB])(?![A-Za-z0-9])", re.I)
_AB_ANY = re.compile(r"(?<![A-Za-z0-9])([AB])(?![A-Za-z0-9])")


def parse_ab(text: str | None) -> str | None:
    """"A" or "B" from a judge's reply ("A", "**B**", "Response A is better", "Answer: B"), or None."""
    if not text:
        return None
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.S).strip()  # reasoning models
    m = _AB_START.match(text)
    if m:
        return m.group(1)
    m = _AB_NAMED.search(text)
    if m:
        return m.group(1).upper()
    found = set(_AB_ANY.findall(text))
    return found.pop() if len(found) == 1 else None


def judge_prompt(request: str, response_a: str, response_b: str) -> str:
    return JUDGE_TEMPLATE.format(request=request.strip(), response_a=response_a.strip() or "(empty response)",
                                 response_b=response_b.strip() or "(empty response)")


class Judge(Protocol):
    name: str

    def __call__(self, requests: Sequence[str], responses_a: Sequence[str],
                 responses_b: Sequence[str]) -> list[Verdict]:
        ...


def compare_policies(requests: Sequence[str], responses: Mapping[str, Sequence[str]], judge: Judge, *,
                     seed: int = 0, progress: Callable[[str], None] | None = None
                     ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Judge every pair of policies (in the given order) on every prompt, in both orders.

    Returns (judgements, summary): one judgement dict per (pair, prompt) and
    ``{"pairs": [...], "overall": {...}}`` with `pair_summary` fields per pair.
    """
    names = list(responses)
    n = len(requests)
    for name in names:
        if len(responses[name]) != n:
            raise EvalError(f"policy {name!r} has {len(responses[name])} responses for {n} prompts")
    judgements: list[dict[str, Any]] = []
    pairs = []
    per_policy: dict[str, list[float]] = {name: [] for name in names}
    for x, y in itertools.combinations(names, 2):
        if progress:
            progress(f"judging {x} vs {y} on {n} prompts (both orders)")
        first = judge(requests, responses[x], responses[y])
        swapped = judge(requests, responses[y], responses[x])
        scores, consistent, invalid = [], [], 0
        for i in range(n):
            score, agree = combine_orders(first[i], swapped[i])
            invalid += (first[i].choice is None) + (swapped[i].choice is None)
            scores.append(score)
            consistent.append(agree)
            judgements.append({
                "prompt_index": i, "policy": x, "opponent": y, "request": requests[i],
                "response": responses[x][i], "opponent_response": responses[y][i],
                "policy_first": first[i].to_json(), "policy_second": swapped[i].to_json(),
                "score": score, "consistent": agree,
            })
        per_policy[x].extend(scores)
        per_policy[y].extend(1.0 - s for s in scores)
        summary = {"policy": x, "opponent": y, **pair_summary(scores, consistent, invalid=invalid, seed=seed)}
        if all(v.p_a is not None for v in list(first) + list(swapped)):
            summary.update(probability_summary([v.p_a for v in first], [v.p_a for v in swapped], seed=seed))
        pairs.append(summary)
    overall = {}
    for name, s in per_policy.items():  # descriptive: pooled over all opponents
        mean = float(np.mean(s)) if s else float("nan")
        overall[name] = {"n": len(s), "win_rate": mean}
    return judgements, {"pairs": pairs, "overall": overall}


def format_table(summary: Mapping[str, Any]) -> str:
    soft = all("debiased_win_rate" in p for p in summary["pairs"])
    header = ("policy", "opponent", "win-rate", "95% CI (Wilson)", "W/T/L", "consistency", "n")
    rows = [header + (("debiased", "95% CI", "mean P(A)") if soft else ())]
    for p in summary["pairs"]:
        lo, hi = p["ci95"]
        row = (p["policy"], p["opponent"], f"{p['win_rate']:.3f}", f"[{lo:.3f}, {hi:.3f}]",
               f"{p['wins']}/{p['ties']}/{p['losses']}", f"{p['consistency']:.3f}", str(p["n"]))
        if soft:
            dlo, dhi = p["debiased_ci95"]
            row += (f"{p['debiased_win_rate']:.3f}", f"[{dlo:.3f}, {dhi:.3f}]", f"{p['mean_p_a']:.2f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Models: resolving, tokenising, sampling.


def resolve_model_path(ref: str) -> str:
    if ref == "embedded":
        from klq_jax.models.gguf import embedded_smollm2_path
        return str(embedded_smollm2_path())
    return ref


def load_tokenizer(path: str):
    from klq_jax.tokenizer import load_tokenizer as load

    try:
        return load(path)  # torch-free for a folder with tokenizer.json (klq_jax/tokenizer.py)
    except (OSError, ValueError) as e:  # missing or malformed files: one line
        raise EvalError(str(e)) from None


def encode_chat(tokenizer, messages: Sequence[Mapping[str, str]], fallback_text: str | None = None) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template, ready for the assistant's reply;
    without a template, `fallback_text` (or the joined message contents) with the tokenizer's
    usual special tokens."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = fallback_text if fallback_text is not None else "\n\n".join(m["content"] for m in messages)
    return list(tokenizer(text)["input_ids"])


def _eos_ids(tokenizer, model) -> tuple[int, ...]:
    ids = {tokenizer.eos_token_id, model.cfg.eos_token_id}
    return tuple(sorted(i for i in ids if i is not None))


def _check_vocab(tokenizer, model, path: str) -> None:
    if len(tokenizer) > model.cfg.vocab_size:
        raise EvalError(f"tokenizer of {path!r} has {len(tokenizer)} tokens but the model's vocabulary has "
                        f"{model.cfg.vocab_size}; accepted: a tokenizer that fits the model")


def request_text(example, task: str) -> str:
    """The user request as the judge sees it (for chat prompts: the conversation)."""
    from klq_jax.data.datasets import to_messages

    messages = to_messages(example, task)
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def generate_responses(policy_path: str, examples: Sequence[Any], task: str, *, max_new_tokens: int = 128,
                       temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8, seed: int = 0,
                       name: str = "policy") -> list[str]:
    """Responses of the model at `policy_path` ("embedded", HF folder or hub id) to `examples`:
    greedy when `temperature` is 0, else sampled at that temperature (and `top_p`)."""
    from klq_jax.data.datasets import to_messages, to_text
    from klq_jax.models.hf import load_model
    from klq_jax.models.sampler import Sampler, bucket_length

    path = resolve_model_path(policy_path)
    model = load_model(path)
    tokenizer = load_tokenizer(path)
    _check_vocab(tokenizer, model, path)
    prompts = []
    for ex in examples:
        fallback = None if ex.is_chat else to_text(ex, task)
        prompts.append(encode_chat(tokenizer, to_messages(ex, task), fallback))
    context = model.cfg.max_position_embeddings
    longest = max(len(p) for p in prompts)
    prompt_length = bucket_length(longest, 32)
    if prompt_length + max_new_tokens > context:
        prompt_length = longest
    if longest + max_new_tokens > context:
        i = max(range(len(prompts)), key=lambda j: len(prompts[j]))
        raise EvalError(f"policy {name}: prompt {i} has {longest} tokens, plus --max-new-tokens={max_new_tokens} "
                        f"exceeds the context of {context}; accepted: shorter prompts or fewer new tokens")
    eos = _eos_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    greedy = temperature <= 0.0
    sampler = Sampler.for_model(model, eos_ids=eos, pad_id=pad, max_new_tokens=max_new_tokens,
                                temperature=1.0 if greedy else float(temperature), top_k=1 if greedy else 0,
                                top_p=1.0 if greedy else float(top_p))
    state = nnx.state(model)
    rng = jax.random.key(seed)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        real = len(chunk)
        chunk = chunk + [chunk[0]] * (batch_size - real)  # one batch shape: one compilation
        res = sampler(state, chunk, jax.random.fold_in(rng, start), prompt_length=prompt_length)
        tokens = np.asarray(res.tokens_bt[:, res.prompt_len:])
        mask = np.asarray(res.response_mask_bt[:, res.prompt_len:])
        for row in range(real):
            ids = [int(t) for t in tokens[row][mask[row]]]
            while ids and ids[-1] in eos:
                ids.pop()
            out.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return out


# ----------------------------------------------------------------------------------------------------
# Judges.


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _last_token_logprobs(graphdef, state, tokens_bt, mask_bt, candidate_ids):
    """log p(candidate | prompt) at the last (real, left-padded) position: [B, K]."""
    from klq_jax.models.transformer import positions_from_mask

    model = nnx.merge(graphdef, state)
    out = model(tokens_bt, positions_from_mask(mask_bt), mask_bt, return_logits=False)
    h_bd = out.hidden_btd[:, -1]
    w_dv = model.embed_vd[...].T if model.lm_head_dv is None else model.lm_head_dv[...]
    logits_bv = jnp.einsum("bd,dv->bv", h_bd, w_dv.astype(h_bd.dtype), preferred_element_type=jnp.float32)
    return jnp.take(jax.nn.log_softmax(logits_bv, axis=-1), candidate_ids, axis=1)


class LocalJudge:
    """A local HF instruct model as judge, scored by its next-token probabilities of "A" vs "B".

    `path` is "embedded" (SmolLM2-135M-Instruct), an HF folder or a hub id. P(A) sums the
    probabilities of the single-token spellings "A" and " A" (likewise B), normalised over A and B.
    Deterministic: no sampling.
    """

    def __init__(self, path: str = "embedded", *, batch_size: int = 4, bucket: int = 64, model=None, tokenizer=None):
        from klq_jax.models.hf import load_model

        self.name = f"local:{path}"
        resolved = resolve_model_path(path)
        self.model = model if model is not None else load_model(resolved)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(resolved)
        _check_vocab(self.tokenizer, self.model, resolved)
        self.graphdef, self.state = nnx.split(self.model)
        self.batch_size, self.bucket = int(batch_size), int(bucket)
        a_ids, b_ids = self._letter_ids("A"), self._letter_ids("B")
        if not a_ids or not b_ids or set(a_ids) & set(b_ids):
            raise EvalError(f"judge {path!r}: its tokenizer has no single token for 'A' and for 'B'; accepted: a "
                            "tokenizer that encodes the letters A and B as single tokens")
        self.candidate_ids = np.asarray(a_ids + b_ids, np.int32)
        self.num_a = len(a_ids)

    def _letter_ids(self, letter: str) -> list[int]:
        ids = []
        for text in (letter, " " + letter):
            enc = self.tokenizer.encode(text, add_special_tokens=False)
            if len(enc) == 1 and enc[0] not in ids and enc[0] < self.model.cfg.vocab_size:
                ids.append(int(enc[0]))
        return ids

    def encode(self, request: str, response_a: str, response_b: str) -> list[int]:
        content = judge_prompt(request, response_a, response_b)
        return encode_chat(self.tokenizer, [{"role": "user", "content": content}], content + "\nAnswer:")

    def prob_a(self, requests: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]) -> np.ndarray:
        """P(A) (normalised over A and B) for each prompt, and the A+B probability mass: ([N], [N])."""
        from klq_jax.models.sampler import bucket_length

        seqs = [self.encode(r, a, b) for r, a, b in zip(requests, responses_a, responses_b)]
        context = self.model.cfg.max_position_embeddings
        longest = max(len(s) for s in seqs)
        if longest > context:
            raise EvalError(f"judge prompt has {longest} tokens, more than the judge's context of {context}; "
                            "accepted: shorter responses (lower --max-new-tokens) or a judge with a longer context")
        length = min(bucket_length(longest, self.bucket), context)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        p_a, mass = [], []
        for start in range(0, len(seqs), self.batch_size):
            chunk = seqs[start:start + self.batch_size]
            real = len(chunk)
            chunk = chunk + [chunk[0]] * (self.batch_size - real)
            tokens = np.full((len(chunk), length), pad, np.int32)
            mask = np.zeros((len(chunk), length), bool)
            for row, s in enumerate(chunk):
                tokens[row, length - len(s):] = s
                mask[row, length - len(s):] = True
            logp = np.asarray(_last_token_logprobs(self.graphdef, self.state, jnp.asarray(tokens),
                                                   jnp.asarray(mask), jnp.asarray(self.candidate_ids)),
                              np.float64)[:real]
            la = np.logaddexp.reduce(logp[:, :self.num_a], axis=1)
            lb = np.logaddexp.reduce(logp[:, self.num_a:], axis=1)
            p_a.extend(1.0 / (1.0 + np.exp(lb - la)))
            mass.extend(np.exp(np.logaddexp(la, lb)))
        return np.asarray(p_a), np.asarray(mass)

    def __call__(self, requests, responses_a, responses_b) -> list[Verdict]:
        p_a, _ = self.prob_a(requests, responses_a, responses_b)
        return [Verdict("A" if p > 0.5 else "B" if p < 0.5 else None, p_a=float(p)) for p in p_a]


class OpenAIJudge:
    """An OpenAI-compatible chat-completions endpoint as judge (temperature 0), via urllib.

    base_url defaults to `$OPENAI_BASE_URL` or https://api.openai.com/v1; api_key to
    `$OPENAI_API_KEY` (required for api.openai.com, optional for a local server).
    """

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 timeout: float = 60.0, max_retries: int = 3, max_tokens: int = 16, backoff: float = 1.0):
        self.model = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_OPENAI_BASE_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        if not self.api_key and "api.openai.com" in self.base_url:
            raise EvalError("--judge openai:... needs an API key; accepted: OPENAI_API_KEY in the environment "
                            "(or OPENAI_BASE_URL pointing at a local server that needs none)")
        self.url = self.base_url + "/chat/completions"
        self.timeout, self.max_retries, self.max_tokens, self.backoff = timeout, max_retries, max_tokens, backoff
        self.name = f"openai:{model}@{self.base_url}"

    def complete(self, content: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                           "messages": [{"role": "user", "content": content}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = json.loads(resp.read().decode())
                return _reply_text(data, self.url)
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:200].replace("\n", " ")
                last = f"HTTP {e.code} {detail}"
                if e.code != 429 and e.code < 500:
                    break  # a client error will not go away
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except json.JSONDecodeError:
                raise EvalError(f"judge endpoint {self.url} returned non-JSON; accepted: an OpenAI-compatible "
                                "/chat/completions server") from None
            if attempt < self.max_retries:
                time.sleep(self.backoff * 2 ** attempt)
        raise EvalError(f"judge endpoint {self.url} failed ({last}); accepted: a reachable OpenAI-compatible "
                        "server, OPENAI_BASE_URL and OPENAI_API_KEY set")

    def __call__(self, requests, responses_a, responses_b) -> list[Verdict]:
        out = []
        for r, a, b in zip(requests, responses_a, responses_b):
            reply = self.complete(judge_prompt(r, a, b))
            out.append(Verdict(parse_ab(reply), raw=reply))
        return out


def _reply_text(data: Any, url: str) -> str:
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise EvalError(f"judge endpoint {url} replied without choices[0].message.content "
                        f"({json.dumps(data)[:120]}); accepted: an OpenAI-compatible /chat/completions reply") from None
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return content or ""


def make_judge(spec: str, *, batch_size: int = 4) -> Judge:
    kind, value = parse_judge(spec)
    if kind == "openai":
        return OpenAIJudge(value)
    return LocalJudge(value, batch_size=batch_size)


# ----------------------------------------------------------------------------------------------------
# The command.


def run_evaluation(policies: Sequence[PolicySpec], *, prompts: str = "embedded:dialogue",
                   judge: str | Judge = "embedded",
                   out_dir: str | os.PathLike, num_prompts: int | None = None, max_new_tokens: int = 128,
                   temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8, judge_batch_size: int = 4,
                   seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Sample, judge, write responses.jsonl / judgements.jsonl / summary.json in `out_dir`; returns the summary."""
    from klq_jax.data.datasets import load_prompts

    source, task = parse_prompts(prompts)
    if isinstance(judge, str):
        parse_judge(judge)  # fail fast on a bad spec, before sampling
    out = Path(out_dir).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvalError(f"--out {str(out)!r} is not writable ({e.strerror or e}); accepted: a directory this process "
                        "can create") from None
    examples = load_prompts(source, split="eval", task=task)
    if num_prompts is not None:
        examples = examples[:num_prompts]
    if not examples:
        raise EvalError(f"--prompts {prompts!r} has no eval prompts; accepted: a prompt set with an eval split")
    requests = [request_text(ex, task) for ex in examples]
    responses: dict[str, list[str]] = {}
    for p in policies:
        log(f"sampling {len(examples)} responses from {p.name} ({p.path})")
        responses[p.name] = generate_responses(p.path, examples, task, max_new_tokens=max_new_tokens,
                                               temperature=temperature, top_p=top_p, batch_size=batch_size,
                                               seed=seed, name=p.name)
    with open(out / "responses.jsonl", "w", encoding="utf-8") as f:
        for i, ex in enumerate(examples):
            f.write(json.dumps({"prompt_index": i, "request": requests[i], "reference": ex.reference,
                                "responses": {name: r[i] for name, r in responses.items()}}) + "\n")
    judge_obj = make_judge(judge, batch_size=judge_batch_size) if isinstance(judge, str) else judge
    judgements, summary = compare_policies(requests, responses, judge_obj, seed=seed, progress=log)
    with open(out / "judgements.jsonl", "w", encoding="utf-8") as f:
        for j in judgements:
            f.write(json.dumps(j) + "\n")
    summary = {
        "judge": judge_obj.name, "prompts": prompts, "split": "eval", "num_prompts": len(examples),
        "policies": {p.name: p.path for p in policies},
        "decoding": {"greedy": temperature <= 0, "temperature": temperature, "top_p": top_p,
                     "max_new_tokens": max_new_tokens, "seed": seed},
        "scoring": "per prompt: 1 if preferred in both orders, 0 if the opponent is, 0.5 otherwise; "
                   "ci95 = Wilson interval (ties as half wins), ci95_bootstrap = percentile bootstrap over prompts",
        **summary,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(format_table(summary))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m klq_jax.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--policies", required=True,
                   help="NAME=PATH,NAME=PATH[,...]; PATH an HF folder, hub id or 'embedded'")
    p.add_argument("--prompts", default="embedded:dialogue",
                   help="SOURCE[:TASK] (eval split), default embedded:dialogue")
    p.add_argument("--judge", default="embedded", help="'embedded', an HF folder/hub id, or openai:MODEL")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-prompts", type=int, default=None, help="use the first N eval prompts (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8, help="sampling batch size")
    p.add_argument("--judge-batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    return p


class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise _ArgError(message)


def main(argv: Iterable[str] | None = None) -> int:
    parser = build_parser()
    parser.__class__ = _Parser
    try:
        args = parser.parse_args(None if argv is None else list(argv))
        for flag, value in (("--num-prompts", args.num_prompts), ("--max-new-tokens", args.max_new_tokens),
                            ("--batch-size", args.batch_size), ("--judge-batch-size", args.judge_batch_size)):
            if value is not None and value < 1:
                raise EvalError(f"{flag}={value}; accepted: an integer >= 1")
        if args.temperature < 0 or not 0 < args.top_p <= 1:
            raise EvalError(f"--temperature={args.temperature}, --top-p={args.top_p}; accepted: temperature >= 0 "
                            "and 0 < top-p <= 1")
        policies = parse_policies(args.policies)
        parse_prompts(args.prompts)
        parse_judge(args.judge)
        run_evaluation(policies, prompts=args.prompts, judge=args.judge, out_dir=args.out,
                       num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
                       judge_batch_size=args.judge_batch_size, seed=args.seed,
                       log=lambda s: print(s, flush=True))
    except _ArgError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, ImportError, OSError) as e:  # EvalError, DataError, CheckpointError, ModelConfigError, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
