"""MNIST-1D (Greydanus & Kobak 2020, arXiv 2011.14439), generated locally; MLP, CNN, transformer.

**Data.** ``mnist1d.data.make_dataset(args)`` builds the data set from ten hand-made 1-D templates
by padding, scaling, translating, shearing and adding noise, seeded by ``args.seed``. We call it
with the package's own default arguments (4000 training and 1000 test sequences of length 40,
seed 42) and never call ``mnist1d.data.get_dataset``, which downloads a pickle. Generating the
5000 sequences takes about a second, so we do not cache them on disk: :func:`load` keeps the
arrays in memory for the life of the process (``functools.lru_cache``) and the sha256 of the
arrays is reported with the results, so a different numpy/scipy producing different data would
show. ``make_dataset`` seeds numpy's and Python's *global* random generators; :func:`load` saves
and restores both around the call so that importing data does not change anything else's
randomness.

**Models** (PyTorch's default initialisation from the global RNG):

* :func:`make_mlp` -- ``40-256-256-10`` ReLU;
* :func:`make_cnn` -- the CNN of the MNIST-1D paper: three ``Conv1d`` layers of 25 channels
  (kernel 5 stride 2, then kernel 3 stride 2 twice), ReLU, and a linear read-out of the
  ``25 x 5`` features; 5.2k parameters. It takes flat ``(n, 40)`` inputs.
* :func:`make_transformer` -- the signal read as a sequence of patches (8 patches of 5 samples
  by default), each projected by an ``nn.Linear`` patch embedding, plus a learned positional
  embedding, through pre-norm ``nn.TransformerEncoderLayer`` blocks (``batch_first``, GELU,
  dropout 0), mean-pooled over the patches, a final ``LayerNorm`` and a linear classifier. It
  also takes flat ``(n, 40)`` inputs.

The paper reports about 68 % test accuracy for the MLP and 94 % for the CNN; the benchmark
targets are 0.60 and 0.90. It reports no transformer; the ``mnist1d-transformer`` target, 0.85,
was set from AdamW runs (see its workload in ``experiments/bench_train.py``).
"""

from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

SEQ_LEN = 40
N_CLASSES = 10
DEFAULT_SAMPLES = 5000
DEFAULT_SEED = 42  # the package's default, which the reference data set was made with


@dataclass(frozen=True)
class MNIST1DData:
    """Inputs ``(n, 40)`` float32 (standardised by ``make_dataset``); labels ``(n,)`` int64."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    sha256: str  # of the generated float64 arrays, in the order x, y, x_test, y_test

    def to(self, device: torch.device | str) -> MNIST1DData:
        moved = (t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test))
        return MNIST1DData(*moved, sha256=self.sha256)


@functools.lru_cache(maxsize=4)
def _generate(num_samples: int, seed: int) -> dict[str, Any]:
    # Imported here: mnist1d imports matplotlib.pyplot and scipy, which the command line does not
    # need just to list its flags.
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the mnist1d tasks need the mnist1d package (pip install 'guided-descent[cli]')",
            name=e.name,
        ) from e

    args = get_dataset_args()  # an ObjectView of the default arguments; no file, no network
    args.num_samples = num_samples
    args.seed = seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    digest = hashlib.sha256()
    for key in ("x", "y", "x_test", "y_test"):
        digest.update(np.ascontiguousarray(data[key]).tobytes())
    return {k: data[k] for k in ("x", "y", "x_test", "y_test")} | {"sha256": digest.hexdigest()}


def load(num_samples: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED) -> MNIST1DData:
    """MNIST-1D from ``make_dataset`` with the default arguments (80/20 train/test split).

    ``num_samples`` smaller than 5000 gives the reduced data set of the CI-sized variant.
    """
    if num_samples < 20:
        raise ValueError(f"num_samples must be >= 20, got {num_samples!r}")
    d = _generate(num_samples, seed)

    def x(a: np.ndarray) -> Tensor:
        return torch.tensor(a, dtype=torch.float32)  # a copy: the cached arrays stay untouched

    def y(a: np.ndarray) -> Tensor:
        return torch.tensor(a, dtype=torch.int64)

    return MNIST1DData(x(d["x"]), y(d["y"]), x(d["x_test"]), y(d["y_test"]), d["sha256"])


def make_mlp(hidden: tuple[int, ...] = (256, 256)) -> nn.Sequential:
    """``40 -> hidden... -> 10`` with ReLU."""
    widths = (SEQ_LEN, *hidden)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], N_CLASSES))
    return nn.Sequential(*layers)


def make_cnn(channels: int = 25) -> nn.Sequential:
    """The paper's ConvBase: lengths 40 -> 19 -> 10 -> 5, then ``Linear(channels * 5, 10)``."""
    return nn.Sequential(
        nn.Unflatten(1, (1, SEQ_LEN)),
        nn.Conv1d(1, channels, 5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * 5, N_CLASSES),
    )


def loss_fn(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy (computed in float32 also under autocast)."""
    return F.cross_entropy(logits.float(), labels)


@torch.no_grad()
def scores(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on the whole of ``(x, y)``."""
    logits = model(x).float()
    return float(F.cross_entropy(logits, y)), float((logits.argmax(dim=1) == y).float().mean())


class PatchTransformer(nn.Module):
    """MNIST-1D as a sequence of patches through ``nn.TransformerEncoderLayer`` blocks.

    ``(n, 40)`` -> ``(n, 40 / patch, patch)`` -> patch embedding ``(n, P, d)`` + positional
    embedding -> ``layers`` pre-norm encoder blocks -> mean over the ``P`` patches -> LayerNorm
    -> ``Linear(d, 10)`` logits ``(n, 10)``. Pre-norm blocks, as in ViT, so the final LayerNorm
    normalises the residual stream once before the classifier. Dropout is 0: a training step is a
    function of the weights and the batch only. In ``eval()`` mode without autograd, torch runs
    the blocks through its fused encoder kernel; the results agree with the training-mode path to
    float32 rounding (tested).
    """

    def __init__(self, patch: int = 5, d_model: int = 32, n_head: int = 4, layers: int = 2,
                 ff_mult: int = 4) -> None:
        super().__init__()
        if patch < 1 or SEQ_LEN % patch:
            raise ValueError(f"patch must divide the sequence length {SEQ_LEN}, got {patch!r}")
        if layers < 1 or ff_mult < 1:
            raise ValueError(f"layers and ff_mult must be >= 1, got {layers!r} and {ff_mult!r}")
        if n_head < 1 or d_model % n_head:
            raise ValueError(f"d_model ({d_model!r}) must be a multiple of n_head ({n_head!r})")
        self.patch = patch
        self.embed = nn.Linear(patch, d_model)
        # (P, d), drawn N(0, 0.02^2) as in ViT and GPT-2: small next to the patch embeddings.
        self.pos = nn.Parameter(0.02 * torch.randn(SEQ_LEN // patch, d_model))
        # One layer built per block, not nn.TransformerEncoder: that deep-copies a single layer,
        # so every block would start from the same weights.
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model, n_head, dim_feedforward=ff_mult * d_model, dropout=0.0,
                activation="gelu", batch_first=True, norm_first=True,
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        # Registered last: routing treats the last nn.Linear as the output head.
        self.head = nn.Linear(d_model, N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x.unflatten(1, (-1, self.patch))) + self.pos  # (n, P, d)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h.mean(dim=1)))  # (n, 10)


def make_transformer(patch: int = 5, d_model: int = 32, n_head: int = 4, layers: int = 2,
                     ff_mult: int = 4) -> PatchTransformer:
    """:class:`PatchTransformer` with these sizes (defaults: the ``mnist1d-transformer`` one)."""
    return PatchTransformer(patch, d_model, n_head, layers, ff_mult)


class SequenceGRU(nn.Module):
    """MNIST-1D read by a recurrent network: ``(n, 40)`` -> ``(n, 40 / patch, patch)`` -> an
    ``nn.GRU`` (``layers`` layers, ``hidden`` units) -> its output at the last position ->
    ``Linear(hidden, 10)`` logits.

    The GRU's weight matrices stack three gates each (``weight_ih_l0`` is ``(3 * hidden,
    patch)``); routing splits them into one matrix per gate for the matrix methods.
    """

    def __init__(self, patch: int = 2, hidden: int = 64, layers: int = 1) -> None:
        super().__init__()
        if patch < 1 or SEQ_LEN % patch:
            raise ValueError(f"patch must divide the sequence length {SEQ_LEN}, got {patch!r}")
        if hidden < 1 or layers < 1:
            raise ValueError(f"hidden and layers must be >= 1, got {hidden!r} and {layers!r}")
        self.patch = patch
        self.rnn = nn.GRU(patch, hidden, num_layers=layers, batch_first=True)
        # Registered last: routing treats the last nn.Linear as the output head.
        self.head = nn.Linear(hidden, N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x.unflatten(1, (-1, self.patch)))  # (n, P, hidden)
        return self.head(out[:, -1])  # (n, 10)


def make_gru(patch: int = 2, hidden: int = 64, layers: int = 1) -> SequenceGRU:
    """:class:`SequenceGRU` with these sizes (defaults: the ``mnist1d-gru`` one)."""
    return SequenceGRU(patch, hidden, layers)
