"""Two moons: scikit-learn's two interleaved half circles, a one-hidden-layer ReLU network.

The pieces the ``moons`` experiment composes:

* :func:`make_data` -- ``sklearn.datasets.make_moons`` plus a seeded train/test split, as float32
  inputs and int64 labels;
* :func:`make_mlp` -- the ``2 -> width -> 2`` ReLU network with PyTorch's default
  ``nn.Linear`` initialisation, drawn from an explicit generator so that no global RNG is touched;
* :func:`batch_indices` -- the minibatch order: back-to-back shuffled epochs;
* :func:`evaluate` -- cross-entropy and accuracy on a whole split;
* :func:`mesh`, :func:`mesh_probability` and :func:`boundary_smoothness` -- the decision boundary
  as ``p(class 1)`` on a grid, and its mean input-gradient norm.

Everything that touches a ``(points, width)`` hidden layer runs in chunks so that width 8192 on a
fine mesh stays at a few tens of MB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Largest number of hidden activations (points x width) one chunk may hold: 2**22 float32 values
# are 16 MB per buffer, and a forward-backward pass keeps a handful of such buffers alive.
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class MoonsData:
    """A train/test split. Inputs are ``(n, 2)`` float32, labels ``(n,)`` int64 in {0, 1}."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    def to(self, device: torch.device | str) -> MoonsData:
        tensors = (self.x_train, self.y_train, self.x_test, self.y_test)
        return MoonsData(*(t.to(device) for t in tensors))


def make_data(
    n_samples: int = 1000, noise: float = 0.3, seed: int = 0, test_fraction: float = 0.2
) -> MoonsData:
    """``make_moons(n_samples, noise, random_state=seed)``, split at random (seeded) in two.

    The split uses its own generator seeded from ``seed`` so that it does not depend on how
    scikit-learn consumes its random state.
    """
    if n_samples < 2:
        raise ValueError(f"n_samples must be >= 2, got {n_samples!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    n_test = round(n_samples * test_fraction)
    if not 0 < n_test < n_samples:
        raise ValueError(
            f"test_fraction {test_fraction} of {n_samples} samples leaves an empty split"
        )
    # Imported here, not at module level: the command line imports every experiment to build its
    # flags, and scikit-learn takes about a second to load.
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=n_samples, noise=noise, random_state=seed)
    # make_moons returns the two moons in blocks (all of class 0, then all of class 1), and its
    # own shuffle depends on its random state; a permutation of our own makes the split random.
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x5E1])).permutation(n_samples)
    test, train = order[:n_test], order[n_test:]
    xt = torch.as_tensor(x, dtype=torch.float32)  # (n, 2) float32; sklearn gives float64
    yt = torch.as_tensor(y, dtype=torch.int64)  # (n,) class indices for cross_entropy
    return MoonsData(xt[train], yt[train], xt[test], yt[test])


def _default_linear_init_(layer: nn.Linear, generator: torch.Generator) -> None:
    """What ``nn.Linear.reset_parameters`` does, with an explicit generator.

    Weight: Kaiming-uniform with ``a = sqrt(5)``, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in));
    bias: the same bound. Drawn in the same order as torch, so that with a generator seeded like
    the global one the result is bit-identical to ``nn.Linear``'s own (a test checks this).
    """
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    bound = 1.0 / math.sqrt(layer.in_features)
    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def make_mlp(
    width: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> nn.Sequential:
    """The ``2 -> width -> 2`` ReLU network, initialised like ``nn.Linear`` from ``generator``.

    Layers are created on the meta device (no memory, no draws from the global RNG), then
    materialised on the CPU, where ``generator`` lives, and moved to ``device``.
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an integer >= 1, got {width!r}")
    model = nn.Sequential(
        nn.Linear(2, width, device="meta"), nn.ReLU(), nn.Linear(width, 2, device="meta")
    )
    model = model.to_empty(device="cpu")
    for layer in (model[0], model[2]):
        _default_linear_init_(layer, generator)
    return model.to(device)


def loss_fn(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of ``(n, 2)`` logits against ``(n,)`` class indices."""
    return F.cross_entropy(logits, labels)


def batch_indices(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Tensor:
    """``(steps, batch_size)`` int64 indices: shuffled epochs laid end to end, then cut in batches.

    Every point is used once per epoch and every batch is full; a batch may straddle two epochs
    (800 points do not divide into batches of 64).
    """
    if batch_size < 1 or steps < 1 or n < 1:
        raise ValueError(f"need n, batch_size, steps >= 1, got {n}, {batch_size}, {steps}")
    needed = steps * batch_size
    epochs = -(-needed // n)  # ceiling division
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(epochs)])
    return order[:needed].view(steps, batch_size)


def _chunk_size(width: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(width, 1))


def _hidden_width(model: nn.Module) -> int:
    return max(p.shape[0] for p in model.parameters() if p.dim() == 2)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``(x, y)``, in chunks, without gradients."""
    chunk = _chunk_size(_hidden_width(model))
    loss_sum, correct = 0.0, 0
    for start in range(0, x.shape[0], chunk):
        logits = model(x[start : start + chunk])
        labels = y[start : start + chunk]
        # Sum, not mean, per chunk so that unequal chunks weigh by their size.
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=1) == labels).sum())
    n = x.shape[0]
    return loss_sum / n, correct / n


def mesh(points: Tensor, resolution: int, margin: float = 0.5) -> tuple[Tensor, Tensor]:
    """A ``resolution x resolution`` grid over the bounding box of ``points`` plus ``margin``.

    Returns ``(xs, ys)``, two ``(resolution,)`` float32 axes; the grid point ``(i, j)`` is
    ``(xs[j], ys[i])`` (row = y, as ``matplotlib.contourf`` expects).
    """
    if resolution < 2:
        raise ValueError(f"resolution must be >= 2, got {resolution!r}")
    lo = points.min(dim=0).values - margin
    hi = points.max(dim=0).values + margin
    xs = torch.linspace(float(lo[0]), float(hi[0]), resolution)
    ys = torch.linspace(float(lo[1]), float(hi[1]), resolution)
    return xs, ys


def _grid_points(xs: Tensor, ys: Tensor) -> Tensor:
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)  # (len(ys)*len(xs), 2)


def _prob_class1(logits: Tensor) -> Tensor:
    # softmax(l)[1] == sigmoid(l1 - l0), and the sigmoid form is stable for large logit gaps.
    return torch.sigmoid(logits[:, 1] - logits[:, 0])


@torch.no_grad()
def mesh_probability(model: nn.Module, xs: Tensor, ys: Tensor) -> Tensor:
    """``p(class 1)`` on the grid spanned by ``xs`` and ``ys``: a ``(len(ys), len(xs))`` tensor."""
    device = next(model.parameters()).device
    points = _grid_points(xs, ys)
    chunk = _chunk_size(_hidden_width(model))
    probs = [
        _prob_class1(model(points[s : s + chunk].to(device))).cpu()
        for s in range(0, points.shape[0], chunk)
    ]
    return torch.cat(probs).view(len(ys), len(xs))


def boundary_smoothness(model: nn.Module, xs: Tensor, ys: Tensor) -> float:
    """Mean of ``||grad_x p(class 1 | x)||`` over the grid: small for a gently varying boundary.

    The network maps each input on its own, so the gradient of the *sum* of ``p`` over a chunk
    with respect to the chunk's inputs gives every point's own input gradient in one backward.
    """
    device = next(model.parameters()).device
    points = _grid_points(xs, ys)
    chunk = _chunk_size(_hidden_width(model))
    total = 0.0
    for s in range(0, points.shape[0], chunk):
        x = points[s : s + chunk].to(device).requires_grad_(True)
        p = _prob_class1(model(x))
        (grad,) = torch.autograd.grad(p.sum(), x)  # (chunk, 2); parameters get no .grad
        total += float(grad.norm(dim=1).sum())
    return total / points.shape[0]


def first_layer_weight(model: nn.Sequential) -> Tensor:
    """The ``(width, 2)`` weight of the input layer (a view, not a copy)."""
    return model[0].weight


def relative_movement(w_final: Tensor, w_init: Tensor) -> float:
    """``||W_T - W_0||_F / ||W_0||_F``: how far training moved a layer, relative to its size."""
    return float((w_final - w_init).norm() / w_init.norm())
