"""Byte-level language modelling on a frozen corpus with the small GPT of :mod:`.gpt`.

**Corpus.** ``guided_descent/data/pystdlib-3.11.7.txt.xz``: the first 10,000,000 bytes of the
sorted ``.py`` sources of CPython 3.11.7's ``Lib/`` (test suites left out), each file preceded by
a ``# ==== path ====`` line; made once by ``scripts/build_corpus.py`` and shipped with the
package under the PSF licence (``PSF-LICENSE.txt`` beside it). The compressed file's sha256 is
checked on every load (:data:`CORPUS_SHA256`), so a run can never silently train on other text.

**Split.** The 10 MB are cut into 64 KiB blocks; every 20th block (blocks 19, 39, ...) is
validation, the rest training: 7 blocks = 458,752 bytes (4.6 %) of validation and 9,541,248
bytes of training text. Interleaved blocks, rather than the last 5 %, keep the validation text
drawn from all of the library (the files are sorted by path, so a tail would be ``xml`` and
``zipfile`` only). Blocks are long enough that a training window rarely straddles a boundary.

**Batches.** A training batch is ``batch`` windows of ``context + 1`` bytes at uniformly random
offsets of the training text (inputs are the first ``context`` bytes, targets the last
``context``), offsets drawn from a seeded generator up front, so the data order is a function of
the seed alone. Validation is a fixed set of windows at evenly spaced offsets of the validation
text; the loss is the mean cross-entropy in nats per byte over all their positions.

**Sizes** (:data:`SIZES`, vocabulary 256, tied head): ``cpu`` 2 layers, width 128, context 128
(0.45M parameters); ``gpu`` 6 layers, width 384, context 512 (10.9M); ``gpt2s`` GPT-2-small's
12 layers, width 768, context 1024 with the byte vocabulary (86.0M).
"""

from __future__ import annotations

import functools
import hashlib
import lzma
from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F
from torch import Tensor

from guided_descent.tasks.gpt import GPT, GPTConfig

CORPUS = "pystdlib-3.11.7.txt.xz"
LICENCE = "PSF-LICENSE.txt"
CORPUS_SHA256 = "bd42279039b5d27ea93144626695c1ed20203912b1328e0d5c99919239fb1b7e"
CORPUS_BYTES = 10_000_000
BLOCK = 1 << 16  # 64 KiB
VAL_EVERY = 20  # every 20th block is validation

SIZES: dict[str, GPTConfig] = {
    "cpu": GPTConfig(vocab_size=256, context=128, n_layer=2, n_head=4, d_model=128),
    "gpu": GPTConfig(vocab_size=256, context=512, n_layer=6, n_head=6, d_model=384),
    "gpt2s": GPTConfig(vocab_size=256, context=1024, n_layer=12, n_head=12, d_model=768),
}


class CorpusError(RuntimeError):
    """The shipped corpus is missing or is not the frozen snapshot."""


def corpus_path() -> resources.abc.Traversable:
    return resources.files("guided_descent") / "data" / CORPUS


@functools.lru_cache(maxsize=1)
def load_corpus() -> bytes:
    """The decompressed corpus (10,000,000 bytes), after checking the compressed file's sha256."""
    path = corpus_path()
    try:
        packed = path.read_bytes()
    except FileNotFoundError:
        raise CorpusError(f"the charlm corpus {CORPUS} is missing from the package") from None
    digest = hashlib.sha256(packed).hexdigest()
    if digest != CORPUS_SHA256:
        raise CorpusError(
            f"{CORPUS} has sha256 {digest}, expected {CORPUS_SHA256}: not the frozen snapshot"
        )
    data = lzma.decompress(packed)
    if len(data) != CORPUS_BYTES:
        raise CorpusError(f"{CORPUS} holds {len(data)} bytes, expected {CORPUS_BYTES}")
    return data


@dataclass(frozen=True)
class Corpus:
    """``train`` and ``val``: 1-D uint8 tensors of bytes."""

    train: Tensor
    val: Tensor

    def to(self, device: torch.device | str) -> Corpus:
        return Corpus(self.train.to(device), self.val.to(device))


def split(data: bytes, block: int = BLOCK, val_every: int = VAL_EVERY) -> Corpus:
    """Blocks ``val_every - 1, 2 * val_every - 1, ...`` of ``block`` bytes to validation."""
    all_bytes = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    n_blocks = -(-len(data) // block)
    is_val = torch.zeros(len(data), dtype=torch.bool)
    for i in range(val_every - 1, n_blocks, val_every):
        is_val[i * block : (i + 1) * block] = True
    return Corpus(all_bytes[~is_val].clone(), all_bytes[is_val].clone())


def load() -> Corpus:
    """The checked corpus, split into training and validation bytes."""
    return split(load_corpus())


def batch_offsets(n_bytes: int, context: int, batch: int, steps: int,
                  generator: torch.Generator) -> Tensor:
    """``(steps, batch)`` int64 start offsets of training windows of ``context + 1`` bytes."""
    high = n_bytes - context - 1
    if high < 1:
        raise ValueError(f"a text of {n_bytes} bytes is too short for context {context}")
    return torch.randint(0, high, (steps, batch), generator=generator)


def windows(text: Tensor, offsets: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """Inputs and targets ``(len(offsets), context)`` int64 from byte windows at ``offsets``."""
    idx = offsets[:, None] + torch.arange(context + 1, device=offsets.device)
    chunk = text[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def val_offsets(n_bytes: int, context: int, count: int) -> Tensor:
    """``count`` evenly spaced window offsets covering the validation text."""
    high = n_bytes - context - 1
    if high < 1:
        raise ValueError(f"a text of {n_bytes} bytes is too short for context {context}")
    return torch.linspace(0, high, count).long()


def loss_fn(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy in nats per byte (in float32, also under bf16 autocast)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: Tensor, y: Tensor, batch: int = 32) -> float:
    """Mean loss over every position of the windows ``(x, y)``, ``batch`` windows at a time."""
    total, count = 0.0, 0
    for start in range(0, x.shape[0], batch):
        xb, yb = x[start : start + batch], y[start : start + batch]
        total += float(loss_fn(model(xb), yb)) * yb.numel()
        count += yb.numel()
    return total / count


def make_model(layout: GPTConfig) -> GPT:
    """The GPT of :mod:`.gpt` (GPT-2 initialisation from the global RNG)."""
    return GPT(layout)
