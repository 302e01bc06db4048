"""LLM-judge evaluation: order combination, win-rate and CI math, the both-orders logic with fake
judges, the HTTP judge against a local mock server, the local logprob judge on a tiny random
llama, the end-to-end command on tiny models, and one-line errors for bad arguments."""

import http.server
import json
import string
import threading

import numpy as np
import pytest

from klq_jax.evaluate import (EvalError, LocalJudge, OpenAIJudge, Verdict, bootstrap_interval, combine_orders,
                              compare_policies, main, make_judge, pair_summary, parse_ab, parse_judge,
                              parse_policies, parse_prompts, probability_summary, wilson_interval)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


# ----------------------------------------------------------------------------------------------------
# Math.


def test_combine_orders():
    A, B, U = Verdict("A"), Verdict("B"), Verdict(None)
    assert combine_orders(A, B) == (1.0, True)    # X preferred as A and as B
    assert combine_orders(B, A) == (0.0, True)    # Y preferred in both orders
    assert combine_orders(A, A) == (0.5, False)   # always the first position
    assert combine_orders(B, B) == (0.5, False)   # always the second position
    assert combine_orders(U, B) == (0.5, False)   # unreadable verdict
    assert combine_orders(A, U) == (0.5, False)


def test_wilson_interval_hand_computed():
    # p=0.5, n=10: centre 0.5, half-width z*sqrt(.025 + z^2/400)/(1 + z^2/10) = 0.2634069
    lo, hi = wilson_interval(0.5, 10)
    assert lo == pytest.approx(0.2365931, abs=1e-6) and hi == pytest.approx(0.7634069, abs=1e-6)
    # 16 wins of 20: the textbook Wilson interval [0.5840, 0.9193]
    lo, hi = wilson_interval(0.8, 20)
    assert lo == pytest.approx(0.58399, abs=1e-5) and hi == pytest.approx(0.91935, abs=1e-5)
    # p=0: [0, z^2 / (n + z^2)]
    lo, hi = wilson_interval(0.0, 10)
    assert lo == 0.0 and hi == pytest.approx(3.8414588 / 13.8414588, abs=1e-6)
    assert wilson_interval(0.5, 0) == (0.0, 1.0)


def test_pair_summary_and_bootstrap():
    s = pair_summary([1, 1, 0.5, 0, 1], [True, True, False, True, True], invalid=1)
    assert (s["n"], s["wins"], s["ties"], s["losses"]) == (5, 3, 1, 1)
    assert s["win_rate"] == pytest.approx(0.7) and s["consistency"] == pytest.approx(0.8)
    assert s["ci95"] == pytest.approx(list(wilson_interval(0.7, 5)))
    assert s["invalid_verdicts"] == 1
    assert bootstrap_interval([0.5] * 7) == (0.5, 0.5)
    lo, hi = bootstrap_interval([0.0, 1.0] * 50, seed=1)
    assert 0.38 < lo < 0.45 and 0.55 < hi < 0.62  # ~ 0.5 +- 1.96 * 0.05
    assert bootstrap_interval([0.0, 1.0] * 50, seed=1) == (lo, hi)  # seeded


def test_probability_summary_hand_computed():
    s = probability_summary([0.9, 0.8, 0.6], [0.7, 0.8, 0.9])
    # soft: (0.9 + 0.3) / 2, (0.8 + 0.2) / 2, (0.6 + 0.1) / 2; debiased: win, tie, loss
    assert s["soft_win_rate"] == pytest.approx((0.6 + 0.5 + 0.35) / 3)
    assert s["debiased_win_rate"] == pytest.approx(0.5)
    assert s["debiased_ci95"] == pytest.approx(list(wilson_interval(0.5, 3)))
    assert s["mean_p_a"] == pytest.approx(4.7 / 6)


def test_parse_ab():
    for text, want in [("A", "A"), (" B.", "B"), ("**A**", "A"), ("Response B is better.", "B"),
                       ("Answer: A", "A"), ("I prefer B", "B"), ("<think>A or B?</think>B", "B"),
                       ("Both are fine", None), ("A and B are equal", "A"), ("", None), (None, None),
                       ("I think response A, not B", "A"), ("Between A and B, hard to say", None)]:
        assert parse_ab(text) == want, text


# ----------------------------------------------------------------------------------------------------
# Both orders, with fake judges.

REQUESTS = ["q0", "q1", "q2", "q3", "q4"]
RESPONSES = {"short": ["a", "b", "c", "d", "e"], "long": ["aaaa", "bbbb", "cccc", "dddd", "eeee"],
             "mid": ["aa", "bb", "cc", "dd", "ee"]}


class AlwaysA:
    name = "always-A"

    def __call__(self, requests, a, b):
        return [Verdict("A") for _ in requests]


class PrefersLonger:
    name = "longer"

    def __call__(self, requests, a, b):
        return [Verdict("A" if len(x) > len(y) else "B") for x, y in zip(a, b)]


def test_position_biased_judge_gives_ties_and_zero_consistency():
    judgements, summary = compare_policies(REQUESTS, RESPONSES, AlwaysA())
    assert len(summary["pairs"]) == 3 and len(judgements) == 15
    for p in summary["pairs"]:
        assert p["win_rate"] == 0.5 and p["consistency"] == 0.0 and p["ties"] == 5
    assert all(j["score"] == 0.5 and not j["consistent"] for j in judgements)


def test_consistent_judge_sees_both_orders():
    judgements, summary = compare_policies(REQUESTS, RESPONSES, PrefersLonger())
    by_pair = {(p["policy"], p["opponent"]): p for p in summary["pairs"]}
    assert by_pair[("short", "long")]["win_rate"] == 0.0
    assert by_pair[("short", "mid")]["win_rate"] == 0.0
    assert by_pair[("long", "mid")]["win_rate"] == 1.0
    assert all(p["consistency"] == 1.0 for p in summary["pairs"])
    assert summary["overall"]["long"]["win_rate"] == 1.0 and summary["overall"]["short"]["win_rate"] == 0.0
    j = judgements[0]
    assert j["policy_first"]["choice"] == "B" and j["policy_second"]["choice"] == "A"  # long shown second, then first


# ----------------------------------------------------------------------------------------------------
# The HTTP judge against a local OpenAI-compatible mock.


class _Handler(http.server.BaseHTTPRequestHandler):
    calls: list = []
    fail_first: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append((self.path, self.headers.get("Authorization"), body))
        if self.fail_first:
            code = self.fail_first.pop(0)
            self.send_response(code)
            self.end_headers()
            self.wfile.write(b'{"error": "nope"}')
            return
        prompt = body["messages"][-1]["content"]
        a = prompt.split("[Response A]\n")[1].split("\n\n[Response B]")[0]
        b = prompt.split("[Response B]\n")[1].split("\n\nWhich response")[0]
        reply = "Response A is better." if "good" in a else ("B" if "good" in b else "Hmm, both.")
        data = json.dumps({"id": "x", "object": "chat.completion", "model": body["model"],
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                        "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def mock_server(monkeypatch):
    _Handler.calls, _Handler.fail_first = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    yield server
    server.shutdown()
    server.server_close()


def test_http_judge(mock_server):
    judge = make_judge("openai:mock-model")
    assert isinstance(judge, OpenAIJudge)
    judge.backoff = 0.0
    _Handler.fail_first = [503]  # retried
    verdicts = judge(["q", "q", "q"], ["a good one", "meh", "meh"], ["meh", "a good one", "meh too"])
    assert [v.choice for v in verdicts] == ["A", "B", None]
    assert verdicts[0].raw == "Response A is better."
    path, auth, body = _Handler.calls[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer test-key"
    assert body["model"] == "mock-model" and body["temperature"] == 0
    responses = {"good": ["good answer"] * 3, "bad": ["bad answer"] * 3}
    _, summary = compare_policies(["q"] * 3, responses, judge)
    assert summary["pairs"][0]["win_rate"] == 1.0 and summary["pairs"][0]["consistency"] == 1.0
    _Handler.fail_first = [401]  # a client error is not retried: one-line error
    with pytest.raises(EvalError, match="HTTP 401") as e:
        judge(["q"], ["a"], ["b"])
    assert "\n" not in str(e.value)


def test_http_judge_needs_key_for_openai(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(EvalError, match="OPENAI_API_KEY"):
        make_judge("openai:gpt-4o-mini")


# ----------------------------------------------------------------------------------------------------
# Tiny local models: a random llama and a character-level tokenizer with a chat template.


def _tiny_model_folder(path, seed):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "</s>", "<s>", "<unk>"]
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>",
        chat_template=("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}<s>assistant:{% endif %}"))
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                                   bos_token_id=2, max_position_embeddings=2048)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    return [_tiny_model_folder(tmp_path_factory.mktemp(f"tiny{i}"), seed=i) for i in range(2)]


def test_local_judge_probabilities_are_valid_and_deterministic(tiny_folders):
    judge = LocalJudge(tiny_folders[0], batch_size=2)
    requests = ["How do I boil an egg?", "Why is the sky blue?", "Name a prime."]
    a, b = ["Put it in boiling water for 8 minutes.", "Rayleigh scattering.", "7"], ["No idea.", "It is.", "8"]
    p1, mass = judge.prob_a(requests, a, b)
    p2, _ = judge.prob_a(requests, a, b)
    assert p1.shape == (3,) and np.all((p1 > 0) & (p1 < 1)) and np.all(np.isfinite(p1))
    assert np.all((mass > 0) & (mass <= 1))
    np.testing.assert_array_equal(p1, p2)
    verdicts = judge(requests, a, b)
    assert [v.choice for v in verdicts] == ["A" if p > 0.5 else "B" for p in p1]
    assert all(v.p_a == pytest.approx(p) for v, p in zip(verdicts, p1))
    # Batch composition does not change a prompt's score.
    single, _ = judge.prob_a(requests[1:2], a[1:2], b[1:2])
    np.testing.assert_allclose(single, p1[1:2], rtol=1e-5)


def test_command_end_to_end_on_tiny_models(tiny_folders, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["--policies", f"one={tiny_folders[0]},two={tiny_folders[1]}", "--prompts", "embedded:dialogue",
               "--judge", tiny_folders[0], "--out", str(out), "--num-prompts", "3", "--max-new-tokens", "5",
               "--batch-size", "2", "--judge-batch-size", "2"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_prompts"] == 3 and set(summary["policies"]) == {"one", "two"}
    (pair,) = summary["pairs"]
    assert pair["n"] == 3 and pair["wins"] + pair["ties"] + pair["losses"] == 3
    assert 0 <= pair["ci95"][0] <= pair["win_rate"] <= pair["ci95"][1] <= 1
    assert 0 <= pair["debiased_win_rate"] <= 1 and 0 < pair["mean_p_a"] < 1  # a probability judge
    assert len((out / "judgements.jsonl").read_text().splitlines()) == 3
    responses = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == 3 and set(responses[0]["responses"]) == {"one", "two"}
    assert "win-rate" in printed.out and "consistency" in printed.out


# ----------------------------------------------------------------------------------------------------
# Bad arguments.


@pytest.mark.parametrize("spec,match", [
    ("", "empty"),
    ("klq", "not NAME=PATH"),
    ("klq=", "not NAME=PATH"),
    ("=runs/x", "not NAME=PATH"),
    ("k q=embedded,sft=embedded", "characters"),
    ("sft=embedded,sft=embedded", "twice"),
    ("sft=embedded", "at least two"),
    ("klq=/nonexistent/folder,sft=embedded", "does not exist"),
])
def test_bad_policies_spec(spec, match, capsys, tmp_path):
    with pytest.raises(EvalError, match=match) as e:
        parse_policies(spec)
    assert "\n" not in str(e.value) and "accepted" in str(e.value)
    assert main(["--policies", spec, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_good_specs(tmp_path):
    assert [p.name for p in parse_policies(f"klq={tmp_path}, sft=embedded,ppo=org/model")] == ["klq", "sft", "ppo"]
    assert parse_prompts("embedded:dialogue") == ("embedded", "dialogue")
    assert parse_prompts("data/eval.jsonl:summarization") == ("data/eval.jsonl", "summarisation")
    assert parse_prompts("Anthropic/hh-rlhf") == ("Anthropic/hh-rlhf", "dialogue")
    assert parse_judge("embedded") == ("local", "embedded")
    assert parse_judge("openai:gpt-4o") == ("openai", "gpt-4o")
    with pytest.raises(EvalError, match="unknown"):
        parse_prompts("embedded:poetry")
    with pytest.raises(EvalError, match="names no model"):
        parse_judge("openai:")


def test_bad_flags_are_one_line(capsys, tmp_path):
    assert main(["--policies", "a=embedded,b=embedded", "--out", str(tmp_path), "--num-prompts", "0"]) == 2
    assert "--num-prompts=0" in capsys.readouterr().err
    assert main(["--out", str(tmp_path)]) == 2  # missing --policies
    err = capsys.readouterr().err
    assert "--policies" in err and err.count("\n") == 1
