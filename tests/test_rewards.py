"""Rewards: quality of the embedded similarity reward on held-out pairs, the common interface, and
the one-line errors of CallableReward and the NaN/inf check.

Run with ``pytest -s tests/test_rewards.py`` to see the measured ranking rates.
"""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from klq_jax import rewards
from klq_jax.rewards import CallableReward, RewardError, SimilarityReward, check_rewards

DATA = Path(__file__).resolve().parent.parent / "klq_jax" / "data"
EVAL_SETS = {  # file -> prompt field
    "dialogue_eval.jsonl": "prompt",
    "summarisation_eval.jsonl": "document",
}
N_REPEAT = 10


# ----------------------------------------------------------------------------------------------
# Held-out pairs: good = the eval set's `alternative` answer, scored against the `reference`.
# ----------------------------------------------------------------------------------------------


def _sentences(text: str) -> list[str]:
    return [s for s in (x.strip() for x in re.split(r"(?<=[.!?])\s+", text.strip())) if s]


def degrade_repeat_loop(text: str) -> str:
    """A degenerate loop: the first sentence (or first 8 words of a one-sentence answer) x10."""
    s = _sentences(text)
    phrase = s[0] if len(s) > 1 else " ".join(text.split()[:8])
    return " ".join([phrase] * N_REPEAT)


def degrade_repeat_tail(text: str) -> str:
    """The whole answer, then its last sentence (or last 6 words) repeated 10 more times."""
    s = _sentences(text)
    phrase = s[-1] if len(s) > 1 else " ".join(text.split()[-6:])
    return " ".join([text.strip()] + [phrase] * N_REPEAT)


def degrade_truncate(text: str) -> str:
    return " ".join(text.split()[:3])


DEGRADATIONS = ("repeat_loop", "repeat_tail", "truncate", "other_prompt", "empty")


def degraded_pairs(rows: list[dict]) -> dict[str, list[str]]:
    alts = [r["alternative"] for r in rows]
    n = len(alts)
    shift = max(1, n // 2)  # another prompt's answer, far away in the file (not a neighbour)
    return {
        "repeat_loop": [degrade_repeat_loop(a) for a in alts],
        "repeat_tail": [degrade_repeat_tail(a) for a in alts],
        "truncate": [degrade_truncate(a) for a in alts],
        "other_prompt": [alts[(i + shift) % n] for i in range(n)],
        "empty": [["", "   ", "\n"][i % 3] for i in range(n)],
    }


def ranking_rates(reward, rows: list[dict], prompt_field: str) -> dict[str, float]:
    """Fraction of pairs where reward(good) > reward(degraded), per kind; ``overall`` pools the
    required kinds (a: repeat_loop, repeat_tail; b: truncate; c: other_prompt; d: empty).
    ``copy_prompt`` (the response is the prompt itself, e.g. the whole document for a summary) is
    an extra kind, reported on its own."""
    prompts = [r[prompt_field] for r in rows]
    refs = [r["reference"] for r in rows]
    good = reward(prompts, [r["alternative"] for r in rows], refs)
    rates, wins = {}, []
    for kind, responses in degraded_pairs(rows).items():
        bad = reward(prompts, responses, refs)
        win = good > bad
        rates[kind] = float(win.mean())
        wins.append(win)
    rates["overall"] = float(np.concatenate(wins).mean())
    rates["copy_prompt"] = float(np.mean(good > reward(prompts, prompts, refs)))
    return rates


def _load_eval(name: str) -> list[dict]:
    path = DATA / name
    if not path.is_file():
        pytest.fail(f"eval set {path} is missing")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert rows, f"{path} is empty"
    return rows


# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def similarity(tmp_path_factory):
    from klq_jax.models import bert

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KLQ_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
        try:
            folder = bert.embedded_minilm_path()
        except ModuleNotFoundError as e:
            pytest.skip(str(e))
    return SimilarityReward(_MemoEncoder(bert.SentenceEncoder(folder)))


class _MemoEncoder:
    """Test speed-up: each distinct text is encoded once across all the tests of this module."""

    def __init__(self, encoder):
        self.encoder, self.memo = encoder, {}

    def encode(self, texts):
        todo = list(dict.fromkeys(t for t in texts if t not in self.memo))
        if todo:
            self.memo.update(zip(todo, self.encoder.encode(todo)))
        return np.stack([self.memo[t] for t in texts]) if texts else np.zeros((0, self.encoder.dim), np.float32)


@pytest.mark.parametrize("name", sorted(EVAL_SETS))
def test_similarity_reward_ranks_good_above_degraded(similarity, name):
    rows = _load_eval(name)
    for field in (EVAL_SETS[name], "reference", "alternative"):
        assert all(isinstance(r.get(field), str) and r[field].strip() for r in rows), field
    rates = ranking_rates(similarity, rows, EVAL_SETS[name])
    print(f"\n{name} ({len(rows)} examples): " + ", ".join(f"{k} {v:.3f}" for k, v in rates.items()))
    assert rates["overall"] >= 0.9, rates
    assert rates["empty"] == 1.0, rates
    assert rates["copy_prompt"] >= 0.9, rates


@pytest.mark.parametrize("name", sorted(EVAL_SETS))
def test_pure_cosine_rates_for_reference(similarity, name):
    """The same pairs with every penalty off: what the penalties are for (printed with -s)."""
    rows = _load_eval(name)
    pure = SimilarityReward(similarity.encoder, repetition_penalty=0.0, length_penalty=0.0, copy_penalty=0.0)
    rates = ranking_rates(pure, rows, EVAL_SETS[name])
    print(f"\n{name} pure cosine: " + ", ".join(f"{k} {v:.3f}" for k, v in rates.items()))
    assert rates["overall"] >= 0.9, rates  # similarity alone already ranks most degradations


def test_similarity_reward_interface(similarity):
    prompts = ["Why is the sky blue?"] * 4
    ref = "Blue light is scattered more by air molecules than red light."
    responses = [
        "Air molecules scatter blue light more strongly than red light.",
        "",
        "   ",
        "I like turtles.",
    ]
    out = similarity(prompts, responses, [ref] * 4)
    assert out.dtype == np.float32 and out.shape == (4,)
    assert out[1] == out[2] == pytest.approx(similarity.minimum)
    assert out[0] > out[3] > similarity.minimum
    assert -1.0 <= out.min() and out.max() <= 1.0
    # chat-message prompts are accepted (their text is used for the copy penalty)
    chat = [({"role": "user", "content": p},) for p in prompts]
    np.testing.assert_allclose(similarity(chat, responses, [ref] * 4), out, atol=1e-6)
    assert similarity(prompts[:1], prompts[:1], [ref])[0] < similarity(prompts[:1], responses[:1], [ref])[0]
    # Rescaling is affine; the cached reference embedding gives the same numbers.
    scaled = SimilarityReward(similarity.encoder, scale=5.0, offset=1.0)
    np.testing.assert_allclose(scaled(prompts, responses, [ref] * 4), 5.0 * out + 1.0, rtol=1e-5, atol=1e-5)
    assert similarity([], [], []).shape == (0,)
    with pytest.raises(RewardError, match=r"reference 1 is None") as e:
        similarity(prompts[:2], responses[:2], [ref, None])
    assert "\n" not in str(e.value)
    with pytest.raises(RewardError, match="equal counts"):
        similarity(prompts, responses[:3], [ref] * 4)


def test_penalty_features():
    assert rewards.repeated_ngram_fraction("") == 0.0
    assert rewards.repeated_ngram_fraction("one two three four five") == 0.0
    assert rewards.repeated_ngram_fraction("the cat sat. " * 20) > 0.9
    assert rewards.repeated_ngram_fraction("The Cat sat the cat sat") == pytest.approx(1 - 3 / 4)
    assert rewards.length_excess("a b c d", "x y") == 0.0  # up to twice the reference is free
    assert rewards.length_excess("a " * 8, "x y") == pytest.approx(1.0)  # 4x: one doubling too many
    assert rewards.length_excess("", "x y") == 0.0
    assert rewards.copied_ngram_fraction("Why is the sky blue", "why is the sky blue?") == 1.0
    assert rewards.copied_ngram_fraction("the sky is blue because", "Why is the sky blue?") == 0.0
    assert rewards.copied_ngram_fraction("hi", "hi there you") == 0.0


# ----------------------------------------------------------------------------------------------
# CallableReward and the finiteness check
# ----------------------------------------------------------------------------------------------

USER_MODULE = '''
import math
NOT_CALLABLE = 3

def exact_match(prompts, responses, references):
    return [float(r.strip() == (ref or "").strip()) for r, ref in zip(responses, references)]

def with_nan(prompts, responses, references):
    return [0.0, math.nan, 1.0][: len(responses)]

def with_inf(prompts, responses, references):
    return [0.0, 1.0, -math.inf][: len(responses)]

def too_few(prompts, responses, references):
    return [1.0]

def not_numbers(prompts, responses, references):
    return ["a"] * len(responses)

def raises(prompts, responses, references):
    raise RuntimeError("boom")

class Scorer:
    @staticmethod
    def length(prompts, responses, references):
        return [len(r) for r in responses]
'''


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    (tmp_path / "klq_test_user_rewards.py").write_text(USER_MODULE)
    (tmp_path / "klq_test_broken_rewards.py").write_text("import klq_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_callable_reward_runs(user_module):
    args = (["p1", "p2", "p3"], ["4", "five", " 6 "], ["4", "5", "6"])
    r = CallableReward("klq_test_user_rewards:exact_match")
    out = r(*args)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(CallableReward("klq_test_user_rewards:Scorer.length")(*args), [1, 4, 3])
    by_file = CallableReward(f"{user_module / 'klq_test_user_rewards.py'}:exact_match")
    np.testing.assert_array_equal(by_file(*args), [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(CallableReward(lambda p, y, r: [0.5] * len(y))(*args), [0.5] * 3)
    assert isinstance(rewards.make_reward("klq_test_user_rewards:exact_match"), CallableReward)


@pytest.mark.parametrize("spec, pattern", [
    ("x", r"'x' is not 'module:function'"),
    ("klq_test_user_rewards:", r"is not 'module:function'"),
    (":exact_match", r"is not 'module:function'"),
    ("klq_no_such_module_xyz:f", r"reward module 'klq_no_such_module_xyz' .*not found"),
    ("klq_no_such_pkg_xyz.sub:f", r"reward module 'klq_no_such_pkg_xyz.sub' .*not found"),
    ("klq_test_broken_rewards:f", r"importing reward module 'klq_test_broken_rewards' failed: .*klq_no_such_dependency"),
    ("klq_test_user_rewards:missing", r"has no attribute 'missing'"),
    ("klq_test_user_rewards:NOT_CALLABLE", r"names a int, not a callable"),
    ("/no/such/file.py:f", r"file '/no/such/file.py' .*does not exist"),
])
def test_callable_reward_bad_spec_is_one_line(user_module, spec, pattern):
    with pytest.raises(RewardError, match=pattern) as e:
        CallableReward(spec)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("fn, pattern", [
    ("with_nan", r"returned nan at index 1"),
    ("with_inf", r"returned -inf at index 2"),
    ("too_few", r"returned shape \(1,\); expected .* shape \(3,\)"),
    ("not_numbers", r"non-numeric"),
    ("raises", r"raised RuntimeError: boom"),
])
def test_callable_reward_bad_output_is_one_line(user_module, fn, pattern):
    r = CallableReward(f"klq_test_user_rewards:{fn}")
    with pytest.raises(RewardError, match=pattern) as e:
        r(["p"] * 3, ["a", "b", "c"], [None] * 3)
    assert "\n" not in str(e.value)


def test_check_rewards():
    np.testing.assert_array_equal(check_rewards([1, 2.5], 2, "m"), np.array([1, 2.5], np.float32))
    assert check_rewards(np.ones((3, 1)), 3, "m").shape == (3,)
    with pytest.raises(RewardError, match=r"reward rm returned nan at index 2 \(1 of 4 not finite\)"):
        check_rewards([0.0, 1.0, float("nan"), 2.0], 4, "rm")
    with pytest.raises(RewardError, match=r"returned inf at index 0 \(2 of 2"):
        check_rewards(np.array([np.inf, -np.inf]), 2, "rm")
    with pytest.raises(RewardError, match=r"returned 1e\+39 at index 1"):  # overflows float32
        check_rewards([0.0, 1e39], 2, "rm")


def test_make_reward_unknown():
    with pytest.raises(RewardError, match=r"unknown reward 'bleu'; accepted: 'similarity'"):
        rewards.make_reward("bleu")
