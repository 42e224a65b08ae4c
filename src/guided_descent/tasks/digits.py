"""scikit-learn's 8x8 handwritten digits: an MLP, a small CNN and a deep narrow autoencoder.

The data is ``sklearn.datasets.load_digits``, shipped inside scikit-learn (1797 images, 10
classes, pixel values 0..16): nothing is downloaded. We scale the pixels to [0, 1] and hold out a
fixed, stratified 20 % test split (359 images) drawn from a generator seeded once for all runs,
so every seed and optimizer is scored on the same test images.

Models (PyTorch's default initialisation, drawn from the global RNG: build them under
``torch.random.fork_rng`` with a seed to make the initial weights a function of the seed):

* :func:`make_mlp` -- ``64-256-256-10`` ReLU (the ``digits-mlp`` workload);
* :func:`make_cnn` -- three 3x3 convolutions (16, 32, 32 channels, one 2x2 max-pool) and a
  linear read-out, 19k parameters;
* :func:`make_autoencoder` -- ``64-128-64-32-16-32-64-128-64`` with tanh between layers and a
  linear output, trained on mean squared reconstruction error (``digits-autoencoder``: the deep,
  narrow, badly conditioned network on which Martens & Grosse showed K-FAC's advantage).

Every model takes flat ``(n, 64)`` inputs (the CNN reshapes them itself), so one data layout
serves all three.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

N_CLASSES = 10
N_PIXELS = 64
AUTOENCODER_WIDTHS: tuple[int, ...] = (64, 128, 64, 32, 16, 32, 64, 128, 64)
# The split is fixed for the project, not per run: changing it changes every number reported.
SPLIT_SEED = 0
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DigitsData:
    """Inputs ``(n, 64)`` float32 in [0, 1]; labels ``(n,)`` int64 in 0..9."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    def to(self, device: torch.device | str) -> DigitsData:
        return DigitsData(*(t.to(device) for t in (self.x_train, self.y_train, self.x_test,
                                                     self.y_test)))


def load(test_fraction: float = TEST_FRACTION, split_seed: int = SPLIT_SEED) -> DigitsData:
    """The bundled digits, pixels / 16, split per class (stratified) into train and test."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    # Imported here: the command line imports every experiment to build its flags, and
    # scikit-learn takes about a second to load.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.data.astype(np.float32) / 16.0  # (1797, 64), pixel values 0..16 -> [0, 1]
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(split_seed)
    test = []
    for label in range(N_CLASSES):
        members = np.flatnonzero(y == label)
        test.extend(rng.choice(members, size=round(test_fraction * len(members)), replace=False))
    is_test = np.zeros(len(y), dtype=bool)
    is_test[np.asarray(test)] = True
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    return DigitsData(xt[~is_test], yt[~is_test], xt[is_test], yt[is_test])


def make_mlp(hidden: tuple[int, ...] = (256, 256)) -> nn.Sequential:
    """``64 -> hidden... -> 10`` with ReLU."""
    widths = (N_PIXELS, *hidden)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], N_CLASSES))
    return nn.Sequential(*layers)


def make_cnn(channels: tuple[int, int, int] = (16, 32, 32)) -> nn.Sequential:
    """Flat ``(n, 64)`` -> ``(n, 1, 8, 8)`` -> conv, conv, max-pool to 4x4, conv -> linear."""
    c1, c2, c3 = channels
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, c1, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Conv2d(c2, c3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c3 * 16, N_CLASSES),
    )


def make_autoencoder(widths: tuple[int, ...] = AUTOENCODER_WIDTHS) -> nn.Sequential:
    """Linear layers through ``widths`` with tanh between them and a linear output."""
    if len(widths) < 3 or widths[0] != widths[-1]:
        raise ValueError(f"an autoencoder needs >= 3 widths, first == last, got {widths!r}")
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of ``(n, 10)`` logits against ``(n,)`` labels."""
    return F.cross_entropy(logits.float(), labels)


def reconstruction_loss(output: Tensor, inputs: Tensor) -> Tensor:
    """Mean squared error per pixel."""
    return F.mse_loss(output.float(), inputs)


@torch.no_grad()
def classification_scores(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on the whole of ``(x, y)``."""
    logits = model(x).float()
    return float(F.cross_entropy(logits, y)), float((logits.argmax(dim=1) == y).float().mean())


@torch.no_grad()
def reconstruction_mse(model: nn.Module, x: Tensor) -> float:
    """Mean squared reconstruction error per pixel on the whole of ``x``."""
    return float(F.mse_loss(model(x).float(), x))
