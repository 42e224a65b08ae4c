"""Shared pieces of the AdEMAMix, MARS and ADOPT tests: a problem, a runner and rounding bounds.

Each test module writes its method's reference out densely from the paper; this module only
supplies the gradients, feeds them to any optimizer, and bounds how far two correct computations
of the same trajectory may drift apart by rounding.

Import from a test as ``from elementwise_problem import ...`` (pytest puts ``tests/`` on
``sys.path``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

# Ranks the contract covers (0-d, 1-d, 2-d, 4-d); small enough for float64 references.
SHAPES: tuple[tuple[int, ...], ...] = ((), (7,), (5, 3), (2, 3, 2, 2))


def problem(
    steps: int = 6, seed: int = 0, scale: float = 1.0, dtype: torch.dtype = torch.float64
) -> tuple[list[Tensor], list[list[Tensor]]]:
    """Initial parameters and ``steps`` lists of gradients (standard normal times ``scale``), in
    ``dtype``: values of a lower precision are exactly representable in float64, so a float64
    reference sees exactly what the optimizer saw."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]
    grads = [
        [(scale * torch.randn(s, generator=g, dtype=torch.float64)).to(dtype) for s in SHAPES]
        for _ in range(steps)
    ]
    return params, grads


def run(
    make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    params: Sequence[Tensor],
    grads_per_step: Sequence[Sequence[Tensor]],
) -> tuple[list[Tensor], torch.optim.Optimizer]:
    """Build an optimizer with ``make`` on copies of ``params`` and step it on the gradients
    (fresh copies each step: no optimizer may rely on, or change, the caller's tensors)."""
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = make(ps)
    for grads in grads_per_step:
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps], opt


def drift_bound(
    steps: int, lr: float, update_bound: float, p_max: float, dtype: torch.dtype, roundings: int
) -> float:
    """A bound on |p − p'| after ``steps`` steps of two computations of the same trajectory that
    differ only by rounding (the standard model: every operation errs by a relative u at most).

    Per step, an update whose size is at most ``update_bound`` is computed with at most
    ``roundings`` operations in each computation, each erring by ``u·update_bound`` at most
    (Adam-like updates: an error in m is at most u times the larger of its two terms, and the
    denominator ``sqrt(v̂)`` is at least ``max|g| / sqrt(t)``, so the ratio's error stays within
    a small multiple of u times the update's own bound), hence ``2·roundings·u·lr·update_bound``
    between the two; the decay and the subtraction round ``p`` twice more (``4u·p_max``).
    Nothing is amplified later: gradients are fed, not recomputed, so the trajectories share them.
    """
    u = torch.finfo(dtype).eps / 2
    return steps * (2 * roundings * u * lr * update_bound + 4 * u * p_max)


def adam_update_bound(steps: int, beta2: float) -> float:
    """``|m̂ / sqrt(v̂)| <= sqrt((1 − beta2^t) / ((1 − beta2) beta2^(t−1)))`` for t <= ``steps``.

    Each |g_k| is at most ``sqrt(v_t / ((1 − beta2) beta2^(t−k)))``, and m̂ is a convex
    combination of the g_k; the bound is ≈ sqrt(t) for beta2 near 1.
    """
    return max(
        math.sqrt((1 - beta2**t) / ((1 - beta2) * beta2 ** (t - 1))) for t in range(1, steps + 1)
    )


def max_abs(tensors: Sequence[Tensor]) -> float:
    return max(float(t.abs().max()) if t.numel() else 0.0 for t in tensors)


def assert_close_by(ours: Sequence[Tensor], ref: Sequence[Tensor], atol: float) -> None:
    """Every entry of ``ours`` within ``atol`` of ``ref`` (compared in float64)."""
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        torch.testing.assert_close(
            a.double(), b.double(), rtol=0.0, atol=atol, msg=lambda m, i=i: f"param {i}: {m}"
        )


def bf16_ulp(x: Tensor) -> Tensor:
    """The spacing of bfloat16 numbers at ``|x|`` (8 significant bits), elementwise, in float64."""
    x = x.double().abs().clamp(min=torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(x)) - 7)


@contextmanager
def heavyball_eager():
    """heavyball with its ``torch.compile`` of optimizer internals off (tens of seconds on a
    CPU otherwise); restored afterwards."""
    import heavyball.utils as hb_utils

    names = ("compile_mode", "compile_mode_recommended_to_none")
    saved = {n: getattr(hb_utils, n) for n in names if hasattr(hb_utils, n)}
    try:
        for n in saved:
            setattr(hb_utils, n, None)
        yield
    finally:
        for n, v in saved.items():
            setattr(hb_utils, n, v)
