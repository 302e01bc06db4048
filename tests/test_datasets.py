"""Prompt sets: embedded data, local/hub loading, HH and TL;DR formatting, errors, PromptStream."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from klq_jax.data import datasets as D
from klq_jax.data.datasets import DataError, PromptExample, PromptStream, load_prompts


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    assert isinstance(err.value, ValueError)
    return msg


# ------------------------------------------------------------------------------------------------
# Embedded sets


@pytest.mark.parametrize("task", ["dialogue", "summarisation"])
def test_embedded_counts_and_schema(task):
    train = load_prompts("embedded", "train", task)
    ev = load_prompts("embedded", "eval", task)
    assert len(train) >= 200 and len(ev) >= 50
    for ex in train + ev:
        assert isinstance(ex, PromptExample) and isinstance(ex.prompt, str)
        assert ex.prompt.strip() and ex.reference and ex.reference.strip()
    for ex in ev:  # eval lines carry a second, differently worded good answer
        assert ex.alternative and ex.alternative.strip() and ex.alternative != ex.reference
    norm = lambda s: " ".join(s.lower().split())
    train_p = [norm(e.prompt) for e in train]
    eval_p = [norm(e.prompt) for e in ev]
    assert len(set(train_p)) == len(train_p), "duplicate train prompts"
    assert len(set(eval_p)) == len(eval_p), "duplicate eval prompts"
    assert not set(train_p) & set(eval_p), "train/eval overlap"


def test_embedded_raw_files_fields_and_lengths():
    import importlib.resources

    root = importlib.resources.files("klq_jax.data")
    specs = {"dialogue": ("prompt", 60), "summarisation": ("document", 30)}
    for task, (field, max_ref_words) in specs.items():
        for split in ("train", "eval"):
            lines = root.joinpath(f"{task}_{split}.jsonl").read_text(encoding="utf-8").splitlines()
            for line in lines:
                rec = json.loads(line)
                expected = {field, "reference"} | ({"alternative"} if split == "eval" else set())
                assert set(rec) == expected
                assert len(rec["reference"].split()) <= max_ref_words
                if task == "summarisation":
                    assert 60 <= len(rec["document"].split()) <= 150


def test_embedded_split_aliases_and_max_examples():
    assert load_prompts("embedded", "test", "dialogue") == load_prompts("embedded", "eval", "dialogue")
    assert len(load_prompts("embedded", "train", "summarization", max_examples=7)) == 7


def test_to_messages_and_to_text():
    d = load_prompts("embedded", "train", "dialogue", max_examples=1)[0]
    assert D.to_messages(d, "dialogue") == [{"role": "user", "content": d.prompt}]
    s = load_prompts("embedded", "train", "summarisation", max_examples=1)[0]
    (msg,) = D.to_messages(s, "summarisation")
    assert msg["role"] == "user" and s.prompt in msg["content"]
    assert "one sentence" in msg["content"].lower() and msg["content"] != s.prompt
    hh = PromptExample("Hi there?", "Hello!")
    assert D.to_text(hh, "hh") == "\n\nHuman: Hi there?\n\nAssistant:"
    chat = PromptExample(({"role": "user", "content": "x"},), None)
    assert D.to_messages(chat, "dialogue") == [{"role": "user", "content": "x"}]


# ------------------------------------------------------------------------------------------------
# Local files


def test_local_jsonl_and_parquet_with_field_mapping(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}", "extra": i} for i in range(5)]
    for path in (_write_jsonl(tmp_path / "p.jsonl", rows), _write_parquet(tmp_path / "p.parquet", rows)):
        exs = load_prompts(str(path), "train", "dialogue", prompt_field="question",
                           reference_field="answer")
        assert [(e.prompt, e.reference) for e in exs] == [(f"q{i}", f"a{i}") for i in range(5)]
        # reference is optional: without mapping and without a 'reference' column -> None
        exs = load_prompts(str(path), "train", "dialogue", prompt_field="question")
        assert all(e.reference is None for e in exs)


def test_local_json_list_and_split_dict(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"prompt": "x", "reference": "y"}]))
    assert load_prompts(str(p), "train", "dialogue") == [PromptExample("x", "y")]
    p.write_text(json.dumps({"train": [{"prompt": "t"}], "eval": [{"prompt": "e"}]}))
    assert load_prompts(str(p), "eval", "dialogue") == [PromptExample("e", None)]


def test_local_folder_picks_split_files(tmp_path):
    (tmp_path / "data").mkdir()
    _write_parquet(tmp_path / "data" / "train-00000-of-00002.parquet", [{"document": "d1", "reference": "r1"}])
    _write_parquet(tmp_path / "data" / "train-00001-of-00002.parquet", [{"document": "d2", "reference": "r2"}])
    _write_jsonl(tmp_path / "data" / "test.jsonl", [{"document": "d3", "reference": "r3"}])
    train = load_prompts(str(tmp_path), "train", "summarisation")
    assert [e.prompt for e in train] == ["d1", "d2"]
    assert [e.prompt for e in load_prompts(str(tmp_path), "test", "summarisation")] == ["d3"]
    with pytest.raises(DataError) as err:
        load_prompts(str(tmp_path), "validation", "summarisation")
    msg = _one_line(err)
    assert "'validation'" in msg and "'test'" in msg and "'train'" in msg


def test_chat_message_prompts(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "hi"}],
             "completion": [{"role": "assistant", "content": "hello"}]}]
    (ex,) = load_prompts(str(_write_jsonl(tmp_path / "c.jsonl", rows)), "train", "dialogue",
                         reference_field="completion")
    assert ex.is_chat and ex.prompt == ({"role": "user", "content": "hi"},) and ex.reference == "hello"


def test_hub_path_uses_datasets_load_dataset(monkeypatch):
    import datasets

    calls = {}

    def fake_load_dataset(path, name=None, split=None, revision=None):
        calls.update(path=path, name=name, split=split, revision=revision)
        return datasets.Dataset.from_list([{"prompt": "p", "reference": "r"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_prompts("someone/some-set", "test", "dialogue") == [PromptExample("p", "r")]
    assert calls == {"path": "someone/some-set", "name": None, "split": "test", "revision": None}

    def failing(*a, **k):
        raise ConnectionError("Couldn't reach 'someone/some-set' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataError) as err:
        load_prompts("someone/some-set", "train", "dialogue")
    assert "'someone/some-set'" in _one_line(err)


# ------------------------------------------------------------------------------------------------
# Hub formats on local stand-ins


def _hh(*turns):
    return "".join(f"\n\n{speaker}: {text}" for speaker, text in turns)


def test_anthropic_hh_single_turn(tmp_path):
    rows = [
        {"chosen": _hh(("Human", "What is the capital of France?"), ("Assistant", "It is Paris.")),
         "rejected": _hh(("Human", "What is the capital of France?"), ("Assistant", "No idea."))},
        {"chosen": _hh(("Human", "Hi"), ("Assistant", "Hello!"), ("Human", "Tell me a joke"),
                       ("Assistant", "Why did...")),
         "rejected": _hh(("Human", "Hi"), ("Assistant", "Hello!"), ("Human", "Tell me a joke"),
                         ("Assistant", "No."))},
        {"chosen": _hh(("Human", "How do I bake bread?\nI have flour."),
                       ("Assistant", "Mix flour, water,\nyeast and salt.")),
         "rejected": _hh(("Human", "How do I bake bread?\nI have flour."), ("Assistant", "Buy it."))},
        {"chosen": _hh(("Human", "Empty reply?"), ("Assistant", "")),
         "rejected": _hh(("Human", "Empty reply?"), ("Assistant", "x"))},
    ]
    for path in (_write_jsonl(tmp_path / "hh.jsonl", rows), _write_parquet(tmp_path / "hh.parquet", rows)):
        exs = load_prompts(str(path), "train", "hh")
        assert exs == [
            PromptExample("What is the capital of France?", "It is Paris."),
            PromptExample("How do I bake bread?\nI have flour.", "Mix flour, water,\nyeast and salt."),
        ]
    assert D.to_messages(exs[0], "hh") == [{"role": "user", "content": "What is the capital of France?"}]
    assert D.to_text(exs[0], "hh") == "\n\nHuman: What is the capital of France?\n\nAssistant:"


def test_hh_only_multi_turn_is_empty_prompt_set(tmp_path):
    rows = [{"chosen": _hh(("Human", "a"), ("Assistant", "b"), ("Human", "c"), ("Assistant", "d")),
             "rejected": "x"}]
    with pytest.raises(DataError) as err:
        load_prompts(str(_write_jsonl(tmp_path / "hh.jsonl", rows)), "train", "hh")
    msg = _one_line(err)
    assert "empty prompt set" in msg and "one Human turn" in msg


def test_tldr_prompt_completion_style(tmp_path):
    prompt = "SUBREDDIT: r/relationships\n\nTITLE: Help\n\nPOST: My friend forgot my birthday.\n\nTL;DR:"
    rows = [{"prompt": prompt, "completion": " Friend forgot my birthday, should I say something?"}]
    (ex,) = load_prompts(str(_write_parquet(tmp_path / "t.parquet", rows)), "validation", "tldr")
    assert ex.prompt == prompt and ex.prompt.endswith("TL;DR:")
    assert ex.reference == "Friend forgot my birthday, should I say something?"
    assert D.to_text(ex, "tldr") == prompt


def test_tldr_subreddit_title_post_style(tmp_path):
    rows = [{"id": "t3_1", "subreddit": "AskReddit", "title": "Quick question",
             "post": "Should I learn to cook or keep ordering food?", "summary": " Learn to cook? ",
             "query_token": [1, 2, 3]}]
    (ex,) = load_prompts(str(_write_jsonl(tmp_path / "t.jsonl", rows)), "train", "tldr")
    assert ex.prompt == ("SUBREDDIT: r/AskReddit\n\nTITLE: Quick question\n\n"
                         "POST: Should I learn to cook or keep ordering food?\n\nTL;DR:")
    assert ex.reference == "Learn to cook?"


# ------------------------------------------------------------------------------------------------
# Bad input: one clear line each


def test_error_missing_file(tmp_path):
    with pytest.raises(DataError) as err:
        load_prompts(str(tmp_path / "nope.jsonl"), "train", "dialogue")
    msg = _one_line(err)
    assert "nope.jsonl" in msg and "not found" in msg and ".parquet" in msg


def test_error_unknown_format(tmp_path):
    p = tmp_path / "prompts.csv"
    p.write_text("prompt\nhello\n")
    with pytest.raises(DataError) as err:
        load_prompts(str(p), "train", "dialogue")
    msg = _one_line(err)
    assert "'.csv'" in msg and ".jsonl" in msg and ".json" in msg and ".parquet" in msg


def test_error_missing_required_field(tmp_path):
    p = _write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as err:
        load_prompts(str(p), "train", "dialogue")
    msg = _one_line(err)
    assert "'prompt'" in msg and "'question'" in msg and "'answer'" in msg
    with pytest.raises(DataError) as err:  # an explicitly mapped reference field is required
        load_prompts(str(p), "train", "dialogue", prompt_field="question", reference_field="gold")
    msg = _one_line(err)
    assert "'gold'" in msg and "'question'" in msg
    with pytest.raises(DataError) as err:  # HH needs 'chosen'
        load_prompts(str(p), "train", "hh")
    assert "'chosen'" in _one_line(err)
    with pytest.raises(DataError) as err:  # TL;DR needs prompt or subreddit/title/post
        load_prompts(str(p), "train", "tldr")
    msg = _one_line(err)
    assert "'subreddit'" in msg and "'question'" in msg


def test_error_empty_prompt_set(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    with pytest.raises(DataError) as err:
        load_prompts(str(p), "train", "dialogue")
    msg = _one_line(err)
    assert "empty prompt set" in msg and "empty.jsonl" in msg
    p2 = _write_jsonl(tmp_path / "blank.jsonl", [{"prompt": "   "}])
    with pytest.raises(DataError):
        load_prompts(str(p2), "train", "dialogue")
    with pytest.raises(DataError) as err:
        PromptStream([], batch_size=2, seed=0)
    assert "empty prompt set" in _one_line(err)


def test_error_unknown_task_and_split():
    with pytest.raises(DataError) as err:
        load_prompts("embedded", "train", "translation")
    msg = _one_line(err)
    assert "'translation'" in msg and "'dialogue'" in msg and "'summarisation'" in msg
    with pytest.raises(DataError) as err:
        load_prompts("embedded", "train", "hh")
    msg = _one_line(err)
    assert "'hh'" in msg and "Anthropic/hh-rlhf" in msg
    with pytest.raises(DataError) as err:
        load_prompts("embedded", "holdout", "dialogue")
    msg = _one_line(err)
    assert "'holdout'" in msg and "'train'" in msg and "'eval'" in msg


def test_error_malformed_jsonl(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    with pytest.raises(DataError) as err:
        load_prompts(str(p), "train", "dialogue")
    msg = _one_line(err)
    assert "line 2" in msg and "bad.jsonl" in msg


# ------------------------------------------------------------------------------------------------
# PromptStream


def _take(stream, n):
    return [[e for e in stream.next_batch()] for _ in range(n)]


def test_prompt_stream_deterministic_and_covers_epochs():
    items = list(range(10))
    a = _take(PromptStream(items, batch_size=4, seed=3), 10)
    b = _take(PromptStream(items, batch_size=4, seed=3), 10)
    c = _take(PromptStream(items, batch_size=4, seed=4), 10)
    assert a == b and a != c
    assert all(len(batch) == 4 for batch in a)
    flat = [x for batch in a for x in batch]
    for epoch in range(4):  # 40 items = 4 full epochs, each a permutation, orders differ
        assert sorted(flat[epoch * 10:(epoch + 1) * 10]) == items
    assert flat[:10] != flat[10:20]


def test_prompt_stream_resume_equals_uninterrupted():
    items = [f"p{i}" for i in range(13)]
    full = _take(PromptStream(items, batch_size=5, seed=7), 12)
    for cut in (0, 1, 2, 3, 7, 11):
        s = PromptStream(items, batch_size=5, seed=7)
        head = _take(s, cut)
        state = json.loads(json.dumps(s.state()))  # survives serialisation
        resumed = PromptStream(items, batch_size=5, seed=7).restore(state)
        assert head + _take(resumed, 12 - cut) == full
    s = PromptStream(items, batch_size=5, seed=7)
    _take(s, 3)
    assert s.state()["epoch"] == 1 and s.state()["position"] == 2


def test_prompt_stream_batch_larger_than_set_and_iter():
    s = PromptStream(["a", "b", "c"], batch_size=7, seed=0)
    batch = next(iter(s))
    assert len(batch) == 7 and set(batch) == {"a", "b", "c"}
    assert s.state()["epoch"] == 2 and s.state()["position"] == 1


def test_prompt_stream_process_slices_partition_global_batch():
    items = list(range(20))
    whole = _take(PromptStream(items, 8, seed=1), 5)
    parts = [_take(PromptStream(items, 8, seed=1, process_index=i, process_count=4), 5) for i in range(4)]
    for step in range(5):
        assert [x for p in parts for x in p[step]] == whole[step]


def test_prompt_stream_restore_rejects_mismatched_state():
    s = PromptStream(list(range(10)), 2, seed=0)
    for bad in ({"epoch": 0, "position": 0, "seed": 1},
                {"epoch": 0, "position": 0, "num_examples": 11},
                {"epoch": 0, "position": 10},
                {"position": 0}):
        with pytest.raises(DataError) as err:
            s.restore(bad)
        _one_line(err)
    with pytest.raises(DataError):
        PromptStream([1], batch_size=0)
    with pytest.raises(DataError):
        PromptStream([1, 2], batch_size=3, process_count=2)
